"""A short EKFAC training run: the MNIST deep autoencoder with EKFAC and with Adam, the same steps and seed.

Prints both training losses and times, writes TensorBoard logs and a PNG of loss against steps under --log-dir
(a new numbered folder beside it when it already holds a run).
Without the MNIST files it trains on a synthetic low-rank image set and says so.

    python scripts/quickstart.py                      # about two minutes on a 2-core CPU
    python scripts/quickstart.py --steps 600 --data-dir ~/data/mnist
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import acktr_kfe  # noqa: E402
from agents.supervised import (  # noqa: E402
    DatasetFilesMissingError,
    MNISTAutoencoder,
    autoencoder_loss,
    build_optimizer,
    load_autoencoder_images,
    minibatches,
    training_step,
)


def synthetic_images(count: int, seed: int) -> torch.Tensor:
    """Pixel intensities in [0, 1] from a random 10-dimensional latent through a random logistic decoder."""
    generator = torch.Generator().manual_seed(seed)
    latent = torch.randn(count, 10, generator=generator)
    decoder = torch.randn(10, 784, generator=generator) * 1.5
    return torch.sigmoid(latent @ decoder - 1.0)


def train(name: str, images: torch.Tensor, steps: int, batch: int, seed: int, writer: object) -> tuple[list, float]:
    from tqdm import tqdm

    torch.manual_seed(seed)
    model = MNISTAutoencoder()
    optimizer = build_optimizer(name, model)
    losses: list[float] = []
    start = time.perf_counter()
    with tqdm(total=steps, desc=f"{name:>5}", unit="step") as progress:
        for x in minibatches(images, batch, steps, seed):
            loss = training_step(model, optimizer, x, x, autoencoder_loss, acktr_kfe.bernoulli_fisher_loss)
            losses.append(loss)
            writer.add_scalar(f"train/loss_{name}", loss, len(losses))
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.1f}")
    return losses, time.perf_counter() - start


def fresh_folder(folder: Path) -> Path:
    """``folder`` if it does not exist or is empty, else the first free ``folder_2``, ``folder_3``, ...: a rerun of
    the quickstart never mixes its curves and plot with an earlier run's."""
    candidate, number = folder, 1
    while candidate.exists() and any(candidate.iterdir()):
        number += 1
        candidate = folder.with_name(f"{folder.name}_{number}")
    if candidate != folder:
        print(f"{folder} holds an earlier run; writing to {candidate}")
    return candidate


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "datasets" / "mnist")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--log-dir", type=Path, default=ROOT / "runs" / "quickstart")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1:
        parser.error(f"--steps and --batch-size must be >= 1, got {args.steps} and {args.batch_size}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    try:
        images = load_autoencoder_images(args.data_dir)
        source = f"MNIST from {args.data_dir} ({len(images)} images)"
    except DatasetFilesMissingError as error:
        print(f"{error}\nTraining on a synthetic low-rank image set instead.")
        images = synthetic_images(8000, args.seed)
        source = "synthetic images (MNIST not found)"
    if len(images) < args.batch_size:
        parser.error(f"--batch-size {args.batch_size} exceeds the {len(images)} images available")

    from torch.utils.tensorboard import SummaryWriter

    args.log_dir = fresh_folder(args.log_dir)
    args.log_dir.mkdir(parents=True)
    writer = SummaryWriter(str(args.log_dir))
    print(f"Deep autoencoder on {source}, batch {args.batch_size}, {args.steps} steps, seed {args.seed}")
    results = {name: train(name, images, args.steps, args.batch_size, args.seed, writer) for name in ("ekfac", "adam")}
    writer.close()

    print("\n| optimizer | final loss (mean of last 20 steps) | seconds |")
    print("|---|---:|---:|")
    for name, (losses, seconds) in results.items():
        tail = losses[-20:]
        print(f"| {name} | {sum(tail) / len(tail):.1f} | {seconds:.0f} |")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for name, (losses, _) in results.items():
        axis.plot(range(1, len(losses) + 1), losses, label=name)
    axis.set(xlabel="step", ylabel="training loss (BCE summed over pixels)", title="MNIST deep autoencoder")
    axis.set_ylim(top=min(400.0, max(max(r[0]) for r in results.values())))
    axis.legend()
    figure.tight_layout()
    plot = args.log_dir / "loss.png"
    figure.savefig(plot, dpi=120)
    print(f"\nLoss curves: {plot}; TensorBoard: tensorboard --logdir {args.log_dir}")


if __name__ == "__main__":
    main()
