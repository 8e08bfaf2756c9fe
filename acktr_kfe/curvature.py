"""Curvature sources and the losses whose backward pass feeds the Kronecker factors.

The optimizer's gradient always comes from the training loss. Its *curvature* comes from the backward pass that
the user chooses (docs/DESIGN.md, section 6):

- ``fisher``: targets sampled from the model's own predictive distribution. Backward one of
  :func:`softmax_fisher_loss`, :func:`bernoulli_fisher_loss`, :func:`gaussian_fisher_loss` or
  :func:`regression_fisher_loss` through
  ``optimizer.curvature_backward``; in expectation over the samples the statistics are those of the true Fisher.
- ``empirical``: the training loss itself, with the true labels (or the taken actions). Every backward pass in
  training mode is recorded, so ``loss.backward(); optimizer.step()`` is the whole loop.
- ``gauss_newton``: for a squared-error scalar head, backward :func:`gauss_newton_loss` (an output gradient of
  exactly 1 per example gives ``J^T J`` with no sampling noise).
- ``ief``: improved empirical Fisher (Wu et al. 2024): the training loss, with each example's output gradients
  divided by the norm of its loss gradient at the logits. Needs the logits:
  ``optimizer.curvature_backward(loss, logits=logits, accumulate_grad=True)``.

Every loss here is a mean over the batch by default (``reduction="mean"``), matching the optimizer's default
``loss_reduction="mean"``, which multiplies recorded output gradients by the batch size to recover per-example
gradients.
"""

from __future__ import annotations

import math
from enum import Enum

import torch
import torch.nn.functional as F
from torch import Tensor


class Curvature(str, Enum):
    """Which backward pass feeds the curvature statistics."""

    FISHER = "fisher"
    EMPIRICAL = "empirical"
    GAUSS_NEWTON = "gauss_newton"
    IEF = "ief"

    @classmethod
    def parse(cls, value: str | Curvature) -> Curvature:
        """The member for ``value``; a ``ValueError`` listing the valid names otherwise."""
        try:
            return cls(value)
        except ValueError:
            valid = ", ".join(repr(m.value) for m in cls)
            raise ValueError(f"Invalid curvature: {value!r}. Valid values: {valid}") from None


def _reduce(per_example: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return per_example.mean()
    if reduction == "sum":
        return per_example.sum()
    raise ValueError(f"Invalid reduction: {reduction!r}. Valid values: 'mean', 'sum'")


def softmax_fisher_loss(logits: Tensor, *, reduction: str = "mean", generator: torch.Generator | None = None) -> Tensor:
    """Cross-entropy against labels sampled from ``softmax(logits)``: its backward gives Fisher statistics.

    Args:
        logits: ``(N, C)`` unnormalized log-probabilities (the model's output, still attached to the graph).
        reduction: ``"mean"`` or ``"sum"`` over the batch.
        generator: optional random generator for the samples.
    """
    with torch.no_grad():
        probs = torch.softmax(logits.detach().reshape(-1, logits.shape[-1]).double(), dim=-1)
        labels = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    per_example = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels, reduction="none")
    return _reduce(per_example, reduction)


def bernoulli_fisher_loss(
    logits: Tensor, *, reduction: str = "mean", generator: torch.Generator | None = None
) -> Tensor:
    """Binary cross-entropy against targets sampled from ``sigmoid(logits)``: Fisher statistics of independent
    Bernoulli outputs (an autoencoder's pixels, multi-label heads), summed over outputs per example.

    Args:
        logits: ``(N, ...)`` logits of independent Bernoulli outputs.
        reduction: ``"mean"`` or ``"sum"`` over the batch.
        generator: optional random generator for the samples.
    """
    with torch.no_grad():
        targets = torch.bernoulli(torch.sigmoid(logits.detach()), generator=generator)
    per_output = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return _reduce(per_output.reshape(logits.shape[0], -1).sum(-1), reduction)


def gaussian_fisher_loss(
    mean: Tensor,
    log_std: Tensor,
    *,
    reduction: str = "mean",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Negative log-likelihood of actions sampled from a diagonal Gaussian ``N(mean, exp(log_std)^2)``.

    Its backward gives Fisher statistics for the mean (``E[grad grad^T] = diag(1/std^2)`` at the output) and for
    ``log_std``. The samples are drawn from the detached distribution, so only the log-likelihood is
    differentiated.

    Args:
        mean: ``(N, D)`` action means.
        log_std: ``(D,)`` or ``(N, D)`` log standard deviations.
        reduction: ``"mean"`` or ``"sum"`` over the batch.
        generator: optional random generator for the samples.
    """
    std = log_std.exp()
    with torch.no_grad():
        noise = torch.randn(mean.shape, dtype=mean.dtype, device=mean.device, generator=generator)
        actions = mean.detach() + std.detach() * noise
    log_prob = -0.5 * ((actions - mean) / std).square() - log_std - 0.5 * math.log(2 * math.pi)
    return _reduce(-log_prob.reshape(mean.shape[0], -1).sum(-1), reduction)


def regression_fisher_loss(
    prediction: Tensor, *, reduction: str = "mean", generator: torch.Generator | None = None
) -> Tensor:
    """Squared error against ``y = prediction + N(0, 1)``: Fisher statistics of a unit-variance regression head.

    In expectation these equal the Gauss-Newton statistics of the squared error, for any number of outputs.

    Args:
        prediction: ``(N, ...)`` regression outputs.
        reduction: ``"mean"`` or ``"sum"`` over the batch.
        generator: optional random generator for the noise.
    """
    with torch.no_grad():
        noise = torch.randn(prediction.shape, dtype=prediction.dtype, device=prediction.device, generator=generator)
        targets = prediction.detach() + noise
    per_example = 0.5 * (prediction - targets).square().reshape(prediction.shape[0], -1).sum(-1)
    return _reduce(per_example, reduction)


def gauss_newton_loss(prediction: Tensor, *, reduction: str = "mean") -> Tensor:
    """A loss whose output gradient is 1 per example: the exact Gauss-Newton statistics of a scalar head.

    For the squared error ``0.5 (f(x) - y)^2`` the Gauss-Newton matrix is ``J^T J``; backpropagating 1 from the
    scalar output of each example records exactly ``J``'s rows, with no noise.

    Args:
        prediction: ``(N,)`` or ``(N, 1)`` scalar outputs (a value head).
        reduction: ``"mean"`` or ``"sum"`` over the batch.

    Raises:
        ValueError: if the head has more than one output (use :func:`regression_fisher_loss`, whose
            expectation is the Gauss-Newton matrix for any number of outputs).
    """
    flat = prediction.reshape(prediction.shape[0], -1)
    if flat.shape[1] != 1:
        raise ValueError(
            f"gauss_newton_loss needs a scalar head, got outputs of shape {tuple(prediction.shape)}; "
            "use regression_fisher_loss for several outputs"
        )
    return _reduce(flat[:, 0], reduction)
