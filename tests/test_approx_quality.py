"""The approximation-quality indicator (acktr_kfe.approximation_quality) against dense float64 Fisher matrices."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import acktr_kfe
from acktr_kfe.quality import natural_gradient_gamma

ROOT = Path(__file__).resolve().parents[1]


def half_squared_error(outputs: Tensor, targets: Tensor) -> Tensor:
    return 0.5 * (outputs - targets).square().reshape(outputs.shape[0], -1).sum(-1).mean()


def problem(head: str, examples: int = 6) -> tuple[nn.Module, object, tuple[Tensor, Tensor]]:
    """A tiny float64 MLP with a softmax cross-entropy or a squared-error head."""
    torch.manual_seed(0)
    x = torch.randn(examples, 4, dtype=torch.float64)
    if head == "classification":
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
        return model, F.cross_entropy, (x, torch.randint(3, (examples,)))
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    return model, F.mse_loss, (x, torch.randn(examples, 2, dtype=torch.float64))


def dense_fisher(model: nn.Module, head: str, x: Tensor) -> Tensor:
    """``E_n[J_n^T H_n J_n]`` from the output Jacobian (jacrev) and the head's output Fisher, written out."""
    params = dict(model.named_parameters())
    names = list(params)

    def outputs(*values: Tensor) -> Tensor:
        return torch.func.functional_call(model, dict(zip(names, values)), (x,))

    jac = torch.func.jacrev(outputs, argnums=tuple(range(len(names))))(*params.values())
    n, c = x.shape[0], outputs(*params.values()).shape[1]
    jacobian = torch.cat([j.reshape(n, c, -1) for j in jac], dim=-1)  # (N, C, P)
    if head == "classification":
        probs = torch.softmax(model(x), -1).detach()
        output_fisher = torch.diag_embed(probs) - probs.unsqueeze(-1) * probs.unsqueeze(-2)
    else:  # F.mse_loss over C outputs: d^2/dz^2 of ||z - y||^2 / C
        output_fisher = (2.0 / c) * torch.eye(c, dtype=torch.float64).expand(n, c, c)
    return (torch.einsum("ncp,ncd,ndq->pq", jacobian, output_fisher, jacobian) / n).detach()


def flat(tensors) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def split_like(vector: Tensor, model: nn.Module) -> list[Tensor]:
    sizes = [p.numel() for p in model.parameters()]
    return [v.reshape(p.shape) for v, p in zip(vector.split(sizes), model.parameters())]


def gradient(model: nn.Module, loss_fn, batch) -> Tensor:
    return flat(torch.autograd.grad(loss_fn(model(batch[0]), batch[1]), list(model.parameters()))).detach()


@pytest.mark.parametrize("head", ["classification", "regression"])
def test_fisher_vector_product_equals_dense_fisher(head: str) -> None:
    model, loss_fn, batch = problem(head)
    fisher = dense_fisher(model, head, batch[0])
    vector = torch.randn(fisher.shape[0], dtype=torch.float64)
    product = flat(acktr_kfe.fisher_vector_product(model, loss_fn, batch, split_like(vector, model)))
    torch.testing.assert_close(product, fisher @ vector, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("head", ["classification", "regression"])
def test_gamma_of_exact_natural_gradient_is_smallest_among_random_directions_and_sgd(head: str) -> None:
    model, loss_fn, batch = problem(head)
    fisher = dense_fisher(model, head, batch[0])
    g = gradient(model, loss_fn, batch)
    natural = torch.linalg.lstsq(fisher, g.unsqueeze(-1), driver="gelsd").solution.squeeze(-1)
    best = acktr_kfe.approximation_quality(model, loss_fn, batch, split_like(natural, model), natural_gradient=True)
    sgd = acktr_kfe.approximation_quality(model, loss_fn, batch, split_like(g, model))
    assert sgd.relative == pytest.approx(1.0)
    assert best.relative < 1.0
    # The natural gradient attains the Cauchy-Schwarz bound 1 / sqrt(g^T F^+ g).
    assert best.gamma == pytest.approx(1.0 / math.sqrt(float(g @ natural)), rel=1e-6)
    assert best.gamma == pytest.approx(best.gamma_natural, rel=1e-6)
    generator = torch.Generator().manual_seed(1)
    for _ in range(30):
        direction = torch.randn(g.shape, dtype=torch.float64, generator=generator)
        other = acktr_kfe.approximation_quality(model, loss_fn, batch, split_like(direction, model))
        assert best.relative <= other.relative * (1 + 1e-9)
    # A direction close to the natural gradient is close in gamma, and not below it.
    near = natural + 1e-3 * natural.norm() * torch.randn(g.shape, dtype=torch.float64, generator=generator)
    close = acktr_kfe.approximation_quality(model, loss_fn, batch, split_like(near, model))
    assert best.relative <= close.relative < best.relative * 1.01


@pytest.mark.parametrize("head", ["classification", "regression"])
@pytest.mark.parametrize("examples", [6, 30])
def test_output_space_natural_gradient_gamma_is_exact_at_full_rank_and_a_lower_bound_otherwise(
    head: str, examples: int
) -> None:
    # P = 43 (classification) or 42 (regression); N C = 18 or 12 (full row rank) and 90 or 60 (rank deficient).
    model, loss_fn, batch = problem(head, examples=examples)
    dense = natural_gradient_gamma(model, loss_fn, batch, method="dense")
    output = natural_gradient_gamma(model, loss_fn, batch, method="output")
    classes = model(batch[0]).shape[1]
    if examples * classes <= sum(p.numel() for p in model.parameters()):
        assert output == pytest.approx(dense, rel=1e-7)
    else:
        assert output < dense


@pytest.mark.parametrize("scale", [1e-4, 3.7, -1.0, -250.0])
def test_gamma_is_invariant_to_the_updates_scale_and_sign(scale: float) -> None:
    model, loss_fn, batch = problem("classification")
    direction = [torch.randn_like(p) for p in model.parameters()]
    reference = acktr_kfe.approximation_quality(model, loss_fn, batch, direction)
    scaled = acktr_kfe.approximation_quality(model, loss_fn, batch, [scale * d for d in direction])
    assert scaled.relative == pytest.approx(reference.relative, rel=1e-10)
    assert scaled.gamma == pytest.approx(reference.gamma, rel=1e-10)


def test_relative_gamma_is_invariant_to_the_loss_scale() -> None:
    model, loss_fn, batch = problem("regression")
    direction = [torch.randn_like(p) for p in model.parameters()]
    reference = acktr_kfe.approximation_quality(model, loss_fn, batch, direction)
    scaled = acktr_kfe.approximation_quality(model, lambda z, y: 100.0 * loss_fn(z, y), batch, direction)
    assert scaled.relative == pytest.approx(reference.relative, rel=1e-10)


def train_step(optimizer, model: nn.Module, loss_fn, batch, curvature: str) -> None:
    outputs = model(batch[0])
    optimizer.zero_grad()
    if curvature == "gauss_newton":
        optimizer.curvature_backward(acktr_kfe.gauss_newton_loss(outputs), retain_graph=True)
    elif curvature == "fisher":
        optimizer.curvature_backward(acktr_kfe.softmax_fisher_loss(outputs), retain_graph=True)
    loss = loss_fn(outputs, batch[1])
    if curvature == "ief":
        optimizer.curvature_backward(loss, logits=outputs, accumulate_grad=True)
    else:
        loss.backward()
    optimizer.step()


def test_kfac_with_exact_gauss_newton_on_a_linear_model_matches_the_natural_gradients_gamma() -> None:
    # One linear layer, scalar squared-error head: the Gauss-Newton block is A = E[a_hat a_hat^T] with G = 1,
    # so K-FAC is exact and (damping -> 0, natural step, no momentum) its step is the natural gradient.
    torch.manual_seed(2)
    model = nn.Linear(3, 1).double()
    batch = (torch.randn(32, 3, dtype=torch.float64), torch.randn(32, 1, dtype=torch.float64))
    optimizer = acktr_kfe.KFAC(
        model,
        lr=0.1,
        momentum=0.0,
        damping=1e-10,
        damping_scaling="absolute",
        damping_mode="eigen",
        step_norm="natural",
        curvature="gauss_newton",
        factor_update_interval=1,
        eigen_update_interval=1,
    )
    before = [p.detach().clone() for p in model.parameters()]
    train_step(optimizer, model, half_squared_error, batch, "gauss_newton")
    change = acktr_kfe.parameter_change(before, model)
    with torch.no_grad():
        for p, b in zip(model.parameters(), before):
            p.copy_(b)
    quality = acktr_kfe.approximation_quality(model, half_squared_error, batch, change, natural_gradient="dense")
    assert quality.relative == pytest.approx(quality.relative_natural, rel=1e-6)
    assert quality.relative < 1.0


@pytest.mark.parametrize("optimizer_name", ["KFAC", "EKFAC"])
@pytest.mark.parametrize("curvature", ["empirical", "fisher", "ief"])
def test_quality_of_one_kronecker_step_read_from_the_parameter_change(optimizer_name: str, curvature: str) -> None:
    model, loss_fn, batch = problem("classification", examples=16)
    optimizer = getattr(acktr_kfe, optimizer_name)(model, curvature=curvature, factor_update_interval=1)
    before = [p.detach().clone() for p in model.parameters()]
    train_step(optimizer, model, loss_fn, batch, curvature)
    change = acktr_kfe.parameter_change(before, model)
    with torch.no_grad():
        for p, b in zip(model.parameters(), before):
            p.copy_(b)
    quality = acktr_kfe.approximation_quality(model, loss_fn, batch, change, natural_gradient="dense")
    assert math.isfinite(quality.relative) and quality.relative > 0
    assert quality.alignment < 0  # a descent step, read as new - old
    assert quality.relative >= quality.relative_natural * (1 - 1e-9)


def test_frozen_parameters_are_ignored_and_buffers_restored() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)).double()
    model[0].bias.requires_grad_(False)
    batch = (torch.randn(8, 4, dtype=torch.float64), torch.randint(3, (8,)))
    running = model[1].running_mean.clone()
    update = [torch.randn_like(p) for p in model.parameters()]
    with_frozen = acktr_kfe.approximation_quality(model, F.cross_entropy, batch, update)
    trainable_only = [u for u, p in zip(update, model.parameters()) if p.requires_grad]
    assert acktr_kfe.approximation_quality(model, F.cross_entropy, batch, trainable_only) == with_frozen
    assert torch.equal(model[1].running_mean, running)


@pytest.mark.parametrize(
    ("update", "message"),
    [
        (lambda ps: ps[:-1], "update has 3 tensors"),
        (lambda ps: [torch.zeros(2, 2), *ps[1:]], r"update tensor 0 has shape \(2, 2\)"),
    ],
)
def test_malformed_update_raises_value_error(update, message: str) -> None:
    model, loss_fn, batch = problem("classification")
    params = [torch.zeros_like(p) for p in model.parameters()]
    with pytest.raises(ValueError, match=message):
        acktr_kfe.approximation_quality(model, loss_fn, batch, update(params))


def test_loss_not_convex_in_the_outputs_is_refused() -> None:
    model, _, batch = problem("regression")
    update = [torch.randn_like(p) for p in model.parameters()]
    with pytest.raises(ValueError, match="not positive semi-definite"):
        acktr_kfe.approximation_quality(model, lambda z, y: -F.mse_loss(z, y), batch, update)


def test_natural_gradient_gamma_refuses_large_models() -> None:
    model = nn.Linear(100, 60)
    batch = (torch.randn(4, 100), torch.randint(60, (4,)))
    with pytest.raises(ValueError, match="6060 x 6060"):
        natural_gradient_gamma(model, F.cross_entropy, batch, method="dense")
    with pytest.raises(ValueError, match="Valid values: 'output', 'dense'"):
        natural_gradient_gamma(model, F.cross_entropy, batch, method="exact")


def test_script_quick_mode_writes_csv_plot_and_table(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "approx_quality.py"), "--quick", "--out-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for name in ("gamma.csv", "gamma.png", "gamma.md"):
        assert (tmp_path / name).is_file(), result.stdout
    table = (tmp_path / "gamma.md").read_text()
    for method in ("sgd", "adam", "ef", "sf", "ief", "kfac-empirical", "ekfac-ief"):
        assert f"| {method} |" in table
