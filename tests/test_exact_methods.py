"""Exact iEF, EF and SF (acktr_kfe.exact) against dense float64 references built with a loop over examples."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from acktr_kfe.exact import EF, IEF, SF


def half_squared_error(outputs: Tensor, targets: Tensor) -> Tensor:
    """``0.5 ||z - y||^2`` per example, averaged over the batch: the unit-variance Gaussian NLL."""
    return 0.5 * (outputs - targets).square().reshape(outputs.shape[0], -1).sum(-1).mean()


def loop_rows(model: nn.Module, loss_fn, inputs: Tensor, targets: Tensor) -> Tensor:
    """Per-example gradients of each example's own loss, one autograd call per example, ``(N, P)``."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(inputs.shape[0]):
        loss = loss_fn(model(inputs[i : i + 1]), targets[i : i + 1])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


def flat(tensors: list[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def regression_problem(examples: int = 6) -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    return model, torch.randn(examples, 3, dtype=torch.float64), torch.randn(examples, 1, dtype=torch.float64)


def classification_problem(examples: int = 5) -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    return model, torch.randn(examples, 4, dtype=torch.float64), torch.randint(3, (examples,))


def test_exact_ief_on_least_squares_equals_gauss_newton_step() -> None:
    # N = 6 examples, P = 49 parameters: the Gauss-Newton step is the minimum-norm solution of J_f D = r.
    model, x, y = regression_problem()
    params = [p for p in model.parameters()]
    jacobian = torch.stack(
        [flat(list(torch.autograd.grad(model(x[i : i + 1]).sum(), params))) for i in range(x.shape[0])]
    )
    residuals = (model(x) - y).detach().reshape(-1)
    gauss_newton = torch.linalg.pinv(jacobian) @ residuals
    direction = flat(IEF(model, half_squared_error, damping=1e-12).direction(x, y))
    torch.testing.assert_close(direction, gauss_newton, rtol=1e-6, atol=1e-9)


def test_ief_equals_its_definition_with_damping_on_the_per_example_scale() -> None:
    model, x, y = classification_problem()
    damping = 0.05
    rows = loop_rows(model, F.cross_entropy, x, y)
    logits = model(x).detach()
    # d l_n / d z_n of softmax cross-entropy: softmax(z_n) - onehot(y_n).
    s = (torch.softmax(logits, -1) - F.one_hot(y, 3).double()).square().sum(-1)
    n = x.shape[0]
    expected = rows.T @ torch.linalg.solve(rows @ rows.T + n * damping * torch.eye(n, dtype=torch.float64), s)
    direction = flat(IEF(model, F.cross_entropy, damping=damping).direction(x, y))
    torch.testing.assert_close(direction, expected, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("damping", [1e-3, 0.3])
def test_ef_update_equals_its_woodbury_form(damping: float) -> None:
    model, x, y = classification_problem()
    rows = loop_rows(model, F.cross_entropy, x, y)
    n, p = rows.shape
    # (J^T J / N + lam I)^-1 (J^T 1 / N) = (J^T J + N lam I)^-1 J^T 1: a P x P solve, no Woodbury identity.
    expected = torch.linalg.solve(rows.T @ rows + n * damping * torch.eye(p, dtype=torch.float64), rows.sum(0))
    direction = flat(EF(model, F.cross_entropy, damping=damping).direction(x, y))
    torch.testing.assert_close(direction, expected, rtol=1e-7, atol=1e-10)


def test_sf_update_equals_damped_sampled_fisher_solve() -> None:
    model, x, y = classification_problem()
    sampled = torch.tensor([2, 0, 1, 1, 0])
    damping = 0.02
    rows = loop_rows(model, F.cross_entropy, x, y)
    sampled_rows = loop_rows(model, F.cross_entropy, x, sampled)
    n, p = rows.shape
    fisher = sampled_rows.T @ sampled_rows / n + damping * torch.eye(p, dtype=torch.float64)
    expected = torch.linalg.solve(fisher, rows.mean(0))
    optimizer = SF(model, F.cross_entropy, damping=damping, target_sampling=lambda outputs, generator: sampled)
    torch.testing.assert_close(flat(optimizer.direction(x, y)), expected, rtol=1e-7, atol=1e-9)


def test_sf_categorical_sampling_is_reproducible_with_a_generator() -> None:
    model, x, y = classification_problem(examples=8)

    def direction(seed: int) -> Tensor:
        optimizer = SF(model, F.cross_entropy, damping=0.1, generator=torch.Generator().manual_seed(seed))
        return flat(optimizer.direction(x, y))

    torch.testing.assert_close(direction(3), direction(3), rtol=0, atol=0)
    assert not torch.equal(direction(3), direction(4))


@pytest.mark.parametrize(("loss_fn", "expected_std"), [(half_squared_error, 1.0), (F.mse_loss, 2.0**0.5)])
def test_sf_gaussian_sampling_uses_the_noise_of_the_loss_likelihood(loss_fn, expected_std: float) -> None:
    # F.mse_loss over C = 4 outputs is ||z - y||^2 / 4: the NLL of N(z, 2 I) up to a constant, so std = sqrt(2).
    model = nn.Linear(3, 4).double()
    x, y = torch.randn(400, 3, dtype=torch.float64), torch.randn(400, 4, dtype=torch.float64)
    seen: dict[str, Tensor] = {}
    optimizer = SF(model, loss_fn, damping=1.0, target_sampling="gaussian")
    from acktr_kfe import exact

    outputs = model(x).detach()
    seen["targets"] = exact._sample_targets(optimizer.target_sampling, outputs, y, optimizer._grads, None)
    std = (seen["targets"] - outputs).std().item()
    assert abs(std - expected_std) < 0.1 * expected_std
    assert torch.isfinite(flat(optimizer.direction(x[:20], y[:20]))).all()


@pytest.mark.parametrize("optimizer_cls", [IEF, EF, SF])
def test_step_moves_trainable_parameters_by_lr_times_direction_and_returns_the_loss(optimizer_cls) -> None:
    model, x, y = classification_problem()
    model[0].bias.requires_grad_(False)
    frozen = model[0].bias.detach().clone()
    kwargs = {"target_sampling": lambda outputs, generator: y} if optimizer_cls is SF else {}
    optimizer = optimizer_cls(model, F.cross_entropy, lr=0.5, damping=0.1, **kwargs)
    trainable = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    direction = optimizer.direction(x, y)
    loss = optimizer.step(x, y)
    assert loss.shape == () and torch.isfinite(loss)
    for p, b, d in zip(trainable, before, direction):
        torch.testing.assert_close(p.detach(), b - 0.5 * d)
    assert torch.equal(model[0].bias.detach(), frozen)
    assert sum(d.numel() for d in direction) == sum(p.numel() for p in trainable)


def test_step_returns_the_mean_loss_before_the_step() -> None:
    model, x, y = classification_problem()
    expected = F.cross_entropy(model(x), y).detach()
    loss = EF(model, F.cross_entropy, lr=0.5).step(x, y)
    torch.testing.assert_close(loss, expected)


def test_momentum_accumulates_the_direction() -> None:
    model, x, y = classification_problem()
    optimizer = EF(model, F.cross_entropy, lr=0.1, momentum=0.5)
    optimizer.step(x, y)
    first = [optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    direction = optimizer.direction(x, y)
    optimizer.step(x, y)
    for p, f, d in zip(model.parameters(), first, direction):
        torch.testing.assert_close(optimizer.state[p]["momentum_buffer"], 0.5 * f + d)


def test_too_large_per_example_matrix_raises_naming_the_size() -> None:
    model, x, y = classification_problem(examples=5)
    p = sum(q.numel() for q in model.parameters())
    optimizer = IEF(model, F.cross_entropy, max_elements=4 * p)
    with pytest.raises(ValueError, match=rf"5 x {p} = {5 * p} elements .*max_elements={4 * p}"):
        optimizer.step(x, y)
    with pytest.raises(ValueError, match=rf"1 x {p}"):
        EF(model, F.cross_entropy, max_elements=p - 1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"damping": 0.0}, "Invalid damping"),
        ({"lr": -1.0}, "Invalid learning rate"),
        ({"momentum": 1.0}, "Invalid momentum"),
        ({"max_elements": 0}, "Invalid max_elements"),
    ],
)
def test_invalid_hyperparameters_raise_value_error(kwargs: dict, message: str) -> None:
    model, _, _ = classification_problem()
    with pytest.raises(ValueError, match=message):
        IEF(model, F.cross_entropy, **kwargs)


def test_invalid_target_sampling_lists_the_valid_values() -> None:
    model, _, _ = classification_problem()
    with pytest.raises(ValueError, match="'categorical', 'gaussian'"):
        SF(model, F.cross_entropy, target_sampling="bernoulli")


def test_categorical_sampling_needs_logits() -> None:
    model, x, y = regression_problem()
    with pytest.raises(ValueError, match="needs \\(N, C\\) logits"):
        SF(model, half_squared_error).direction(x, y.reshape(-1))


def test_model_without_trainable_parameters_or_not_a_module_is_refused() -> None:
    model, _, _ = classification_problem()
    with pytest.raises(TypeError, match="IEF\\(model, loss_fn"):
        IEF(list(model.parameters()), F.cross_entropy)  # type: ignore[arg-type]
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter that requires a gradient"):
        EF(model, F.cross_entropy)
