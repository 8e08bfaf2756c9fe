"""Optimizer factory and training step shared by the supervised scripts and tests.

For K-FAC and EKFAC the curvature is the true Fisher of the model's output distribution: a separate backward on
targets sampled from the model (``curvature_backward``), while the training loss supplies the gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import acktr_kfe

from .data import load_mnist

OPTIMIZER_NAMES = ("sgd", "adam", "kfac", "ekfac", "ekfac_ra")

# Defaults for the MNIST deep autoencoder, chosen by the sweeps recorded in docs/BENCHMARKS.md (batch 250 and 1000).
_KRONECKER = {"lr": 1.0, "damping": 0.01, "max_kl": 1e-3, "curvature": "fisher"}
_EKFAC = {**_KRONECKER, "momentum": 0.95, "factor_update_interval": 10, "scale_update_interval": 10}
AUTOENCODER_DEFAULTS: dict[str, dict[str, Any]] = {
    "sgd": {"lr": 0.01, "momentum": 0.9},
    "adam": {"lr": 3e-3},
    "kfac": {**_KRONECKER, "momentum": 0.9},
    # Statistics every 10 steps rather than EKFAC's default 20: on this task the fresher scale leaves the
    # plateau sooner (150.6 against 183.8 after 300 steps at batch 250, docs/BENCHMARKS.md).
    "ekfac": _EKFAC,
    "ekfac_ra": {**_EKFAC, "scale_mode": "running"},
}


def build_optimizer(name: str, model: nn.Module, **overrides: Any) -> torch.optim.Optimizer:
    """An optimizer by name (``sgd``, ``adam``, ``kfac``, ``ekfac``, ``ekfac_ra``) with autoencoder defaults.

    Raises:
        ValueError: for an unknown name, listing the valid ones.
    """
    if name not in OPTIMIZER_NAMES:
        raise ValueError(f"Invalid optimizer: {name!r}. Valid values: {', '.join(OPTIMIZER_NAMES)}")
    options = {**AUTOENCODER_DEFAULTS[name], **{k: v for k, v in overrides.items() if v is not None}}
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), **options)
    if name == "adam":
        return torch.optim.Adam(model.parameters(), **options)
    cls = acktr_kfe.KFAC if name == "kfac" else acktr_kfe.EKFAC
    return cls(model, **options)


def load_autoencoder_images(data_dir: str | Path) -> Tensor:
    """The MNIST train and test files as one training set of images ``(N, 784)`` in ``[0, 1]``.

    The K-FAC and EKFAC papers report *training* loss on this benchmark; the shared data holds a part of the
    training split, so both files are used together.
    """
    train, _ = load_mnist(data_dir, "train")
    test, _ = load_mnist(data_dir, "test")
    return torch.cat([train, test])


def minibatches(data: Tensor, batch_size: int, steps: int, seed: int) -> Iterator[Tensor]:
    """``steps`` minibatches of ``data``, reshuffled each epoch with a seeded generator; a last partial batch
    of an epoch is dropped."""
    generator = torch.Generator().manual_seed(seed)
    produced = 0
    while produced < steps:
        order = torch.randperm(len(data), generator=generator)
        for start in range(0, len(data) - batch_size + 1, batch_size):
            yield data[order[start : start + batch_size]]
            produced += 1
            if produced == steps:
                return


def training_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    inputs: Tensor,
    targets: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    fisher_loss: Callable[[Tensor], Tensor],
) -> float:
    """One step; for a Kronecker optimizer in Fisher mode, first a curvature pass on sampled targets.

    Returns:
        the training loss before the step.
    """
    optimizer.zero_grad(set_to_none=True)
    output = model(inputs)
    loss = loss_fn(output, targets)
    if isinstance(optimizer, acktr_kfe.KFAC | acktr_kfe.EKFAC) and optimizer.curvature is acktr_kfe.Curvature.FISHER:
        optimizer.curvature_backward(fisher_loss(output), retain_graph=True)
    loss.backward()
    optimizer.step()
    return loss.item()
