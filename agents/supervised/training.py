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

# The preconditioners come from acktr_kfe's registry; "ekfac_ra" is EKFAC with the running-average scale.
OPTIMIZER_NAMES = ("sgd", "adam", *acktr_kfe.available_preconditioners(), "ekfac_ra")
# Per-task batch size, epochs and optimizer settings (the source of truth; docs/BENCHMARKS.md records the sweeps).
CONFIG_PATH = Path(__file__).resolve().parents[2] / "configs" / "supervised.yml"


def task_config(task: str, path: str | Path | None = None) -> dict[str, Any]:
    """The section of ``configs/supervised.yml`` (or ``path``) for ``task``: batch_size, epochs, optimizers.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: if the task has no section, or the section is malformed.
    """
    from ..rl_config import read_settings

    path = Path(path) if path is not None else CONFIG_PATH
    if not path.is_file():
        raise FileNotFoundError(f"supervised config not found: {path}")
    data = read_settings(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of task sections, got {type(data).__name__}")
    if task not in data:
        raise ValueError(f"{path}: no section for task {task!r}; sections: {', '.join(sorted(data))}")
    section = data[task]
    if not isinstance(section, dict) or not isinstance(section.get("optimizers"), dict):
        raise ValueError(f"{path}: section {task!r} must be a mapping with an 'optimizers' mapping")
    unknown = sorted(set(section["optimizers"]) - set(OPTIMIZER_NAMES))
    if unknown:
        raise ValueError(f"{path}: unknown optimizer(s) {unknown} in {task!r}; valid: {', '.join(OPTIMIZER_NAMES)}")
    return section


def build_optimizer(
    name: str,
    model: nn.Module,
    task: str = "mnist_autoencoder",
    config_path: str | Path | None = None,
    **overrides: Any,
) -> torch.optim.Optimizer:
    """An optimizer by name (``sgd``, ``adam``, ``kfac``, ``ekfac``, ``ekfac_ra``) with the task's settings from
    ``configs/supervised.yml``; keyword arguments that are not ``None`` override them.

    Raises:
        ValueError: for an unknown name, listing the valid ones, or invalid hyperparameters.
    """
    if name not in OPTIMIZER_NAMES:
        raise ValueError(f"Invalid optimizer: {name!r}. Valid values: {', '.join(OPTIMIZER_NAMES)}")
    defaults = dict(task_config(task, config_path)["optimizers"].get(name) or {})
    options = {**defaults, **{k: v for k, v in overrides.items() if v is not None}}
    if name == "sgd":
        options.pop("damping", None)
        return torch.optim.SGD(model.parameters(), **options)
    if name == "adam":
        options.pop("damping", None)
        return torch.optim.Adam(model.parameters(), **options)
    if name == "ekfac_ra":
        options.setdefault("scale_mode", "running")
    # The configs' settings were tuned with absolute damping, the natural step and the trust region on the new
    # direction (configs/supervised.yml).
    options.setdefault("damping_scaling", "absolute")
    options.setdefault("step_norm", "natural")
    options.setdefault("trust_region_mode", "direction")
    cls = acktr_kfe.preconditioner_class("ekfac" if name == "ekfac_ra" else name)
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
