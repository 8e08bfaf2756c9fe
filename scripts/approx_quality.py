"""How close each optimizer's update is to the exact natural gradient during training (Wu et al. 2024's indicator).

    python scripts/approx_quality.py                         # MNIST MLP and CIFAR-10 CNN, every method
    python scripts/approx_quality.py --tasks mnist_mlp --steps 300 --every 25 --damping-sweep
    python scripts/approx_quality.py --quick --out-dir /tmp/aq   # a few seconds: the tests run this

One trajectory per task is trained with Adam (lr --trajectory-lr). At every step each stateful method (Adam, the
K-FAC and EKFAC variants) is put at the trajectory's parameters and steps on the trajectory's batch, so its state
(factors, eigenbases, moments) is the one it would have built along that trajectory; every --every steps the update
of every method on that batch, at those parameters, is scored with ``acktr_kfe.approximation_quality``: gamma
relative to SGD's (1 = SGD, lower = closer to the natural gradient; the exact natural gradient is the lowest).
All methods are scored at the same parameters on the same batches.

Methods: ``natural-gradient`` (the lowest gamma any update can reach on the batch, ``1 / sqrt(g^T F^+ g)``,
from ``acktr_kfe.quality.natural_gradient_gamma``'s output-space form: exact when the N C x P output Jacobian has
full row rank, a lower bound otherwise; scored with ``sgd``), ``sgd`` (the batch gradient: 1 by definition, a
check), ``adam`` (the trajectory's own step), ``ef``,
``sf``, ``ief`` (acktr_kfe.exact, absolute damping --exact-damping on the per-example scale), and
``kfac-<curvature>`` / ``ekfac-<curvature>`` for curvature empirical, fisher and ief: the library's optimizers
with their default damping (relative 1e-2), factor and eigenbasis intervals, but ``step_norm="natural"`` and no
momentum, so that the update scored is the preconditioned gradient ``F_hat^-1 g`` itself (--kronecker-interval 1
refreshes their curvature every step, to separate the curvature's quality from its staleness); and ``ekfac-default``,
``EKFAC(model)`` with every default (empirical curvature, Adam-length steps by layer, momentum 0.9), the step a
drop-in user takes.

--damping-sweep also scores EF, SF and iEF for each damping in --sweep-dampings at the steps --sweep-steps
(the paper's robustness-to-damping comparison).

Writes to --out-dir (default runs/approx_quality): gamma.csv (task, method, step, relative gamma, gamma, SGD's
gamma, trajectory loss, milliseconds to produce the update), gamma.png (relative gamma against steps, one panel
per task), gamma.md (the table: median over the scored steps, first and last), and with --damping-sweep
damping.csv, damping.png and a second table in gamma.md.
Data: --data-dir (default ../shared/datasets from the repository root) holds mnist/ (IDX files) and
cifar-10-batches-py/; without them a synthetic set of the same shape is used and a note is printed.
"""

from __future__ import annotations

import argparse
import copy
import csv
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import acktr_kfe  # noqa: E402
from acktr_kfe.exact import EF, IEF, SF  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "datasets"
CURVATURES = ("empirical", "fisher", "ief")
KRONECKER = (*(f"{kind}-{c}" for kind in acktr_kfe.available_preconditioners() for c in CURVATURES), "ekfac-default")
EXACT = ("ef", "sf", "ief")
METHODS = ("sgd", "adam", *EXACT, *KRONECKER)
NATURAL = "natural-gradient"


@dataclass
class Task:
    """One model and its data."""

    name: str
    build: Callable[[], nn.Module]
    inputs: Tensor
    targets: Tensor
    source: str


class SmallCNN(nn.Sequential):
    """Three 3x3 convolutions (16, 32, 32 channels) with ReLU and 2x2 max-pooling, then a linear classifier:
    19,466 parameters, small enough for exact per-example methods at batch 128."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, classes),
        )


def load_tasks(names: list[str], data_dir: Path, hidden: int, quick: bool) -> list[Task]:
    """The requested tasks, from --data-dir or synthetic with a printed note."""
    from agents.supervised.data import DatasetFilesMissingError, load_cifar10, load_mnist

    tasks = []
    generator = torch.Generator().manual_seed(0)
    for name in names:
        if name == "mnist_mlp":
            try:
                images, labels = load_mnist(data_dir / "mnist", "train")
                source = "MNIST train"
            except DatasetFilesMissingError:
                print(f"note: MNIST not found under {data_dir / 'mnist'}; using a synthetic 784-pixel set")
                labels = torch.randint(10, (4000,), generator=generator)
                prototypes = torch.rand(10, 784, generator=generator)
                images = (prototypes[labels] + 0.3 * torch.rand(4000, 784, generator=generator)).clamp(0, 1)
                source = "synthetic (MNIST absent)"
            if quick:
                images, labels = images[:2000], labels[:2000]

            def mlp() -> nn.Module:
                return nn.Sequential(nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, 10))

            tasks.append(Task(name, mlp, images, labels, source))
        elif name == "cifar_cnn":
            try:
                images, labels = load_cifar10(data_dir, "train")
                source = "CIFAR-10 train (the batches present)"
            except DatasetFilesMissingError:
                print(f"note: CIFAR-10 not found under {data_dir}; using a synthetic 3x32x32 set")
                labels = torch.randint(10, (4000,), generator=generator)
                prototypes = torch.randn(10, 3, 32, 32, generator=generator)
                images = prototypes[labels] + torch.randn(4000, 3, 32, 32, generator=generator)
                source = "synthetic (CIFAR-10 absent)"
            if quick:
                images, labels = images[:2000], labels[:2000]
            tasks.append(Task(name, SmallCNN, images, labels, source))
        else:
            raise ValueError(f"Invalid task: {name!r}. Valid values: 'mnist_mlp', 'cifar_cnn'")
    return tasks


def kronecker_optimizer(
    method: str,
    model: nn.Module,
    interval: int | None,
    factor_decay: float | None = None,
    damping: float | None = None,
) -> torch.optim.Optimizer:
    """The K-FAC / EKFAC variant named ``method`` on ``model``; ``interval`` replaces the factor, eigenbasis and
    (EKFAC) scale update intervals, ``factor_decay`` the factors' running-average decay and ``damping`` the
    (relative) damping of every variant but ``ekfac-default`` (``None``: the library's defaults)."""
    kind, curvature = method.split("-", 1)
    if curvature == "default":
        return acktr_kfe.EKFAC(model)
    intervals = {}
    if interval is not None:
        intervals = {"factor_update_interval": interval, "eigen_update_interval": interval}
        if kind == "ekfac":
            intervals["scale_update_interval"] = interval
    if factor_decay is not None:
        intervals["factor_decay"] = factor_decay
    if damping is not None:
        intervals["damping"] = damping
    cls = acktr_kfe.preconditioner_class(kind)
    return cls(model, lr=1e-3, momentum=0.0, step_norm="natural", curvature=curvature, **intervals)


def kronecker_step(method: str, optimizer, model: nn.Module, batch: tuple[Tensor, Tensor]) -> None:
    """One training step with the curvature backward its curvature source needs (README's table)."""
    curvature = "empirical" if method.endswith("default") else method.split("-", 1)[1]
    inputs, targets = batch
    optimizer.zero_grad()
    logits = model(inputs)
    if curvature == "fisher":
        optimizer.curvature_backward(acktr_kfe.softmax_fisher_loss(logits), retain_graph=True)
    loss = F.cross_entropy(logits, targets)
    if curvature == "ief":
        optimizer.curvature_backward(loss, logits=logits, accumulate_grad=True)
    else:
        loss.backward()
    optimizer.step()


def load_parameters(model: nn.Module, values: list[Tensor]) -> None:
    with torch.no_grad():
        for p, v in zip(model.parameters(), values):
            p.copy_(v)


def exact_direction(method: str, model: nn.Module, damping: float, batch, seed: int) -> list[Tensor]:
    """The update of the exact method on the batch (``D``, to be subtracted)."""
    if method == "ef":
        return EF(model, F.cross_entropy, damping=damping).direction(*batch)
    if method == "ief":
        return IEF(model, F.cross_entropy, damping=damping).direction(*batch)
    generator = torch.Generator().manual_seed(seed)
    return SF(model, F.cross_entropy, damping=damping, generator=generator).direction(*batch)


def run_task(task: Task, args: argparse.Namespace, methods: list[str]) -> tuple[list[dict], list[dict]]:
    """Train the trajectory and score every method; the rows of gamma.csv and of damping.csv."""
    torch.manual_seed(args.seed)
    model = task.build()
    adam = torch.optim.Adam(model.parameters(), lr=args.trajectory_lr)
    shadows: dict[str, tuple[nn.Module, torch.optim.Optimizer]] = {}
    for method in methods:
        if method in KRONECKER:
            copy_ = copy.deepcopy(model)
            shadows[method] = (
                copy_,
                kronecker_optimizer(
                    method, copy_, args.kronecker_interval, args.kronecker_factor_decay, args.kronecker_damping
                ),
            )
    generator = torch.Generator().manual_seed(args.seed + 1)
    rows: list[dict] = []
    sweep: list[dict] = []
    scored = set(range(0, args.steps, args.every)) | {args.steps - 1}
    for step in range(args.steps):
        index = torch.randint(task.inputs.shape[0], (args.batch_size,), generator=generator)
        batch = (task.inputs[index], task.targets[index])
        theta = [p.detach().clone() for p in model.parameters()]
        score = step in scored
        updates: dict[str, tuple[list[Tensor], float]] = {}
        for method, (shadow, optimizer) in shadows.items():
            load_parameters(shadow, theta)
            start = time.perf_counter()
            kronecker_step(method, optimizer, shadow, batch)
            elapsed = (time.perf_counter() - start) * 1e3
            if score:
                updates[method] = (acktr_kfe.parameter_change(theta, shadow), elapsed)
        if score:
            for method in methods:
                if method in EXACT:
                    start = time.perf_counter()
                    direction = exact_direction(method, model, args.exact_damping, batch, args.seed + step)
                    updates[method] = (direction, (time.perf_counter() - start) * 1e3)
                elif method == "sgd":
                    start = time.perf_counter()
                    loss = F.cross_entropy(model(batch[0]), batch[1])
                    grads = torch.autograd.grad(loss, list(model.parameters()))
                    updates[method] = ([g.detach() for g in grads], (time.perf_counter() - start) * 1e3)
            if args.damping_sweep and step in args.sweep_steps_resolved:
                for method in EXACT:
                    for damping in args.sweep_dampings:
                        direction = exact_direction(method, model, damping, batch, args.seed + step)
                        quality = acktr_kfe.approximation_quality(model, F.cross_entropy, batch, direction)
                        sweep.append(
                            {
                                "task": task.name,
                                "method": method,
                                "step": step,
                                "damping": damping,
                                "relative": quality.relative,
                            }
                        )
        with torch.no_grad():
            trajectory_loss = float(F.cross_entropy(model(batch[0]), batch[1]))
        adam.zero_grad()
        start = time.perf_counter()
        F.cross_entropy(model(batch[0]), batch[1]).backward()
        adam.step()
        elapsed = (time.perf_counter() - start) * 1e3
        if score and "adam" in methods:
            updates["adam"] = (acktr_kfe.parameter_change(theta, model), elapsed)
        if score:
            after = [p.detach().clone() for p in model.parameters()]
            load_parameters(model, theta)
            for method in methods:
                update, milliseconds = updates[method]
                natural = method == "sgd"  # the natural gradient's gamma once per step, beside SGD's
                quality = acktr_kfe.approximation_quality(
                    model, F.cross_entropy, batch, update, natural_gradient=natural
                )
                row = {
                    "task": task.name,
                    "method": method,
                    "step": step,
                    "relative": quality.relative,
                    "gamma": quality.gamma,
                    "gamma_sgd": quality.gamma_sgd,
                    "loss": trajectory_loss,
                    "ms": milliseconds,
                }
                rows.append(row)
                if natural:
                    bound = quality.gamma_natural
                    rows.append(
                        {**row, "method": NATURAL, "relative": quality.relative_natural, "gamma": bound, "ms": math.nan}
                    )
            load_parameters(model, after)
            line = "  ".join(
                f"{r['method']} {r['relative']:.3g}" for r in rows if r["step"] == step and r["task"] == task.name
            )
            print(f"[{task.name}] step {step} loss {trajectory_loss:.3f}: {line}", flush=True)
    return rows, sweep


def write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot(rows: list[dict], sweep: list[dict], out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.2), squeeze=False)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    colors = plt.get_cmap("tab20")
    for axis, task in zip(axes[0], tasks):
        for index, method in enumerate(methods):
            points = [(r["step"], r["relative"]) for r in rows if r["task"] == task and r["method"] == method]
            style = "--" if method.startswith("kfac") else (":" if method.startswith("ekfac") else "-")
            axis.plot(*zip(*points), style, marker=".", color=colors(index % 20), label=method)
        axis.set_yscale("log")
        axis.set_title(task)
        axis.set_xlabel("training step (Adam trajectory)")
    axes[0][0].set_ylabel("gamma / gamma_SGD (lower: closer to natural gradient)")
    axes[0][-1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out_dir / "gamma.png", dpi=110)
    plt.close(fig)
    if not sweep:
        return
    panels = sorted({(r["task"], r["step"]) for r in sweep}, key=lambda k: (tasks.index(k[0]), k[1]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6), squeeze=False)
    for axis, (task, step) in zip(axes[0], panels):
        for method in EXACT:
            points = [
                (r["damping"], r["relative"])
                for r in sweep
                if r["task"] == task and r["step"] == step and r["method"] == method
            ]
            axis.plot(*zip(*points), marker="o", label=method)
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_title(f"{task}, step {step}")
        axis.set_xlabel("damping (per-example scale)")
    axes[0][0].set_ylabel("gamma / gamma_SGD")
    axes[0][-1].legend()
    fig.tight_layout()
    fig.savefig(out_dir / "damping.png", dpi=110)
    plt.close(fig)


def markdown(rows: list[dict], sweep: list[dict], header: str) -> str:
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = [
        header,
        "",
        "Relative gamma (gamma / gamma_SGD; 1 = SGD, lower = closer to the exact natural gradient):",
        "median over the scored steps (first step -> last step), and the median time to produce the update.",
        "",
    ]
    lines.append("| method | " + " | ".join(f"{t}: median (first -> last) | {t}: ms/update" for t in tasks) + " |")
    lines.append("|---|" + "---|---|" * len(tasks))
    for method in methods:
        cells = []
        for task in tasks:
            mine = [r for r in rows if r["task"] == task and r["method"] == method]
            values = [r["relative"] for r in mine]
            cells.append(f"{statistics.median(values):.3g} ({values[0]:.3g} -> {values[-1]:.3g})")
            times = [r["ms"] for r in mine if math.isfinite(r["ms"])]
            cells.append(f"{statistics.median(times):.1f}" if times else "-")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    if sweep:
        dampings = sorted({r["damping"] for r in sweep})
        lines += ["", "Damping sweep (exact methods): relative gamma against damping at fixed steps.", ""]
        lines.append("| task | step | method | " + " | ".join(f"{d:g}" for d in dampings) + " |")
        lines.append("|---|---|---|" + "---|" * len(dampings))
        for task, step in sorted({(r["task"], r["step"]) for r in sweep}, key=lambda k: (tasks.index(k[0]), k[1])):
            for method in EXACT:
                by_damping = {
                    r["damping"]: r["relative"]
                    for r in sweep
                    if r["task"] == task and r["step"] == step and r["method"] == method
                }
                lines.append(
                    f"| {task} | {step} | {method} | " + " | ".join(f"{by_damping[d]:.3g}" for d in dampings) + " |"
                )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["mnist_mlp", "cifar_cnn"], choices=["mnist_mlp", "cifar_cnn"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--steps", type=int, default=200, help="trajectory length")
    parser.add_argument("--every", type=int, default=20, help="score every this many steps (and the last)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=100, help="MNIST MLP hidden units")
    parser.add_argument("--trajectory-lr", type=float, default=1e-3, help="Adam's learning rate on the trajectory")
    parser.add_argument("--exact-damping", type=float, default=1e-4, help="EF/SF/iEF damping (per-example scale)")
    parser.add_argument(
        "--kronecker-interval",
        type=int,
        default=None,
        help="K-FAC/EKFAC factor, eigenbasis and scale update interval (default: the library's 10/20, 100, 20)",
    )
    parser.add_argument(
        "--kronecker-factor-decay",
        type=float,
        default=None,
        help="K-FAC/EKFAC factor running-average decay (default: the library's 0.95; 0: the current batch only)",
    )
    parser.add_argument(
        "--kronecker-damping",
        type=float,
        default=None,
        help="K-FAC/EKFAC damping, relative to each block's curvature norm (default: the library's 1e-2)",
    )
    parser.add_argument("--damping-sweep", action="store_true", help="score EF/SF/iEF across --sweep-dampings")
    parser.add_argument("--sweep-dampings", type=float, nargs="+", default=[1e-8, 1e-6, 1e-4, 1e-2, 1.0])
    parser.add_argument(
        "--sweep-steps",
        type=int,
        nargs="+",
        default=None,
        help="steps of the sweep (default: the first and the last scored step)",
    )
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out-dir", type=Path, default=ROOT / "runs" / "approx_quality")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--quick", action="store_true", help="a few seconds: MNIST MLP, 4 steps, batch 32")
    args = parser.parse_args(argv)
    if args.quick:
        args.tasks, args.steps, args.every, args.batch_size, args.hidden = ["mnist_mlp"], 4, 2, 32, 32
        args.damping_sweep, args.sweep_dampings, args.sweep_steps = True, [1e-4, 1e-1], [0]
    if args.steps < 1 or args.every < 1 or args.batch_size < 2:
        parser.error("--steps and --every must be >= 1 and --batch-size >= 2")
    args.sweep_steps_resolved = set(args.sweep_steps if args.sweep_steps is not None else [0, args.steps - 1])
    args.sweep_steps_resolved = {s for s in args.sweep_steps_resolved if s < args.steps}
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    tasks = load_tasks(args.tasks, args.data_dir, args.hidden, args.quick)
    rows: list[dict] = []
    sweep: list[dict] = []
    start = time.perf_counter()
    for task in tasks:
        print(
            f"{task.name}: {task.source}, {task.inputs.shape[0]} examples, "
            f"{sum(p.numel() for p in task.build().parameters())} parameters",
            flush=True,
        )
        task_rows, task_sweep = run_task(task, args, args.methods)
        rows += task_rows
        sweep += task_sweep
    seconds = time.perf_counter() - start
    write_csv(args.out_dir / "gamma.csv", rows)
    if sweep:
        write_csv(args.out_dir / "damping.csv", sweep)
    plot(rows, sweep, args.out_dir)
    command = "python scripts/approx_quality.py " + " ".join(sys.argv[1:] if argv is None else argv)
    header = (
        f"Command: `{command.strip()}`; {seconds:.0f} s on {platform.machine()} with {args.threads} torch "
        f"thread(s), torch {torch.__version__}, {time.strftime('%Y-%m-%d', time.gmtime())}. Data: "
        + "; ".join(f"{t.name}: {t.source}" for t in tasks)
        + f". K-FAC/EKFAC update intervals: {args.kronecker_interval or 'library defaults'}, factor decay: "
        + f"{'library default' if args.kronecker_factor_decay is None else args.kronecker_factor_decay}, damping: "
        + f"{'library default' if args.kronecker_damping is None else args.kronecker_damping}"
        + f". Trajectory: Adam lr {args.trajectory_lr}, batch {args.batch_size}, {args.steps} steps, scored every "
        f"{args.every}; exact methods' damping {args.exact_damping:g}."
    )
    (args.out_dir / "gamma.md").write_text(markdown(rows, sweep, header))
    print(markdown(rows, sweep, header))
    print(f"wrote {args.out_dir / 'gamma.csv'}, gamma.png, gamma.md" + (", damping.csv, damping.png" if sweep else ""))
    if any(not math.isfinite(r["relative"]) for r in rows):
        print("note: some updates had no component along the gradient (relative gamma inf)")
    return rows


if __name__ == "__main__":
    main()
