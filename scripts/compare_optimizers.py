"""Compare optimizers on one supervised task: same seed, same epochs and batch size, one run each.

    python scripts/compare_optimizers.py --task mnist_autoencoder --optimizers sgd adam kfac ekfac ekfac_ra
    python scripts/compare_optimizers.py --task cifar10_vgg11 --epochs 3 --optimizers sgd adam kfac ekfac
    python scripts/compare_optimizers.py --task mnist_autoencoder --report     # redo plot and table from the logs

Writes to --out (default runs/compare/TASK): one run folder per optimizer (as scripts/supervised.py),
loss.png (training loss against epochs and against wall-clock, the EKFAC paper's figures) and results.md, the
markdown table: final and best training loss (trailing mean of 10 steps), wall-clock to reach the target loss
(--target, default Adam's final loss when Adam runs, else the highest final loss), seconds per epoch, and the
evaluation metrics of the last epoch.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agents.supervised.data import DatasetFilesMissingError  # noqa: E402
from agents.supervised.runner import TASKS, get_task, load_task_data, train_run  # noqa: E402
from agents.supervised.training import OPTIMIZER_NAMES  # noqa: E402
from scripts.supervised import add_run_arguments, run_options  # noqa: E402

SMOOTHING = 10


def read_steps(run_dir: Path) -> dict[str, np.ndarray]:
    """steps.csv of a run as arrays, with the trailing-mean loss ``smooth``."""
    with (run_dir / "steps.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise ValueError(f"{run_dir / 'steps.csv'} holds no steps")
    loss = np.array([float(r["loss"]) for r in rows])
    cumulative = np.cumsum(np.insert(loss, 0, 0.0))
    counts = np.minimum(np.arange(1, len(loss) + 1), SMOOTHING)
    smooth = (cumulative[1:] - cumulative[np.arange(1, len(loss) + 1) - counts]) / counts
    return {
        "step": np.array([int(r["step"]) for r in rows]),
        "epoch": np.array([int(r["epoch"]) for r in rows]),
        "loss": loss,
        "smooth": smooth,
        "seconds": np.array([float(r["wall_clock_s"]) for r in rows]),
    }


def steps_per_epoch(run_dir: Path) -> int:
    """Full minibatches per epoch of a run, from its config.yml (a run capped by --max-seconds may end mid-epoch)."""
    import yaml

    config = yaml.safe_load((run_dir / "config.yml").read_text())
    return max(1, int(config["train_examples"]) // int(config["batch_size"]))


def read_epochs(run_dir: Path) -> list[dict[str, float]]:
    with (run_dir / "epochs.csv").open() as handle:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)]


def summarize(runs: dict[str, Path], target: float | None) -> tuple[str, float]:
    """The markdown table and the target loss it used."""
    data = {name: read_steps(path) for name, path in runs.items()}
    finals = {name: float(d["smooth"][-1]) for name, d in data.items()}
    if target is None:
        target = finals["adam"] if "adam" in finals else max(finals.values())
    lines = [
        f"| optimizer | final training loss | best training loss | wall-clock to {target:.4g} (s) | steps to it "
        "| s / epoch | last-epoch evaluation |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, d in data.items():
        reached = np.nonzero(d["smooth"] <= target)[0]
        when = f"{d['seconds'][reached[0]]:.1f}" if len(reached) else "not reached"
        steps = f"{d['step'][reached[0]]}" if len(reached) else "-"
        per_epoch = d["seconds"][-1] / (len(d["step"]) / steps_per_epoch(runs[name]))
        last = read_epochs(runs[name])[-1]
        evaluation = ", ".join(f"{k[5:]} {v:.4g}" for k, v in last.items() if k.startswith("eval_"))
        lines.append(
            f"| {name} | {finals[name]:.4g} | {d['smooth'].min():.4g} | {when} | {steps} | {per_epoch:.1f} "
            f"| {evaluation} |"
        )
    return "\n".join(lines), target


def plot(runs: dict[str, Path], task: str, target: float, path: Path) -> None:
    """Training loss (trailing mean) against epochs and against wall-clock seconds, one line per optimizer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_epoch, by_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, run_dir in runs.items():
        d = read_steps(run_dir)
        by_epoch.plot(d["step"] / steps_per_epoch(run_dir), d["smooth"], label=name)
        by_time.plot(d["seconds"], d["smooth"], label=name)
    for ax, label in ((by_epoch, "epochs"), (by_time, "training wall-clock (s)")):
        ax.axhline(target, color="gray", linestyle=":", linewidth=1)
        ax.set_xlabel(label)
        ax.set_ylabel(f"training loss (mean of last {SMOOTHING} steps)")
        ax.set_yscale("log")
        ax.legend()
    fig.suptitle(f"{task}: {TASKS[task].description}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser)
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZER_NAMES), choices=list(OPTIMIZER_NAMES))
    parser.add_argument("--target", type=float, default=None, help="target training loss for the time column")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--report", action="store_true", help="only rebuild loss.png and results.md from --out")
    args = parser.parse_args(argv)
    out = args.out or ROOT / "runs" / "compare" / args.task
    runs = {name: out / name for name in args.optimizers}
    if args.report:
        missing = [str(p) for p in runs.values() if not (p / "steps.csv").is_file()]
        if missing:
            print(f"error: no run logs in {', '.join(missing)}", file=sys.stderr)
            return 2
    else:
        options = run_options(args)
        try:
            data = load_task_data(get_task(args.task), options["data_dir"])
            for name, run_dir in runs.items():
                summary: dict[str, Any] = train_run(args.task, name, log_dir=run_dir, data=data, **options)
                print(json.dumps(summary), flush=True)
        except (DatasetFilesMissingError, ValueError, FileNotFoundError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    table, target = summarize(runs, args.target)
    (out / "results.md").write_text(table + "\n")
    plot(runs, args.task, target, out / "loss.png")
    print(table)
    print(f"wrote {out / 'results.md'} and {out / 'loss.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
