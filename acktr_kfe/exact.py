"""Exact iEF, EF and sampled-Fisher (SF) updates for models whose per-example gradients fit in memory.

Paper: Wu, Yu, Zhang, Woodland 2024, "An Improved Empirical Fisher Approximation for Natural Gradient Descent"
(arXiv:2406.06420). These are the exact methods that paper compares; the Kronecker-factored ``curvature="ief"``,
``"empirical"`` and ``"fisher"`` of :class:`acktr_kfe.KFAC` / :class:`acktr_kfe.EKFAC` approximate them.

Conventions (the library's; README, "Using the preconditioners"):

- ``J`` is the ``(N, P)`` matrix whose row n is ``grad_n``, the gradient of example n's *own* loss
  ``l_n = loss_fn(model(x_n), y_n)`` over the trainable parameters (not divided by N), flattened in the order of
  ``model.parameters()``. The mean gradient is ``g = J^T 1 / N`` and the per-example-scale empirical Fisher is
  ``F_EF = E_n[grad_n grad_n^T] = J^T J / N``.
- ``damping`` ``lam`` is absolute and is added to that per-example-scale curvature, ``F + lam I``. In the N x N
  (Woodbury) form this becomes ``N lam`` on the Gram matrix ``J J^T``:

  .. code-block:: text

      EF:   D = (J^T J / N + lam I)^-1 g = J^T (J J^T + N lam I)^-1 1
      iEF:  D = J^T (J J^T + N lam I)^-1 s,      s_n = ||d l_n / d z_n||^2   (z_n: the model output of example n)
      SF:   D = (J_s^T J_s / N + lam I)^-1 g
              = (g - J_s^T (J_s J_s^T + N lam I)^-1 J_s g) / lam

  with ``J_s`` the per-example gradients of the same loss at targets sampled from the model
  (``F_SF = J_s^T J_s / N``, one sample per example). SF's gradient ``g`` is the true-label gradient, which is
  not in the span of the sampled gradients, so the SF step keeps the paper's matrix form rather than the
  ``J^T (...)^-1 s`` form of EF and iEF: its component outside that span is divided by ``lam`` alone (the
  damping sensitivity the paper reports for SF).

  As ``lam -> 0`` the iEF update is the minimum-norm ``D`` with ``grad_n^T D = ||d l_n / d z_n||^2`` for every n:
  each example's loss falls, to first order, as much as under a unit gradient step on its own output. For a scalar
  head with the loss ``0.5 (f - y)^2`` and N <= P (``J_f`` of full row rank) this is the Gauss-Newton step
  ``(J_f^T J_f)^+ J_f^T r`` (``J_f`` the output Jacobian, ``r`` the residuals); a loss ``c (f - y)^2``
  (``F.mse_loss``: c = 1) gives ``2c`` times that step. The per-example gradients are taken in the parameters'
  dtype; every solve is in float64.

- Memory: ``J`` holds ``N * P`` numbers (twice, once in the parameters' dtype and once in float64).
  ``max_elements`` (default ``2**26``, 512 MiB in float64) bounds ``N * P``; a larger batch or model raises a
  ``ValueError`` naming the size.

Usage: the optimizer computes the loss and the per-example gradients itself, so no ``backward()`` is needed::

    optimizer = acktr_kfe.exact.IEF(model, torch.nn.functional.cross_entropy, lr=0.1, damping=1e-4)
    for x, y in loader:
        loss = optimizer.step(x, y)          # the batch's mean loss before the step

``optimizer.direction(x, y)`` returns the update ``D`` (one tensor per trainable parameter) without stepping.
``loss_fn(outputs, targets)`` must be a mean over the batch (``F.cross_entropy``, ``F.mse_loss``); each example's
loss is ``loss_fn`` on a batch of one. The model must treat examples independently (no BatchNorm in training
mode): the per-example gradients come from ``torch.func`` (``vmap`` over ``grad`` of ``functional_call``).
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.optim import Optimizer

from .trust_region import is_positive_int

LossFn = Callable[[Tensor, Tensor], Tensor]
TargetSampler = Callable[[Tensor, torch.Generator | None], Tensor]

DEFAULT_MAX_ELEMENTS = 2**26


class TargetSampling(str, Enum):
    """How :class:`SF` samples targets from the model's output.

    ``categorical``: labels drawn from ``softmax(outputs)`` (classification with ``F.cross_entropy``).
    ``gaussian``: ``outputs + std * N(0, I)``, with ``std = 1 / sqrt(h)`` where ``h`` is the loss's curvature in
    its outputs (``F.mse_loss`` over C outputs: ``h = 2 / C``; ``0.5 * squared error``: ``h = 1``), so that the
    loss is the negative log-likelihood of that Gaussian up to a constant and the sampled gradients' second moment
    is the Fisher.
    """

    CATEGORICAL = "categorical"
    GAUSSIAN = "gaussian"


def _check_size(examples: int, parameters: int, max_elements: int) -> None:
    elements = examples * parameters
    if elements > max_elements:
        gib = elements * 8 / 2**30
        raise ValueError(
            f"the per-example gradient matrix would be N x P = {examples} x {parameters} = {elements} elements "
            f"({gib:.2f} GiB in float64), over max_elements={max_elements}; use a smaller batch, fewer trainable "
            "parameters (freeze some), or raise max_elements"
        )


class PerExampleGradients:
    """Per-example gradients of a model's trainable parameters, from ``torch.func``.

    Args:
        model: the model; its parameters with ``requires_grad`` are the ones differentiated.
        loss_fn: ``loss_fn(outputs, targets)``, a mean over the batch.
        max_elements: the largest ``N * P`` allowed (``ValueError`` naming the size beyond it).
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, max_elements: int = DEFAULT_MAX_ELEMENTS) -> None:
        if not is_positive_int(max_elements):
            raise ValueError(f"Invalid max_elements: {max_elements!r} (must be an integer >= 1)")
        self.model = model
        self.loss_fn = loss_fn
        self.max_elements = max_elements
        self.names = [name for name, p in model.named_parameters() if p.requires_grad]
        if not self.names:
            raise ValueError("the model has no parameter that requires a gradient")
        self.num_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
        _check_size(1, self.num_parameters, max_elements)

    def _frozen(self) -> dict[str, Tensor]:
        state = {name: p.detach() for name, p in self.model.named_parameters() if not p.requires_grad}
        # Buffers are cloned so that a forward that updates them in place leaves the model's own unchanged.
        state.update({name: b.detach().clone() for name, b in self.model.named_buffers()})
        return state

    def _example_loss(self, params: dict[str, Tensor], frozen: dict[str, Tensor], x: Tensor, y: Tensor):
        outputs = functional_call(self.model, {**params, **frozen}, (x.unsqueeze(0),))
        return self.loss_fn(outputs, y.unsqueeze(0)), outputs.squeeze(0)

    def __call__(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(J, outputs, losses)``: ``J`` ``(N, P)`` per-example gradients in the parameters' dtype (rows ordered
        as ``model.parameters()``, each flattened), the outputs ``(N, ...)`` and the per-example losses ``(N,)``."""
        _check_size(inputs.shape[0], self.num_parameters, self.max_elements)
        params = {name: p.detach() for name, p in self.model.named_parameters() if p.requires_grad}
        frozen = self._frozen()
        per_example = vmap(grad(self._example_loss, has_aux=True), in_dims=(None, None, 0, 0))
        grads, outputs = per_example(params, frozen, inputs, targets)
        rows = torch.cat([grads[name].reshape(inputs.shape[0], -1) for name in self.names], dim=1)
        losses = vmap(lambda z, y: self.loss_fn(z.unsqueeze(0), y.unsqueeze(0)))(outputs, targets)
        return rows, outputs, losses

    def output_gradients(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """``d l_n / d z_n`` of each example, shape ``outputs.shape``."""
        return vmap(grad(lambda z, y: self.loss_fn(z.unsqueeze(0), y.unsqueeze(0))))(outputs.detach(), targets)

    def output_curvature(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """The mean diagonal of ``d^2 l_n / d z_n^2`` of each example, shape ``(N,)``."""

        def diagonal_mean(z: Tensor, y: Tensor) -> Tensor:
            hessian = torch.func.jacrev(grad(lambda w: self.loss_fn(w.unsqueeze(0), y.unsqueeze(0))))(z)
            flat = hessian.reshape(z.numel(), z.numel())
            return flat.diagonal().mean()

        return vmap(diagonal_mean)(outputs.detach(), targets)


class _ExactOptimizer(Optimizer):
    """Shared machinery of :class:`IEF`, :class:`EF` and :class:`SF`; see their docstrings."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        lr: float = 0.1,
        *,
        damping: float = 1e-4,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        max_elements: int = DEFAULT_MAX_ELEMENTS,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"{type(self).__name__} is built from the model (an nn.Module) and a loss function, got "
                f"{type(model).__name__}; write {type(self).__name__}(model, loss_fn, lr=...)"
            )
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(outputs, targets), got {type(loss_fn).__name__}")
        if not lr >= 0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not damping > 0:
            raise ValueError(f"Invalid damping: {damping} (must be > 0)")
        if not 0 <= momentum < 1:
            raise ValueError(f"Invalid momentum: {momentum} (must be in [0, 1))")
        if not weight_decay >= 0:
            raise ValueError(f"Invalid weight_decay: {weight_decay}")
        self._grads = PerExampleGradients(model, loss_fn, max_elements)
        params = [p for p in model.parameters() if p.requires_grad]
        defaults = {"lr": lr, "damping": damping, "momentum": momentum, "weight_decay": weight_decay}
        super().__init__(params, defaults)
        if len(self.param_groups) != 1:  # pragma: no cover - built from one list
            raise ValueError("exact optimizers take one parameter group")

    @property
    def max_elements(self) -> int:
        """The largest ``N * P`` (batch size times trainable parameters) allowed."""
        return self._grads.max_elements

    def _solve(self, rows: Tensor, outputs: Tensor, inputs: Tensor, targets: Tensor, damping: float) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def _flat_direction(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        group = self.param_groups[0]
        with torch.enable_grad():
            rows, outputs, losses = self._grads(inputs, targets)
        direction = self._solve(rows.double(), outputs, inputs, targets, float(group["damping"]))
        return direction, losses.mean()

    def _split(self, flat: Tensor) -> list[Tensor]:
        params = self.param_groups[0]["params"]
        pieces, offset = [], 0
        for p in params:
            pieces.append(flat[offset : offset + p.numel()].reshape(p.shape).to(p.dtype))
            offset += p.numel()
        return pieces

    def direction(self, inputs: Tensor, targets: Tensor) -> list[Tensor]:
        """The update ``D`` on this batch (one tensor per trainable parameter, in ``model.parameters()`` order),
        without weight decay or momentum; the step is ``p <- p - lr D``."""
        flat, _ = self._flat_direction(inputs, targets)
        return self._split(flat)

    @torch.no_grad()
    def step(self, inputs: Tensor, targets: Tensor) -> Tensor:  # type: ignore[override]
        """One update on the batch ``(inputs, targets)``; returns the batch's mean loss before the step.

        ``buf <- momentum buf + D + weight_decay p`` (``buf = D + weight_decay p`` without momentum), then
        ``p <- p - lr buf``.
        """
        flat, loss = self._flat_direction(inputs, targets)
        group = self.param_groups[0]
        for p, d in zip(group["params"], self._split(flat)):
            if group["weight_decay"]:
                d = d + group["weight_decay"] * p
            if group["momentum"]:
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = d.clone()
                else:
                    buf.mul_(group["momentum"]).add_(d)
                d = buf
            p.add_(d, alpha=-group["lr"])
        return loss.detach()


def _gram_solve(rows: Tensor, rhs: Tensor, damping: float) -> Tensor:
    """``(J J^T + N lam I)^-1 rhs`` in float64 (Cholesky; symmetric eigensolve if it fails)."""
    n = rows.shape[0]
    gram = rows @ rows.T
    gram.diagonal().add_(n * damping)
    factor, info = torch.linalg.cholesky_ex(gram)
    if int(info) == 0:
        return torch.cholesky_solve(rhs.unsqueeze(-1), factor).squeeze(-1)
    vals, vecs = torch.linalg.eigh(gram)
    return vecs @ ((vecs.T @ rhs) / vals.clamp_min(n * damping))


class IEF(_ExactOptimizer):
    r"""Exact improved empirical Fisher (iEF, Wu et al. 2024, arXiv:2406.06420), for small trainable parameter sets.

    .. code-block:: text

        J  = per-example gradients of the trainable parameters, (N, P), each example's own loss (float64)
        s_n = ||d l_n / d z_n||^2                                  (z_n: the model output of example n)
        D  = J^T (J J^T + N damping I)^-1 s
        buf <- momentum buf + D + weight_decay p;   p <- p - lr buf

    See :mod:`acktr_kfe.exact` for the scale of ``J`` and the damping convention (``damping`` is added to the
    per-example-scale curvature). As ``damping -> 0`` the iEF step of a scalar ``0.5 * squared error`` model with
    N <= P is its Gauss-Newton step.

    Args:
        model: the model; its parameters with ``requires_grad`` are updated.
        loss_fn: ``loss_fn(outputs, targets)``, a mean over the batch (``F.cross_entropy``, ``F.mse_loss``).
        lr: learning rate.
        damping: ``lam > 0``, absolute, on the per-example scale.
        momentum: heavy-ball momentum in ``[0, 1)``.
        weight_decay: L2 coefficient added to ``D``.
        max_elements: the largest ``N * P`` allowed; a larger per-example gradient matrix raises ``ValueError``.
    """

    def _solve(self, rows: Tensor, outputs: Tensor, inputs: Tensor, targets: Tensor, damping: float) -> Tensor:
        output_grads = self._grads.output_gradients(outputs, targets)
        s = output_grads.reshape(rows.shape[0], -1).double().square().sum(dim=1)
        return rows.T @ _gram_solve(rows, s, damping)


class EF(_ExactOptimizer):
    r"""Exact empirical Fisher natural gradient, for small trainable parameter sets.

    .. code-block:: text

        J = per-example gradients of the trainable parameters, (N, P), each example's own loss (float64)
        D = (J^T J / N + damping I)^-1 (J^T 1 / N) = J^T (J J^T + N damping I)^-1 1
        buf <- momentum buf + D + weight_decay p;   p <- p - lr buf

    Arguments as :class:`IEF`.
    """

    def _solve(self, rows: Tensor, outputs: Tensor, inputs: Tensor, targets: Tensor, damping: float) -> Tensor:
        ones = torch.ones(rows.shape[0], dtype=rows.dtype, device=rows.device)
        return rows.T @ _gram_solve(rows, ones, damping)


def _sample_targets(
    sampling: TargetSampling | TargetSampler,
    outputs: Tensor,
    targets: Tensor,
    grads: PerExampleGradients,
    generator: torch.Generator | None,
) -> Tensor:
    outputs = outputs.detach()
    if sampling is TargetSampling.CATEGORICAL:
        if outputs.dim() != 2 or outputs.shape[1] < 2:
            raise ValueError(
                f"target_sampling='categorical' needs (N, C) logits, got outputs of shape {tuple(outputs.shape)}"
            )
        probs = torch.softmax(outputs.double(), dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1).to(targets.dtype)
    if sampling is TargetSampling.GAUSSIAN:
        curvature = grads.output_curvature(outputs, targets)
        if not bool((curvature > 0).all()):
            raise ValueError("target_sampling='gaussian' needs a loss with positive curvature in the outputs")
        std = curvature.rsqrt().reshape(-1, *([1] * (outputs.dim() - 1)))
        noise = torch.randn(outputs.shape, dtype=outputs.dtype, device=outputs.device, generator=generator)
        return (outputs + std * noise).to(targets.dtype)
    return sampling(outputs, generator)


class SF(_ExactOptimizer):
    r"""Exact sampled-Fisher natural gradient (one target sampled from the model per example), for small models.

    .. code-block:: text

        y_hat_n ~ p(y | z_n)                          (target_sampling; z_n the model output of example n)
        J   = per-example gradients at the true targets, (N, P);  g = J^T 1 / N       (float64)
        J_s = per-example gradients at the sampled targets, (N, P)
        D   = (J_s^T J_s / N + damping I)^-1 g = (g - J_s^T (J_s J_s^T + N damping I)^-1 J_s g) / damping
        buf <- momentum buf + D + weight_decay p;   p <- p - lr buf

    The part of ``g`` outside the span of the sampled gradients is divided by ``damping`` alone, so the step's
    length depends strongly on the damping (Wu et al. 2024 report this sensitivity); use a trust region or a small
    ``lr`` with small damping.

    Args:
        target_sampling: ``"categorical"`` (default; softmax logits), ``"gaussian"`` (see :class:`TargetSampling`),
            or a callable ``(outputs, generator) -> targets``.
        generator: random generator for the samples.
        Other arguments as :class:`IEF`.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        lr: float = 0.1,
        *,
        damping: float = 1e-4,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        max_elements: int = DEFAULT_MAX_ELEMENTS,
        target_sampling: str | TargetSampling | TargetSampler = "categorical",
        generator: torch.Generator | None = None,
    ) -> None:
        if callable(target_sampling) and not isinstance(target_sampling, (str, TargetSampling)):
            self.target_sampling: TargetSampling | TargetSampler = target_sampling
        else:
            try:
                self.target_sampling = TargetSampling(target_sampling)
            except ValueError:
                valid = ", ".join(repr(m.value) for m in TargetSampling)
                raise ValueError(
                    f"Invalid target_sampling: {target_sampling!r}. Valid values: {valid}, or a callable"
                ) from None
        self.generator = generator
        super().__init__(
            model,
            loss_fn,
            lr=lr,
            damping=damping,
            momentum=momentum,
            weight_decay=weight_decay,
            max_elements=max_elements,
        )

    def _solve(self, rows: Tensor, outputs: Tensor, inputs: Tensor, targets: Tensor, damping: float) -> Tensor:
        sampled = _sample_targets(self.target_sampling, outputs, targets, self._grads, self.generator)
        with torch.enable_grad():
            sampled_rows, _, _ = self._grads(inputs, sampled)
        sampled_rows = sampled_rows.double()
        gradient = rows.mean(dim=0)
        projected = sampled_rows.T @ _gram_solve(sampled_rows, sampled_rows @ gradient, damping)
        return (gradient - projected) / damping


__all__ = ["DEFAULT_MAX_ELEMENTS", "EF", "IEF", "SF", "PerExampleGradients", "TargetSampling"]
