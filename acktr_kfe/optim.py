"""``KFAC`` and ``EKFAC``: ``torch.optim.Optimizer`` subclasses built from a model, their public base
:class:`KroneckerPreconditioner`, and the registry of preconditioners by name.

Papers: K-FAC, Martens & Grosse 2015 (arXiv:1503.05671); KFC for convolutions, Grosse & Martens 2016
(arXiv:1602.01407); EKFAC, George et al. 2018 (arXiv:1806.03884); ACKTR's trust region, Wu et al. 2017
(arXiv:1708.05144).

Conventions (docs/DESIGN.md, section 2): a layer is ``W_hat = [W | b]`` of shape ``(out, in+1)``; its per-example
gradient is ``grad_n = sum_t g_{n,t} a_hat_{n,t}^T``; curvature is per example, ``F = E_n[vec(grad_n)
vec(grad_n)^T]`` with ``vec`` the row-major flatten, and its Kronecker approximation is ``kron(G, A)`` with
``A = E_n[sum_t a_hat a_hat^T]`` and ``G = E_n[sum_t g g^T] / T``.

The optimizer schedules and steps; every layer's curvature math is in its block (:mod:`acktr_kfe.blocks`), and the
trust-region bookkeeping in :mod:`acktr_kfe.trust_region`.
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
import weakref
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from . import distributed as data_parallel
from .blocks import (
    CurvatureBlock,
    EKFACBlock,
    EmbeddingDiagonalBlock,
    KFACBlock,
    RefreshResult,
    Rows,
    block_class_for,
)
from .capture import Record, StatisticsCapture
from .curvature import Curvature
from .layers import EXCLUDE_NAME_PLACEHOLDER, adapter_for
from .trust_region import (
    TrustRegions,
    check_radius,
    is_nonnegative_int,
    is_positive_int,
    is_real_number,
    step_quadratic,
)

# With a trailing separator: a user's acktr_kfe_runs/ or site-packages/torchvision/ is not the library.
_LIBRARY_DIRS = tuple(str(Path(p).resolve().parent) + os.sep for p in (__file__, torch.__file__))


def _warn(message: str) -> None:
    """``warnings.warn`` attributed to the first caller outside this package and torch: the user's line that
    called ``step()`` (torch's optimizer wrappers sit between it and the optimizer)."""
    level = 2  # warnings.warn's stacklevel of _warn's caller
    frame = sys._getframe(1)
    while frame is not None and str(Path(frame.f_code.co_filename).resolve()).startswith(_LIBRARY_DIRS):
        frame = frame.f_back
        level += 1
    warnings.warn(message, RuntimeWarning, stacklevel=level)


def _sum_of_squares(tensor: Tensor) -> Tensor:
    """``sum(tensor ** 2)`` in float32 or float64 (a float16 tensor's squares overflow from 256 on)."""
    if tensor.dtype not in (torch.float32, torch.float64):
        tensor = tensor.float()
    return tensor.square().sum()


# Per-parameter optimizer state (outside the blocks): momentum and Adam's moments.
_PARAM_STATE_KEYS = ("momentum_buffer", "adam_exp_avg", "adam_exp_avg_sq")


def _validate_counters(extra: dict[str, Any]) -> tuple[int, dict[str, int], int]:
    """The step, consecutive-failure and skipped-step counters of a state to load, or ``ValueError`` naming the bad
    one (checked before anything is loaded)."""

    def count(value: Any, name: str) -> int:
        if not is_nonnegative_int(value):
            raise ValueError(f"corrupted optimizer state: kronecker {name} is {value!r}, expected an integer >= 0")
        return int(value)

    failures = extra.get("consecutive_failures")
    if not isinstance(failures, dict):
        raise ValueError(
            f"corrupted optimizer state: kronecker consecutive_failures is {failures!r}, expected a mapping"
        )
    return (
        count(extra.get("step"), "step"),
        {str(k): count(v, f"consecutive_failures[{k!r}]") for k, v in failures.items()},
        count(extra.get("skipped_steps"), "skipped_steps"),
    )


def _parse_enum(enum_cls: type[Enum], value: Any, what: str) -> Any:
    try:
        return enum_cls(value)
    except ValueError:
        valid = ", ".join(repr(m.value) for m in enum_cls)
        raise ValueError(f"Invalid {what}: {value!r}. Valid values: {valid}") from None


class LossReduction(str, Enum):
    """How the recorded loss reduces over the batch. ``mean``: output gradients are multiplied by the batch
    size to recover per-example gradients; ``sum``: they are taken as they are."""

    MEAN = "mean"
    SUM = "sum"


class DampingMode(str, Enum):
    """K-FAC damping. ``factored``: Tikhonov damping split between the factors with Martens & Grosse's
    ``pi``; ``eigen``: exact damping ``(Lambda_G (x) Lambda_A + lambda)^-1`` in the eigenbasis."""

    FACTORED = "factored"
    EIGEN = "eigen"


class DampingScaling(str, Enum):
    """What ``damping`` is measured against. ``relative``: a fraction of the Frobenius norm of each block's modeled
    curvature (``||F_block||_F``, the 2-norm of its eigenvalues), so that one value transfers across losses, layers
    and the course of training (the curvature of a layer moves by orders of magnitude with the loss's units and with
    training; a fixed damping is negligible for some blocks and dominant for others). The norm is dominated by the
    largest eigenvalues, so the directions a minibatch hardly sampled are not divided by a near-zero curvature (a
    mean eigenvalue would be: a batch of 128 spans 128 of a layer's many directions). ``absolute``: added as it is
    to the curvature's eigenvalues (the papers' convention). A ``fisher_diagonals`` parameter's damping is relative
    to its diagonal value."""

    RELATIVE = "relative"
    ABSOLUTE = "absolute"


class StepNorm(str, Enum):
    """How long a step is. ``adam``: each preconditioned layer moves along its (momentum) natural-gradient direction
    by the length of the step Adam would take for that layer (learning-rate grafting, Agarwal et al. 2020,
    arXiv:2002.11803), and ``lr`` is Adam's learning rate: the curvature chooses the direction, a first-order
    method that holds on any model the length, so no unit of the loss or the layer reaches the step size;
    ``natural``: the natural-gradient step itself, ``lr F^-1 grad`` (the papers' update, which ACKTR uses)."""

    ADAM = "adam"
    NATURAL = "natural"


# Growth of the parameter norm and of the gradient norm since the first step that is reported as a warning.
GROWTH_WARNING_FACTORS = (10.0, 1000.0)

# Adam's constants for step_norm="adam" (PyTorch's defaults).
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


class TrustRegionMode(str, Enum):
    """What the KL trust region bounds. ``direction``: the new preconditioned direction ``D`` before the momentum
    step (ACKTR paper, OpenAI baselines); ``step``: the step actually taken, ``momentum buf + D``."""

    DIRECTION = "direction"
    STEP = "step"


class ScaleMode(str, Enum):
    """EKFAC scale estimate (George et al. 2018). ``minibatch``: the estimate from the latest scale-update
    batch; ``running``: an exponential running average over scale updates while the basis is held fixed."""

    MINIBATCH = "minibatch"
    RUNNING = "running"


def _check_interval(value: Any, name: str) -> int:
    if not is_positive_int(value):
        raise ValueError(f"Invalid {name}: {value!r} (must be an integer >= 1)")
    return int(value)


@dataclass
class _PendingRefresh:
    """Basis refreshes running in the background (``refresh_delay``): installed at step ``due``."""

    due: int
    blocks: list[CurvatureBlock]
    future: Future


def _drop_basis_buffer(block: CurvatureBlock) -> None:
    """After the block's basis changed: its momentum buffer kept in the old basis is rotated in afresh."""
    if block.has("momentum_in_basis"):
        del block.state["momentum_in_basis"]


def _validate_group(group: dict[str, Any]) -> None:
    lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
    damping, max_kl = group["damping"], group["max_kl"]
    if not is_real_number(lr) or not (lr >= 0 and math.isfinite(lr)):
        raise ValueError(f"Invalid learning rate: {lr!r} (must be a finite float >= 0)")
    if not is_real_number(momentum) or not 0.0 <= momentum < 1.0:
        raise ValueError(f"Invalid momentum: {momentum!r} (must be in [0, 1))")
    if not is_real_number(weight_decay) or not weight_decay >= 0.0:
        raise ValueError(f"Invalid weight_decay: {weight_decay!r} (must be >= 0)")
    if not is_real_number(damping) or not (damping > 0.0 and math.isfinite(damping)):
        raise ValueError(f"Invalid damping: {damping!r} (must be a finite float > 0)")
    check_radius(max_kl)


class KroneckerPreconditioner(Optimizer):
    r"""The public base of the preconditioners: builds one curvature block per layer, schedules their statistics
    updates and basis refreshes, preconditions through them, and takes the (trust-region scaled) step.

    A preconditioner is a block class (:class:`acktr_kfe.CurvatureBlock`) and defaults: :class:`KFAC` and
    :class:`EKFAC` are this class with :class:`acktr_kfe.KFACBlock` and :class:`acktr_kfe.EKFACBlock`. Each
    ``nn.Linear``, ``nn.Conv2d`` (or a type added with :func:`acktr_kfe.register_adapter`) gets a block of
    ``block_class``; each ``nn.Embedding`` a diagonal block (:class:`acktr_kfe.EmbeddingDiagonalBlock`).

    The schedule, every step:

    .. code-block:: text

        factor steps (every factor_update_interval; and for a block without statistics yet):
            every block: batch statistics from the recorded rows; if all are finite, fold them in (factor_decay)
        every block that wants a refresh (every eigen_update_interval, or no basis yet): refresh its basis
        scale steps (every scale_update_interval; blocks with basis statistics, EKFAC's scale):
            every such block: an estimate in its basis; if all are finite, fold it in
        every block: D = precondition(grad + weight_decay [W | b], damping of the block)
        the step (step_norm, trust regions): see :class:`KFAC`

    Args: as :class:`KFAC` (with K-FAC's defaults), and:
        scale_update_interval: steps between basis-statistics estimates (EKFAC's scale); ``None``: every factor
            update.
        block_options: keyword options for the blocks' constructors (``{"damping_mode": "eigen"}``).

    A new preconditioner: subclass :class:`acktr_kfe.CurvatureBlock` and call
    ``acktr_kfe.register_preconditioner(name, block_class)``, which makes a subclass of this class with that
    ``block_class``.
    """

    block_class: ClassVar[type[CurvatureBlock]] = KFACBlock

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        *,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        damping: float = 1e-2,
        max_kl: float | None = None,
        factor_decay: float = 0.95,
        factor_update_interval: int = 10,
        eigen_update_interval: int = 100,
        scale_update_interval: int | None = None,
        curvature: str | Curvature = "empirical",
        loss_reduction: str | LossReduction = "mean",
        exclude: Iterable[str] = (),
        max_consecutive_failures: int = 10,
        fisher_diagonals: Mapping[Tensor, float] | None = None,
        trust_regions: Sequence[tuple[Iterable[Tensor], float | None]] | None = None,
        trust_region_mode: str | TrustRegionMode = "step",
        damping_scaling: str | DampingScaling = "relative",
        step_norm: str | StepNorm = "adam",
        refresh_tolerance: float | None = None,
        refresh_delay: int = 0,
        statistics_fraction: float = 1.0,
        block_options: Mapping[str, Any] | None = None,
        distributed: bool = True,
        average_gradients: bool | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"{type(self).__name__} is built from the model (an nn.Module), got {type(model).__name__}; "
                f"write {type(self).__name__}(model, lr=...)"
            )
        # A DistributedDataParallel wrapper: the blocks are its module's layers (hooked there, named as without the
        # wrapper), and its backward has averaged the gradients already.
        wrapped_by_ddp = data_parallel.is_wrapped_by_ddp(model)
        if wrapped_by_ddp:
            model = model.module
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "damping": damping,
            "max_kl": max_kl,
        }
        _validate_group(defaults)
        if not (is_real_number(factor_decay) and 0.0 <= factor_decay < 1.0):
            raise ValueError(f"Invalid factor_decay: {factor_decay!r} (must be in [0, 1))")
        self.factor_decay = float(factor_decay)
        self.factor_update_interval = _check_interval(factor_update_interval, "factor_update_interval")
        self.eigen_update_interval = _check_interval(eigen_update_interval, "eigen_update_interval")
        if scale_update_interval is None:
            scale_update_interval = self.factor_update_interval
        self.scale_update_interval = _check_interval(scale_update_interval, "scale_update_interval")
        self.max_consecutive_failures = _check_interval(max_consecutive_failures, "max_consecutive_failures")
        self.curvature = Curvature.parse(curvature)
        self.loss_reduction = _parse_enum(LossReduction, loss_reduction, "loss_reduction")

        excluded = set(exclude) if not isinstance(exclude, str) else {exclude}
        module_names = {name for name, _ in model.named_modules()}
        unknown = sorted(excluded - module_names)
        if unknown:
            raise ValueError(f"exclude names modules that the model does not have: {unknown}")
        options = dict(block_options or {})
        self._blocks: list[CurvatureBlock] = []
        for name, module in model.named_modules():
            adapter_cls = adapter_for(module)
            if adapter_cls is None or name in excluded or not module.weight.requires_grad:
                continue
            try:
                adapter = adapter_cls(module)
            except ValueError as error:  # a layer the adapter refuses: name it, and how to leave it out
                message = str(error).replace(EXCLUDE_NAME_PLACEHOLDER, repr(name))
                raise ValueError(f"layer {name!r}: {message}") from None
            block_cls = block_class_for(adapter, self.block_class)
            self._blocks.append(block_cls(name or type(module).__name__, adapter, **options))
        # An embedding whose weight another preconditioned layer shares (a language model's tied input and output
        # embeddings) is left to that layer's block, which sees the gradient of both uses, as before embeddings
        # had blocks of their own: two blocks must not precondition one parameter.
        weight_owners: dict[int, int] = {}
        for block in self._blocks:
            weight_owners[id(block.weight)] = weight_owners.get(id(block.weight), 0) + 1
        self._blocks = [
            block
            for block in self._blocks
            if not (isinstance(block, EmbeddingDiagonalBlock) and weight_owners[id(block.weight)] > 1)
        ]

        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no parameter that requires a gradient")
        owned = {id(p) for block in self._blocks for p in block.adapter.parameters()}
        self._fisher_diagonals: dict[int, float] = {}
        for param, value in (fisher_diagonals or {}).items():
            if not any(param is p for p in params) or id(param) in owned:
                raise ValueError(
                    "fisher_diagonals must name trainable parameters of the model that no preconditioned layer "
                    f"owns; got a tensor of shape {tuple(param.shape)}"
                )
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"Invalid fisher_diagonals value: {value!r} (must be a finite float > 0)")
            self._fisher_diagonals[id(param)] = float(value)
        self.trust_regions = TrustRegions(
            trust_regions, params, max_kl, [(b.name, b.adapter.parameters()) for b in self._blocks]
        )
        self.trust_region_mode = _parse_enum(TrustRegionMode, trust_region_mode, "trust_region_mode")
        self.damping_scaling = _parse_enum(DampingScaling, damping_scaling, "damping_scaling")
        self.step_norm = _parse_enum(StepNorm, step_norm, "step_norm")
        if refresh_tolerance is not None and not (is_real_number(refresh_tolerance) and 0.0 < refresh_tolerance < 1.0):
            raise ValueError(f"Invalid refresh_tolerance: {refresh_tolerance!r} (must be in (0, 1), or None)")
        self.refresh_tolerance = refresh_tolerance
        if not is_nonnegative_int(refresh_delay):
            raise ValueError(f"Invalid refresh_delay: {refresh_delay!r} (must be an integer >= 0)")
        if refresh_delay >= self.eigen_update_interval:
            raise ValueError(
                f"Invalid refresh_delay: {refresh_delay} (must be less than eigen_update_interval="
                f"{self.eigen_update_interval}, so that each refresh lands before the next one starts)"
            )
        self.refresh_delay = int(refresh_delay)
        self._pending_refresh: _PendingRefresh | None = None
        self._refresh_worker: ThreadPoolExecutor | None = None
        if not (is_real_number(statistics_fraction) and 0.0 < statistics_fraction <= 1.0):
            raise ValueError(f"Invalid statistics_fraction: {statistics_fraction!r} (must be in (0, 1])")
        self.statistics_fraction = float(statistics_fraction)
        # Basis refreshes by kind (diagnostics of refresh_tolerance): full eigendecompositions and warm refreshes.
        self.refresh_counts = {"full": 0, "warm": 0}
        # Data parallel (acktr_kfe.distributed): on when a process group of several ranks is initialized.
        self.distributed = bool(distributed)
        self.average_gradients = not wrapped_by_ddp if average_gradients is None else bool(average_gradients)
        # Per block name, the refreshes this rank computed, and the rank that computed each block's last refresh.
        self.computed_refreshes: dict[str, int] = {}
        self.last_refresh_owners: dict[str, int] = {}
        super().__init__(params, defaults)
        self._bind_blocks()

        self._step = 0
        self._all_layers_have_factors = False
        self._consecutive_failures: dict[str, int] = {}
        self._warned_missing: set[str] = set()
        self.last_kl_clip_scale: Tensor | None = None
        self.last_predicted_kl: Tensor | None = None
        self.last_kl_clip_scales: Tensor | None = None
        self.last_predicted_kls: Tensor | None = None
        self.last_eigh_ms: float = 0.0
        self.skipped_steps = 0
        # Per block whose momentum lives in its basis (CurvatureBlock.momentum_in_basis): the buffer in basis
        # coordinates, the basis it is in, and the parameter-space buffers it was stored as (with their versions).
        self._basis_buffers: dict[CurvatureBlock, tuple[Tensor, tuple[Any, ...], list[tuple[Tensor, int]]]] = {}
        # (first norm, growth that triggers the next warning) of the parameters and of the gradient.
        self._growth: list[tuple[float | None, float]] = [(None, f) for f in GROWTH_WARNING_FACTORS]
        # Parameters left out of the parameter norm that warning watches (exempt_from_growth_warning).
        self._growth_exempt: set[int] = set()

        optimizer_ref = weakref.ref(self)

        def wants_statistics() -> bool:
            optimizer = optimizer_ref()
            return optimizer is not None and optimizer._wants_statistics()

        self._capture = StatisticsCapture(
            [block.adapter.module for block in self._blocks],
            wants_statistics=wants_statistics,
            always_armed=self.curvature is Curvature.EMPIRICAL,
        )
        weakref.finalize(self, self._capture.remove)

    def _bind_blocks(self) -> None:
        """Point every block at its weight's entry of ``self.state`` (again after ``load_state_dict``)."""
        for block in self._blocks:
            block.bind(self.state)

    # --- public helpers ----------------------------------------------------------------------------------
    def set_trust_region_radius(self, index: int, radius: float | None) -> None:
        """Change the radius of trust region ``index`` (an adaptive radius, a schedule)."""
        self.trust_regions.set_radius(index, radius, self.param_groups[0])

    @property
    def blocks(self) -> list[CurvatureBlock]:
        """The curvature block of each preconditioned layer, in the order of ``model.named_modules()``."""
        return list(self._blocks)

    @property
    def preconditioned_layers(self) -> list[str]:
        """Names (as in ``model.named_modules()``) of the layers whose gradients are preconditioned."""
        return [block.name for block in self._blocks]

    @property
    def synchronized(self) -> bool:
        """Whether steps are data parallel now: ``distributed`` and a process group of several ranks is up."""
        return self.distributed and data_parallel.is_active()

    @property
    def steps(self) -> int:
        """Number of steps taken (skipped steps not counted)."""
        return self._step

    def exempt_from_growth_warning(self, params: Iterable[Tensor]) -> None:
        """Leave ``params`` out of the parameter norm whose growth is warned about: parameters rescaled on purpose
        outside the optimizer, such as a value head kept in units of its targets' running scale (PopArt), which
        grows tenfold when that scale falls tenfold while the values it gives stay the same. They are still
        stepped, and their gradients still checked."""
        self._growth_exempt.update(id(p) for p in params)

    def record_curvature(self, *, logit_grad_norms: Tensor | None = None):
        """Context manager: backward passes run inside it feed the curvature statistics.

        Use it (or the shorthand :meth:`curvature_backward`) for ``curvature="fisher"`` or
        ``"gauss_newton"``; with ``"empirical"`` every training backward is recorded anyway.
        """
        return self._capture.recording(logit_grad_norms)

    def curvature_backward(
        self,
        loss: Tensor,
        *,
        logits: Tensor | None = None,
        logit_grad_norms: Tensor | None = None,
        retain_graph: bool = False,
        accumulate_grad: bool = False,
    ) -> None:
        """Run a backward pass of ``loss`` that feeds the curvature statistics.

        Args:
            loss: the curvature loss, e.g. ``acktr_kfe.softmax_fisher_loss(logits)`` for the Fisher.
            logits: the model output at which the per-example gradient norms are taken (``curvature="ief"``
                needs it or ``logit_grad_norms``; ignored otherwise).
            logit_grad_norms: for ``curvature="ief"``, the per-example norms ``||d loss / d logits||``, shape
                ``(N,)``, when the caller knows them in closed form (they carry the same ``1 / N`` as the recorded
                output gradients of a mean-reduced loss).
            retain_graph: keep the graph for a following ``loss.backward()`` of the training loss.
            accumulate_grad: also accumulate this loss's gradient into ``.grad`` (for ``empirical`` and
                ``ief``, where the curvature loss is the training loss); by default ``.grad`` is untouched.
        """
        if not self._wants_statistics():
            # Nothing is recorded on this step (the hooks registered nothing at the forward): skip the pass.
            if accumulate_grad:
                loss.backward(retain_graph=retain_graph)
            return
        norms = None
        if self.curvature is Curvature.IEF:
            if logit_grad_norms is not None:
                norms = logit_grad_norms.detach()
            elif logits is None:
                raise ValueError("curvature='ief' needs the logits: curvature_backward(loss, logits=logits)")
            else:
                (logit_grad,) = torch.autograd.grad(loss, logits, retain_graph=True)
                norms = logit_grad.reshape(logit_grad.shape[0], -1).norm(dim=1).detach()
        with self.record_curvature(logit_grad_norms=norms):
            if accumulate_grad:
                loss.backward(retain_graph=retain_graph)
            else:
                # Only the output gradients matter (the hooks take them). Asking autograd for each layer's
                # bias gradient (a sum over the batch) rather than its weight gradient reaches every layer's
                # output while skipping the weight-gradient products.
                inputs = [block.adapter.parameters()[-1] for block in self._blocks]
                torch.autograd.grad(loss, inputs, retain_graph=retain_graph, allow_unused=True)

    def remove_hooks(self) -> None:
        """Detach the optimizer's hooks from the model (the optimizer can no longer record curvature)."""
        self._capture.remove()

    # --- schedule ------------------------------------------------------------------------------------------
    def _is_factor_step(self, step: int) -> bool:
        return step % self.factor_update_interval == 0

    def _is_eigen_step(self, step: int) -> bool:
        return step % self.eigen_update_interval == 0

    def _is_scale_step(self, step: int) -> bool:
        return step % self.scale_update_interval == 0 and any(b.has_basis_statistics for b in self._blocks)

    def _wants_statistics(self) -> bool:
        if self._is_factor_step(self._step) or self._is_scale_step(self._step):
            return True
        if not self._all_layers_have_factors:
            # Runs once per hooked forward: cache the answer once every layer has its factors.
            self._all_layers_have_factors = all(block.has_statistics for block in self._blocks)
        return not self._all_layers_have_factors

    # --- statistics ----------------------------------------------------------------------------------------
    def _layer_rows(self, block: CurvatureBlock, records: list[Record]) -> list[Rows]:
        """Activations ``(N, T, in)`` and per-example-scaled output gradients ``(N, T, out)`` of each record.

        Statistics are kept in float32 (float64 for a float64 layer) whatever the precision of the forward and
        backward passes (autocast, a bf16 model). With a mean-reduced loss the output gradients are multiplied by
        the number of examples the loss averaged over: the batch, or with gradient accumulation (each micro-batch's
        loss divided by the number of micro-batches, so that the accumulated gradient is the mean over all of
        them) the examples of every micro-batch recorded since the last step.
        """
        rows = []
        sampled = []
        batches: dict[int, int] = {}
        for position, record in enumerate(records):
            batches.setdefault(record.generation, record.grad_output.shape[0])
            # The subsampled record carries the matching subset of iEF's per-example norms.
            record = self._subsample(block, record, position)
            acts, grads = block.rows(record.layer_input, record.grad_output)
            if acts.shape[0] != grads.shape[0]:
                raise RuntimeError(
                    f"layer {block.name}: input batch {acts.shape[0]} does not match output batch {grads.shape[0]}"
                )
            rows.append((acts, grads))
            sampled.append(record)
        scale = float(sum(batches.values())) if self.loss_reduction is LossReduction.MEAN else 1.0
        return [self._scaled_rows(acts, grads, record, scale) for (acts, grads), record in zip(rows, sampled)]

    def _subsample(self, block: CurvatureBlock, record: Record, position: int) -> Record:
        """The record restricted to a random ``statistics_fraction`` of its examples (all of them at 1). The subset
        is drawn from a generator seeded by the step, the layer and the record, so a resumed run draws the same."""
        batch = record.grad_output.shape[0]
        keep = max(1, round(self.statistics_fraction * batch))
        if keep >= batch or record.layer_input.shape[0] != batch:
            return record
        device = record.grad_output.device
        generator = torch.Generator(device=device)
        generator.manual_seed(zlib.crc32(f"{self._step}/{block.name}/{position}".encode()))
        index = torch.randperm(batch, generator=generator, device=device)[:keep]
        norms = record.logit_grad_norms
        return Record(
            record.layer_input[index],
            record.grad_output[index],
            None if norms is None else norms[index],
            record.generation,
        )

    def _scaled_rows(self, acts: Tensor, grads: Tensor, record: Record, scale: float) -> Rows:
        if self.curvature is Curvature.IEF:
            if record.logit_grad_norms is None:
                raise RuntimeError(
                    "curvature='ief' needs the per-example logit gradient norms: record with "
                    "optimizer.curvature_backward(loss, logits=logits, accumulate_grad=True)"
                )
            # iEF (Wu et al. 2024): divide each example's gradient by ||d l_n / d z_n||. Both the output
            # gradients and the recorded norms carry the same 1/N of a mean-reduced loss, which cancels.
            norms = record.logit_grad_norms.to(grads.dtype).reshape(-1, 1, 1)
            return acts, grads / norms.clamp_min(torch.finfo(grads.dtype).tiny)
        return acts, grads * scale

    def _update_curvature(self, records: dict[nn.Module, list[Record]], step: int) -> None:
        """The statistics step: every block's statistics, bases and basis statistics, on their schedules."""
        rows: dict[CurvatureBlock, list[Rows]] = {}
        for block in self._blocks:
            block_records = records.get(block.adapter.module)
            if block_records:
                rows[block] = self._layer_rows(block, block_records)

        if self._is_factor_step(step):
            self._update_statistics(rows)
        else:
            # Off the factor schedule, only layers that have no factors yet (first reached late) get them.
            missing = {block: r for block, r in rows.items() if not block.has_statistics}
            if missing:
                self._update_statistics(missing)

        if self._pending_refresh is not None and self._pending_refresh.due <= step:
            self._install_pending_refresh()
        refresh = [block for block in self._blocks if block.wants_refresh(self._is_eigen_step(step))]
        if refresh and self.refresh_delay:
            # A block without a basis gets its first one now; the others keep theirs until the background
            # refresh lands, refresh_delay steps later.
            later = [block for block in refresh if block.ready]
            first = [block for block in refresh if not block.ready]
            if first:
                self._refresh_bases(first)
            if later:
                self._start_refresh(later, step + self.refresh_delay)
        elif refresh:
            self._refresh_bases(refresh)
        if self._is_scale_step(step):
            self._update_basis_statistics(rows)

    def _update_statistics(self, rows: dict[CurvatureBlock, list[Rows]]) -> None:
        """Each block's batch statistics, folded in only if every block's are finite (one host sync)."""
        batches = {block: block.batch_statistics(block_rows) for block, block_rows in rows.items()}
        if not batches:
            return
        if self.synchronized:
            # Data parallel: every rank's batch statistics, averaged in one bucketed all-reduce before the check
            # (those of the combined batch for equal per-rank batches): every rank folds in the same values, or
            # skips them alike.
            tensors = [tensor for batch in batches.values() for tensor in batch]
            data_parallel.all_reduce_mean(tensors, what="curvature statistics")
        checks = torch.stack([sum(t.sum() for t in batch) for batch in batches.values()])
        if not bool(torch.isfinite(checks).all()):
            self._failure("statistics", "non-finite curvature statistics; factors left unchanged")
            return
        self._consecutive_failures["statistics"] = 0
        for block, batch in batches.items():
            block.update_statistics(batch, self.factor_decay)

    def _refresh_bases(self, blocks: list[CurvatureBlock]) -> None:
        """Refresh the basis of each block in ``blocks``; a failed decomposition counts as one failure per round.

        Data parallel (KAISA, Pauloski et al. 2021): each block's refresh runs on one rank, assigned by
        ``refresh_cost`` (the same greedy assignment on every rank), and its ``basis_tensors`` are broadcast from
        there. A block without a basis yet is refreshed on every rank (which creates its tensors) and then takes
        its owner's.
        """
        start = time.perf_counter()
        failed: list[str] = []
        synchronized = self.synchronized
        owners = data_parallel.assign_by_cost([b.refresh_cost() for b in blocks]) if synchronized else None
        here = data_parallel.rank() if synchronized else 0
        for index, block in enumerate(blocks):
            if owners is not None and owners[index] != here and block.ready:
                continue
            failed += self._count_refresh(block, block.refresh(self.refresh_tolerance))
        self.last_eigh_ms = 1000.0 * (time.perf_counter() - start)
        failed_elsewhere = False
        if owners is not None:
            data_parallel.broadcast_from_owners([b.basis_tensors() for b in blocks], owners, what="eigenbases")
            for block, owner in zip(blocks, owners):
                self.last_refresh_owners[block.name] = owner
                if owner != here:
                    block.adopt_basis()
                    _drop_basis_buffer(block)
            failed_elsewhere = data_parallel.agree_any(bool(failed), what="the eigendecomposition check")
        self._refresh_failures(failed, failed_elsewhere)

    def _count_refresh(self, block: CurvatureBlock, result: RefreshResult) -> list[str]:
        """Count one block's refresh; its failed factors, for the failure warning."""
        self.refresh_counts["full"] += result.full
        self.refresh_counts["warm"] += result.warm
        self.computed_refreshes[block.name] = self.computed_refreshes.get(block.name, 0) + 1
        _drop_basis_buffer(block)
        return [f"{key} of layer {block.name}" for key in result.failed]

    def _refresh_failures(self, failed: list[str], failed_elsewhere: bool = False) -> None:
        if failed or failed_elsewhere:
            # One failure per refresh round, however many factors failed in it (on any rank).
            where = ", ".join(failed) if failed else "a layer refreshed on another rank"
            self._failure(
                "eigh",
                f"eigendecomposition of factor {where} failed; keeping the last basis "
                "(the factor's diagonal where there was none)",
            )
        else:
            self._consecutive_failures["eigh"] = 0

    def _start_refresh(self, blocks: list[CurvatureBlock], due: int) -> None:
        """Start the refreshes of ``blocks`` in a background thread, on copies of their factors; they are installed
        at step ``due``. On a GPU they run in a side stream."""
        self._install_pending_refresh()  # none pending while refresh_delay < eigen_update_interval
        inputs = [block.refresh_inputs(copy=True) for block in blocks]
        device = blocks[0].weight.device
        stream = None
        if device.type == "cuda":
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))  # after the copies above
        tolerance = self.refresh_tolerance

        def compute() -> list[dict[str, Any]]:
            if stream is None:
                return [block.compute_refresh(i, tolerance) for block, i in zip(blocks, inputs)]
            with torch.cuda.device(device), torch.cuda.stream(stream):
                computed = [block.compute_refresh(i, tolerance) for block, i in zip(blocks, inputs)]
            stream.synchronize()  # this thread waits; the training stream never does
            return computed

        if self._refresh_worker is None:
            self._refresh_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="acktr-kfe-refresh")
            weakref.finalize(self, self._refresh_worker.shutdown, wait=False)
        self._pending_refresh = _PendingRefresh(due, list(blocks), self._refresh_worker.submit(compute))

    def _install_pending_refresh(self) -> None:
        """Wait for the background refreshes (if still running) and install their bases."""
        pending, self._pending_refresh = self._pending_refresh, None
        if pending is None:
            return
        start = time.perf_counter()
        computed = pending.future.result()
        failed: list[str] = []
        for block, result in zip(pending.blocks, computed):
            if block.weight.device.type == "cuda":  # made in the side stream, used in the current one from now on
                for value in result.values():
                    if isinstance(value, Tensor):
                        value.record_stream(torch.cuda.current_stream(block.weight.device))
            failed += self._count_refresh(block, block.install_refresh(result))
        self.last_eigh_ms = 1000.0 * (time.perf_counter() - start)  # the wait, not the decompositions
        self._refresh_failures(failed)

    def _update_basis_statistics(self, rows: dict[CurvatureBlock, list[Rows]]) -> None:
        """Each block's estimate in its basis (EKFAC's scale), folded in only if every one is finite."""
        estimates = {}
        for block, block_rows in rows.items():
            estimate = block.basis_statistics(block_rows)
            if estimate is not None:
                estimates[block] = estimate
        if not estimates:
            return
        if self.synchronized:  # as the factors: the estimate of every rank's batch, in the bases all ranks share
            data_parallel.all_reduce_mean(list(estimates.values()), what="basis statistics")
        if not bool(torch.isfinite(torch.stack([s.sum() for s in estimates.values()])).all()):
            self._failure("statistics", "non-finite EKFAC scale estimate; scale left unchanged")
            return
        for block, estimate in estimates.items():
            block.update_basis_statistics(estimate)

    def _failure(self, kind: str, message: str) -> None:
        """Count a numerical failure of one kind (gradient, statistics, eigh): warn, or raise when repeated."""
        count = self._consecutive_failures[kind] = self._consecutive_failures.get(kind, 0) + 1
        if count >= self.max_consecutive_failures:
            raise RuntimeError(
                f"{type(self).__name__}: {count} consecutive numerical failures, the last: "
                f"{message}. Check the loss and the learning rate; a larger damping may help."
            )
        _warn(f"{type(self).__name__}: {message}")

    def _block_damping(self, block: CurvatureBlock, damping: float) -> float:
        """The damping added to this block's curvature (see :class:`DampingScaling`)."""
        return block.damping(damping, relative=self.damping_scaling is DampingScaling.RELATIVE)

    # --- the step --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        """Precondition the gradients and take one (trust-region scaled) momentum step.

        Args:
            closure: optional callable that re-evaluates the model and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        _validate_group(group)
        lr, momentum = group["lr"], group["momentum"]
        weight_decay, damping = group["weight_decay"], group["damping"]

        params = [p for p in group["params"] if p.grad is not None]
        popped = self._capture.pop_records()
        if not params:
            return loss
        # A batch of no example (an empty last batch, a mask that kept nothing) records empty passes: there is
        # nothing to learn from it, and nothing to reshape.
        records = {m: [r for r in rs if r.grad_output.numel() > 0] for m, rs in popped.items()}
        records = {m: rs for m, rs in records.items() if rs}
        synchronized = self.synchronized
        if synchronized and self.refresh_delay:  # checked on every step, before any work of a data-parallel run
            raise RuntimeError(
                f"{type(self).__name__}: refresh_delay={self.refresh_delay} is not supported with data parallel "
                "training (each rank refreshes its share and broadcasts it in the step); use refresh_delay=0"
            )
        if synchronized and self.average_gradients:
            data_parallel.average_gradients(params)  # data parallel without DDP: the mean gradient over the ranks
        empty = bool(popped) and not records
        # A non-finite gradient must never reach the parameters (docs/DESIGN.md, section 7), nor one whose squares
        # overflow (finite entries near 1e20 in float32): Adam's second moment, the momentum norm and the trust
        # region's quadratic form would keep an Inf. One host sync per step decides, and gives the growth check its
        # norms.
        watched = [p.detach() for p in params if id(p) not in self._growth_exempt] or [params[0].new_zeros(())]
        param_squares = torch.stack([_sum_of_squares(p) for p in watched]).sum()
        grad_squares = torch.stack([_sum_of_squares(p.grad) for p in params]).sum()
        param_squares, grad_squares = torch.stack([param_squares, grad_squares]).tolist()
        non_finite = not math.isfinite(grad_squares)
        if synchronized:  # every rank skips, or none (one all-reduce of both decisions)
            empty, non_finite = data_parallel.agree_flags([empty, non_finite], what="the skip decisions")
        if empty:
            self.skipped_steps += 1
            _warn(f"{type(self).__name__}: the batch holds no example; the step was skipped")
            return loss
        self._watch_growth(math.sqrt(param_squares), math.sqrt(grad_squares))
        if non_finite:
            self.skipped_steps += 1
            self._failure("gradient", "non-finite gradient (or one whose squares overflow); the step was skipped")
            return loss

        self._follow_weight_dtypes()
        if records:
            self._update_curvature(records, self._step)
        elif self._step == 0 and any(block.weight.grad is not None for block in self._blocks):
            raise RuntimeError(self._no_statistics_message())

        regions = self.trust_regions
        radii = regions.radii(group)
        # Per trust region, the quadratic form of the step it bounds. "direction" (ACKTR paper, OpenAI baselines):
        # D^T grad of the new direction, then the momentum step. "step": u^T F_damped u of the step actually
        # taken, u = momentum buf + D (momentum would otherwise multiply the KL of a steady step by up to
        # 1 / (1 - momentum)^2); with F_damped D = grad, u^T F_damped u = D^T grad + momentum (2 buf^T grad +
        # momentum buf^T F_damped buf), whose last term costs a projection per layer.
        on_step = self.trust_region_mode is TrustRegionMode.STEP and bool(momentum)
        # With step_norm="adam" the regions measure the grafted step itself (_grafted_update), not these forms.
        grafted = self.step_norm is StepNorm.ADAM
        measured = regions.measured(radii, on_step)
        directions: dict[Tensor, Tensor] = {}
        # Blocks whose momentum buffer lives in their basis: the direction, the damped curvature and the previous
        # buffer there (None before the first step; rotated in once per step at most).
        basis_steps: dict[CurvatureBlock, tuple[Tensor, Tensor, Tensor | None]] = {}
        block_dampings: dict[CurvatureBlock, float] = {}
        quadratics = regions.zeros(params[0])

        for block in self._blocks:
            adapter = block.adapter
            grad = adapter.grad_matrix()
            if grad is None:
                continue
            # A bfloat16 / float16 layer: the curvature, the solve and the quadratic forms stay in float32.
            grad = grad.to(block.dtype)
            if weight_decay:
                grad = grad + weight_decay * adapter.param_matrix()
            block_damping = damping
            region = regions.region(block.weight)
            if block.ready:
                block_damping = block_dampings[block] = self._block_damping(block, damping)
                if momentum and block.momentum_in_basis() and all(p.grad is not None for p in adapter.parameters()):
                    # The step in the block's basis: one rotation in here, one out in the update, and the buffer's
                    # quadratic form elementwise (D^T grad and buf^T grad are the same in any orthonormal basis).
                    grad_in_basis = block.to_basis(grad)
                    curvature = block.damped_basis_curvature(block_damping)
                    direction = grad_in_basis / curvature
                    previous = self._basis_buffer(block)
                    basis_steps[block] = (direction, curvature, previous)
                    if region is not None and not grafted:
                        buffer = previous if measured[region] else None
                        buffer_quadratic = None if buffer is None else (curvature * buffer.square()).sum()
                        quadratics[region] += step_quadratic(
                            direction, grad_in_basis, momentum, buffer, buffer_quadratic
                        )
                    continue
                direction = block.precondition(grad, block_damping)
            else:
                if block.name not in self._warned_missing:
                    self._warned_missing.add(block.name)
                    _warn(
                        f"{type(self).__name__}: no curvature recorded yet for layer {block.name}; "
                        "its gradient is used unpreconditioned"
                    )
                direction = grad
            if region is not None and not grafted:
                buffer = self._buffer_matrix(block) if measured[region] else None
                buffer_quadratic = None
                if buffer is not None:
                    buffer_quadratic = block.quadratic(buffer, block_damping) if block.ready else buffer.square().sum()
                quadratics[region] += step_quadratic(direction, grad, momentum, buffer, buffer_quadratic)
            for param, part in zip(adapter.parameters(), adapter.split(direction)):
                if param.grad is not None:  # a bias frozen after construction stays where it is
                    directions[param] = part
        in_basis = {param for block in basis_steps for param in block.adapter.parameters()}
        for param in params:
            if param in directions or param in in_basis:
                continue
            grad = param.grad + weight_decay * param if weight_decay else param.grad
            diagonal = self._fisher_diagonals.get(id(param))
            if diagonal is None:
                directions[param] = grad
                continue
            # A parameter with a known per-example Fisher diagonal (e.g. a Gaussian policy's state-independent
            # log std: 2 per dimension) takes the damped natural-gradient step and counts in its trust region
            # like the layers.
            damped = diagonal * (1 + damping) if self.damping_scaling is DampingScaling.RELATIVE else diagonal + damping
            directions[param] = direction = grad / damped
            region = regions.region(param)
            if region is not None and not grafted:
                buffer = self.state.get(param, {}).get("momentum_buffer") if measured[region] else None
                buffer_quadratic = None if buffer is None else damped * buffer.square().sum()
                quadratics[region] += step_quadratic(direction, grad, momentum, buffer, buffer_quadratic)

        # A non-finite direction (overflowing statistics, a degenerate basis) must never reach the parameters.
        check = [d.sum() for d in directions.values()] + [step[0].sum() for step in basis_steps.values()]
        if self.step_norm is StepNorm.ADAM:
            # The grafted update checks the directions with its step sizes: one agreement across ranks per step.
            scales, quadratics = self._grafted_update(
                directions, basis_steps, block_dampings, lr, momentum, weight_decay, radii, check
            )
            if scales is None:
                self.skipped_steps += 1
                self._failure("step", "non-finite preconditioned direction or step size; the step was skipped")
                return loss
        else:
            scales = regions.scales(quadratics, lr, radii)
            check += [scales.sum(), torch.stack(quadratics).sum()]
            if not self._agreed_finite(torch.stack(check), synchronized):
                self.skipped_steps += 1
                self._failure("step", "non-finite preconditioned direction or trust-region scale; the step was skipped")
                return loss
            self._natural_update(directions, basis_steps, scales, lr, momentum, on_step)
        self._consecutive_failures["step"] = 0

        self.last_kl_clip_scales = scales
        self.last_predicted_kls = regions.predicted(quadratics, lr, scales)
        self.last_kl_clip_scale = scales[0]
        self.last_predicted_kl = self.last_predicted_kls[0]
        self._step += 1
        self._consecutive_failures["gradient"] = 0
        return loss

    @staticmethod
    def _agreed_finite(values: Tensor, synchronized: bool) -> bool:
        """Whether every entry of ``values`` is finite; in a data-parallel run, on every rank (one all-reduce), so
        that a step skipped on one rank is skipped on all and the parameters stay identical."""
        finite = bool(torch.isfinite(values).all())
        if synchronized:
            finite = not data_parallel.agree_any(not finite, what="the non-finite-step decision")
        return finite

    def _follow_weight_dtypes(self) -> None:
        """Bring a layer's statistics to its weight's precision and device when the model was converted after they
        were recorded (``model.double()``, ``.to(device)``); one comparison per layer and step."""
        for block in self._blocks:
            if not block.has_statistics or not block.follow_weight():
                continue
            for param in block.adapter.parameters():
                for key in _PARAM_STATE_KEYS:
                    if key in self.state[param]:
                        self.state[param][key] = self.state[param][key].to(param)

    def _watch_growth(self, param_norm: float, grad_norm: float) -> None:
        """Warn when the parameter norm or the gradient norm has grown by an order of magnitude (again) since the
        first step: a run that is diverging is reported while it is still finite. Checked on every step, from the
        norms of the step's one host sync."""
        for index, (what, norm) in enumerate(zip(("parameter", "gradient"), (param_norm, grad_norm))):
            first, factor = self._growth[index]
            if first is None:
                if norm > 0 and math.isfinite(norm):
                    self._growth[index] = (norm, GROWTH_WARNING_FACTORS[index])
                continue
            if norm > factor * first:
                # An overflowing norm (one bad batch) is reported without raising the next threshold to Inf.
                while math.isfinite(norm) and norm > factor * first:
                    factor *= 10.0
                self._growth[index] = (first, factor)
                _warn(
                    f"{type(self).__name__}: the {what} norm grew from {first:.3g} to {norm:.3g} since the first step "
                    f"(step {self._step}); the run may be diverging: {self._divergence_advice()}"
                )

    def _divergence_advice(self) -> str:
        """What to change when the norms grow, given the settings in use."""
        advice = ["lower lr", "raise damping"]
        if self.step_norm is StepNorm.NATURAL and self.damping_scaling is DampingScaling.RELATIVE:
            # Relative damping vanishes with the curvature, and so does the trust region's KL (README).
            advice.append("use damping_scaling='absolute' with step_norm='natural'")
        if all(radius is None for radius in self.trust_regions.radii(self.param_groups[0])):
            advice.append("set max_kl")
        return ", ".join(advice[:-1]) + " or " + advice[-1]

    def _natural_update(
        self,
        directions: dict[Tensor, Tensor],
        basis_steps: dict[CurvatureBlock, tuple[Tensor, Tensor, Tensor | None]],
        scales: Tensor,
        lr: float,
        momentum: float,
        on_step: bool,
    ) -> None:
        """The natural-gradient momentum step ``p <- p - lr buf`` with the trust-region scales applied."""
        for block, (direction, _, buffer) in basis_steps.items():
            step_scale = self.trust_regions.scale_of(block.weight, scales)
            if buffer is None:
                buffer = direction * step_scale
            elif on_step:
                buffer = buffer.mul(momentum).add_(direction).mul_(step_scale)
            else:
                buffer = buffer.mul(momentum).addcmul_(direction, step_scale)
            parts = self._parameter_buffers(block, buffer)
            for param, part in zip(block.adapter.parameters(), parts):
                self.state[param]["momentum_buffer"] = part
                param.add_(part, alpha=-lr)
            self._keep_basis_buffer(block, buffer, parts)
        for param, direction in directions.items():
            step_scale = self.trust_regions.scale_of(param, scales)
            if not momentum:
                param.addcmul_(direction, step_scale, value=-lr)
                continue
            state = self.state[param]
            buffer = state.get("momentum_buffer")
            if buffer is None:
                state["momentum_buffer"] = buffer = direction * step_scale
            elif on_step:
                # buffer <- nu (momentum buffer + D): nu stays a tensor (no host sync).
                buffer.mul_(momentum).add_(direction).mul_(step_scale)
            else:
                buffer.mul_(momentum).addcmul_(direction, step_scale)
            param.add_(buffer, alpha=-lr)

    def _adam_step(self, param: Tensor, weight_decay: float, pending: dict[Tensor, dict[str, Tensor]]) -> Tensor:
        """Adam's step (Kingma & Ba 2015, PyTorch's defaults: betas 0.9, 0.999, eps 1e-8) for ``param``, from its
        raw gradient. Its moments (``adam_exp_avg``, ``adam_exp_avg_sq`` in the parameter's state) are computed
        out of place into ``pending``: they are stored only when the step is taken."""
        state = self.state[param]
        grad = param.grad + weight_decay * param if weight_decay else param.grad
        exp_avg = state["adam_exp_avg"] if "adam_exp_avg" in state else torch.zeros_like(param)
        exp_avg_sq = state["adam_exp_avg_sq"] if "adam_exp_avg_sq" in state else torch.zeros_like(param)
        exp_avg = exp_avg.lerp(grad, 1 - ADAM_BETAS[0])
        exp_avg_sq = exp_avg_sq.mul(ADAM_BETAS[1]).addcmul_(grad, grad, value=1 - ADAM_BETAS[1])
        pending.setdefault(param, {}).update(adam_exp_avg=exp_avg, adam_exp_avg_sq=exp_avg_sq)
        count = self._step + 1
        denominator = (exp_avg_sq / (1 - ADAM_BETAS[1] ** count)).sqrt_().add_(ADAM_EPS)
        return (exp_avg / (1 - ADAM_BETAS[0] ** count)) / denominator

    def _grafted_update(
        self,
        directions: dict[Tensor, Tensor],
        basis_steps: dict[CurvatureBlock, tuple[Tensor, Tensor, Tensor | None]],
        block_dampings: dict[CurvatureBlock, float],
        lr: float,
        momentum: float,
        weight_decay: float,
        radii: list[float | None],
        direction_checks: list[Tensor],
    ) -> tuple[Tensor | None, list[Tensor]]:
        """``step_norm="adam"``: each layer moves along its preconditioned momentum direction by the length of
        Adam's step for that layer (learning-rate grafting, Agarwal et al. 2020); parameters outside the
        preconditioned layers take Adam's step. A trust region, where set, then bounds ``0.5 lr^2 u^T F_damped u``
        of the step ``u`` actually taken. Returns the scales (``None`` when a direction, given by its
        ``direction_checks``, or a step size is not finite: nothing is changed then) and the quadratic forms per
        region."""
        regions = self.trust_regions
        quadratics = regions.zeros(self.param_groups[0]["params"][0])
        steps: dict[Tensor, Tensor] = {}
        checks: list[Tensor] = list(direction_checks)
        # New moments and momentum buffers, stored only once every check has passed: a skipped step leaves them.
        pending: dict[Tensor, dict[str, Tensor]] = {}
        pending_in_basis: dict[CurvatureBlock, tuple[Tensor, list[Tensor]]] = {}
        for block, (direction, curvature, previous) in basis_steps.items():
            params = block.adapter.parameters()
            adam_norm_sq = sum(self._adam_step(p, weight_decay, pending).square().sum() for p in params)
            buffer = direction.clone() if previous is None else previous.mul(momentum).add_(direction)
            buffer_norm = torch.linalg.vector_norm(buffer)  # the rotation keeps the norm
            length = torch.sqrt(adam_norm_sq) / buffer_norm.clamp_min(torch.finfo(buffer_norm.dtype).tiny)
            checks += [adam_norm_sq, buffer_norm, length]
            parts = self._parameter_buffers(block, buffer)
            pending_in_basis[block] = (buffer, parts)
            for param, part in zip(params, parts):
                pending[param]["momentum_buffer"] = part
                steps[param] = part * length
            region = regions.region(block.weight)
            if region is not None and radii[region] is not None:
                quadratics[region] += length.square() * (curvature * buffer.square()).sum()
        for block in self._blocks:
            if block in basis_steps:
                continue
            params = [p for p in block.adapter.parameters() if p in directions]
            if not params:
                continue
            adam_norm_sq = sum(self._adam_step(p, weight_decay, pending).square().sum() for p in params)
            buffers = []
            for param in params:
                buffer = self.state.get(param, {}).get("momentum_buffer")
                if buffer is None or not momentum:
                    buffer = directions[param].clone()
                else:
                    buffer = buffer.mul(momentum).add_(directions[param])
                pending[param]["momentum_buffer"] = buffer
                buffers.append(buffer)
            buffer_norm = torch.sqrt(sum(b.square().sum() for b in buffers))
            length = torch.sqrt(adam_norm_sq) / buffer_norm.clamp_min(torch.finfo(buffer_norm.dtype).tiny)
            # An overflowing Adam norm or buffer norm would make the length Inf or 0: both are failures.
            checks += [adam_norm_sq, buffer_norm, length]
            for param, buffer in zip(params, buffers):
                steps[param] = buffer * length
            region = regions.region(block.weight)
            complete = all(p in steps for p in block.adapter.parameters())
            if region is not None and radii[region] is not None and block.ready and complete:
                matrix = block.adapter.join([steps[p] for p in block.adapter.parameters()])
                quadratics[region] += block.quadratic(matrix, block_dampings[block])
        for param in directions:
            if param not in steps:
                steps[param] = self._adam_step(param, weight_decay, pending)
        scales = regions.scales(quadratics, lr, radii)
        if not self._agreed_finite(torch.stack([*checks, scales.sum()]), self.synchronized):
            return None, quadratics
        for param, entries in pending.items():
            self.state[param].update(entries)
        for block, (buffer, parts) in pending_in_basis.items():
            self._keep_basis_buffer(block, buffer, parts)
        for param, step in steps.items():
            param.addcmul_(step, regions.scale_of(param, scales), value=-lr)
        return scales, quadratics

    def _basis_buffer(self, block: CurvatureBlock) -> Tensor | None:
        """The layer's momentum buffer in the block's basis: the one kept from the last step while the basis and the
        stored buffers are unchanged, else the stored buffers rotated in (after a refresh, a load, or a change made
        outside the optimizer); ``None`` before the first step."""
        buffers = [self.state.get(p, {}).get("momentum_buffer") for p in block.adapter.parameters()]
        if any(b is None for b in buffers):
            return None
        kept = self._basis_buffers.get(block)
        if kept is not None:
            buffer, key, stored = kept
            same_basis = len(key) == len(current := block.basis_key()) and all(
                a is b if isinstance(a, Tensor) else a == b for a, b in zip(key, current)
            )
            if same_basis and all(b is s and b._version == v for b, (s, v) in zip(buffers, stored)):
                return buffer
        return block.to_basis(block.adapter.join(buffers))

    def _parameter_buffers(self, block: CurvatureBlock, buffer: Tensor) -> list[Tensor]:
        """A buffer in the block's basis rotated back, one contiguous tensor per parameter."""
        return [part.contiguous() for part in block.adapter.split(block.from_basis(buffer))]

    def _keep_basis_buffer(self, block: CurvatureBlock, buffer: Tensor, parts: list[Tensor]) -> None:
        """Keep the buffer in the block's basis for the next step, and in the state (``momentum_in_basis``, until the
        next refresh) so that a resumed run continues from the same numbers."""
        self.state[block.weight]["momentum_in_basis"] = buffer
        self._basis_buffers[block] = (buffer, block.basis_key(), [(part, part._version) for part in parts])

    def _restore_basis_buffers(self) -> None:
        """After a load: the saved buffers in basis coordinates, for the stored buffers and basis they came with."""
        self._basis_buffers.clear()
        for block in self._blocks:
            buffer = self.state[block.weight].get("momentum_in_basis") if block.has("momentum_in_basis") else None
            parts = [self.state.get(p, {}).get("momentum_buffer") for p in block.adapter.parameters()]
            if buffer is None or not block.ready or not block.momentum_in_basis() or any(b is None for b in parts):
                continue
            self._keep_basis_buffer(block, buffer, parts)

    def _buffer_matrix(self, block: CurvatureBlock) -> Tensor | None:
        """The layer's momentum buffer as one ``(out, in+1)`` matrix, or ``None`` before the first step."""
        buffers = [self.state.get(p, {}).get("momentum_buffer") for p in block.adapter.parameters()]
        if any(b is None for b in buffers):
            return None
        return block.adapter.join(buffers)

    def _no_statistics_message(self) -> str:
        how = {
            Curvature.EMPIRICAL: "call loss.backward() with the model in training mode before step()",
            Curvature.FISHER: (
                "call optimizer.curvature_backward(acktr_kfe.softmax_fisher_loss(logits), retain_graph=True) "
                "(or another *_fisher_loss) before the training loss's backward"
            ),
            Curvature.GAUSS_NEWTON: (
                "call optimizer.curvature_backward(acktr_kfe.gauss_newton_loss(prediction), retain_graph=True) "
                "before the training loss's backward"
            ),
            Curvature.IEF: "call optimizer.curvature_backward(loss, logits=logits, accumulate_grad=True)",
        }[self.curvature]
        return (
            f"{type(self).__name__}: no curvature statistics were recorded before the first step "
            f"(curvature={self.curvature.value!r}); {how}."
        )

    # --- serialization ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The optimizer state: per-layer factors, eigenbases, scales, momentum, and the step counters."""
        state = super().state_dict()
        state["kronecker"] = {
            "type": type(self).__name__,
            "step": self._step,
            "consecutive_failures": dict(self._consecutive_failures),
            "skipped_steps": self.skipped_steps,
        }
        pending = self._pending_refresh
        if pending is not None:
            # Refreshes still in the background: saved with the step they land at, so a resumed run installs the
            # same bases at the same step.
            state["kronecker"]["pending_refresh"] = {
                "due": pending.due,
                "blocks": {block.name: computed for block, computed in zip(pending.blocks, pending.future.result())},
            }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state saved by :meth:`state_dict`; a mismatched or corrupted state raises ``ValueError``."""
        state_dict = dict(state_dict)
        extra = state_dict.pop("kronecker", None)
        if not isinstance(extra, dict) or extra.get("type") != type(self).__name__:
            found = extra.get("type") if isinstance(extra, dict) else "a state without K-FAC counters"
            raise ValueError(f"cannot load {found} into {type(self).__name__}")
        step, failures, skipped = _validate_counters(extra)
        self._validate_state(state_dict)
        pending = self._validate_pending_refresh(extra.get("pending_refresh"), step)
        super().load_state_dict(state_dict)
        self._step, self._consecutive_failures, self.skipped_steps = step, failures, skipped
        if self._pending_refresh is not None:
            self._pending_refresh.future.cancel()
        self._pending_refresh = pending
        self._all_layers_have_factors = False
        self._bind_blocks()
        self._restore_basis_buffers()

    def _validate_pending_refresh(self, saved: Any, step: int) -> _PendingRefresh | None:
        """The saved background refreshes, checked (layers, step, shapes, finite values) and ready to install."""
        if saved is None:
            return None
        blocks = {block.name: block for block in self._blocks}
        if (
            not isinstance(saved, dict)
            or not is_nonnegative_int(saved.get("due"))
            or not isinstance(saved.get("blocks"), dict)
            or not step <= saved["due"] < step + self.eigen_update_interval
        ):
            raise ValueError(f"corrupted optimizer state: pending_refresh {saved!r:.200}")
        chosen, computed = [], []
        for name, result in saved["blocks"].items():
            block = blocks.get(name)
            if block is None or not isinstance(result, dict):
                raise ValueError(f"corrupted optimizer state: pending_refresh of unknown layer {name!r}")
            shapes = block.state_shapes()
            converted = {}
            for key, value in result.items():
                if isinstance(value, Tensor):
                    if key not in shapes or tuple(value.shape) != shapes[key] or not bool(torch.isfinite(value).all()):
                        raise ValueError(f"corrupted optimizer state: pending_refresh {key} of layer {name}")
                    value = value.to(device=block.weight.device, dtype=block.dtype)
                converted[key] = value
            chosen.append(block)
            computed.append(converted)
        future: Future = Future()
        future.set_result(computed)
        return _PendingRefresh(int(saved["due"]), chosen, future)

    def _validate_state(self, state_dict: dict[str, Any]) -> None:
        """Check every tensor of a state to load (shape, floating dtype, finite values) before anything changes:
        a corrupted state raises here, not steps later."""
        groups, saved_state = state_dict.get("param_groups"), state_dict.get("state")
        if not isinstance(groups, list) or len(groups) != 1 or not isinstance(saved_state, dict):
            raise ValueError("corrupted optimizer state: expected one parameter group and a 'state' mapping")
        try:
            _validate_group({**self.defaults, **{k: v for k, v in groups[0].items() if k != "params"}})
        except (TypeError, ValueError) as error:
            raise ValueError(f"corrupted optimizer state: param_groups: {error}") from None
        saved_ids = groups[0].get("params", [])
        params = self.param_groups[0]["params"]
        if len(saved_ids) != len(params):
            raise ValueError(f"the state holds {len(saved_ids)} parameters, the optimizer {len(params)}")
        blocks = {id(block.weight): block for block in self._blocks}
        for saved_id, param in zip(saved_ids, params):
            block = blocks.get(id(param))
            where = f"layer {block.name}" if block is not None else f"a parameter of shape {tuple(param.shape)}"
            shapes = {key: tuple(param.shape) for key in _PARAM_STATE_KEYS}
            counts: tuple[str, ...] = ("factor_updates", "scale_updates")
            non_negative: tuple[str, ...] = ("adam_exp_avg_sq",)
            if block is not None:
                shapes.update(block.state_shapes())
                shapes["momentum_in_basis"] = (block.adapter.out_dim, block.adapter.in_dim)
                counts = tuple({*counts, *block.count_keys})
                non_negative += block.non_negative_keys
            for key, value in saved_state.get(saved_id, {}).items():
                if key in counts:
                    if not is_nonnegative_int(value):
                        raise ValueError(
                            f"corrupted optimizer state: {key} of {where} is {value!r}, expected an integer >= 0"
                        )
                    continue
                if key not in shapes:
                    continue
                if not isinstance(value, Tensor):
                    raise ValueError(
                        f"corrupted optimizer state: {key} of {where} is a {type(value).__name__}, expected a tensor"
                    )
                if tuple(value.shape) != shapes[key]:
                    raise ValueError(
                        f"corrupted optimizer state: {key} of {where} has shape {tuple(value.shape)}, "
                        f"expected {shapes[key]}"
                    )
                if not value.is_floating_point():
                    raise ValueError(f"corrupted optimizer state: {key} of {where} has dtype {value.dtype}")
                if not bool(torch.isfinite(value).all()):
                    raise ValueError(f"corrupted optimizer state: {key} of {where} holds NaN or Inf")
                if key in non_negative and bool((value < 0).any()):
                    raise ValueError(
                        f"corrupted optimizer state: {key} of {where} holds negative values (curvature "
                        "eigenvalues and second moments are >= 0)"
                    )

    def __repr__(self) -> str:
        group = self.param_groups[0]
        hyper = ", ".join(f"{k}={group[k]}" for k in ("lr", "momentum", "weight_decay", "damping", "max_kl"))
        return (
            f"{type(self).__name__}({hyper}, curvature={self.curvature.value!r}, layers={self.preconditioned_layers})"
        )


class KFAC(KroneckerPreconditioner):
    r"""K-FAC (Martens & Grosse 2015; KFC for convolutions, Grosse & Martens 2016) with a momentum step.

    Each layer's curvature is a :class:`acktr_kfe.KFACBlock` (an ``nn.Embedding``'s a
    :class:`acktr_kfe.EmbeddingDiagonalBlock`); the schedule and the step are :class:`KroneckerPreconditioner`'s.

    For each preconditioned layer (``nn.Linear``, ``nn.Conv2d``, or a type added with
    :func:`acktr_kfe.register_adapter`) with gradient ``grad = [dW | db]`` of shape ``(out, in+1)``:

    .. code-block:: text

        every factor_update_interval steps (from the recorded backward pass; see Curvature):
            A <- decay A + (1 - decay) E_n[sum_t a_hat a_hat^T]        (first update: A = batch value)
            G <- decay G + (1 - decay) E_n[sum_t g g^T] / T            (g per example: x N for a mean loss)
        every eigen_update_interval steps:
            A = Q_A diag(d_A) Q_A^T,  G = Q_G diag(d_G) Q_G^T          (robust eigh, float64 retry)
        every step:
            grad <- grad + weight_decay [W | b]
            damping_scaling "relative" (default): lambda = damping ||G||_F ||A||_F;  "absolute": lambda = damping
            damping_mode "factored":  pi = sqrt((tr A / dim A) / (tr G / dim G))
                D = (G + sqrt(lambda)/pi I)^-1 grad (A + pi sqrt(lambda) I)^-1
            damping_mode "eigen":
                D = Q_G [ (Q_G^T grad Q_A) / (d_G d_A^T + lambda) ] Q_A^T
            step_norm "adam" (default; learning-rate grafting, Agarwal et al. 2020):
                buf <- momentum buf + D
                a = Adam's step for the layer's parameters (betas 0.9, 0.999, eps 1e-8, from grad)
                u = (||a|| / ||buf||) buf                                  (the layer moves by Adam's length)
                nu = min(1, sqrt(2 max_kl / (lr^2 u^T F_damped u)))        (1 without max_kl)
                p <- p - lr nu u;   other parameters: p <- p - lr nu a
            step_norm "natural" (the papers' step); other parameters: D = grad (+ weight_decay p)
                trust_region_mode "step" (default; bounds the step taken, momentum included):
                    u = momentum buf + D
                    nu = min(1, sqrt(2 max_kl / (lr^2 u^T F_damped u)))
                         u^T F_damped u = D^T grad + momentum (2 buf^T grad + momentum buf^T F_damped buf)
                    buf <- nu u;   p <- p - lr buf
                trust_region_mode "direction" (ACKTR paper):
                    nu = min(1, sqrt(2 max_kl / (lr^2 D^T grad)))
                    buf <- momentum buf + nu D;   p <- p - lr buf

    The defaults (relative damping, Adam-length steps) make the step independent of the loss's units and bounded
    on any model: ``KFAC(model)`` in the plain loop (README, docs/BENCHMARKS.md's drop-in table).

    Args:
        model: the model; its Linear and Conv2d layers are preconditioned, other parameters take Adam's step
            (``step_norm="adam"``) or the same momentum step with their raw gradient (``"natural"``).
        lr: learning rate, read from ``param_groups`` at every step (schedulers work); Adam's learning rate with
            ``step_norm="adam"``.
        momentum: heavy-ball momentum in ``[0, 1)``.
        weight_decay: L2 coefficient added to the gradient before preconditioning.
        damping: Tikhonov damping ``> 0`` (in ``param_groups``), a fraction of each block's curvature norm or an
            absolute value (``damping_scaling``).
        max_kl: ACKTR trust region; ``None`` disables it.
        damping_scaling: ``"relative"`` or ``"absolute"`` (see :class:`DampingScaling`).
        step_norm: ``"adam"`` or ``"natural"`` (see :class:`StepNorm`).
        refresh_tolerance: ``None`` (default): every basis refresh is a full eigendecomposition. A value in
            ``(0, 1)``: a refresh first rotates the previous basis by one step of subspace iteration
            (:func:`acktr_kfe.eigen.warm_eigh`, a matrix product and a QR) and keeps it when the off-diagonal mass
            of the factor in it, ``||offdiag(Q^T A Q)||_F / ||Q^T A Q||_F``, is at most this tolerance; otherwise,
            and for the first basis, a full eigendecomposition. ``refresh_counts`` counts both kinds.
        refresh_delay: ``0`` (default): a basis refresh runs inside the step that schedules it. ``d >= 1`` (less
            than ``eigen_update_interval``): it runs in a background thread (on a GPU, in a side stream) on a copy of
            the factors of that step, while the steps in between keep the last basis; its result is installed at
            the start of the step ``d`` steps later, waiting for it there if it has not finished (the ACKTR paper
            computed its inverses asynchronously). The bases, and so the run, do not depend on timing: a run is
            the same for the same ``d`` however long the decompositions take, and a state saved in between holds
            the pending result. A layer's first basis is computed in the step. Not with data parallel training.
        statistics_fraction: the fraction of each recorded batch's examples that feeds the factors and the EKFAC
            scale, drawn at random on each statistics step (the ACKTR paper and kfac-jax estimate the curvature on
            part of the batch); 1 uses every example. The gradient always uses the whole batch.
        distributed: data parallel on ``torch.distributed`` (:mod:`acktr_kfe.distributed`) when a process group
            of several ranks is initialized (ignored otherwise): the batch statistics (factors, the EKFAC scale)
            are averaged across ranks in one bucketed all-reduce per statistics step, each layer's
            eigendecomposition runs on one rank chosen by cost and is broadcast from it, the skip decisions are
            taken alike, and (see ``average_gradients``) the gradients are averaged, so every rank takes the same
            step: that of one process on the combined batch, for equal per-rank batches. ``False``: this rank's
            optimizer ignores the others.
        average_gradients: average the gradients across ranks at the start of ``step`` (data parallel only).
            ``None`` (default): unless the model given is a ``DistributedDataParallel`` wrapper, whose backward
            has averaged them already.
        factor_decay: running-average decay of A and G, in ``[0, 1)``.
        factor_update_interval: steps between factor updates.
        eigen_update_interval: steps between eigendecompositions (and damped inverses).
        damping_mode: ``"factored"`` or ``"eigen"``.
        curvature: ``"empirical"``, ``"fisher"``, ``"gauss_newton"`` or ``"ief"`` (see
            :class:`acktr_kfe.Curvature`).
        loss_reduction: ``"mean"`` (the recorded loss is a batch mean) or ``"sum"``.
        exclude: names of modules (as in ``named_modules()``) not to precondition.
        fisher_diagonals: ``{parameter: value}`` for parameters outside the preconditioned layers whose per-example
            Fisher is a known constant diagonal (a diagonal Gaussian policy's state-independent ``log_std``: 2).
            They step by ``grad / (value + damping)`` and count in the trust region; other parameters outside the
            layers take the raw gradient.
        trust_region_mode: ``"step"`` or ``"direction"`` (see above; the grafted step is always bounded as taken).
        trust_regions: separate trust regions, as ``[(parameters, max_kl or None), ...]`` (with ``max_kl=None``):
            each region's step is measured (``u^T F_damped u`` over its parameters) and scaled on its own, as
            ACKTR does for an actor and a critic without shared layers; a radius of ``None`` measures without
            scaling; parameters in no region take the unscaled step. ``None``: one region, every parameter,
            radius ``max_kl``.
        max_consecutive_failures: numerical failures in a row (non-finite gradients or statistics, failed
            eigendecompositions, non-finite steps) tolerated with a warning before a ``RuntimeError``.

    After each step, ``last_kl_clip_scale`` holds ``nu`` and ``last_predicted_kl`` the predicted KL
    ``0.5 (nu lr)^2 u^T F_damped u`` of the step taken (both tensors, no host sync; of the first region when there
    are several, and ``last_kl_clip_scales`` / ``last_predicted_kls`` hold one value per region);
    ``last_eigh_ms`` the time of the last eigendecomposition round.
    """

    block_class: ClassVar[type[CurvatureBlock]] = KFACBlock

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        *,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        damping: float = 1e-2,
        max_kl: float | None = None,
        factor_decay: float = 0.95,
        factor_update_interval: int = 10,
        eigen_update_interval: int = 100,
        damping_mode: str | DampingMode = "factored",
        curvature: str | Curvature = "empirical",
        loss_reduction: str | LossReduction = "mean",
        exclude: Iterable[str] = (),
        max_consecutive_failures: int = 10,
        fisher_diagonals: Mapping[Tensor, float] | None = None,
        trust_regions: Sequence[tuple[Iterable[Tensor], float | None]] | None = None,
        trust_region_mode: str | TrustRegionMode = "step",
        damping_scaling: str | DampingScaling = "relative",
        step_norm: str | StepNorm = "adam",
        refresh_tolerance: float | None = None,
        refresh_delay: int = 0,
        statistics_fraction: float = 1.0,
        distributed: bool = True,
        average_gradients: bool | None = None,
    ) -> None:
        self.damping_mode = _parse_enum(DampingMode, damping_mode, "damping_mode")
        super().__init__(
            model,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            damping=damping,
            max_kl=max_kl,
            factor_decay=factor_decay,
            factor_update_interval=factor_update_interval,
            eigen_update_interval=eigen_update_interval,
            curvature=curvature,
            loss_reduction=loss_reduction,
            exclude=exclude,
            max_consecutive_failures=max_consecutive_failures,
            fisher_diagonals=fisher_diagonals,
            trust_regions=trust_regions,
            trust_region_mode=trust_region_mode,
            damping_scaling=damping_scaling,
            step_norm=step_norm,
            refresh_tolerance=refresh_tolerance,
            refresh_delay=refresh_delay,
            statistics_fraction=statistics_fraction,
            distributed=distributed,
            average_gradients=average_gradients,
            block_options={"damping_mode": self.damping_mode},
        )


class EKFAC(KroneckerPreconditioner):
    r"""EKFAC (George et al. 2018): K-FAC's eigenbasis with a per-coordinate scale re-estimated in it.

    Same factors and eigenbasis as :class:`KFAC`. In the Kronecker-factored eigenbasis (KFE) the per-example
    gradient is ``U_G^T grad_n U_A``; its elementwise second moment ``s`` is the diagonal of the curvature in
    the KFE, the Frobenius-optimal diagonal there (so ``||F - F_EKFAC|| <= ||F - F_KFAC||`` in that basis).

    .. code-block:: text

        every factor_update_interval steps:  A, G running averages (as K-FAC)
        every eigen_update_interval steps:   U_A, U_G <- eigenvectors of A, G;  s <- d_G d_A^T  (K-FAC's diagonal)
        every scale_update_interval steps (from the recorded backward pass, vectorized over examples):
            s_batch = E_n[(U_G^T grad_n U_A)^2]
            scale_mode "minibatch": s <- s_batch
            scale_mode "running":   s <- scale_decay s + (1 - scale_decay) s_batch
                                    (the first estimate after a basis refresh replaces s)
        every step:
            lambda = damping ||s||_2 (damping_scaling "relative", default) or damping ("absolute")
            D = U_G [ (U_G^T grad U_A) / (s + lambda) ] U_A^T
            step length (step_norm), nu, momentum and weight decay as K-FAC

    Each layer's curvature is a :class:`acktr_kfe.EKFACBlock` (an ``nn.Embedding``'s a
    :class:`acktr_kfe.EmbeddingDiagonalBlock`). Right after a basis refresh and before the first scale estimate in
    that basis, EKFAC models exactly the K-FAC block ``kron(G, A)`` (with eigenbasis damping).

    Args:
        model, lr, momentum, weight_decay, damping, max_kl, damping_scaling, step_norm, refresh_tolerance,
        refresh_delay, statistics_fraction, factor_decay,
        factor_update_interval, eigen_update_interval, curvature, loss_reduction, exclude, max_consecutive_failures,
        fisher_diagonals, trust_regions, trust_region_mode: as :class:`KFAC`.
        scale_update_interval: steps between scale estimates.
        scale_mode: ``"minibatch"`` or ``"running"``.
        scale_decay: running-average decay of the scale (``running`` mode); defaults to ``factor_decay``.

    The default intervals (factors and scale every 20 steps, basis every 100) are twice K-FAC's factor interval:
    in EKFAC the factors only feed the eigenbasis, and the scale re-estimates the curvature in it. With them an
    EKFAC step costs about 2.3 SGD steps on the MNIST autoencoder at batch 1000 (docs/BENCHMARKS.md).
    """

    block_class: ClassVar[type[CurvatureBlock]] = EKFACBlock

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        *,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        damping: float = 1e-2,
        max_kl: float | None = None,
        factor_decay: float = 0.95,
        factor_update_interval: int = 20,
        eigen_update_interval: int = 100,
        scale_update_interval: int = 20,
        scale_mode: str | ScaleMode = "minibatch",
        scale_decay: float | None = None,
        curvature: str | Curvature = "empirical",
        loss_reduction: str | LossReduction = "mean",
        exclude: Iterable[str] = (),
        max_consecutive_failures: int = 10,
        fisher_diagonals: Mapping[Tensor, float] | None = None,
        trust_regions: Sequence[tuple[Iterable[Tensor], float | None]] | None = None,
        trust_region_mode: str | TrustRegionMode = "step",
        damping_scaling: str | DampingScaling = "relative",
        step_norm: str | StepNorm = "adam",
        refresh_tolerance: float | None = None,
        refresh_delay: int = 0,
        statistics_fraction: float = 1.0,
        distributed: bool = True,
        average_gradients: bool | None = None,
    ) -> None:
        self.scale_update_interval = _check_interval(scale_update_interval, "scale_update_interval")
        self.scale_mode = _parse_enum(ScaleMode, scale_mode, "scale_mode")
        # Without its own value the scale decays as the factors do; a bad value is reported under the name given.
        name = "factor_decay" if scale_decay is None else "scale_decay"
        scale_decay = factor_decay if scale_decay is None else scale_decay
        if not is_real_number(scale_decay) or not 0.0 <= scale_decay < 1.0:
            raise ValueError(f"Invalid {name}: {scale_decay!r} (must be in [0, 1))")
        self.scale_decay = float(scale_decay)
        super().__init__(
            model,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            damping=damping,
            max_kl=max_kl,
            factor_decay=factor_decay,
            factor_update_interval=factor_update_interval,
            eigen_update_interval=eigen_update_interval,
            curvature=curvature,
            loss_reduction=loss_reduction,
            exclude=exclude,
            max_consecutive_failures=max_consecutive_failures,
            fisher_diagonals=fisher_diagonals,
            trust_regions=trust_regions,
            trust_region_mode=trust_region_mode,
            damping_scaling=damping_scaling,
            step_norm=step_norm,
            refresh_tolerance=refresh_tolerance,
            refresh_delay=refresh_delay,
            statistics_fraction=statistics_fraction,
            distributed=distributed,
            average_gradients=average_gradients,
            scale_update_interval=self.scale_update_interval,
            block_options={"scale_mode": self.scale_mode, "scale_decay": self.scale_decay},
        )


def curvature_matrix(optimizer: KroneckerPreconditioner, module: nn.Module) -> Tensor:
    """The dense curvature block the optimizer currently models for ``module``, without damping.

    Rows and columns follow the parameter order of docs/DESIGN.md, section 2, ``[W | b].flatten()`` with ``W``
    reshaped to ``(out, -1)``, and the per-example scale ``E_n[vec(grad_n) vec(grad_n)^T]``. K-FAC: ``kron(G, A)``
    as of the last eigendecomposition; EKFAC: ``(U_G (x) U_A) diag(s) (U_G (x) U_A)^T``; an embedding: the
    diagonal ``diag(E_n[grad_n ** 2])``. Size ``(out (in+1))^2``: meant for tests and for studying approximation
    quality on small layers.

    Raises:
        ValueError: if the optimizer does not precondition ``module``, or has no curvature for it yet.
    """
    for block in optimizer.blocks:
        if block.adapter.module is module:
            if not block.ready:
                raise ValueError(f"no curvature has been computed yet for layer {block.name}; take a step first")
            return block.modeled_block()
    raise ValueError(
        f"{type(module).__name__} is not preconditioned by this optimizer; "
        f"preconditioned layers: {optimizer.preconditioned_layers}"
    )


# --- the registry of preconditioners by name -----------------------------------------------------------------
_PRECONDITIONERS: dict[str, type[KroneckerPreconditioner]] = {}


def register_preconditioner(
    name: str, cls: type[KroneckerPreconditioner] | type[CurvatureBlock]
) -> type[KroneckerPreconditioner]:
    """Make a preconditioner available by ``name`` (to :func:`preconditioner_class`, the agents and the scripts).

    Args:
        name: a lower-case identifier, e.g. ``"ekfac"``.
        cls: a :class:`KroneckerPreconditioner` subclass, or a :class:`acktr_kfe.CurvatureBlock` subclass, for which
            a :class:`KroneckerPreconditioner` subclass with that ``block_class`` (and the base's defaults) is made.

    Returns:
        The registered optimizer class.

    Raises:
        ValueError: if ``name`` is not a lower-case identifier or is already registered to another class.
        TypeError: if ``cls`` is neither kind of class.
    """
    if not (isinstance(name, str) and name.isidentifier() and name == name.lower()):
        raise ValueError(f"Invalid preconditioner name: {name!r} (must be a lower-case identifier)")
    if isinstance(cls, type) and issubclass(cls, CurvatureBlock):
        block_cls = cls
        cls = type(
            f"{block_cls.__name__}Preconditioner",
            (KroneckerPreconditioner,),
            {
                "block_class": block_cls,
                "__module__": block_cls.__module__,
                "__doc__": f"The {name!r} preconditioner: :class:`KroneckerPreconditioner` with "
                f":class:`{block_cls.__qualname__}` blocks.",
            },
        )
    if not (isinstance(cls, type) and issubclass(cls, KroneckerPreconditioner)):
        raise TypeError(
            f"register_preconditioner takes a KroneckerPreconditioner or CurvatureBlock subclass, got {cls!r}"
        )
    existing = _PRECONDITIONERS.get(name)
    if existing is not None and existing is not cls:
        raise ValueError(f"a preconditioner named {name!r} is already registered ({existing.__name__})")
    _PRECONDITIONERS[name] = cls
    return cls


def preconditioner_class(name: str) -> type[KroneckerPreconditioner]:
    """The optimizer class registered as ``name``; ``ValueError`` listing the valid names otherwise."""
    try:
        return _PRECONDITIONERS[name]
    except (KeyError, TypeError):
        valid = ", ".join(repr(n) for n in available_preconditioners())
        raise ValueError(f"Invalid preconditioner: {name!r}. Valid values: {valid}") from None


def available_preconditioners() -> tuple[str, ...]:
    """The registered names, in registration order (``"kfac"``, ``"ekfac"`` first)."""
    return tuple(_PRECONDITIONERS)


register_preconditioner("kfac", KFAC)
register_preconditioner("ekfac", EKFAC)
