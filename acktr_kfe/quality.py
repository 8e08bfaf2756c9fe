"""How close an update is to the exact natural gradient: the indicator of Wu et al. 2024 (arXiv:2406.06420).

For an update ``D`` on a batch with mean loss ``L``, gradient ``g = dL/dtheta`` and exact Fisher ``F``, the iEF
paper's indicator is

.. code-block:: text

    gamma(D) = sqrt(D^T F D) / |D^T g|

By Cauchy-Schwarz, ``|D^T g| <= sqrt(D^T F D) sqrt(g^T F^+ g)`` for ``g`` in the range of ``F``, so
``gamma(D) >= 1 / sqrt(g^T F^+ g)`` with equality exactly when ``D`` is a multiple of the natural gradient
``F^+ g``: the smaller, the closer to the natural gradient. ``gamma`` does not change when ``D`` is scaled by any
non-zero number (so the learning rate and the sign of the update do not matter), and neither does the ratio below
when the loss, and with it ``F`` and ``g``, is scaled. We report it, as the paper does, relative to SGD's update on
the same batch (``D = g``):

.. code-block:: text

    relative = gamma(D) / gamma(g),   gamma(g) = sqrt(g^T F g) / (g^T g)

so 1 is SGD's quality and values below 1 are closer to the natural gradient than SGD.

``F`` is the generalized Gauss-Newton matrix of ``loss_fn`` at the model's outputs,
``F = J_z^T (d^2 L / d z^2) J_z`` (``J_z`` the Jacobian of the outputs ``z`` in the parameters). For softmax
cross-entropy (classification) and squared error (regression) it is the exact Fisher of the model's predictive
distribution (Martens 2014, arXiv:1412.1193, section 9.2), at the per-example scale for a mean loss
(``E_n[J_n^T H_n J_n]``; ``F.mse_loss`` over C outputs gives ``2 / C`` times the unit-variance Fisher, a factor
``relative`` does not see). ``D^T F D = (J_z D)^T (d^2 L / d z^2) (J_z D)`` needs one Jacobian-vector product
(double backward) and one output-Hessian-vector product per update; no matrix is formed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class ApproximationQuality:
    """The indicator of one update on one batch (see :mod:`acktr_kfe.quality`).

    Attributes:
        relative: ``gamma / gamma_sgd``: 1 for SGD's update, lower is closer to the natural gradient.
        gamma: ``sqrt(D^T F D) / |D^T g|`` of the update.
        gamma_sgd: the same for ``D = g``.
        gamma_natural: ``1 / sqrt(g^T F^+ g)``, the natural gradient's (lowest possible) gamma, when computed
            (``natural_gradient``; see :func:`natural_gradient_gamma`), else ``None``.
        curvature: ``D^T F D``.
        alignment: ``D^T g`` (negative for a descent step read as a parameter change).
    """

    relative: float
    gamma: float
    gamma_sgd: float
    curvature: float
    alignment: float
    gamma_natural: float | None = None

    @property
    def relative_natural(self) -> float | None:
        """``gamma_natural / gamma_sgd``: the lowest ``relative`` any update can reach on this batch."""
        return None if self.gamma_natural is None else self.gamma_natural / self.gamma_sgd


def _output_jvp(outputs: Tensor, params: Sequence[Tensor], vector: Sequence[Tensor]) -> Tensor:
    """``J_z v`` by double backward: ``d/du <J_z^T u, v>`` (every module autograd can differentiate twice)."""
    dummy = torch.zeros_like(outputs, requires_grad=True)
    vjp = torch.autograd.grad(outputs, params, grad_outputs=dummy, create_graph=True, allow_unused=True)
    terms = [(g * v).sum() for g, v in zip(vjp, vector) if g is not None]
    if not terms:
        return torch.zeros_like(outputs)
    (jvp,) = torch.autograd.grad(torch.stack(terms).sum(), dummy, allow_unused=True)
    return torch.zeros_like(outputs) if jvp is None else jvp.detach()


def _output_hvp(output_grad: Tensor, outputs: Tensor, vector: Tensor) -> Tensor:
    """``(d^2 L / d z^2) v`` from the graph of ``dL/dz``; zero for a loss linear in the outputs."""
    if not output_grad.requires_grad:
        return torch.zeros_like(vector)
    (hvp,) = torch.autograd.grad(output_grad, outputs, grad_outputs=vector, retain_graph=True, allow_unused=True)
    return torch.zeros_like(vector) if hvp is None else hvp.detach()


def _dot(a: Sequence[Tensor] | Tensor, b: Sequence[Tensor] | Tensor) -> float:
    if isinstance(a, Tensor):
        return float((a.double() * b.double()).sum())  # type: ignore[union-attr]
    return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b)))


class _Batch:
    """The forward pass, gradient and output-gradient graph shared by every quadratic form on one batch."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, batch: Sequence[Tensor]) -> None:
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ValueError("batch must be an (inputs, targets) pair")
        inputs, targets = batch
        self.all_params = list(model.parameters())
        self.trainable = [i for i, p in enumerate(self.all_params) if p.requires_grad]
        if not self.trainable:
            raise ValueError("the model has no parameter that requires a gradient")
        self.params = [self.all_params[i] for i in self.trainable]
        # The forward runs on copies of the buffers, so a training-mode BatchNorm leaves its statistics unchanged.
        buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
        with torch.enable_grad():
            self.outputs = torch.func.functional_call(model, buffers, (inputs,))
            loss = loss_fn(self.outputs, targets)
            if loss.dim() != 0:
                raise ValueError(f"loss_fn must return a scalar (mean) loss, got shape {tuple(loss.shape)}")
            (self.output_grad,) = torch.autograd.grad(loss, self.outputs, create_graph=True)
            grads = torch.autograd.grad(loss, self.params, retain_graph=True, allow_unused=True)
        self.gradient = [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(self.params, grads)]

    def quadratic(self, vector: Sequence[Tensor]) -> float:
        """``v^T F v`` for ``v`` over the trainable parameters."""
        with torch.enable_grad():
            jvp = _output_jvp(self.outputs, self.params, vector)
            hvp = _output_hvp(self.output_grad, self.outputs, jvp)
        value = _dot(jvp, hvp)
        bound = 1e-6 * float(jvp.double().norm() * hvp.double().norm())
        if value < -bound:
            raise ValueError(
                f"the loss's curvature in the model outputs is not positive semi-definite (v^T F v = {value:.3e}); "
                "the indicator needs a loss convex in the outputs (cross-entropy, squared error)"
            )
        return max(value, 0.0)

    def select(self, update: Sequence[Tensor]) -> list[Tensor]:
        """The trainable parameters' entries of an update given for every parameter (or for the trainable ones)."""
        update = list(update)
        if len(update) == len(self.all_params):
            chosen = [(self.all_params[i], update[i]) for i in self.trainable]
        elif len(update) == len(self.params):
            chosen = list(zip(self.params, update))
        else:
            raise ValueError(
                f"update has {len(update)} tensors; expected one per model parameter ({len(self.all_params)}) "
                f"or one per trainable parameter ({len(self.params)}), in model.parameters() order"
            )
        out = []
        for index, (param, tensor) in enumerate(chosen):
            if tuple(tensor.shape) != tuple(param.shape):
                raise ValueError(
                    f"update tensor {index} has shape {tuple(tensor.shape)}, its parameter {tuple(param.shape)}"
                )
            out.append(tensor.detach().to(device=param.device, dtype=param.dtype))
        return out


def _gamma(curvature: float, alignment: float) -> float:
    return math.sqrt(curvature) / abs(alignment) if alignment != 0 else math.inf


def natural_gradient_gamma(
    model: nn.Module, loss_fn: LossFn, batch: Sequence[Tensor], *, method: str = "output"
) -> float:
    """The natural gradient's gamma, ``1 / sqrt(g^T F^+ g)``: the lowest gamma any update reaches on the batch.

    Args:
        method: ``"output"`` (any model size): ``g^T F^+ g`` is replaced by ``(1/N) sum_n r_n^T H_n^+ r_n`` with
            ``r_n = d l_n / d z_n`` and ``H_n = d^2 l_n / d z_n^2`` of each example's own loss (C x C). That is
            ``g^T F^+ g`` exactly when the stacked output Jacobian (N C x P) has full row rank (N C <= P, generic
            weights) and an upper bound on it otherwise, so the gamma returned is a lower bound on every update's
            gamma, attained by the natural gradient in the full-rank case. ``loss_fn`` must be a mean of
            per-example losses. ``"dense"`` (tiny models, P <= 5000): ``F`` formed column by column from
            Fisher-vector products and ``F^+ g`` solved by least squares in float64; exact for any rank.
    """
    if method == "dense":
        return _dense_natural_gradient_gamma(model, loss_fn, batch)
    if method != "output":
        raise ValueError(f"Invalid method: {method!r}. Valid values: 'output', 'dense'")
    inputs, targets = batch
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    with torch.no_grad():
        outputs = torch.func.functional_call(model, buffers, (inputs,)).detach()

    def example_loss(z: Tensor, y: Tensor) -> Tensor:
        return loss_fn(z.unsqueeze(0), y.unsqueeze(0))

    residuals = torch.func.vmap(torch.func.grad(example_loss))(outputs, targets)
    hessians = torch.func.vmap(torch.func.jacrev(torch.func.grad(example_loss)))(outputs, targets)
    n = outputs.shape[0]
    size = outputs[0].numel()
    r = residuals.reshape(n, size, 1).double()
    solved = torch.linalg.lstsq(hessians.reshape(n, size, size).double(), r, driver="gelsd").solution
    value = float((r * solved).sum()) / n
    return 1.0 / math.sqrt(value) if value > 0 else math.inf


def _dense_natural_gradient_gamma(model: nn.Module, loss_fn: LossFn, batch: Sequence[Tensor]) -> float:
    state = _Batch(model, loss_fn, batch)
    sizes = [p.numel() for p in state.params]
    total = sum(sizes)
    if total > 5000:
        raise ValueError(f"natural_gradient_gamma forms the dense {total} x {total} Fisher; use P <= 5000")
    columns = []
    for k in range(total):
        unit = torch.zeros(total, dtype=state.params[0].dtype, device=state.params[0].device)
        unit[k] = 1
        vector = [piece.reshape(p.shape) for piece, p in zip(unit.split(sizes), state.params)]
        columns.append(_fisher_vector_product_flat(state, vector))
    fisher = torch.stack(columns, dim=1).double()
    fisher = 0.5 * (fisher + fisher.T)
    gradient = torch.cat([g.reshape(-1) for g in state.gradient]).double()
    natural = torch.linalg.lstsq(fisher, gradient.unsqueeze(-1), driver="gelsd").solution.squeeze(-1)
    value = float(gradient @ natural)
    return 1.0 / math.sqrt(value) if value > 0 else math.inf


def _fisher_vector_product_flat(state: _Batch, vector: Sequence[Tensor]) -> Tensor:
    """``F v`` flattened (float64), for the tests and :func:`natural_gradient_gamma`."""
    with torch.enable_grad():
        jvp = _output_jvp(state.outputs, state.params, vector)
        hvp = _output_hvp(state.output_grad, state.outputs, jvp)
        back = torch.autograd.grad(state.outputs, state.params, grad_outputs=hvp, retain_graph=True, allow_unused=True)
    return torch.cat(
        [(torch.zeros_like(p) if b is None else b).reshape(-1).double() for p, b in zip(state.params, back)]
    )


def fisher_vector_product(
    model: nn.Module, loss_fn: LossFn, batch: Sequence[Tensor], vector: Sequence[Tensor]
) -> list[Tensor]:
    """``F v`` with ``F`` the Gauss-Newton (Fisher) matrix of :mod:`acktr_kfe.quality`, one tensor per trainable
    parameter; ``vector`` as ``update`` in :func:`approximation_quality`."""
    state = _Batch(model, loss_fn, batch)
    flat = _fisher_vector_product_flat(state, state.select(vector))
    pieces = flat.split([p.numel() for p in state.params])
    return [piece.reshape(p.shape).to(p.dtype) for piece, p in zip(pieces, state.params)]


def approximation_quality(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Sequence[Tensor],
    update: Sequence[Tensor],
    *,
    natural_gradient: bool | str = False,
) -> ApproximationQuality:
    """The iEF paper's indicator of ``update`` on ``batch``, relative to SGD's (Wu et al. 2024, arXiv:2406.06420).

    Args:
        model: the model at the parameters the update was computed at. Its forward runs on copies of its buffers, so a
            training-mode forward leaves BatchNorm statistics unchanged.
        loss_fn: ``loss_fn(outputs, targets)``, a mean over the batch, convex in the outputs (``F.cross_entropy``,
            ``F.mse_loss``).
        batch: ``(inputs, targets)``, the batch the update was computed on.
        update: one tensor per parameter, shaped and ordered like ``model.parameters()`` (or one per trainable
            parameter); entries of frozen parameters are ignored. Any scale and sign: a parameter change
            ``new - old`` read from an optimizer step works.
        natural_gradient: also compute the natural gradient's gamma (:func:`natural_gradient_gamma`): ``True`` or
            ``"output"`` for the output-space form (any size; a lower bound, exact when the output Jacobian has
            full row rank), ``"dense"`` for the dense Fisher (tiny models).

    Returns:
        :class:`ApproximationQuality`; ``relative = gamma(update) / gamma(g)`` with ``gamma(D) =
        sqrt(D^T F D) / |D^T g|``, ``g`` the batch gradient and ``F`` the Gauss-Newton / Fisher matrix.
    """
    state = _Batch(model, loss_fn, batch)
    direction = state.select(update)
    curvature = state.quadratic(direction)
    alignment = _dot(direction, state.gradient)
    gamma_sgd = _gamma(state.quadratic(state.gradient), _dot(state.gradient, state.gradient))
    gamma = _gamma(curvature, alignment)
    natural = None
    if natural_gradient:
        method = "output" if natural_gradient is True else str(natural_gradient)
        natural = natural_gradient_gamma(model, loss_fn, batch, method=method)
    return ApproximationQuality(
        relative=gamma / gamma_sgd if gamma_sgd > 0 else math.inf,
        gamma=gamma,
        gamma_sgd=gamma_sgd,
        curvature=curvature,
        alignment=alignment,
        gamma_natural=natural,
    )


def parameter_change(before: Sequence[Tensor], model: nn.Module) -> list[Tensor]:
    """``new - old`` of every parameter of ``model`` (``before`` a snapshot of ``model.parameters()``): the update
    an optimizer step made, to pass to :func:`approximation_quality`."""
    return [p.detach() - b for p, b in zip(model.parameters(), before)]


__all__ = [
    "ApproximationQuality",
    "approximation_quality",
    "fisher_vector_product",
    "natural_gradient_gamma",
    "parameter_change",
]
