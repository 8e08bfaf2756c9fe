"""The KL trust-region step-size rule of ACKTR (Wu et al. 2017, section 3.1).

With the preconditioned direction ``D = F_hat^-1 grad`` and learning rate ``eta``, a step ``-eta D`` changes
the model's distribution by a predicted KL of ``0.5 eta^2 D^T F_hat D = 0.5 eta^2 D^T grad``. The step is
scaled by ``nu = min(1, sqrt(2 max_kl / (eta^2 D^T grad)))``, so the predicted KL never exceeds ``max_kl``.
(OpenAI baselines' ``kfac_clip`` is ``2 max_kl``.) With momentum the optimizers apply the rule to the step
actually taken, ``u = momentum buf + D``, with ``u^T F_hat u`` in place of ``D^T grad``.

Everything stays a tensor on the parameters' device: no host synchronization.
"""

from __future__ import annotations

import torch
from torch import Tensor


def kl_clip_scale(direction_dot_grad: Tensor, lr: float, max_kl: float | None) -> Tensor:
    """The factor ``nu`` in ``[0, 1]`` that keeps the predicted KL of the step at most ``max_kl``.

    Args:
        direction_dot_grad: scalar tensor ``D^T grad`` (or ``u^T F_hat u`` for a momentum step ``u``).
        lr: the learning rate ``eta``.
        max_kl: the trust-region radius; ``None`` disables the rule (``nu = 1``).
    """
    one = torch.ones((), dtype=direction_dot_grad.dtype, device=direction_dot_grad.device)
    if max_kl is None or lr == 0:
        return one
    # A non-positive D^T grad (a rounding artefact near a stationary point) predicts no KL: no clipping.
    quadratic = (lr * lr) * direction_dot_grad.clamp_min(torch.finfo(direction_dot_grad.dtype).tiny)
    return torch.sqrt((2.0 * max_kl) / quadratic).clamp(max=1.0)


def predicted_kl(direction_dot_grad: Tensor, lr: float, scale: Tensor) -> Tensor:
    """``0.5 (nu eta)^2 D^T grad``: the KL the quadratic model predicts for the step actually taken."""
    return 0.5 * (lr * lr) * scale.square() * direction_dot_grad.clamp_min(0)
