"""The optimizer's correctness checks on every available device: exact blocks, the EKFAC theorem, the trust
region and the state_dict round trip. The CUDA cases carry the ``cuda`` marker and skip on a machine without a GPU;
on a GPU machine ``python -m pytest tests/test_devices.py tests/test_exact_reference.py -m "cuda or not slow"``
checks everything with torch alone (no gymnasium, SB3, MuJoCo or ALE needed)."""

from __future__ import annotations

import io

import pytest
import torch

from acktr_kfe import EKFAC, KFAC, curvature_matrix

from .test_exact_reference import (
    TRACKED,
    assert_scale_is_kfe_diagonal,
    exact_block,
    exact_optimizer,
    kfac_reconstruction,
    loss_fn,
    make_data,
    make_model,
    mean_grad,
    one_step,
)

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine"),
        ],
    ),
]
KINDS = ["linear", "conv-1"]


def _on(device: str, kind: str, seed: int = 0, n: int = 8):
    model = make_model(kind, bias=True, seed=seed).to(device)
    x, y = make_data(kind, seed=seed + 10, n=n)
    return model, x.to(device), y.to(device)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("device", DEVICES)
def test_ekfac_and_kfac_directions_equal_dense_damped_solves_on_the_device(device: str, kind: str) -> None:
    for cls in (EKFAC, KFAC):
        model, x, y = _on(device, kind)
        grads = {i: mean_grad(model, i, x, y) for i in TRACKED}
        options = {"damping_mode": "eigen"} if cls is KFAC else {}
        optimizer = exact_optimizer(cls, model, damping=0.05, damping_scaling="absolute", **options)
        directions = one_step(optimizer, model, x, y)
        for i in TRACKED:
            block = curvature_matrix(optimizer, model[i])
            assert block.device.type == device and optimizer.state[model[i].weight]["A"].device.type == device
            eye = torch.eye(block.shape[0], dtype=block.dtype, device=block.device)
            expected = torch.linalg.solve(block + 0.05 * eye, grads[i])
            torch.testing.assert_close(directions[i].reshape(-1), expected)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("device", DEVICES)
def test_ekfac_theorem_against_the_exact_block_on_the_device(device: str, kind: str) -> None:
    model, x, y = _on(device, kind, seed=3, n=16)
    blocks = {i: exact_block(model, i, x, y) for i in TRACKED}
    optimizer = exact_optimizer(EKFAC, model)
    one_step(optimizer, model, x, y)
    for i in TRACKED:
        state = optimizer.state[model[i].weight]
        # The scale is the exact block's diagonal in the KFE, and no diagonal there is closer in Frobenius norm.
        assert_scale_is_kfe_diagonal(state, blocks[i])
        kfac_error = torch.linalg.matrix_norm(blocks[i] - kfac_reconstruction(state))
        assert torch.linalg.matrix_norm(blocks[i] - curvature_matrix(optimizer, model[i])) <= kfac_error + 1e-12


@pytest.mark.parametrize("device", DEVICES)
def test_trust_region_bounds_the_predicted_kl_on_the_device(device: str) -> None:
    model, x, y = _on(device, "linear")
    optimizer = exact_optimizer(EKFAC, model, max_kl=1e-4, lr=10.0)
    one_step(optimizer, model, x, y)
    scale, predicted = optimizer.last_kl_clip_scales, optimizer.last_predicted_kls
    assert scale.device.type == device and float(scale.max()) < 1.0, "the region clipped the oversized step"
    assert float(predicted.max()) == pytest.approx(1e-4, rel=1e-6)


@pytest.mark.parametrize("cls", [EKFAC, KFAC])
@pytest.mark.parametrize("device", DEVICES)
def test_state_dict_round_trip_continues_identically_on_the_device(device: str, cls: type) -> None:
    model, x, y = _on(device, "conv-1")
    optimizer = cls(model, lr=0.1, step_norm="natural", factor_update_interval=1, eigen_update_interval=2)
    for _ in range(3):
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    twin = make_model("conv-1", bias=True).to(device)
    buffer.seek(0)
    saved = torch.load(buffer, map_location=device, weights_only=False)
    twin.load_state_dict(saved["model"])
    twin_optimizer = cls(twin, lr=0.1, step_norm="natural", factor_update_interval=1, eigen_update_interval=2)
    twin_optimizer.load_state_dict(saved["optimizer"])
    for net, opt in ((model, optimizer), (twin, twin_optimizer)):
        opt.zero_grad()
        loss_fn(net(x), y).backward()
        opt.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert q.device.type == device
        # Bit for bit on CPU; CUDA's convolution backward may sum in another order from one call to the next.
        tolerance = 0.0 if device == "cpu" else 1e-10
        torch.testing.assert_close(p, q, rtol=0, atol=tolerance)


@pytest.mark.parametrize("device", DEVICES)
def test_delayed_refresh_installs_the_basis_of_its_start_step_on_the_device(device: str) -> None:
    """refresh_delay on the device: the background refresh (a side stream on a GPU) installs, two steps later, the
    decomposition of the factor it started from."""
    from acktr_kfe.eigen import robust_eigh

    model, x, y = _on(device, "conv-1")
    optimizer = EKFAC(
        model, lr=0.1, step_norm="natural", factor_update_interval=1, eigen_update_interval=3, refresh_delay=2
    )
    block = optimizer.blocks[0]

    def step() -> None:
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()

    for _ in range(4):  # step 3 starts a refresh from its factors
        step()
    started_from = block.factor_a.clone()
    step()
    step()  # installed at the start of step 5
    expected = robust_eigh(started_from)[1]
    assert block.eigvecs_a.device.type == device
    torch.testing.assert_close(block.eigvecs_a.abs(), expected.abs(), rtol=1e-4, atol=1e-5)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
