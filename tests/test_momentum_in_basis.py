"""The momentum buffer kept in the Kronecker-factored eigenbasis: the same steps as in parameter coordinates, with
one rotation in and one out per layer and step."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from acktr_kfe import EKFAC, KFAC
from acktr_kfe.blocks import KroneckerBlock

from .test_optimizer_behaviour import batch, mlp, train

# Eigenbases every third step: the runs cross two refreshes, where the kept buffer must be rotated afresh.
OPTIONS = {"factor_update_interval": 1, "eigen_update_interval": 3, "momentum": 0.9, "weight_decay": 1e-3}
CASES = [
    pytest.param(EKFAC, {"scale_update_interval": 1, "step_norm": "natural", "max_kl": 1e-3}, id="ekfac-natural"),
    pytest.param(EKFAC, {"scale_update_interval": 1, "step_norm": "adam", "max_kl": 1e-3}, id="ekfac-adam"),
    pytest.param(
        EKFAC,
        {"scale_update_interval": 1, "step_norm": "natural", "max_kl": 1e-3, "trust_region_mode": "direction"},
        id="ekfac-direction",
    ),
    pytest.param(KFAC, {"damping_mode": "eigen", "step_norm": "natural", "max_kl": 1e-3}, id="kfac-eigen"),
]


def run(cls: type, options: dict, in_basis: bool, monkeypatch: pytest.MonkeyPatch, steps: int = 8) -> nn.Module:
    with monkeypatch.context() as patch:
        if not in_basis:
            patch.setattr(KroneckerBlock, "momentum_in_basis", lambda self: False)
        model = mlp().double()
        optimizer = cls(model, lr=0.2, **OPTIONS, **options)
        for seed in range(steps):
            x, y = batch(seed)
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x.double()), y).backward()
            optimizer.step()
    return model


@pytest.mark.parametrize(("cls", "options"), CASES)
def test_momentum_in_the_eigenbasis_takes_the_parameter_space_steps(
    cls: type, options: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    in_basis = run(cls, options, True, monkeypatch)
    in_parameters = run(cls, options, False, monkeypatch)
    for p, q in zip(in_basis.parameters(), in_parameters.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def kl_bounded_ekfac(model: torch.nn.Module, *, factors: int, eigen: int, scale: int) -> EKFAC:
    """EKFAC with momentum, the natural step and a KL trust region on the step taken; factors, eigenbasis and
    scale updated every ``factors``, ``eigen`` and ``scale`` steps."""
    return EKFAC(
        model,
        lr=0.1,
        momentum=0.9,
        max_kl=1e-3,
        step_norm="natural",
        factor_update_interval=factors,
        eigen_update_interval=eigen,
        scale_update_interval=scale,
    )


def count_rotations(monkeypatch: pytest.MonkeyPatch, in_basis: bool) -> tuple[int, int]:
    """Rotations (to_kfe + from_kfe calls, two matrix products each) per layer and step, with the trust region
    on the step taken: (steps without a refresh, their rotations)."""
    calls = {"count": 0}
    for name in ("to_kfe", "from_kfe"):
        original = getattr(KroneckerBlock, name)

        def counted(self, matrix, original=original):
            calls["count"] += 1
            return original(self, matrix)

        monkeypatch.setattr(KroneckerBlock, name, counted)
    if not in_basis:
        monkeypatch.setattr(KroneckerBlock, "momentum_in_basis", lambda self: False)
    model = mlp()
    optimizer = kl_bounded_ekfac(model, factors=100, eigen=100, scale=100)
    train(optimizer, model, range(3))  # the first steps create the basis and the buffer
    calls["count"] = 0
    train(optimizer, model, range(3, 7))
    monkeypatch.undo()
    return 4 * len(optimizer.blocks), calls["count"]


def test_a_step_rotates_each_layer_once_in_and_once_out(monkeypatch: pytest.MonkeyPatch) -> None:
    layer_steps, rotations = count_rotations(monkeypatch, in_basis=True)
    assert rotations == 2 * layer_steps
    layer_steps, rotations = count_rotations(monkeypatch, in_basis=False)
    assert rotations == 3 * layer_steps  # gradient in, direction out, momentum buffer in for its quadratic form


def test_a_buffer_changed_outside_the_optimizer_is_rotated_in_again() -> None:
    model = mlp()
    optimizer = EKFAC(model, lr=0.1, momentum=0.9, step_norm="natural", eigen_update_interval=100)
    train(optimizer, model, range(3))
    for param in model.parameters():
        optimizer.state[param]["momentum_buffer"].zero_()
    reference = mlp()
    reference.load_state_dict(model.state_dict())
    before = [p.detach().clone() for p in model.parameters()]
    train(optimizer, model, range(3, 4))
    # With a zeroed buffer the step is the new direction alone: buf = nu D.
    kept = [optimizer.state[p]["momentum_buffer"] for p in model.parameters()]
    for p, b, start in zip(model.parameters(), kept, before):
        torch.testing.assert_close(p.detach(), start - 0.1 * b)
    block = optimizer.blocks[0]
    in_basis = optimizer.state[block.weight]["momentum_in_basis"]
    torch.testing.assert_close(block.to_kfe(block.adapter.join(kept[:2])), in_basis, rtol=1e-4, atol=1e-5)


def test_a_refresh_drops_the_saved_buffer_in_the_old_basis() -> None:
    model = mlp()
    optimizer = EKFAC(model, lr=0.1, momentum=0.9, step_norm="natural", eigen_update_interval=2)
    train(optimizer, model, range(2))
    weight = optimizer.blocks[0].weight
    assert "momentum_in_basis" in optimizer.state[weight]
    x, y = batch(2)
    optimizer.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimizer._update_curvature(optimizer._capture.pop_records(), 2)  # the refresh of step 2, before its update
    assert "momentum_in_basis" not in optimizer.state[weight]


def test_after_a_refresh_the_buffer_is_rotated_into_the_new_basis_once(monkeypatch: pytest.MonkeyPatch) -> None:
    model = mlp()
    optimizer = kl_bounded_ekfac(model, factors=1, eigen=3, scale=1)
    train(optimizer, model, range(3))
    calls = {"to_kfe": 0}
    original = KroneckerBlock.to_kfe

    def counted(self, matrix):
        calls["to_kfe"] += 1
        return original(self, matrix)

    monkeypatch.setattr(KroneckerBlock, "to_kfe", counted)
    train(optimizer, model, range(3, 4))  # step 3 refreshes every basis
    # Per layer: the gradient, and the buffer once (for the trust region's quadratic form and the update alike).
    assert calls["to_kfe"] == 2 * len(optimizer.blocks)
