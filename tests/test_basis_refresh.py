"""The warm-started basis refresh (``refresh_tolerance``): subspace iteration from the previous eigenbasis."""

from __future__ import annotations

import pytest
import torch

from acktr_kfe import EKFAC, KFAC
from acktr_kfe.eigen import robust_eigh, warm_eigh

from .test_exact_reference import (
    KINDS,
    TRACKED,
    assert_scale_is_kfe_diagonal,
    exact_block,
    make_data,
    make_model,
    one_step,
)


def off_diagonal_mass(matrix: torch.Tensor, basis: torch.Tensor) -> float:
    projected = basis.T @ matrix @ basis
    return float((projected - torch.diag(projected.diagonal())).norm() / projected.norm())


def spread_factor(seed: int, d: int = 60, n: int = 400) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randn(n, d, generator=generator, dtype=torch.float64) * torch.logspace(-2, 1, d, dtype=torch.float64)
    return rows.T @ rows / n


@pytest.mark.parametrize("step", [0.01, 0.05, 0.2])
def test_warm_refresh_diagonalizes_a_slowly_moving_factor_better_than_the_stale_basis(step: float) -> None:
    old = spread_factor(0)
    values, vectors = robust_eigh(old)
    new = (1 - step) * old + step * spread_factor(1)
    stale = off_diagonal_mass(new, vectors)
    refreshed_values, refreshed, drift = warm_eigh(new, values, vectors)
    # The drift reported is the off-diagonal mass of the factor in the refreshed basis, and one subspace iteration
    # at least halves the stale basis's; the basis stays orthonormal and the eigenvalues are its Rayleigh quotients.
    assert drift == pytest.approx(off_diagonal_mass(new, refreshed), rel=1e-6)
    assert drift < 0.6 * stale
    assert drift < 0.5 * step
    torch.testing.assert_close(refreshed.T @ refreshed, torch.eye(60, dtype=torch.float64))
    torch.testing.assert_close(refreshed_values, (refreshed.T @ new @ refreshed).diagonal().clamp_min(0))


def test_warm_refresh_keeps_the_order_of_the_columns() -> None:
    old = spread_factor(0)
    values, vectors = robust_eigh(old)
    _, refreshed, _ = warm_eigh(0.98 * old + 0.02 * spread_factor(1), values, vectors)
    # The dominant eigenvectors (the last columns, ascending order) stay where they were, up to sign.
    alignment = (refreshed[:, -10:] * vectors[:, -10:]).sum(0).abs()
    assert bool((alignment > 0.95).all()), alignment


def test_warm_refresh_of_a_non_finite_factor_returns_none() -> None:
    values, vectors = robust_eigh(spread_factor(0))
    broken = spread_factor(1)
    broken[0, 0] = float("nan")
    assert warm_eigh(broken, values, vectors) is None


@pytest.mark.parametrize("kind", KINDS)
def test_ekfac_with_warm_refresh_keeps_the_ekfac_theorem_against_the_exact_block(kind: str) -> None:
    """George et al. 2018: in any basis, the EKFAC scale is the Frobenius-optimal diagonal; here the basis comes
    from warm refreshes, and EKFAC stays closer to the exact block than K-FAC's eigenvalues in that basis."""
    model = make_model(kind, bias=True)
    optimizer = EKFAC(
        model,
        lr=1e-3,
        momentum=0.0,
        factor_update_interval=1,
        eigen_update_interval=1,
        scale_update_interval=1,
        refresh_tolerance=0.5,
    )
    for seed in range(4):
        x, y = make_data(kind, seed=40 + seed, n=16)
        one_step(optimizer, model, x, y)
    assert optimizer.refresh_counts["warm"] > 0
    x, y = make_data(kind, seed=99, n=16)
    blocks = {i: exact_block(model, i, x, y) for i in TRACKED}
    one_step(optimizer, model, x, y)
    for i in TRACKED:
        state = optimizer.state[model[i].weight]
        basis = assert_scale_is_kfe_diagonal(state, blocks[i])
        ekfac = (basis * state["scale"].reshape(-1)) @ basis.T
        kfac = (basis * torch.outer(state["eigvals_G"], state["eigvals_A"]).reshape(-1)) @ basis.T
        assert (blocks[i] - ekfac).norm() <= (blocks[i] - kfac).norm() + 1e-12


@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_refresh_tolerance_falls_back_to_a_full_eigendecomposition_when_the_basis_drifted(cls: type) -> None:
    model = make_model("linear", bias=True)
    options = {"factor_update_interval": 1, "eigen_update_interval": 1, "refresh_tolerance": 1e-9}
    optimizer = cls(model, **options)
    for seed in range(3):
        one_step(optimizer, model, *make_data("linear", seed=seed))
    # A tolerance no refresh meets: every refresh is full, as without the option.
    assert optimizer.refresh_counts["warm"] == 0
    assert optimizer.refresh_counts["full"] == 3 * 2 * len(TRACKED)
    with pytest.raises(ValueError, match=r"Invalid refresh_tolerance: 1\.5"):
        cls(model, refresh_tolerance=1.5)


def fraction_factors(fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).double()
    optimizer = EKFAC(model, statistics_fraction=fraction, step_norm="natural", lr=0.1, momentum=0.0)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 10, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 4, (512,), generator=generator)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    grad = model[0].weight.grad.clone()
    before = model[0].weight.detach().clone()
    optimizer.step()
    state = optimizer.state[model[0].weight]
    return state["A"], state["G"], (before - model[0].weight.detach()), grad


def test_statistics_on_part_of_the_batch_approach_the_full_batch_estimate() -> None:
    full_a, full_g, _, _ = fraction_factors(1.0)
    errors = {}
    for fraction in (0.125, 0.5):
        a, g, _, _ = fraction_factors(fraction)
        errors[fraction] = max(float((a - full_a).norm() / full_a.norm()), float((g - full_g).norm() / full_g.norm()))
    # Measured on this batch of 512 (relative Frobenius error of A, the larger one): 0.38 from 64 examples, 0.26
    # from 128, 0.16 from 256; the sampling error of an 11-dimensional second moment, about sqrt(11 / n) (1 - f).
    assert errors[0.5] < errors[0.125] < 0.5
    assert errors[0.5] < 0.2


def test_statistics_subset_is_reproducible_and_the_gradient_uses_the_whole_batch() -> None:
    first, second = fraction_factors(0.25), fraction_factors(0.25)
    for a, b in zip(first[:3], second[:3]):
        torch.testing.assert_close(a, b, rtol=0.0, atol=0.0)
    # The step preconditions the whole batch's gradient: the same gradient as with every example.
    torch.testing.assert_close(first[3], fraction_factors(1.0)[3])
    with pytest.raises(ValueError, match="Invalid statistics_fraction: 0"):
        EKFAC(torch.nn.Linear(2, 2), statistics_fraction=0)
