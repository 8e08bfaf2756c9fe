"""Drop-in benchmark: ``EKFAC(model)`` and ``KFAC(model)`` with every default, in the plain loop, against Adam and SGD.

Each task is written as a new user would write it (PyTorch's default initialization, ``zero_grad``,
``loss.backward()``, ``step()``, nothing else). For each optimizer it prints the training loss after N steps (the
mean of the last 10 minibatch losses), whether the run diverged (a non-finite loss, or a loss 100 times its
first value), and the time per step, as a markdown table; with ``--out`` it also writes the table and a PNG of
the loss curves there.

    python scripts/bench_dropin.py                         # every task, a few minutes on a 2-core CPU
    python scripts/bench_dropin.py --validation             # the tasks kept apart from the choice of defaults
    python scripts/bench_dropin.py --tasks regression --optimizers adam ekfac --steps 100
    python scripts/bench_dropin.py --ekfac-kwargs '{"damping": 0.03}'    # a sweep point

The MNIST and CIFAR-10 tasks read ``--data-dir`` (default ``../shared/datasets``); without the files they train on
synthetic images of the same shape and say so.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import acktr_kfe  # noqa: E402
from agents.supervised.data import DatasetFilesMissingError, load_cifar10, load_mnist  # noqa: E402
from agents.supervised.models import MNISTAutoencoder, autoencoder_loss  # noqa: E402

OPTIMIZERS = ("adam", "sgd", *acktr_kfe.available_preconditioners())


@dataclass
class Task:
    """One drop-in task: a model factory, a batch sampler and a mean training loss."""

    name: str
    model: Callable[[], nn.Module]
    batch: Callable[[torch.Generator], tuple[Tensor, Tensor]]
    loss: Callable[[Tensor, Tensor], Tensor]
    steps: int
    data: str
    validation: bool = False


def _sampler(inputs: Tensor, targets: Tensor, batch_size: int) -> Callable[[torch.Generator], tuple[Tensor, Tensor]]:
    def sample(generator: torch.Generator) -> tuple[Tensor, Tensor]:
        index = torch.randint(inputs.shape[0], (batch_size,), generator=generator)
        return inputs[index], targets[index]

    return sample


def _mnist(data_dir: Path) -> tuple[Tensor, Tensor, str]:
    try:
        images, labels = load_mnist(data_dir / "mnist", "train")
        return images, labels, "MNIST train files"
    except DatasetFilesMissingError:
        generator = torch.Generator().manual_seed(0)
        labels = torch.randint(10, (4000,), generator=generator)
        prototypes = torch.rand(10, 784, generator=generator)
        images = (prototypes[labels] + 0.3 * torch.rand(4000, 784, generator=generator)).clamp(0, 1)
        return images, labels, "synthetic (MNIST files absent)"


def _cifar(data_dir: Path) -> tuple[Tensor, Tensor, str]:
    try:
        images, labels = load_cifar10(data_dir, "train")
        return images, labels, "CIFAR-10 subset"
    except DatasetFilesMissingError:
        generator = torch.Generator().manual_seed(0)
        labels = torch.randint(10, (4000,), generator=generator)
        prototypes = torch.randn(10, 3, 32, 32, generator=generator)
        images = prototypes[labels] + torch.randn(4000, 3, 32, 32, generator=generator)
        return images, labels, "synthetic (CIFAR-10 files absent)"


class SmallCNN(nn.Sequential):
    """Three 3x3 convolutions with ReLU and max-pooling, then a two-layer classifier (PyTorch default init)."""

    def __init__(self, channels: int = 3, classes: int = 10) -> None:
        super().__init__(
            nn.Conv2d(channels, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, 128),
            nn.ReLU(),
            nn.Linear(128, classes),
        )


def _regression_data() -> tuple[Tensor, Tensor]:
    """A smooth nonlinear target of 8 inputs with unit-scale noise-free outputs, plus 0.1 noise."""
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(8192, 8, generator=generator)
    mixing = torch.randn(8, 4, generator=generator)
    hidden = inputs @ mixing
    targets = torch.sin(hidden[:, :1]) + hidden[:, 1:2] * torch.tanh(hidden[:, 2:3]) + 0.5 * hidden[:, 3:4]
    targets = targets + 0.1 * torch.randn(targets.shape, generator=generator)
    return inputs, targets


def _mnist_test(data_dir: Path) -> tuple[Tensor, Tensor, str]:
    try:
        images, labels = load_mnist(data_dir / "mnist", "test")
        return images, labels, "MNIST test files"
    except DatasetFilesMissingError:
        return _mnist(data_dir)


def _cifar_test(data_dir: Path) -> tuple[Tensor, Tensor, str]:
    try:
        images, labels = load_cifar10(data_dir, "test")
        return images, labels, "CIFAR-10 test batch"
    except DatasetFilesMissingError:
        return _cifar(data_dir)


def validation_tasks(data_dir: Path) -> list[Task]:
    """Tasks kept apart from the choice of the defaults (run with ``--validation``): written after the defaults were
    fixed, never tuned on. They add what the tuned-on set lacks: BatchNorm, LayerNorm, GELU and dropout, a target
    in units of 100, a ReLU autoencoder; the image tasks read the test splits."""
    mnist_images, mnist_labels, mnist_source = _mnist_test(data_dir)
    cifar_images, cifar_labels, cifar_source = _cifar_test(data_dir)
    generator = torch.Generator().manual_seed(5)
    inputs = torch.rand(8192, 4, generator=generator) * 4 - 2
    targets = 100 * (inputs[:, :1] * inputs[:, 1:2] - torch.cos(2 * inputs[:, 2:3]) + 0.3 * inputs[:, 3:4] ** 2)

    def mnist_cnn_bn() -> nn.Module:
        return nn.Sequential(
            nn.Unflatten(1, (1, 28, 28)),
            nn.Conv2d(1, 16, 5),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(512, 10),
        )

    def cifar_mlp() -> nn.Module:
        return nn.Sequential(
            nn.Flatten(), nn.Linear(3072, 256), nn.LayerNorm(256), nn.GELU(), nn.Dropout(0.1), nn.Linear(256, 10)
        )

    def regressor() -> nn.Module:
        return nn.Sequential(nn.Linear(4, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 1))

    def relu_autoencoder() -> nn.Module:
        return nn.Sequential(
            nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 32), nn.ReLU(), nn.Linear(32, 256), nn.ReLU(),
            nn.Linear(256, 784),
        )  # fmt: skip

    def summed_bce(logits: Tensor, images: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(logits, images, reduction="sum") / images.shape[0]

    cifar_flat = cifar_images.reshape(cifar_images.shape[0], -1)
    return [
        Task("mnist_cnn_bn", mnist_cnn_bn, _sampler(mnist_images, mnist_labels, 64), F.cross_entropy, 200,
             mnist_source, True),
        Task("cifar_mlp_ln_gelu", cifar_mlp, _sampler(cifar_flat, cifar_labels, 128), F.cross_entropy, 200,
             cifar_source, True),
        Task("regression_x100", regressor, _sampler(inputs, targets, 64), F.mse_loss, 300, "synthetic", True),
        Task("relu_autoencoder", relu_autoencoder, _sampler(mnist_images, mnist_images, 128), summed_bce, 300,
             mnist_source, True),
    ]  # fmt: skip


def make_tasks(data_dir: Path, steps: int | None) -> dict[str, Task]:
    """The tasks of the benchmark, data loaded once."""
    mnist_images, mnist_labels, mnist_source = _mnist(data_dir)
    cifar_images, cifar_labels, cifar_source = _cifar(data_dir)
    reg_inputs, reg_targets = _regression_data()

    def mlp() -> nn.Module:
        return nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))

    def regressor() -> nn.Module:
        return nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))

    def small_batch_mlp() -> nn.Module:
        return nn.Sequential(nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))

    tasks = [
        Task("mnist_mlp", mlp, _sampler(mnist_images, mnist_labels, 128), F.cross_entropy, 300, mnist_source),
        Task("cifar_cnn", SmallCNN, _sampler(cifar_images, cifar_labels, 128), F.cross_entropy, 200, cifar_source),
        Task(
            "autoencoder",
            lambda: MNISTAutoencoder(init="default"),
            _sampler(mnist_images, mnist_images, 250),
            autoencoder_loss,
            200,
            mnist_source,
        ),
        Task("regression", regressor, _sampler(reg_inputs, reg_targets, 128), F.mse_loss, 300, "synthetic"),
        Task(
            "mnist_batch8",
            small_batch_mlp,
            _sampler(mnist_images, mnist_labels, 8),
            F.cross_entropy,
            300,
            mnist_source,
        ),
    ]
    tasks += validation_tasks(data_dir)
    if steps is not None:
        for task in tasks:
            task.steps = steps
    return {task.name: task for task in tasks}


def build(name: str, model: nn.Module, kwargs: dict) -> torch.optim.Optimizer:
    """The optimizer with its defaults (Adam and SGD: PyTorch's, SGD with lr 0.01 and momentum 0.9)."""
    if name == "adam":
        return torch.optim.Adam(model.parameters(), **kwargs)
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), **{"lr": 0.01, "momentum": 0.9, **kwargs})
    if name in acktr_kfe.available_preconditioners():
        return acktr_kfe.preconditioner_class(name)(model, **kwargs)
    raise ValueError(f"Unknown optimizer: {name!r}. Valid: {', '.join(OPTIMIZERS)}")


def run(task: Task, name: str, seed: int, kwargs: dict) -> dict:
    """Train one task with one optimizer in the plain loop; the losses, the time per step and divergence."""
    torch.manual_seed(seed)
    model = task.model()
    optimizer = build(name, model, kwargs)
    generator = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    diverged_at = None
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(task.steps):
            inputs, targets = task.batch(generator)
            optimizer.zero_grad()
            loss = task.loss(model(inputs), targets)
            loss.backward()
            optimizer.step()
            value = float(loss)
            losses.append(value)
            if not math.isfinite(value) or value > 100 * max(losses[0], 1e-12):
                diverged_at = step
                break
    seconds = time.perf_counter() - start
    return {
        "losses": losses,
        "final": sum(losses[-10:]) / len(losses[-10:]),
        "diverged_at": diverged_at,
        "ms_per_step": 1000 * seconds / len(losses),
    }


def table(results: dict[str, dict[str, dict]], optimizers: list[str]) -> str:
    """Markdown: one row per task, final loss per optimizer (``diverged@N`` for a divergence), then ms/step."""
    header = (
        "| task | steps | " + " | ".join(optimizers) + " | " + " | ".join(f"{o} ms/step" for o in optimizers) + " |"
    )
    lines = [header, "|" + "---|" * (2 + 2 * len(optimizers))]
    for task_name, per_optimizer in results.items():
        cells = []
        for name in optimizers:
            result = per_optimizer[name]
            cells.append(
                f"diverged@{result['diverged_at']}" if result["diverged_at"] is not None else f"{result['final']:.4g}"
            )
        times = [f"{per_optimizer[name]['ms_per_step']:.1f}" for name in optimizers]
        steps = len(next(iter(per_optimizer.values()))["losses"])
        lines.append(f"| {task_name} | {steps} | " + " | ".join(cells) + " | " + " | ".join(times) + " |")
    return "\n".join(lines)


def plot(results: dict[str, dict[str, dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4 * len(results), 3.2), squeeze=False)
    for axis, (task_name, per_optimizer) in zip(axes[0], results.items()):
        for name, result in per_optimizer.items():
            axis.plot(result["losses"], label=name)
        axis.set_title(task_name)
        axis.set_xlabel("step")
        axis.set_yscale("log")
    axes[0][0].set_ylabel("training loss")
    axes[0][-1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, dict[str, dict]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=None, help="tasks to run (default: the tuned-on set)")
    parser.add_argument(
        "--validation", action="store_true", help="run the validation tasks, kept apart from the choice of defaults"
    )
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZERS)
    parser.add_argument("--steps", type=int, default=None, help="steps per task (default: each task's own)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "datasets")
    parser.add_argument("--ekfac-kwargs", type=json.loads, default={}, help="JSON of EKFAC keyword arguments")
    parser.add_argument("--kfac-kwargs", type=json.loads, default={}, help="JSON of KFAC keyword arguments")
    parser.add_argument("--out", type=Path, default=None, help="folder for results.md and loss.png")
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    tasks = make_tasks(args.data_dir, args.steps)
    names = args.tasks or [name for name, task in tasks.items() if task.validation == args.validation]
    unknown = [name for name in names if name not in tasks]
    if unknown:
        parser.error(f"unknown tasks {unknown}; valid: {', '.join(tasks)}")
    kwargs = {"ekfac": args.ekfac_kwargs, "kfac": args.kfac_kwargs}
    results: dict[str, dict[str, dict]] = {}
    for task_name in names:
        task = tasks[task_name]
        results[task_name] = {}
        for name in args.optimizers:
            result = run(task, name, args.seed, kwargs.get(name, {}))
            results[task_name][name] = result
            status = f"diverged at step {result['diverged_at']}" if result["diverged_at"] is not None else ""
            print(
                f"{task_name:>14} {name:>6}: loss {result['final']:.4g}  {result['ms_per_step']:.1f} ms/step {status}",
                flush=True,
            )
    print()
    print(f"data: {', '.join(sorted({tasks[n].data for n in names}))}")
    print(table(results, args.optimizers))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.md").write_text(table(results, args.optimizers) + "\n")
        plot(results, args.out / "loss.png")
    return results


if __name__ == "__main__":
    main()
