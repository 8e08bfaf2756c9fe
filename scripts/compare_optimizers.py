"""Compare optimizers on one supervised task: same seed, same epochs and batch size, one run each.

    python scripts/compare_optimizers.py --task mnist_autoencoder --optimizers sgd adam kfac ekfac ekfac_ra
    python scripts/compare_optimizers.py --task cifar10_vgg11 --epochs 3 --optimizers sgd adam kfac ekfac
    python scripts/compare_optimizers.py --task mnist_autoencoder --report     # redo plot and table from the logs

Writes to --out (default runs/compare/TASK): one run folder per optimizer (as scripts/supervised.py),
loss.png (training loss against epochs and against wall-clock, the EKFAC paper's figures) and results.md, the
markdown table: final and best training loss (trailing mean of 10 steps), wall-clock to reach the target loss
(--target, default Adam's final loss when Adam runs, else the highest final loss), seconds per epoch, and the
evaluation metrics of the last epoch. An optimizer whose loss turns NaN or infinite is a result too: its row
says "diverged at step N", its curve stops there, and the comparison goes on with the next optimizer.
--out must be a new (or empty) folder; --report rebuilds the plot and table of an existing one.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agents.run_folder import RunFolderError, RunLock, atomic_write_text, refuse_existing_run, temporary_path  # noqa: E402
from agents.supervised.data import DatasetFilesMissingError  # noqa: E402
from agents.supervised.runner import TASKS, TrainingDivergedError, get_task, load_task_data, train_run  # noqa: E402
from agents.supervised.training import OPTIMIZER_NAMES  # noqa: E402
from scripts.supervised import add_run_arguments, run_options  # noqa: E402

SMOOTHING = 10


def read_steps(run_dir: Path) -> dict[str, np.ndarray]:
    """steps.csv of a run as arrays, with the trailing-mean loss ``smooth``."""
    with (run_dir / "steps.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    if not rows and diverged_at(run_dir) is None:
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


def diverged_at(run_dir: Path) -> int | None:
    """The step at which a run's loss stopped being finite (its ``diverged.json``), or ``None``."""
    path = run_dir / "diverged.json"
    if not path.is_file():
        return None
    try:
        return int(json.loads(path.read_text())["step"])
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path} is corrupted ({type(error).__name__}: {error})") from None


def steps_per_epoch(run_dir: Path) -> int:
    """Full minibatches per epoch of a run, from its config.yml (a run capped by --max-seconds may end mid-epoch)."""
    import yaml

    config = yaml.safe_load((run_dir / "config.yml").read_text())
    return max(1, int(config["train_examples"]) // int(config["batch_size"]))


def read_epochs(run_dir: Path) -> list[dict[str, float]]:
    with (run_dir / "epochs.csv").open() as handle:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)]


def summarize(runs: dict[str, Path], target: float | None) -> tuple[str, float | None]:
    """The markdown table and the target loss it used (``None`` when every run diverged)."""
    data = {name: read_steps(path) for name, path in runs.items()}
    diverged = {name: diverged_at(path) for name, path in runs.items()}
    finals = {name: float(d["smooth"][-1]) for name, d in data.items() if diverged[name] is None}
    if target is None and finals:
        target = finals["adam"] if "adam" in finals else max(finals.values())
    shown = f"{target:.4g}" if target is not None else "the target"
    lines = [
        f"| optimizer | final training loss | best training loss | wall-clock to {shown} (s) | steps to it "
        "| s / epoch | last-epoch evaluation |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, d in data.items():
        reached = np.nonzero(d["smooth"] <= target)[0] if target is not None and len(d["step"]) else []
        when = f"{d['seconds'][reached[0]]:.1f}" if len(reached) else "not reached"
        steps = f"{d['step'][reached[0]]}" if len(reached) else "-"
        done = len(d["step"])
        per_epoch = f"{d['seconds'][-1] / (done / steps_per_epoch(runs[name])):.1f}" if done else "-"
        epochs = read_epochs(runs[name])
        evaluation = (
            ", ".join(f"{k[5:]} {v:.4g}" for k, v in epochs[-1].items() if k.startswith("eval_")) if epochs else "-"
        )
        final = f"{finals[name]:.4g}" if diverged[name] is None else f"diverged at step {diverged[name]}"
        best = f"{d['smooth'].min():.4g}" if done else "-"
        lines.append(f"| {name} | {final} | {best} | {when} | {steps} | {per_epoch} | {evaluation} |")
    return "\n".join(lines), target


def plot(runs: dict[str, Path], task: str, target: float | None, path: Path) -> None:
    """Training loss (trailing mean) against epochs and against wall-clock seconds, one line per optimizer; a
    diverged run's line stops at its last finite step, marked with an x. Written atomically to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_epoch, by_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, run_dir in runs.items():
        d = read_steps(run_dir)
        step = diverged_at(run_dir)
        label = name if step is None else f"{name} (diverged at step {step})"
        for ax, x in ((by_epoch, d["step"] / steps_per_epoch(run_dir)), (by_time, d["seconds"])):
            (line,) = ax.plot(x, d["smooth"], label=label)
            if step is not None and len(x):
                ax.plot(x[-1:], d["smooth"][-1:], "x", color=line.get_color(), markersize=9)
    for ax, label in ((by_epoch, "epochs"), (by_time, "training wall-clock (s)")):
        if target is not None:
            ax.axhline(target, color="gray", linestyle=":", linewidth=1)
        ax.set_xlabel(label)
        ax.set_ylabel(f"training loss (mean of last {SMOOTHING} steps)")
        ax.set_yscale("log")
        ax.legend()
    fig.suptitle(f"{task}: {TASKS[task].description}")
    fig.tight_layout()
    temporary = temporary_path(path, path.suffix)
    fig.savefig(temporary, dpi=100)
    plt.close(fig)
    os.replace(temporary, path)


def report(runs: dict[str, Path], task: str, target: float | None, out: Path) -> None:
    """Write results.md and loss.png from the runs' logs, and print the table."""
    table, target = summarize(runs, target)
    atomic_write_text(out / "results.md", table + "\n")
    plot(runs, task, target, out / "loss.png")
    print(table)
    print(f"wrote {out / 'results.md'} and {out / 'loss.png'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser)
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZER_NAMES), choices=list(OPTIMIZER_NAMES))
    parser.add_argument("--target", type=float, default=None, help="target training loss for the time column")
    parser.add_argument("--out", type=Path, default=None, help="a new folder (default runs/compare/TASK)")
    parser.add_argument("--config", type=Path, default=None, help="settings file (default configs/supervised.yml)")
    parser.add_argument("--report", action="store_true", help="only rebuild loss.png and results.md from --out")
    args = parser.parse_args(argv)
    if len(set(args.optimizers)) != len(args.optimizers):
        parser.error(f"--optimizers names one twice: {' '.join(args.optimizers)}")
    if args.target is not None and not (np.isfinite(args.target) and args.target > 0):
        parser.error(f"--target must be a finite number > 0, got {args.target}")
    out = args.out or ROOT / "runs" / "compare" / args.task
    runs = {name: out / name for name in args.optimizers}
    try:
        if args.report:
            missing = [name for name, path in runs.items() if not (path / "steps.csv").is_file()]
            if missing:
                present = [name for name in runs if name not in missing]
                hint = f"; the ones with logs: --optimizers {' '.join(present)}" if present else ""
                print(f"error: no run logs in {out} for {', '.join(missing)}{hint}", file=sys.stderr)
                return 2
            with RunLock(out):
                report(runs, args.task, args.target, out)
            return 0
        refuse_existing_run(out, flag="--out", resume_hint="To redo only its table and plot, add --report.")
        options = run_options(args)
        data = load_task_data(get_task(args.task), options["data_dir"])
        with RunLock(out):
            for name, run_dir in runs.items():
                try:
                    summary: dict[str, Any] = train_run(
                        args.task, name, log_dir=run_dir, data=data, config_path=args.config, log_dir_flag="--out",
                        **options,
                    )  # fmt: skip
                    print(json.dumps(summary), flush=True)
                except TrainingDivergedError as diverged:
                    where = (
                        f"in {args.config}"
                        if args.config
                        else "in a copy of configs/supervised.yml passed with --config FILE"
                    )
                    print(
                        f"{diverged}. Recorded as diverged at step {diverged.step}; the comparison goes on. To "
                        f"change its settings, edit {args.task}.optimizers.{name} {where}, and run again with a "
                        "fresh --out.",
                        flush=True,
                    )
            report(runs, args.task, args.target, out)
    except (DatasetFilesMissingError, ValueError, FileNotFoundError, RunFolderError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
