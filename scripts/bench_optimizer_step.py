"""Time one training step of the MNIST deep autoencoder with SGD, Adam, K-FAC and EKFAC (issue: acktr_kfe).

Each optimizer runs at its default intervals, so factor, scale and eigendecomposition work is amortized as in real
training; steps are timed in interleaved rounds of 100 (each round holds the same amortized work) and the median
round is reported, so that a slow spell of a shared machine does not decide the result.
The table prints each one's mean step time and its ratio to SGD's, and the layer-sized matrix products of its
preconditioning per layer and step (counted over 10 more steps: a rotation into or out of the eigenbasis is two,
as is K-FAC's factored solve), beside the floor that any method which preconditions every step with two basis
products per layer cannot beat:
``1 + 2 sum(out in (out + in)) / (3 B sum(out in))``.

    python scripts/bench_optimizer_step.py                     # CPU, and CUDA when available
    python scripts/bench_optimizer_step.py --steps 400 --threads 2 --device cpu
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from acktr_kfe import EKFAC, KFAC  # noqa: E402
from acktr_kfe.blocks import EKFACBlock, KFACBlock, KroneckerBlock  # noqa: E402
from agents.supervised import MNISTAutoencoder, autoencoder_loss, load_mnist  # noqa: E402
from agents.supervised.data import DatasetFilesMissingError  # noqa: E402


class _ParameterMomentumBlock(EKFACBlock):
    """EKFAC's block with the momentum buffer left in parameter coordinates (how every step ran before the buffer
    moved to the eigenbasis): the reference for the products that move saves."""

    def momentum_in_basis(self) -> bool:
        return False


class _EKFACParameterMomentum(EKFAC):
    block_class = _ParameterMomentumBlock


OPTIMIZERS: dict[str, Callable[[torch.nn.Module], torch.optim.Optimizer]] = {
    "SGD": lambda m: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9),
    "Adam": lambda m: torch.optim.Adam(m.parameters(), lr=1e-3),
    "K-FAC": lambda m: KFAC(m),
    "EKFAC": lambda m: EKFAC(m),
    "EKFAC-ra": lambda m: EKFAC(m, scale_mode="running"),
    # The configuration agents.supervised uses on this task: factors and scale every 10 steps.
    "EKFAC 10/10": lambda m: EKFAC(m, factor_update_interval=10, scale_update_interval=10),
    # With a trust region on the step taken, the momentum buffer's quadratic form is needed every step: kept in
    # the eigenbasis it is elementwise (two basis products per layer-step saved).
    "EKFAC max_kl": lambda m: EKFAC(m, max_kl=1e-3),
    "EKFAC max_kl, buffer in parameter coordinates": lambda m: _EKFACParameterMomentum(m, max_kl=1e-3),
}


@contextlib.contextmanager
def counting_products() -> Iterator[dict[str, int]]:
    """Count the preconditioner's layer-sized matrix products: a rotation to or from the eigenbasis is two, and so
    is K-FAC's factored solve (one damped inverse on each side)."""
    counts = {"products": 0}
    originals = {
        (KroneckerBlock, "to_kfe"): KroneckerBlock.to_kfe,
        (KroneckerBlock, "from_kfe"): KroneckerBlock.from_kfe,
        (KFACBlock, "precondition"): KFACBlock.precondition,
    }

    def counted(name: str, original: Callable) -> Callable:
        def wrapper(self, *args):
            if name != "precondition" or self.factored:
                counts["products"] += 2
            return original(self, *args)

        return wrapper

    for (cls, name), original in originals.items():
        setattr(cls, name, counted(name, original))
    try:
        yield counts
    finally:
        for (cls, name), original in originals.items():
            setattr(cls, name, original)


def preconditioning_floor(model: torch.nn.Module, batch: int) -> float:
    """The ratio to SGD under which no every-step two-basis-product preconditioner can go."""
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    basis = sum(m.out_features * m.in_features * (m.out_features + m.in_features) for m in layers)
    pass_cost = sum(m.out_features * m.in_features for m in layers)
    return 1.0 + 2.0 * basis / (3.0 * batch * pass_cost)


def load_images(data_dir: Path, batch: int) -> torch.Tensor:
    try:
        images, _ = load_mnist(data_dir, "train")
        return images[:batch]
    except DatasetFilesMissingError:
        print(f"(MNIST not found in {data_dir}: timing on uniform random pixels, which costs the same)")
        return torch.rand(batch, 784, generator=torch.Generator().manual_seed(0))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_device(
    device: torch.device, images: torch.Tensor, steps: int, rounds: int, warmup: int, names: list[str]
) -> list[dict]:
    images = images.to(device)
    setups = {}
    for name in names:
        build = OPTIMIZERS[name]
        torch.manual_seed(0)
        model = MNISTAutoencoder().to(device)
        setups[name] = (model, build(model), [])

    def run(name: str, count: int) -> float:
        model, optimizer, _ = setups[name]
        sync(device)
        start = time.perf_counter()
        for _ in range(count):
            optimizer.zero_grad(set_to_none=True)
            autoencoder_loss(model(images), images).backward()
            optimizer.step()
        sync(device)
        return time.perf_counter() - start

    for name in setups:
        run(name, warmup)
    per_round = max(1, steps // rounds)
    for _ in range(rounds):
        for name, (_, _, times) in setups.items():
            times.append(run(name, per_round) / per_round)
    # Each round of a multiple of 100 steps holds the same amortized work (every default interval divides 100),
    # so the median round is an unbiased and robust estimate; a burst of load from elsewhere hits one round.
    rows = []
    sgd = statistics.median(setups["SGD"][2])
    layers = sum(isinstance(m, torch.nn.Linear) for m in MNISTAutoencoder().modules())
    for name, (_, _, times) in setups.items():
        with counting_products() as counts:  # 10 more steps, untimed
            run(name, 10)
        median = statistics.median(times)
        rows.append(
            {
                "optimizer": name,
                "ms": 1000 * median,
                "ratio": median / sgd,
                "spread": max(times) / min(times),
                "products": counts["products"] / (10 * layers),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=200, help="timed steps per optimizer (after warm-up)")
    parser.add_argument(
        "--rounds", type=int, default=4, help="interleaved rounds (keep steps / rounds a multiple of 100)"
    )
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "datasets" / "mnist")
    parser.add_argument(
        "--optimizers",
        nargs="+",
        choices=list(OPTIMIZERS),
        default=list(OPTIMIZERS),
        metavar="NAME",
        help=f"which to time (SGD, the reference, always runs); choices: {', '.join(OPTIMIZERS)}",
    )
    args = parser.parse_args(argv)
    names = ["SGD", *[name for name in args.optimizers if name != "SGD"]]
    if args.steps < 1 or args.rounds < 1 or args.batch_size < 1:
        parser.error("--steps, --rounds and --batch-size must be >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    devices = ["cpu"] if args.device == "cpu" else ["cuda"] if args.device == "cuda" else ["cpu"]
    if args.device == "auto" and torch.cuda.is_available():
        devices.append("cuda")

    images = load_images(args.data_dir, args.batch_size)
    floor = preconditioning_floor(MNISTAutoencoder(), args.batch_size)
    print(
        f"MNIST autoencoder step, batch {args.batch_size}, {args.steps} timed steps per optimizer in {args.rounds} "
        f"interleaved rounds; torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor()}"
    )
    for device_name in devices:
        device = torch.device(device_name)
        label = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} thr)"
        rows = bench_device(device, images, args.steps, args.rounds, args.warmup, names)
        print(f"\n{label}: floor for every-step two-basis-product preconditioning = {floor:.2f} x SGD\n")
        print(
            "| optimizer | ms / step (median round) | ratio to SGD | ratio / floor | slowest / fastest round "
            "| basis products / layer-step |"
        )
        print("|---|---:|---:|---:|---:|---:|")
        for row in rows:
            print(
                f"| {row['optimizer']} | {row['ms']:.1f} | {row['ratio']:.2f} | {row['ratio'] / floor:.2f} "
                f"| {row['spread']:.2f} | {row['products']:.1f} |"
            )


if __name__ == "__main__":
    main()
