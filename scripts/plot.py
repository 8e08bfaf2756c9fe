"""Learning curves from the run folders of scripts/train.py: return against environment steps, as a PNG.

One line per algorithm (and preconditioner), the mean over seeds with the min-max spread shaded; the curves
come from the TensorBoard scalar ``rollout/ep_rew_mean`` that SB3 logs every update.

    python scripts/plot.py runs/ --out runs/learning_curves.png
    python scripts/plot.py runs/CartPole-v1_acktr_seed0 runs/CartPole-v1_a2c_seed0 --out cartpole.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import yaml

TAG = "rollout/ep_rew_mean"


def find_runs(paths: list[Path]) -> list[Path]:
    """Run folders (holding config.yml and tb/) among the paths and their subfolders."""
    runs = set()
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"no such run folder: {path}")
        candidates = [path, *path.rglob("*")] if path.is_dir() else []
        runs.update(c for c in candidates if (c / "config.yml").is_file() and (c / "tb").is_dir())
    return sorted(runs)


def read_curve(run: Path, tag: str = TAG) -> tuple[np.ndarray, np.ndarray]:
    """Steps and values of one scalar across a run's TensorBoard event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps, values = [], []
    for events in sorted({p.parent for p in (run / "tb").rglob("events.out.tfevents.*")}):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        if tag in accumulator.Tags().get("scalars", []):
            for event in accumulator.Scalars(tag):
                steps.append(event.step)
                values.append(event.value)
    order = np.argsort(steps, kind="stable")
    return np.asarray(steps)[order], np.asarray(values)[order]


def label_of(run: Path) -> str:
    config = yaml.safe_load((run / "config.yml").read_text())
    label = str(config.get("algo", "?")).upper()
    preconditioner = config.get("preconditioner") or (config.get("policy_kwargs") or {}).get("preconditioner")
    if preconditioner and config.get("algo") != "acktr":
        label += f"+{preconditioner.upper()}"
    elif preconditioner:
        label += f" ({preconditioner.upper()})"
    return f"{label} on {config.get('env', '?')}"


def plot(runs: list[Path], out: Path, tag: str = TAG) -> dict[str, int]:
    """Draw the curves; returns the number of runs behind each line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for run in runs:
        steps, values = read_curve(run, tag)
        if len(steps):
            groups.setdefault(label_of(run), []).append((steps, values))
    if not groups:
        raise ValueError(f"none of the {len(runs)} runs logged {tag!r}")
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for label, curves in sorted(groups.items()):
        grid = np.linspace(0, min(s[-1] for s, _ in curves), 200)
        stacked = np.stack([np.interp(grid, s, v) for s, v in curves])
        axis.plot(grid, stacked.mean(0), label=f"{label} ({len(curves)} seed{'s' if len(curves) > 1 else ''})")
        if len(curves) > 1:
            axis.fill_between(grid, stacked.min(0), stacked.max(0), alpha=0.2)
    axis.set(xlabel="environment steps", ylabel="episode return (mean of last 100)", title="Learning curves")
    axis.legend()
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=120)
    plt.close(figure)
    return {label: len(curves) for label, curves in groups.items()}


def main(argv: list[str] | None = None) -> dict[str, int]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="run folders, or folders that hold them")
    parser.add_argument("--out", type=Path, default=Path("learning_curves.png"))
    parser.add_argument("--tag", default=TAG, help=f"TensorBoard scalar to plot (default {TAG})")
    args = parser.parse_args(argv)
    try:
        runs = find_runs(args.paths)
    except FileNotFoundError as error:
        parser.error(str(error))
    if not runs:
        parser.error(f"no run folders (with config.yml and tb/) under {[str(p) for p in args.paths]}")
    counts = plot(runs, args.out, args.tag)
    listed = (f"{label} ({n} run{'s' if n != 1 else ''})" for label, n in sorted(counts.items()))
    print(f"{args.out}: " + ", ".join(listed))
    return counts


if __name__ == "__main__":
    try:
        main()
    except ValueError as failure:
        sys.exit(f"error: {failure}")
