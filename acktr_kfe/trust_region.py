"""The KL trust regions of the optimizers: regions and radii, the step-size rule of ACKTR (Wu et al. 2017, section
3.1), the quadratic forms it reads, and the predicted KL.

With the preconditioned direction ``D = F_hat^-1 grad`` and learning rate ``eta``, a step ``-eta D`` changes
the model's distribution by a predicted KL of ``0.5 eta^2 D^T F_hat D = 0.5 eta^2 D^T grad``. The step is
scaled by ``nu = min(1, sqrt(2 max_kl / (eta^2 D^T grad)))``, so the predicted KL never exceeds ``max_kl``.
(OpenAI baselines' ``kfac_clip`` is ``2 max_kl``.) With momentum the optimizers apply the rule to the step
actually taken, ``u = momentum buf + D``, with ``u^T F_hat u`` in place of ``D^T grad`` (docs/DESIGN.md, section 5).

Parameters may be split into regions, each measured and scaled on its own (ACKTR's actor and critic without shared
layers); :class:`TrustRegions` holds that partition and the radii. The calibration of the radii against a
measured KL lives with the agent that can measure one (``agents/kl_calibration.py``).

Everything stays a tensor on the parameters' device: no host synchronization.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor


def is_real_number(value: Any) -> bool:
    """A real number (Python's or NumPy's); a string, a tensor or a bool read from a config or a state is not."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_positive_int(value: Any) -> bool:
    """An integer >= 1 (Python's or NumPy's); a bool, a float such as ``4.0`` or a string is not."""
    return is_nonnegative_int(value) and value >= 1


def is_nonnegative_int(value: Any) -> bool:
    """An integer >= 0 (Python's or NumPy's); a bool, a float such as ``4.0`` or a string is not."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0


def check_radius(max_kl: Any, name: str = "max_kl") -> None:
    """Raise ``ValueError`` unless ``max_kl`` is a finite float > 0 or ``None``."""
    if max_kl is not None and not (is_real_number(max_kl) and max_kl > 0.0 and math.isfinite(max_kl)):
        raise ValueError(f"Invalid {name}: {max_kl!r} (must be a finite float > 0, or None to disable)")


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


def step_quadratic(
    direction: Tensor, grad: Tensor, momentum: float, buffer: Tensor | None, buffer_quadratic: Tensor | None
) -> Tensor:
    """``u^T F_damped u`` of the step ``u = momentum buf + D`` from ``F_damped D = grad``:
    ``D^T grad + momentum (2 buf^T grad + momentum buf^T F_damped buf)``; ``D^T grad`` without a buffer."""
    quadratic = torch.dot(direction.reshape(-1), grad.reshape(-1))
    if buffer is None or buffer_quadratic is None:
        return quadratic
    return quadratic + momentum * (momentum * buffer_quadratic + 2.0 * torch.dot(buffer.reshape(-1), grad.reshape(-1)))


class TrustRegions:
    """A partition of the trainable parameters into KL trust regions, their radii, and the per-step bookkeeping.

    Args:
        trust_regions: ``[(parameters, max_kl or None), ...]``, or ``None`` for one region that holds every
            parameter and whose radius is the parameter group's ``max_kl`` (read at every step).
        params: the optimizer's trainable parameters.
        max_kl: the group's ``max_kl``; must be ``None`` when ``trust_regions`` is given.
        layers: ``(name, parameters)`` of each preconditioned layer: a layer lies in one region or in none.

    Raises:
        ValueError: on an empty list, a pair that is not one, a tensor that is not a trainable parameter, a
            parameter in two regions, a layer split between regions, or ``max_kl`` given with explicit regions.
    """

    def __init__(
        self,
        trust_regions: Sequence[tuple[Iterable[Tensor], float | None]] | None,
        params: Sequence[Tensor],
        max_kl: float | None,
        layers: Iterable[tuple[str, Sequence[Tensor]]] = (),
    ) -> None:
        self.explicit = trust_regions is not None
        self._region_of: dict[int, int] = {}
        self._radii: list[float | None] = [None]
        if trust_regions is None:
            self._region_of = {id(p): 0 for p in params}
            return
        if len(trust_regions) == 0:
            raise ValueError("trust_regions must hold at least one (parameters, max_kl) pair, or be None")
        if max_kl is not None:
            raise ValueError("give the radius of each trust region in trust_regions, and max_kl=None")
        trainable = {id(p) for p in params}
        self._radii = []
        for index, entry in enumerate(trust_regions):
            if not (isinstance(entry, tuple | list) and len(entry) == 2):
                raise ValueError(f"trust_regions[{index}] must be a (parameters, max_kl) pair, got {entry!r}")
            members, radius = entry
            check_radius(radius)
            for param in members:
                if id(param) not in trainable:
                    raise ValueError(f"trust_regions[{index}] holds a tensor that is not a trainable model parameter")
                if id(param) in self._region_of:
                    raise ValueError(f"a parameter belongs to trust regions {self._region_of[id(param)]} and {index}")
                self._region_of[id(param)] = index
            self._radii.append(radius)
        for name, layer_params in layers:
            if len({self._region_of.get(id(p)) for p in layer_params}) > 1:
                raise ValueError(f"trust_regions must hold all or none of layer {name}'s parameters")

    def __len__(self) -> int:
        return len(self._radii)

    def region(self, param: Tensor) -> int | None:
        """The index of the region ``param`` belongs to, or ``None``."""
        return self._region_of.get(id(param))

    def radii(self, group: dict[str, Any]) -> list[float | None]:
        """The radius of each region for this step (the group's ``max_kl`` for the one implicit region)."""
        return list(self._radii) if self.explicit else [group["max_kl"]]

    def set_radius(self, index: int, radius: float | None, group: dict[str, Any]) -> None:
        """Change the radius of region ``index`` (the group's ``max_kl`` for the one implicit region)."""
        if not 0 <= index < len(self._radii):
            raise IndexError(f"trust region {index} does not exist; there are {len(self._radii)}")
        check_radius(radius)
        if self.explicit:
            self._radii[index] = radius
        else:
            group["max_kl"] = radius

    def zeros(self, reference: Tensor) -> list[Tensor]:
        """One zero quadratic form per region, to accumulate a step's forms into."""
        return [torch.zeros((), dtype=reference.dtype, device=reference.device) for _ in self._radii]

    def measured(self, radii: list[float | None], on_step: bool) -> list[bool]:
        """Per region: whether the momentum buffer's quadratic form is needed (the ``step`` mode's measured regions;
        the one implicit region only when it has a radius)."""
        return [on_step and (self.explicit or radius is not None) for radius in radii]

    @staticmethod
    def scales(quadratics: list[Tensor], lr: float, radii: list[float | None]) -> Tensor:
        """``nu`` of each region, stacked."""
        return torch.stack([kl_clip_scale(q, lr, radius) for q, radius in zip(quadratics, radii)])

    @staticmethod
    def predicted(quadratics: list[Tensor], lr: float, scales: Tensor) -> Tensor:
        """The predicted KL of each region's step, stacked."""
        return torch.stack([predicted_kl(q, lr, nu) for q, nu in zip(quadratics, scales)])

    def scale_of(self, param: Tensor, scales: Tensor) -> Tensor:
        """The scale of ``param``'s region, 1 outside every region."""
        region = self.region(param)
        return torch.ones_like(scales[0]) if region is None else scales[region]
