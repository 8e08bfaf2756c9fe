"""K-FAC and EKFAC against dense float64 references built from per-example gradients (torch.func)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from acktr_kfe import EKFAC, KFAC, curvature_matrix

from .reference import (
    conv_patches_loop,
    homogeneous,
    layer_grad_rows,
    layer_io,
    per_example_grads,
    second_moment,
)

CONV_CONFIGS = [
    {"stride": 1, "padding": 0, "dilation": 1},
    {"stride": 2, "padding": 1, "dilation": 1},
    {"stride": 1, "padding": 2, "dilation": 2},
    {"stride": (2, 1), "padding": (1, 0), "dilation": (1, 2)},
]
TRACKED = (0, 3)  # indices of the preconditioned layers in every test model


def make_model(kind: str, bias: bool, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    if kind == "linear":
        return nn.Sequential(nn.Linear(4, 5, bias=bias), nn.Tanh(), nn.Identity(), nn.Linear(5, 3, bias=bias)).double()
    conv = nn.Conv2d(2, 3, 3, bias=bias, **CONV_CONFIGS[int(kind.split("-")[1])])
    with torch.no_grad():
        features = conv(torch.zeros(1, 2, 6, 6)).numel()
    return nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(features, 3, bias=bias)).double()


KINDS = ["linear"] + [f"conv-{i}" for i in range(len(CONV_CONFIGS))]


def make_data(kind: str, seed: int, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shape = (n, 4) if kind == "linear" else (n, 2, 6, 6)
    x = torch.randn(shape, generator=generator, dtype=torch.float64)
    return x, torch.randint(0, 3, (n,), generator=generator)


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y)


def reference_factors(model: nn.Sequential, index: int, x: torch.Tensor, y: torch.Tensor):
    """A = E_n[sum_t a a^T] and G = E_n[sum_t g g^T] / T from loop patches and per-example output grads."""
    model = copy.deepcopy(model)
    layer = model[index]
    layer_input, grad_out = layer_io(model, layer, loss_fn, x, y)
    if isinstance(layer, nn.Conv2d):
        acts = conv_patches_loop(layer_input, layer)
        grads = grad_out.flatten(2).transpose(1, 2)
    else:
        acts, grads = layer_input.unsqueeze(1), grad_out.unsqueeze(1)
    acts = homogeneous(acts, layer.bias is not None)
    n, t = grads.shape[:2]
    return (
        torch.einsum("nti,ntj->ij", acts, acts) / n,
        torch.einsum("nti,ntj->ij", grads, grads) / (n * t),
        acts,
        grads,
    )


def exact_block(model: nn.Sequential, index: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """E_n[vec(grad_n) vec(grad_n)^T] for one layer, in [W | b].flatten() order."""
    grads = per_example_grads(model, loss_fn, x, y)
    return second_moment(layer_grad_rows(grads, str(index), model[index].bias is not None))


def one_step(optimizer: torch.optim.Optimizer, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Take a step on (x, y) and return each tracked layer's direction (before - after, flat [W | b])."""

    def flat(layer: nn.Module) -> torch.Tensor:
        parts = [layer.weight.detach().reshape(layer.weight.shape[0], -1)]
        if layer.bias is not None:
            parts.append(layer.bias.detach().reshape(-1, 1))
        return torch.cat(parts, dim=1).clone()

    before = {i: flat(model[i]) for i in TRACKED}
    optimizer.zero_grad()
    loss_fn(model(x), y).backward()
    optimizer.step()
    return {i: before[i] - flat(model[i]) for i in TRACKED}


def mean_grad(model: nn.Module, index: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    grads = per_example_grads(model, loss_fn, x, y)
    return layer_grad_rows(grads, str(index), model[index].bias is not None).mean(0)


def kfac_reconstruction(state: dict) -> torch.Tensor:
    """``kron(G, A)`` rebuilt from a layer's eigendecomposed factors (K-FAC's block in the same KFE as EKFAC's)."""
    factor_a = (state["eigvecs_A"] * state["eigvals_A"]) @ state["eigvecs_A"].T
    factor_g = (state["eigvecs_G"] * state["eigvals_G"]) @ state["eigvecs_G"].T
    return torch.kron(factor_g, factor_a)


def assert_scale_is_kfe_diagonal(state: dict, block: torch.Tensor) -> torch.Tensor:
    """EKFAC's scale equals the exact block's diagonal in the layer's KFE; returns the KFE basis."""
    basis = torch.kron(state["eigvecs_G"], state["eigvecs_A"])
    torch.testing.assert_close(state["scale"].reshape(-1), (basis.T @ block @ basis).diagonal())
    return basis


def exact_optimizer(cls: type, model: nn.Module, **kwargs) -> torch.optim.Optimizer:
    """An optimizer whose first step is a plain preconditioned step on the batch's own statistics."""
    options = {
        "lr": 1.0,
        "momentum": 0.0,
        "factor_update_interval": 1,
        "eigen_update_interval": 1,
        "step_norm": "natural",
    }
    if cls is EKFAC:
        options["scale_update_interval"] = 1
    return cls(model, **{**options, **kwargs})


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("kind", KINDS)
def test_factors_equal_dense_per_example_statistics(kind: str, bias: bool) -> None:
    model = make_model(kind, bias)
    x, y = make_data(kind, seed=1)
    references = {i: reference_factors(model, i, x, y) for i in TRACKED}
    optimizer = exact_optimizer(KFAC, model)
    one_step(optimizer, model, x, y)
    for i in TRACKED:
        state = optimizer.state[model[i].weight]
        a_ref, g_ref, _, _ = references[i]
        torch.testing.assert_close(state["A"], a_ref)
        torch.testing.assert_close(state["G"], g_ref)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("kind", KINDS)
def test_recorded_rows_rebuild_torch_func_per_example_gradients(kind: str, bias: bool) -> None:
    """sum_t g_{n,t} a_hat_{n,t}^T from the loop patches equals torch.func's per-example gradient."""
    model = make_model(kind, bias)
    x, y = make_data(kind, seed=2)
    grads = per_example_grads(model, loss_fn, x, y)
    for i in TRACKED:
        _, _, acts, out_grads = reference_factors(model, i, x, y)
        rebuilt = torch.einsum("nto,nti->noi", out_grads, acts).reshape(x.shape[0], -1)
        torch.testing.assert_close(rebuilt, layer_grad_rows(grads, str(i), bias))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("kind", KINDS)
def test_kfac_block_is_kronecker_product_of_reference_factors(kind: str, bias: bool) -> None:
    model = make_model(kind, bias)
    x, y = make_data(kind, seed=3)
    references = {i: reference_factors(model, i, x, y) for i in TRACKED}
    optimizer = exact_optimizer(KFAC, model)
    one_step(optimizer, model, x, y)
    for i in TRACKED:
        a_ref, g_ref, _, _ = references[i]
        torch.testing.assert_close(curvature_matrix(optimizer, model[i]), torch.kron(g_ref, a_ref))


@pytest.mark.parametrize("damping_mode", ["factored", "eigen"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("scaling", ["absolute", "relative"])
def test_kfac_direction_equals_dense_damped_solve(kind: str, bias: bool, damping_mode: str, scaling: str) -> None:
    model = make_model(kind, bias)
    x, y = make_data(kind, seed=4)
    references = {i: reference_factors(model, i, x, y) for i in TRACKED}
    grads = {i: mean_grad(model, i, x, y) for i in TRACKED}
    optimizer = exact_optimizer(KFAC, model, damping=0.05, damping_mode=damping_mode, damping_scaling=scaling)
    directions = one_step(optimizer, model, x, y)
    for i in TRACKED:
        a_ref, g_ref, _, _ = references[i]
        block = torch.kron(g_ref, a_ref)
        # Relative damping: a fraction of the Frobenius norm of the block, kron(G, A).
        damping = 0.05 * (torch.linalg.matrix_norm(block) if scaling == "relative" else 1.0)
        if damping_mode == "factored":
            pi = torch.sqrt((a_ref.trace() / a_ref.shape[0]) / (g_ref.trace() / g_ref.shape[0]))
            eye_a, eye_g = torch.eye(a_ref.shape[0]).double(), torch.eye(g_ref.shape[0]).double()
            damped = torch.kron(g_ref + damping**0.5 / pi * eye_g, a_ref + pi * damping**0.5 * eye_a)
        else:
            damped = block + damping * torch.eye(block.shape[0]).double()
        expected = torch.linalg.solve(damped, grads[i])
        torch.testing.assert_close(directions[i].reshape(-1), expected)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("kind", KINDS)
def test_ekfac_scale_equals_kfe_diagonal_of_exact_second_moment(kind: str, bias: bool) -> None:
    model = make_model(kind, bias)
    x, y = make_data(kind, seed=5)
    blocks = {i: exact_block(model, i, x, y) for i in TRACKED}
    optimizer = exact_optimizer(EKFAC, model)
    one_step(optimizer, model, x, y)
    for i in TRACKED:
        assert_scale_is_kfe_diagonal(optimizer.state[model[i].weight], blocks[i])


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("scaling", ["absolute", "relative"])
def test_ekfac_direction_equals_dense_damped_solve(kind: str, bias: bool, scaling: str) -> None:
    model = make_model(kind, bias)
    x, y = make_data(kind, seed=6)
    grads = {i: mean_grad(model, i, x, y) for i in TRACKED}
    optimizer = exact_optimizer(EKFAC, model, damping=0.05, damping_scaling=scaling)
    directions = one_step(optimizer, model, x, y)
    for i in TRACKED:
        block = curvature_matrix(optimizer, model[i])
        damping = 0.05 * (torch.linalg.matrix_norm(block) if scaling == "relative" else 1.0)
        expected = torch.linalg.solve(block + damping * torch.eye(block.shape[0]).double(), grads[i])
        torch.testing.assert_close(directions[i].reshape(-1), expected)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kind", KINDS)
def test_ekfac_is_closer_than_kfac_to_exact_block_in_frobenius_norm(kind: str, seed: int) -> None:
    """George et al. 2018, theorem: in the shared KFE, EKFAC's diagonal is the Frobenius-optimal one."""
    model = make_model(kind, bias=True, seed=seed)
    x, y = make_data(kind, seed=100 + seed, n=16)
    blocks = {i: exact_block(model, i, x, y) for i in TRACKED}
    optimizer = exact_optimizer(EKFAC, model)
    one_step(optimizer, model, x, y)
    for i in TRACKED:
        state = optimizer.state[model[i].weight]
        kfac_error = torch.linalg.matrix_norm(blocks[i] - kfac_reconstruction(state))
        ekfac_error = torch.linalg.matrix_norm(blocks[i] - curvature_matrix(optimizer, model[i]))
        assert ekfac_error <= kfac_error + 1e-12
        if kind != "linear" or i != 3:
            # Strict except where K-FAC is itself exact in its KFE diagonal; here a real gain is expected.
            assert ekfac_error < kfac_error


def test_ekfac_models_kfac_block_after_refresh_until_first_scale_update() -> None:
    model = make_model("linear", bias=True)
    optimizer = EKFAC(
        model, lr=0.1, momentum=0.0, factor_update_interval=1, eigen_update_interval=1, scale_update_interval=2
    )
    for seed in range(2):  # step 0 estimates a scale; step 1 refreshes the basis and estimates none
        one_step(optimizer, model, *make_data("linear", seed))
    state = optimizer.state[model[0].weight]
    assert state["scale_updates"] == 0
    torch.testing.assert_close(curvature_matrix(optimizer, model[0]), torch.kron(state["G"], state["A"]))


def test_ekfac_running_scale_averages_estimates_within_one_basis() -> None:
    model = make_model("linear", bias=True)
    decay = 0.5
    optimizer = EKFAC(
        model,
        lr=0.0,
        momentum=0.0,
        factor_update_interval=100,
        eigen_update_interval=100,
        scale_update_interval=1,
        scale_mode="running",
        scale_decay=decay,
    )
    batches = [make_data("linear", seed) for seed in range(2)]
    one_step(optimizer, model, *batches[0])  # lr=0: the model, and so the exact blocks, stay fixed
    state = optimizer.state[model[0].weight]
    basis = torch.kron(state["eigvecs_G"], state["eigvecs_A"])
    first = (basis.T @ exact_block(model, 0, *batches[0]) @ basis).diagonal()
    second = (basis.T @ exact_block(model, 0, *batches[1]) @ basis).diagonal()
    one_step(optimizer, model, *batches[1])
    torch.testing.assert_close(state["scale"].reshape(-1), decay * first + (1 - decay) * second)
    assert state["scale_updates"] == 2


def test_gauss_newton_kfac_is_exact_for_deep_linear_network() -> None:
    """Deep linear net, scalar head: g_n is the same for every example, so kron(G, A) is the exact J^T J."""
    import acktr_kfe

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Identity(), nn.Identity(), nn.Linear(4, 1)).double()
    x = torch.randn(10, 3, dtype=torch.float64)
    params = {name: p.detach() for name, p in model.named_parameters()}
    jac = torch.func.vmap(
        torch.func.grad(lambda p, xi: torch.func.functional_call(model, p, (xi.unsqueeze(0),)).sum()),
        in_dims=(None, 0),
    )(params, x)
    optimizer = KFAC(
        model, lr=0.0, momentum=0.0, factor_update_interval=1, eigen_update_interval=1, curvature="gauss_newton"
    )
    prediction = model(x)
    optimizer.curvature_backward(acktr_kfe.gauss_newton_loss(prediction), retain_graph=True)
    (0.5 * prediction.square().mean()).backward()
    optimizer.step()
    for i in TRACKED:
        exact = second_moment(layer_grad_rows(jac, str(i), True))
        torch.testing.assert_close(curvature_matrix(optimizer, model[i]), exact)


def test_ief_output_gradients_are_divided_by_logit_gradient_norm() -> None:
    model = make_model("linear", bias=True)
    x, y = make_data("linear", seed=7)
    _, _, _acts, grads = reference_factors(model, 3, x, y)
    logits = model(x).detach().requires_grad_(True)
    per_example = F.cross_entropy(logits, y, reduction="sum")
    (logit_grads,) = torch.autograd.grad(per_example, logits)
    scaled = grads / logit_grads.norm(dim=1).reshape(-1, 1, 1)
    expected_g = torch.einsum("nti,ntj->ij", scaled, scaled) / x.shape[0]

    start = copy.deepcopy(model)
    optimizer = exact_optimizer(KFAC, model, curvature="ief")
    out = model(x)
    optimizer.curvature_backward(loss_fn(out, y), logits=out, accumulate_grad=True)
    optimizer.step()
    torch.testing.assert_close(optimizer.state[model[3].weight]["G"], expected_g)
    # The norms given in closed form (mean loss: 1 / N of the per-example ones) record the same factor.
    given = exact_optimizer(KFAC, start, curvature="ief")
    given.curvature_backward(
        loss_fn(start(x), y), logit_grad_norms=logit_grads.norm(dim=1) / x.shape[0], accumulate_grad=True
    )
    given.step()
    torch.testing.assert_close(given.state[start[3].weight]["G"], expected_g)
