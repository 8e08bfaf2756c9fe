"""Per-layer curvature blocks: one object per preconditioned layer, holding all of that layer's curvature math.

A block owns one layer's statistics and knows how to update them from the rows the hooks recorded, refresh its
basis, precondition a gradient, give the quadratic form of a step under its damped curvature, give its curvature
norm (relative damping) and its modeled dense block (:func:`acktr_kfe.curvature_matrix`), describe the shapes of
its saved state, and name the tensors a data-parallel run shares. The optimizer
(:class:`acktr_kfe.KroneckerPreconditioner`) only schedules: it decides when statistics are updated and bases
refreshed, asks every block, and moves the parameters.

Conventions (docs/DESIGN.md, section 2): a layer is ``W_hat = [W | b]`` of shape ``(out, in+1)`` with parameters
in ``W_hat.flatten()`` order; curvature is per example, ``F = E_n[vec(grad_n) vec(grad_n)^T]``.

Where the state lives: in the optimizer's per-parameter state of the layer's weight (``optimizer.state[weight]``),
under the keys of the saved format (``"A"``, ``"eigvecs_G"``, ``"scale"``...), so that ``state_dict()`` keeps the
format of ``torch.optim`` and older saved states load. A block reads and writes that mapping through typed
attributes (``block.factor_a`` is ``state["A"]``); the optimizer binds its ``state`` with
:meth:`CurvatureBlock.bind` and re-binds it after ``load_state_dict``.

A new approximation is one subclass of :class:`CurvatureBlock` (or :class:`KroneckerBlock` to reuse the factors
and the eigenbasis) and one call of :func:`acktr_kfe.register_preconditioner`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from .eigen import kfe_scale, robust_eigh, warm_eigh
from .layers import EmbeddingAdapter, LayerAdapter

Rows = tuple[Tensor, Tensor]
"""One record's rows: activations ``(N, T, in)`` (an embedding's are token indices ``(N, T)``) and per-example
output gradients ``(N, T, out)``."""


def statistics_dtype(weight: Tensor) -> torch.dtype:
    """The precision of a layer's statistics: its weight's, float32 for bfloat16 and float16 weights."""
    return weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32


class _StateEntry:
    """A block attribute stored in the optimizer's per-parameter state under ``key`` (``None`` when absent)."""

    def __init__(self, key: str) -> None:
        self.key = key

    def __get__(self, block: CurvatureBlock | None, owner: type) -> Any:
        if block is None:
            return self
        state = block._states.get(block.weight)
        return None if state is None else state.get(self.key)

    def __set__(self, block: CurvatureBlock, value: Any) -> None:
        block.state[self.key] = value


@dataclass
class RefreshResult:
    """What one block's basis refresh did: full eigendecompositions, warm refreshes, and the factors whose
    decomposition failed (``"A"``, ``"G"``), for the optimizer's counters and its failure warning."""

    full: int = 0
    warm: int = 0
    failed: list[str] = field(default_factory=list)


class CurvatureBlock(ABC):
    """One layer's curvature approximation: its statistics, its basis, and the operations the optimizer asks for.

    Args:
        name: the layer's name (as in ``model.named_modules()``), for messages.
        adapter: the layer's adapter (hooked tensors to rows, ``[W | b]`` join and split).
        **options: the optimizer's block options (``damping_mode``, ``scale_mode``...); a block reads those it
            knows and ignores the others, so that one optimizer can hold blocks of several kinds.

    Class attributes:
        statistics_keys: the state's tensors that follow the weight's device and precision.
        non_negative_keys: the state's tensors that must hold no negative value (checked on load).
        count_keys: the state's integer counters (checked on load).
        has_basis_statistics: whether :meth:`basis_statistics` estimates anything (EKFAC's scale); the optimizer
            then runs it on its scale schedule.
    """

    statistics_keys: ClassVar[tuple[str, ...]] = ()
    non_negative_keys: ClassVar[tuple[str, ...]] = ()
    count_keys: ClassVar[tuple[str, ...]] = ()
    has_basis_statistics: ClassVar[bool] = False

    def __init__(self, name: str, adapter: LayerAdapter, **options: Any) -> None:
        del options
        self.name = name
        self.adapter = adapter
        self._states: MutableMapping[Tensor, dict[str, Any]] = defaultdict(dict)
        # ||F_block||_F for relative damping: derived from the state, recomputed when the state changes (one host
        # sync then, none on other steps).
        self._norm: float | None = None

    # --- identity ------------------------------------------------------------------------------------------
    @property
    def weight(self) -> Tensor:
        """The layer's weight: the parameter whose optimizer state holds the block's state."""
        return self.adapter.weight

    @property
    def dtype(self) -> torch.dtype:
        """The precision of the statistics, the solve and the quadratic forms."""
        return statistics_dtype(self.weight)

    @property
    def state(self) -> dict[str, Any]:
        """The block's state: the entry of its weight in the bound mapping (looked up on each access, so that an
        optimizer's ``state`` gets no entry until something is stored or asked for)."""
        return self._states[self.weight]

    def has(self, key: str) -> bool:
        """Whether the state holds ``key`` (without creating the weight's entry)."""
        state = self._states.get(self.weight)
        return state is not None and key in state

    def bind(self, states: MutableMapping[Tensor, dict[str, Any]]) -> None:
        """Keep the block's state in ``states[weight]`` (the optimizer's ``state``, a ``defaultdict(dict)`` keyed by
        parameter); drop caches."""
        self._states = states
        self.invalidate()

    def invalidate(self) -> None:
        """Drop everything derived from the state (called when the state changes outside the block's methods)."""
        self._norm = None

    # --- statistics ----------------------------------------------------------------------------------------
    def rows(self, layer_input: Tensor, grad_output: Tensor) -> Rows:
        """The rows of one record: activations and output gradients (not yet scaled per example)."""
        dtype = self.dtype
        return self.adapter.activations(layer_input.to(dtype)), self.adapter.output_grads(grad_output.to(dtype))

    @property
    @abstractmethod
    def has_statistics(self) -> bool:
        """Whether statistics have been recorded at least once."""

    @property
    @abstractmethod
    def ready(self) -> bool:
        """Whether the block can precondition (it has its basis, or needs none)."""

    @abstractmethod
    def batch_statistics(self, rows: Sequence[Rows]) -> tuple[Tensor, ...]:
        """This batch's statistics from the rows of each record, without changing the state (the optimizer checks
        every block's values for NaN and Inf in one host sync before any is applied)."""

    @abstractmethod
    def update_statistics(self, batch: tuple[Tensor, ...], decay: float) -> None:
        """Fold a batch's statistics into the running averages (the first ones replace them)."""

    def wants_refresh(self, scheduled: bool) -> bool:
        """Whether the basis is to be recomputed now: on the optimizer's schedule, or when there is none yet."""
        del scheduled
        return False

    def refresh(self, tolerance: float | None) -> RefreshResult:
        """Recompute the basis from the statistics: :meth:`compute_refresh` of :meth:`refresh_inputs`, installed."""
        return self.install_refresh(self.compute_refresh(self.refresh_inputs(copy=False), tolerance))

    def refresh_inputs(self, copy: bool) -> dict[str, Tensor]:
        """What :meth:`compute_refresh` reads from the state; with ``copy`` the tensors that later steps change in
        place are copied, so that the refresh can run while training goes on (``refresh_delay``)."""
        del copy
        return {}

    def compute_refresh(self, inputs: dict[str, Tensor], tolerance: float | None) -> dict[str, Any]:
        """The new basis from ``inputs`` alone (no state is read or written: it may run in another thread), as a
        mapping of tensors and counts that :meth:`install_refresh` stores (and a state_dict can hold)."""
        del inputs, tolerance
        return {}

    def install_refresh(self, computed: dict[str, Any]) -> RefreshResult:
        """Store a basis from :meth:`compute_refresh` (nothing for a block without a basis)."""
        del computed
        return RefreshResult()

    def basis_statistics(self, rows: Sequence[Rows]) -> Tensor | None:
        """An estimate of statistics kept in the current basis (EKFAC's scale) from this batch, or ``None``."""
        del rows
        return None

    def update_basis_statistics(self, estimate: Tensor) -> None:
        """Fold an estimate of :meth:`basis_statistics` into the state."""
        del estimate

    # --- preconditioning -----------------------------------------------------------------------------------
    def momentum_in_basis(self) -> bool:
        """Whether the block preconditions in a basis of its own where its damped curvature is diagonal
        (:meth:`to_basis`, :meth:`from_basis`, :meth:`damped_basis_curvature`). The optimizer then keeps the layer's
        momentum buffer in those coordinates between basis refreshes, so that a step costs one rotation in (of the
        gradient) and one out (of the step), and the buffer's quadratic form is elementwise."""
        return False

    def to_basis(self, matrix: Tensor) -> Tensor:
        """A layer-shaped matrix in the block's basis (see :meth:`momentum_in_basis`)."""
        raise NotImplementedError(f"{type(self).__name__} has no basis of its own")

    def from_basis(self, matrix: Tensor) -> Tensor:
        """Inverse of :meth:`to_basis`."""
        raise NotImplementedError(f"{type(self).__name__} has no basis of its own")

    def damped_basis_curvature(self, damping: float) -> Tensor:
        """The damped curvature in the block's basis, as its layer-shaped diagonal."""
        raise NotImplementedError(f"{type(self).__name__} has no basis of its own")

    def basis_key(self) -> tuple[Any, ...]:
        """Changes whenever the basis does (a refresh, an adopted or loaded basis): the optimizer's momentum in the
        basis is valid while it holds. Tensors in it are compared by identity, other entries by value."""
        return ()

    @abstractmethod
    def precondition(self, grad: Tensor, damping: float) -> Tensor:
        """``(F_block + damping)^-1 grad`` for a layer-shaped gradient ``(out, in+1)``, by the block's damping rule."""

    @abstractmethod
    def quadratic(self, matrix: Tensor, damping: float) -> Tensor:
        """``vec(M)^T F_damped vec(M)`` for a layer-shaped ``M``: the curvature :meth:`precondition` inverts."""

    @abstractmethod
    def curvature_norm(self) -> Tensor:
        """The Frobenius norm of the modeled block ``||F_block||_F`` (a scalar tensor): the 2-norm of its
        eigenvalues, dominated by the largest ones."""

    def damping(self, damping: float, relative: bool) -> float:
        """The damping added to this block's curvature: ``damping`` itself, or (``relative``) ``damping`` times
        :meth:`curvature_norm`, taken as 1 for a block whose curvature is zero."""
        if not relative:
            return damping
        if self._norm is None:
            norm = float(self.curvature_norm())
            self._norm = norm if norm > 0 and math.isfinite(norm) else 1.0
        return damping * self._norm

    @abstractmethod
    def modeled_block(self) -> Tensor:
        """The dense undamped curvature the block models, rows and columns in ``W_hat.flatten()`` order."""

    # --- serialization -------------------------------------------------------------------------------------
    @abstractmethod
    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of every tensor the block's state may hold (checked on load)."""

    def follow_weight(self) -> bool:
        """Bring the statistics to the weight's device and precision when the model was converted after they were
        recorded (``model.double()``, ``.to(device)``). Returns whether anything moved."""
        state = self._states.get(self.weight)
        if not state:
            return False
        dtype, device = self.dtype, self.weight.device
        tensors = [key for key in self.statistics_keys if isinstance(state.get(key), Tensor)]
        if all(state[k].dtype == dtype and state[k].device == device for k in tensors):
            return False
        for key in tensors:
            state[key] = state[key].to(device=device, dtype=dtype)
        self.invalidate()
        return True

    # --- data parallelism ----------------------------------------------------------------------------------
    def statistics_tensors(self) -> list[Tensor]:
        """The tensors a statistics update changes, to be averaged across ranks after it (in place)."""
        return []

    def refresh_cost(self) -> float:
        """A relative cost of :meth:`refresh` (0 for a block without a basis), to balance refreshes across ranks."""
        return 0.0

    def basis_tensors(self) -> list[Tensor]:
        """The tensors a refresh produces, to be broadcast (in place) from the rank that computed them."""
        return []

    def adopt_basis(self) -> None:
        """Data parallel: :meth:`basis_tensors` were overwritten in place with the refresh another rank computed;
        do what :meth:`refresh` does besides computing them (drop what is derived from the old basis)."""
        self.invalidate()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, ready={self.ready})"


class KroneckerBlock(CurvatureBlock):
    """The Kronecker factors ``A = E_n[sum_t a_hat a_hat^T]``, ``G = E_n[sum_t g g^T] / T`` (KFC normalization) and
    their eigenbasis ``A = U_A diag(d_A) U_A^T``, ``G = U_G diag(d_G) U_G^T``, shared by :class:`KFACBlock` and
    :class:`EKFACBlock`. Subclasses give the damped curvature in the Kronecker-factored eigenbasis (KFE), where
    every mode's damped block is diagonal.
    """

    statistics_keys: ClassVar[tuple[str, ...]] = ("A", "G", "eigvals_A", "eigvecs_A", "eigvals_G", "eigvecs_G")
    non_negative_keys: ClassVar[tuple[str, ...]] = ("eigvals_A", "eigvals_G")
    count_keys: ClassVar[tuple[str, ...]] = ("factor_updates",)

    factor_a = _StateEntry("A")
    factor_g = _StateEntry("G")
    eigvals_a = _StateEntry("eigvals_A")
    eigvecs_a = _StateEntry("eigvecs_A")
    eigvals_g = _StateEntry("eigvals_G")
    eigvecs_g = _StateEntry("eigvecs_G")
    factor_updates = _StateEntry("factor_updates")

    @property
    def has_statistics(self) -> bool:
        return self.has("A")

    @property
    def ready(self) -> bool:
        return self.has("eigvecs_A")

    def batch_statistics(self, rows: Sequence[Rows]) -> tuple[Tensor, ...]:
        examples = sum(acts.shape[0] for acts, _ in rows)
        locations = rows[0][0].shape[1]
        a_sum = sum(acts.flatten(0, 1).T @ acts.flatten(0, 1) for acts, _ in rows)
        g_sum = sum(grads.flatten(0, 1).T @ grads.flatten(0, 1) for _, grads in rows)
        # KFC normalization: A = E_n[sum_t a a^T], G = E_n[sum_t g g^T] / T.
        return a_sum / examples, g_sum / (examples * locations)

    def update_statistics(self, batch: tuple[Tensor, ...], decay: float) -> None:
        a_batch, g_batch = batch
        if not self.has_statistics:
            self.factor_a, self.factor_g, self.factor_updates = a_batch, g_batch, 0
        else:
            self.factor_a.mul_(decay).add_(a_batch, alpha=1 - decay)
            self.factor_g.mul_(decay).add_(g_batch, alpha=1 - decay)
        self.factor_updates += 1

    def wants_refresh(self, scheduled: bool) -> bool:
        return self.has_statistics and (scheduled or not self.ready)

    def refresh_inputs(self, copy: bool) -> dict[str, Tensor]:
        state = self.state
        inputs = {key: state[key].clone() if copy else state[key] for key in ("A", "G")}
        for key in ("A", "G"):  # the last basis, replaced (never changed in place) by a refresh
            for name in (f"eigvals_{key}", f"eigvecs_{key}"):
                if name in state:
                    inputs[name] = state[name]
        return inputs

    def compute_refresh(self, inputs: dict[str, Tensor], tolerance: float | None) -> dict[str, Any]:
        """Eigendecompose A and G: a warm refresh (one step of subspace iteration from the last basis) when
        ``tolerance`` is set and its off-diagonal mass is within it, else :func:`acktr_kfe.eigen.robust_eigh`. A
        failed decomposition keeps the last good basis (the factor's diagonal when there is none)."""
        computed: dict[str, Any] = {"full": 0, "warm": 0, "failed": []}
        for key in ("A", "G"):
            vals_key, vecs_key = f"eigvals_{key}", f"eigvecs_{key}"
            if tolerance is not None and vecs_key in inputs:
                warm = warm_eigh(inputs[key], inputs[vals_key], inputs[vecs_key])
                if warm is not None and warm[2] <= tolerance:
                    computed[vals_key], computed[vecs_key] = warm[0], warm[1]
                    computed["warm"] += 1
                    continue
            computed["full"] += 1
            decomposition = robust_eigh(inputs[key])
            if decomposition is None:
                computed["failed"].append(key)
                if vecs_key in inputs:
                    continue  # keep the last good basis
                # No basis yet: the factor's diagonal (its own eigenbasis when the factor is diagonal).
                matrix = inputs[key]
                decomposition = (
                    torch.nan_to_num(matrix.diagonal().clone()).clamp_min(0),
                    torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device),
                )
            computed[vals_key], computed[vecs_key] = decomposition
        return computed

    def install_refresh(self, computed: dict[str, Any]) -> RefreshResult:
        state = self.state
        for key in ("eigvals_A", "eigvecs_A", "eigvals_G", "eigvecs_G"):
            if key in computed:
                state[key] = computed[key]
        self.invalidate()
        self._on_refreshed()
        return RefreshResult(full=computed["full"], warm=computed["warm"], failed=list(computed["failed"]))

    def _on_refreshed(self) -> None:
        """Called after the basis was recomputed."""

    def adopt_basis(self) -> None:
        self.invalidate()
        self._on_refreshed()

    @abstractmethod
    def damped_kfe_curvature(self, damping: float) -> Tensor:
        """The damped curvature the block inverts, as its diagonal ``(out, in+1)`` in the KFE."""

    def to_kfe(self, matrix: Tensor) -> Tensor:
        """``U_G^T M U_A``: a layer-shaped matrix in the Kronecker-factored eigenbasis."""
        return self.eigvecs_g.T @ matrix @ self.eigvecs_a

    def from_kfe(self, matrix: Tensor) -> Tensor:
        """``U_G M U_A^T``: inverse of :meth:`to_kfe`."""
        return self.eigvecs_g @ matrix @ self.eigvecs_a.T

    def precondition(self, grad: Tensor, damping: float) -> Tensor:
        return self.from_kfe(self.to_kfe(grad).div_(self.damped_kfe_curvature(damping)))

    def momentum_in_basis(self) -> bool:
        return True

    def to_basis(self, matrix: Tensor) -> Tensor:
        return self.to_kfe(matrix)

    def from_basis(self, matrix: Tensor) -> Tensor:
        return self.from_kfe(matrix)

    def damped_basis_curvature(self, damping: float) -> Tensor:
        return self.damped_kfe_curvature(damping)

    def basis_key(self) -> tuple[Any, ...]:
        # A refresh stores new tensors; an adopted (broadcast) basis is written in place, which bumps _version.
        vecs_a, vecs_g = self.eigvecs_a, self.eigvecs_g
        return (vecs_a, vecs_a._version, vecs_g, vecs_g._version)

    def quadratic(self, matrix: Tensor, damping: float) -> Tensor:
        return (self.damped_kfe_curvature(damping) * self.to_kfe(matrix).square()).sum()

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        d_in, d_out = self.adapter.in_dim, self.adapter.out_dim
        return {
            "A": (d_in, d_in),
            "G": (d_out, d_out),
            "eigvecs_A": (d_in, d_in),
            "eigvecs_G": (d_out, d_out),
            "eigvals_A": (d_in,),
            "eigvals_G": (d_out,),
        }

    def statistics_tensors(self) -> list[Tensor]:
        return [self.factor_a, self.factor_g] if self.has_statistics else []

    def refresh_cost(self) -> float:
        # An eigendecomposition of an n x n matrix costs O(n^3).
        return float(self.adapter.in_dim**3 + self.adapter.out_dim**3)

    def basis_tensors(self) -> list[Tensor]:
        if not self.ready:
            return []
        return [self.eigvals_a, self.eigvecs_a, self.eigvals_g, self.eigvecs_g]


class KFACBlock(KroneckerBlock):
    """K-FAC's block ``kron(G, A)`` (Martens & Grosse 2015; KFC, Grosse & Martens 2016).

    Damping (``damping_mode`` option, :class:`acktr_kfe.DampingMode`): ``"factored"``,
    ``(G + sqrt(lambda)/pi I)^-1 grad (A + pi sqrt(lambda) I)^-1`` with ``pi = sqrt(mean d_A / mean d_G)``; or
    ``"eigen"``, ``U_G [ (U_G^T grad U_A) / (d_G d_A^T + lambda) ] U_A^T``.
    """

    def __init__(self, name: str, adapter: LayerAdapter, *, damping_mode: Any = "factored", **options: Any) -> None:
        super().__init__(name, adapter, **options)
        self.factored = getattr(damping_mode, "value", damping_mode) == "factored"
        # Damped inverses of G and A (factored mode) with the damping they were built for: derived from the basis,
        # not part of the state.
        self._inverses: tuple[float, Tensor, Tensor] | None = None

    def invalidate(self) -> None:
        super().invalidate()
        self._inverses = None

    @staticmethod
    def _pi(vals_a: Tensor, vals_g: Tensor) -> Tensor:
        """Martens & Grosse 2015, section 6.3: ``pi`` balances the damping between the factors by their mean
        eigenvalue, so that the damped Kronecker product is closest to ``kron(G, A) + lambda I``."""
        tiny = torch.finfo(vals_a.dtype).tiny
        return torch.sqrt((vals_a.mean().clamp_min(tiny)) / (vals_g.mean().clamp_min(tiny)))

    def factored_inverses(self, damping: float) -> tuple[Tensor, Tensor]:
        """``(G + sqrt(lambda)/pi I)^-1`` and ``(A + pi sqrt(lambda) I)^-1``, cached until the basis changes."""
        if self._inverses is not None and self._inverses[0] == damping:
            return self._inverses[1], self._inverses[2]
        vals_a, vecs_a, vals_g, vecs_g = self.eigvals_a, self.eigvecs_a, self.eigvals_g, self.eigvecs_g
        pi = self._pi(vals_a, vals_g)
        root = math.sqrt(damping)
        inv_a = (vecs_a / (vals_a + pi * root)) @ vecs_a.T
        inv_g = (vecs_g / (vals_g + root / pi)) @ vecs_g.T
        self._inverses = (damping, inv_g, inv_a)
        return inv_g, inv_a

    def momentum_in_basis(self) -> bool:
        # Factored damping preconditions with the two damped inverses (two products, no rotation): the momentum
        # buffer stays in parameter coordinates.
        return not self.factored

    def precondition(self, grad: Tensor, damping: float) -> Tensor:
        if self.factored:
            inv_g, inv_a = self.factored_inverses(damping)
            return inv_g @ grad @ inv_a
        return super().precondition(grad, damping)

    def damped_kfe_curvature(self, damping: float) -> Tensor:
        vals_a, vals_g = self.eigvals_a, self.eigvals_g
        if not self.factored:
            return torch.outer(vals_g, vals_a) + damping
        pi = self._pi(vals_a, vals_g)
        root = math.sqrt(damping)
        return torch.outer(vals_g + root / pi, vals_a + pi * root)

    def curvature_norm(self) -> Tensor:
        # ||kron(G, A)||_F = ||G||_F ||A||_F.
        return torch.linalg.vector_norm(self.eigvals_g) * torch.linalg.vector_norm(self.eigvals_a)

    def modeled_block(self) -> Tensor:
        factor_a = (self.eigvecs_a * self.eigvals_a) @ self.eigvecs_a.T
        factor_g = (self.eigvecs_g * self.eigvals_g) @ self.eigvecs_g.T
        return torch.kron(factor_g, factor_a)


class EKFACBlock(KroneckerBlock):
    """EKFAC's block (George et al. 2018): K-FAC's eigenbasis with a per-coordinate scale re-estimated in it.

    In the KFE the per-example gradient is ``U_G^T grad_n U_A``; ``s = E_n[(U_G^T grad_n U_A)^2]`` is the diagonal
    of the curvature there, the Frobenius-optimal diagonal in that basis. After a refresh ``s = d_G d_A^T`` (the
    block is K-FAC's) until the first estimate. Options: ``scale_mode`` (``"minibatch"``: the latest estimate;
    ``"running"``: a running average with ``scale_decay`` while the basis is held).
    """

    statistics_keys: ClassVar[tuple[str, ...]] = (*KroneckerBlock.statistics_keys, "scale")
    non_negative_keys: ClassVar[tuple[str, ...]] = (*KroneckerBlock.non_negative_keys, "scale")
    count_keys: ClassVar[tuple[str, ...]] = (*KroneckerBlock.count_keys, "scale_updates")
    has_basis_statistics: ClassVar[bool] = True

    scale = _StateEntry("scale")
    scale_updates = _StateEntry("scale_updates")

    def __init__(
        self,
        name: str,
        adapter: LayerAdapter,
        *,
        scale_mode: Any = "minibatch",
        scale_decay: float = 0.95,
        **options: Any,
    ) -> None:
        super().__init__(name, adapter, **options)
        self.running = getattr(scale_mode, "value", scale_mode) == "running"
        self.scale_decay = float(scale_decay)

    def _on_refreshed(self) -> None:
        self.scale = torch.outer(self.eigvals_g, self.eigvals_a)
        self.scale_updates = 0

    def basis_statistics(self, rows: Sequence[Rows]) -> Tensor | None:
        if not self.ready:
            return None
        total = sum(kfe_scale(acts, grads, self.eigvecs_a, self.eigvecs_g) for acts, grads in rows)
        return total / sum(acts.shape[0] for acts, _ in rows)

    def update_basis_statistics(self, estimate: Tensor) -> None:
        if not self.running or self.scale_updates == 0:
            self.scale = estimate
        else:
            self.scale.mul_(self.scale_decay).add_(estimate, alpha=1 - self.scale_decay)
        self.scale_updates += 1
        self.invalidate()

    def damped_kfe_curvature(self, damping: float) -> Tensor:
        return self.scale + damping

    def curvature_norm(self) -> Tensor:
        return torch.linalg.vector_norm(self.scale)

    def modeled_block(self) -> Tensor:
        basis = torch.kron(self.eigvecs_g, self.eigvecs_a)
        return (basis * self.scale.reshape(-1)) @ basis.T

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        return {**super().state_shapes(), "scale": (self.adapter.out_dim, self.adapter.in_dim)}

    def statistics_tensors(self) -> list[Tensor]:
        return [*super().statistics_tensors(), *([self.scale] if self.ready else [])]

    def basis_tensors(self) -> list[Tensor]:
        # A refresh resets the scale to d_G d_A^T: it travels with the basis.
        return [*super().basis_tensors(), *([self.scale] if self.ready else [])]


class EmbeddingDiagonalBlock(CurvatureBlock):
    """A diagonal block for ``nn.Embedding``: the exact diagonal of the per-example Fisher of the weight.

    The weight ``W`` (``num_embeddings x embedding_dim``, no bias, parameters in ``W.flatten()`` order) gets from
    example ``n`` with tokens ``v_{n,t}`` the gradient ``grad_n[v] = sum_{t: v_{n,t} = v} g_{n,t}``: a sum of
    one-hot rows, so the Kronecker factor ``A`` of a one-hot input is diagonal and ``W``'s rows do not couple
    through it. The block keeps ``d = E_n[grad_n ** 2]`` (elementwise, shape of ``W``; a running average like the
    factors) and preconditions ``D = grad / (d + lambda)``: an exact diagonal with no eigendecomposition.
    ``padding_idx``'s row gets no gradient and no statistics (its step is zero). With ``max_norm`` the statistics
    are those of the renormalized rows that autograd differentiates. An embedding whose weight another
    preconditioned layer shares gets no block: that layer's block preconditions the shared weight.
    """

    statistics_keys: ClassVar[tuple[str, ...]] = ("diagonal",)
    non_negative_keys: ClassVar[tuple[str, ...]] = ("diagonal",)
    count_keys: ClassVar[tuple[str, ...]] = ("factor_updates",)

    diagonal = _StateEntry("diagonal")
    factor_updates = _StateEntry("factor_updates")

    def rows(self, layer_input: Tensor, grad_output: Tensor) -> Rows:
        # Token indices stay integers (a float32 index is exact only below 2^24).
        return self.adapter.activations(layer_input), self.adapter.output_grads(grad_output.to(self.dtype))

    @property
    def has_statistics(self) -> bool:
        return self.has("diagonal")

    @property
    def ready(self) -> bool:
        return self.has_statistics

    def batch_statistics(self, rows: Sequence[Rows]) -> tuple[Tensor, ...]:
        vocabulary, width = self.adapter.out_dim, self.adapter.in_dim
        padding_idx = getattr(self.adapter.module, "padding_idx", None)
        total = None
        examples = 0
        for tokens, grads in rows:
            count, locations = tokens.shape
            examples += count
            tokens = tokens.to(grads.device)
            if padding_idx is not None:
                grads = grads * (tokens != padding_idx).unsqueeze(-1).to(grads.dtype)
            flat_grads = grads.reshape(-1, width)
            diagonal = grads.new_zeros(vocabulary, width)
            if locations == 1:
                diagonal.index_add_(0, tokens.reshape(-1), flat_grads.square())
            else:
                # Sum each example's gradient over its locations that share a token, then square.
                keys = (torch.arange(count, device=tokens.device).unsqueeze(1) * vocabulary + tokens).reshape(-1)
                unique, inverse = torch.unique(keys, return_inverse=True)
                sums = grads.new_zeros(unique.shape[0], width).index_add_(0, inverse, flat_grads)
                diagonal.index_add_(0, unique % vocabulary, sums.square())
            total = diagonal if total is None else total + diagonal
        return (total / examples,)

    def update_statistics(self, batch: tuple[Tensor, ...], decay: float) -> None:
        (diagonal,) = batch
        if not self.has_statistics:
            self.diagonal, self.factor_updates = diagonal, 0
        else:
            self.diagonal.mul_(decay).add_(diagonal, alpha=1 - decay)
        self.factor_updates += 1
        self.invalidate()

    def precondition(self, grad: Tensor, damping: float) -> Tensor:
        return grad / (self.diagonal + damping)

    def quadratic(self, matrix: Tensor, damping: float) -> Tensor:
        return ((self.diagonal + damping) * matrix.square()).sum()

    def curvature_norm(self) -> Tensor:
        return torch.linalg.vector_norm(self.diagonal)

    def modeled_block(self) -> Tensor:
        return torch.diag(self.diagonal.reshape(-1))

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"diagonal": (self.adapter.out_dim, self.adapter.in_dim)}

    def statistics_tensors(self) -> list[Tensor]:
        return [self.diagonal] if self.has_statistics else []


def block_class_for(adapter: LayerAdapter, default: type[CurvatureBlock]) -> type[CurvatureBlock]:
    """The block class of a layer: the diagonal block for an embedding, ``default`` (the optimizer's) otherwise."""
    if isinstance(adapter, EmbeddingAdapter):
        return EmbeddingDiagonalBlock
    return default
