"""The supervised benchmark tasks and one training run, as ``scripts/supervised.py`` and
``scripts/compare_optimizers.py`` use them.

A run writes to its log folder: ``steps.csv`` (step, epoch, training loss of the minibatch, training wall-clock
in seconds), ``epochs.csv`` (epoch, wall-clock, mean training loss, evaluation loss and, for classification,
accuracy), TensorBoard logs in ``tb/`` and the resolved settings in ``config.yml``. The wall-clock counts training
only (data batches, forward, curvature and backward passes, optimizer steps), not the evaluations.

A run never writes into a folder that already holds files, and locks its folder while it runs
(``agents.run_folder``).

Data parallel (``torchrun --nproc_per_node N scripts/supervised.py``, a process group initialized before
``train_run``): the model is wrapped in ``DistributedDataParallel``, the batch size is per rank, and each step every
rank takes its own slice of one shuffled global batch of ``N * batch_size`` examples (the same order on every rank),
so a step sees the batch a single process would see with ``N`` times the batch size. The logged loss is the mean
over the ranks. Only rank 0 writes the folder (``config.yml`` records ``world_size``), shows progress and
evaluates. A run whose loss turns NaN or infinite keeps what it logged up to that step, writes
``diverged.json`` (step, epoch, loss) and raises ``TrainingDivergedError``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

import acktr_kfe
from acktr_kfe import distributed
from acktr_kfe.trust_region import is_positive_int

from ..run_folder import RunFolderError, RunLock, atomic_write_text, refuse_existing_run, write_error
from .data import augment_cifar, load_cifar10
from .models import VGG11, MNISTAutoencoder, ResNet34, autoencoder_loss
from .training import build_optimizer, load_autoencoder_images, task_config, training_step


@dataclass(frozen=True)
class Task:
    """A benchmark: model, training loss, the loss whose backward on sampled targets gives the Fisher, data."""

    name: str
    build_model: Callable[..., nn.Module]
    loss: Callable[[Tensor, Tensor], Tensor]
    fisher_loss: Callable[[Tensor], Tensor]
    dataset: str
    classification: bool
    description: str


class TrainingDivergedError(RuntimeError):
    """The training loss became NaN or infinite; the run's logs up to the step before are kept.

    Attributes:
        step, epoch: where the loss stopped being finite (``step`` counts from 1).
        loss: the non-finite value.
        log_dir: the run folder, with ``steps.csv`` up to ``step - 1`` and ``diverged.json``.
    """

    def __init__(self, task: str, optimizer: str, step: int, epoch: int, loss: float, log_dir: Path) -> None:
        kronecker = optimizer not in ("sgd", "adam")  # a registered preconditioner, or ekfac_ra
        super().__init__(
            f"{optimizer} on {task}: the training loss is {loss} at step {step} (epoch {epoch}); lower the "
            f"learning rate{' or raise the damping' if kronecker else ''}"
        )
        self.task, self.optimizer, self.step, self.epoch, self.loss, self.log_dir = (
            task,
            optimizer,
            step,
            epoch,
            loss,
            log_dir,
        )


# Largest learning rate accepted: beyond it the optimizers' internal products (Adam's lr / (1 - beta1)) overflow
# float32, and no run of these tasks learns anything.
MAX_LR = 1e6
# Optimizer options of configs/supervised.yml checked at load: (low, high, low excluded).
OPTION_RANGES: dict[str, tuple[float, float, bool]] = {
    "lr": (0.0, MAX_LR, True),
    "damping": (0.0, math.inf, True),
    "momentum": (0.0, 1.0, False),
    "max_kl": (0.0, math.inf, True),
    "weight_decay": (0.0, math.inf, False),
}


def check_option(name: str, value: Any, source: str | None = None) -> None:
    """Raise ``ValueError`` (naming ``source``, the file and section, if given) unless ``value`` is a finite
    number in ``name``'s range."""
    low, high, low_open = OPTION_RANGES[name]
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not (number and math.isfinite(value) and (value > low if low_open else value >= low) and value <= high):
        bound = f"in {'(' if low_open else '['}{low:g}, {high:g}]" if math.isfinite(high) else f"> {low:g}"
        where = f"{source}: invalid" if source else "Invalid"
        raise ValueError(f"{where} {name}: {value!r} (must be a finite number {bound})")


def _cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy(logits, labels)


TASKS: dict[str, Task] = {
    "mnist_autoencoder": Task(
        "mnist_autoencoder",
        MNISTAutoencoder,
        autoencoder_loss,
        acktr_kfe.bernoulli_fisher_loss,
        "mnist",
        False,
        "MNIST deep autoencoder 784-1000-500-250-30 and mirror, binary cross-entropy summed over pixels",
    ),
    "cifar10_vgg11": Task(
        "cifar10_vgg11",
        VGG11,
        _cross_entropy,
        acktr_kfe.softmax_fisher_loss,
        "cifar10",
        True,
        "VGG11 without batch norm on CIFAR-10, cross-entropy",
    ),
    "cifar10_vgg11_bn": Task(
        "cifar10_vgg11_bn",
        lambda **kwargs: VGG11(batch_norm=True, **kwargs),
        _cross_entropy,
        acktr_kfe.softmax_fisher_loss,
        "cifar10",
        True,
        "VGG11 with batch norm on CIFAR-10, cross-entropy",
    ),
    "cifar10_resnet34": Task(
        "cifar10_resnet34",
        ResNet34,
        _cross_entropy,
        acktr_kfe.softmax_fisher_loss,
        "cifar10",
        True,
        "ResNet34 on CIFAR-10, cross-entropy",
    ),
}


def get_task(name: str) -> Task:
    """A task by name; an unknown name raises ``ValueError`` listing the valid ones."""
    if name not in TASKS:
        raise ValueError(f"Invalid task: {name!r}. Valid values: {', '.join(TASKS)}")
    return TASKS[name]


def load_task_data(task: Task, data_dir: str | Path) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(train inputs, train targets, eval inputs, eval targets)``.

    The autoencoder trains on every MNIST image present (the papers report training loss) and is evaluated on
    the same set; CIFAR-10 trains on the ``data_batch_*`` files present and is evaluated on ``test_batch``.
    """
    if task.dataset == "mnist":
        images = load_autoencoder_images(data_dir)
        return images, images, images, images
    train_x, train_y = load_cifar10(data_dir, "train")
    test_x, test_y = load_cifar10(data_dir, "test")
    return train_x, train_y, test_x, test_y


def resolve_device(device: str) -> torch.device:
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``; CUDA without a GPU raises ``ValueError``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"Invalid device: {device!r}. Valid values: auto, cpu, cuda, cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for, but this torch build sees no CUDA GPU; use --device cpu")
    return torch.device(device)


def _across_ranks(loss: float, stop: bool) -> tuple[float, bool]:
    """The mean of ``loss`` over the ranks and whether ``stop`` holds on any (one all-reduce; as is alone)."""
    if not distributed.is_active():
        return loss, stop
    values = torch.tensor([loss, float(stop)], dtype=torch.float64)
    distributed.all_reduce_mean([values], what="the step's loss")
    return float(values[0]), bool(values[1] > 0)


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, inputs: Tensor, targets: Tensor, batch_size: int) -> dict[str, float]:
    """Mean loss (and accuracy for classification) over a dataset, in eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_loss, correct, count = 0.0, 0, 0
    for start in range(0, len(inputs), batch_size):
        x = inputs[start : start + batch_size].to(device)
        y = targets[start : start + batch_size].to(device)
        output = model(x)
        total_loss += task.loss(output, y).item() * len(x)
        if task.classification:
            correct += int((output.argmax(1) == y).sum())
        count += len(x)
    model.train(was_training)
    metrics = {"eval_loss": total_loss / count}
    if task.classification:
        metrics["eval_accuracy"] = correct / count
    return metrics


def train_run(
    task_name: str,
    optimizer_name: str,
    *,
    data_dir: str | Path,
    log_dir: str | Path,
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    damping: float | None = None,
    device: str = "auto",
    seed: int = 0,
    augment: bool = False,
    max_seconds: float | None = None,
    width: int | None = None,
    progress: bool = True,
    config_path: str | Path | None = None,
    data: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
    log_dir_flag: str = "--log-dir",
) -> dict[str, Any]:
    """Train one optimizer on one task; write the CSVs, TensorBoard logs and config; return a summary.

    ``epochs`` and ``batch_size`` default to the task's config; ``lr`` and ``damping`` override the optimizer's.
    ``max_seconds`` stops the run once its training wall-clock exceeds it (at the end of a step; on any rank, for
    all of them). ``data`` skips
    loading (``load_task_data``'s tuple). ``width`` narrows the CIFAR models (channels of the first convolution,
    64 in the papers' models) for quick runs. ``log_dir`` must not hold files yet (``log_dir_flag`` is the option
    named in the refusal).

    Raises:
        ValueError: invalid task, optimizer, device or hyperparameters (before any training).
        DatasetFilesMissingError: the data files are not in ``data_dir``.
        RunFolderError: ``log_dir`` already holds files, is in use by another process, or a write to it failed.
        TrainingDivergedError: the training loss became NaN or infinite (with the step); the logs up to it are kept.
    """
    task = get_task(task_name)
    config = task_config(task_name, config_path)
    source = str(config_path) if config_path is not None else "configs/supervised.yml"
    for key in ("epochs", "batch_size"):
        value = config.get(key, 1)
        if not is_positive_int(value):
            raise ValueError(f"{source}: invalid {task_name}.{key}: {value!r} (must be an integer >= 1)")
    epochs = int(config.get("epochs", 1) if epochs is None else epochs)
    batch_size = int(config.get("batch_size", 128) if batch_size is None else batch_size)
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"Invalid epochs / batch size: {epochs} / {batch_size} (both must be integers >= 1)")
    for name, value in (("lr", lr), ("damping", damping)):
        if value is not None:
            check_option(name, value)
    if optimizer_name in ("sgd", "adam") and damping is not None:
        names = ", ".join((*acktr_kfe.available_preconditioners(), "ekfac_ra"))
        raise ValueError(f"--damping applies to {names}, not {optimizer_name}")
    if max_seconds is not None and not (max_seconds > 0 and math.isfinite(max_seconds)):
        raise ValueError(f"Invalid max_seconds: {max_seconds!r} (must be a finite number > 0)")
    for name, value in (config["optimizers"].get(optimizer_name) or {}).items():
        if name in OPTION_RANGES:
            check_option(name, value, f"{source}, {task_name}.optimizers.{optimizer_name}")
    if width is not None and (task.dataset != "cifar10" or width < 1):
        raise ValueError(f"Invalid width: {width!r} (an integer >= 1, for the CIFAR-10 models only)")
    torch_device = resolve_device(device)
    if torch_device.type == "cuda" and distributed.is_active() and torch_device.index is None:
        torch_device = torch.device("cuda", torch.cuda.current_device())  # this rank's GPU (LOCAL_RANK)
    torch.manual_seed(seed)
    model = (task.build_model() if width is None else task.build_model(width=width)).to(torch_device)
    if distributed.is_active():
        # DDP averages the gradients in the backward; the optimizer, built from the wrapper, hooks the inner
        # modules, sees that the gradients are averaged, and averages its statistics itself.
        device_ids = None if torch_device.type == "cpu" else [torch_device]
        model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    try:
        optimizer = build_optimizer(optimizer_name, model, task_name, config_path, lr=lr, damping=damping)
    except TypeError as error:  # an option of the wrong type or name in the settings file
        raise ValueError(f"{source}, {task_name}.optimizers.{optimizer_name}: {error}") from None
    train_x, train_y, eval_x, eval_y = data if data is not None else load_task_data(task, data_dir)
    ranks = distributed.world_size()
    if len(train_x) < batch_size * ranks:
        per_rank = f" per rank, times {ranks} ranks," if ranks > 1 else ""
        raise ValueError(f"batch size {batch_size}{per_rank} exceeds the {len(train_x)} training examples")

    log_dir = Path(log_dir)
    writes = distributed.rank() == 0
    lock = RunLock(log_dir)
    try:
        if writes:
            refuse_existing_run(log_dir, flag=log_dir_flag)
            lock.acquire()
            refuse_existing_run(log_dir, flag=log_dir_flag)  # again, now that the folder is ours
    except RunFolderError:
        lock.release()
        distributed.agree_any(True, what="the run folder's check")  # the other ranks stop too
        raise
    if distributed.agree_any(False, what="the run folder's check"):
        raise RunFolderError(f"rank 0 could not use the run folder {log_dir} (its message says why)")
    if distributed.rank():
        torch.manual_seed(seed + 1000 * distributed.rank())  # distinct Fisher samples per rank
    try:
        return _train(
            task, optimizer_name, optimizer, model, torch_device, log_dir, epochs, batch_size, seed, augment,
            width, max_seconds, progress, (train_x, train_y, eval_x, eval_y),
        )  # fmt: skip
    except OSError as error:
        raise write_error(log_dir, error, "The run's logs up to the failed write are in it.") from error
    finally:
        lock.release()


def _train(
    task: Task,
    optimizer_name: str,
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    torch_device: torch.device,
    log_dir: Path,
    epochs: int,
    batch_size: int,
    seed: int,
    augment: bool,
    width: int | None,
    max_seconds: float | None,
    progress: bool,
    data: tuple[Tensor, Tensor, Tensor, Tensor],
) -> dict[str, Any]:
    """The training loop of ``train_run``, in a locked, empty folder."""
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    task_name = task.name
    train_x, train_y, eval_x, eval_y = data
    rank, ranks = distributed.rank(), distributed.world_size()
    writes = rank == 0  # only rank 0 writes the folder, shows progress and evaluates
    inner = model.module if distributed.is_wrapped_by_ddp(model) else model
    settings = {
        "task": task_name,
        "optimizer": optimizer_name,
        "optimizer_options": {k: v for k, v in optimizer.defaults.items() if isinstance(v, int | float | str)},
        "epochs": epochs,
        "batch_size": batch_size,
        "world_size": ranks,
        "device": str(torch_device),
        "seed": seed,
        "augment": augment,
        "width": width,
        "train_examples": len(train_x),
        "eval_examples": len(eval_x),
    }
    if writes:
        atomic_write_text(log_dir / "config.yml", yaml.safe_dump(settings, sort_keys=False))
    writer = SummaryWriter(str(log_dir / "tb")) if writes else None
    # The same order on every rank; each step, rank r takes slice r of a global batch of ranks * batch_size.
    generator = torch.Generator().manual_seed(seed)
    global_batch = batch_size * ranks
    steps_per_epoch = len(train_x) // global_batch

    step, clock, stopped = 0, 0.0, False
    epoch_rows: list[dict[str, float]] = []
    diverged: TrainingDivergedError | None = None
    with (log_dir / "steps.csv").open("w", newline="") if writes else open(os.devnull, "w") as steps_file:
        steps_csv = csv.writer(steps_file)
        steps_csv.writerow(["step", "epoch", "loss", "wall_clock_s"])
        bar = tqdm(
            total=epochs * steps_per_epoch, desc=f"{task_name} {optimizer_name}", disable=not (progress and writes)
        )
        for epoch in range(1, epochs + 1):
            model.train()
            order = torch.randperm(len(train_x), generator=generator)
            epoch_losses = []
            for index in range(steps_per_epoch):
                started = time.perf_counter()
                start = index * global_batch + rank * batch_size
                batch = order[start : start + batch_size]
                x, y = train_x[batch], train_y[batch]
                if augment and task.dataset == "cifar10":
                    x = augment_cifar(x, generator)
                x, y = x.to(torch_device, non_blocking=True), y.to(torch_device, non_blocking=True)
                value = training_step(model, optimizer, x, y, task.loss, task.fisher_loss)
                clock += time.perf_counter() - started
                step += 1
                # Every rank logs the loss of the global batch and stops when any rank's clock says so.
                value, stop = _across_ranks(value, max_seconds is not None and clock >= max_seconds)
                if not math.isfinite(value):
                    diverged = TrainingDivergedError(task_name, optimizer_name, step, epoch, value, log_dir)
                    break
                epoch_losses.append(value)
                steps_csv.writerow([step, epoch, f"{value:.6g}", f"{clock:.4f}"])
                steps_file.flush()
                if writer is not None:
                    writer.add_scalar("train/loss", value, step)
                    writer.add_scalar("train/loss_vs_seconds", value, int(clock * 1000))
                bar.update(1)
                bar.set_postfix(loss=f"{value:.4g}")
                if stop:
                    stopped = True
                    break
            if diverged is not None:
                break
            row = {"epoch": epoch, "wall_clock_s": clock, "train_loss": sum(epoch_losses) / len(epoch_losses)}
            if writes:  # the inner model: DDP's forward would wait for the other ranks
                row.update(evaluate(inner, task, eval_x, eval_y, max(batch_size, 1000)))
            epoch_rows.append(row)
            for key, value in row.items():
                if key != "epoch" and writer is not None:
                    writer.add_scalar(f"epoch/{key}", value, epoch)
            if stopped:
                break
        bar.close()
    if writer is None:  # ranks other than 0 write nothing
        if diverged is not None:
            raise diverged
        return {"task": task_name, "optimizer": optimizer_name, "steps": step, "wall_clock_s": clock, "rank": rank}
    writer.close()
    with (log_dir / "epochs.csv").open("w", newline="") as epochs_file:
        fields = ["epoch", "wall_clock_s", "train_loss", "eval_loss"]
        fields += ["eval_accuracy"] if task.classification else []
        epochs_csv = csv.DictWriter(epochs_file, fieldnames=fields)
        epochs_csv.writeheader()
        epochs_csv.writerows(epoch_rows)
    if diverged is not None:
        record = {"step": diverged.step, "epoch": diverged.epoch, "loss": str(diverged.loss), "wall_clock_s": clock}
        atomic_write_text(log_dir / "diverged.json", json.dumps(record, indent=2) + "\n")
        raise diverged
    return {
        "task": task_name,
        "optimizer": optimizer_name,
        "steps": step,
        "wall_clock_s": clock,
        "seconds_per_epoch": clock / (step / steps_per_epoch),
        "world_size": ranks,
        "final_train_loss": epoch_rows[-1]["train_loss"],
        **{k: v for k, v in epoch_rows[-1].items() if k.startswith("eval_")},
        "log_dir": str(log_dir),
    }
