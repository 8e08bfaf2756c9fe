"""Curvature blocks: the embedding's diagonal block against its exact Fisher block, the registry of preconditioners,
and the tensors each block names for data parallelism."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import acktr_kfe
from acktr_kfe import (
    EKFAC,
    KFAC,
    CurvatureBlock,
    EKFACBlock,
    EmbeddingDiagonalBlock,
    KFACBlock,
    KroneckerPreconditioner,
    TrustRegions,
    curvature_matrix,
)
from acktr_kfe.optim import _PRECONDITIONERS

from .reference import per_example_grads, second_moment

VOCABULARY, WIDTH, CLASSES = 7, 3, 4


class Bag(nn.Module):
    """Embedding, mean over the tokens of each example, linear head: ``(N, L)`` token indices (or ``(N,)``) to
    ``(N, CLASSES)`` logits."""

    def __init__(self, padding_idx: int | None = None, max_norm: float | None = None) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCABULARY, WIDTH, padding_idx=padding_idx, max_norm=max_norm)
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        embedded = self.embedding(tokens)
        return self.head(embedded.mean(1) if embedded.dim() == 3 else embedded)


def make_bag(padding_idx: int | None = None, seed: int = 0) -> Bag:
    torch.manual_seed(seed)
    return Bag(padding_idx).double()


def make_tokens(shape: tuple[int, ...], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    # A small vocabulary: examples repeat tokens, so the per-example gradient of a row sums over locations.
    tokens = torch.randint(0, VOCABULARY, shape, generator=generator)
    targets = torch.randint(0, CLASSES, shape[:1], generator=generator)
    return tokens, targets


def exact_embedding_fisher(model: Bag, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``E_n[vec(grad_n) vec(grad_n)^T]`` of the embedding weight, from torch.func per-example gradients."""
    grads = per_example_grads(model, F.cross_entropy, tokens, targets)["embedding.weight"]
    return second_moment(grads.reshape(grads.shape[0], -1))


def natural_step(cls: type, model: Bag, tokens: torch.Tensor, targets: torch.Tensor, damping: float) -> torch.Tensor:
    """The weight change of one natural-gradient step with lr 1, no momentum and absolute damping."""
    optimizer = cls(
        model,
        lr=1.0,
        momentum=0.0,
        damping=damping,
        damping_scaling="absolute",
        step_norm="natural",
        factor_update_interval=1,
    )
    before = model.embedding.weight.detach().clone()
    optimizer.zero_grad()
    F.cross_entropy(model(tokens), targets).backward()
    optimizer.step()
    return optimizer, before - model.embedding.weight.detach()


SHAPES = [pytest.param((6, 5), id="sequences"), pytest.param((6,), id="one-token-per-example")]


@pytest.mark.parametrize("cls", [KFAC, EKFAC])
@pytest.mark.parametrize("padding_idx", [None, 0])
@pytest.mark.parametrize("shape", SHAPES)
def test_embedding_block_models_the_exact_diagonal_of_the_per_example_fisher(
    cls: type, padding_idx: int | None, shape: tuple[int, ...]
) -> None:
    model = make_bag(padding_idx)
    tokens, targets = make_tokens(shape)
    exact = exact_embedding_fisher(model, tokens, targets)
    optimizer, _ = natural_step(cls, model, tokens, targets, damping=1e-3)
    modeled = curvature_matrix(optimizer, model.embedding)
    torch.testing.assert_close(modeled, torch.diag(exact.diagonal()))
    assert exact.diagonal().abs().sum() > 0
    if padding_idx is not None:
        assert modeled.diagonal().reshape(VOCABULARY, WIDTH)[padding_idx].abs().sum() == 0


@pytest.mark.parametrize("shape", SHAPES)
def test_embedding_direction_is_the_gradient_divided_by_the_damped_exact_diagonal(shape: tuple[int, ...]) -> None:
    model = make_bag(padding_idx=2)
    tokens, targets = make_tokens(shape)
    damping = 1e-2
    diagonal = exact_embedding_fisher(model, tokens, targets).diagonal().reshape(VOCABULARY, WIDTH)
    model.zero_grad()
    F.cross_entropy(model(tokens), targets).backward()
    grad = model.embedding.weight.grad.clone()
    _, change = natural_step(EKFAC, model, tokens, targets, damping)
    torch.testing.assert_close(change, grad / (diagonal + damping))
    assert change[2].abs().sum() == 0, "the padding row does not move"


def test_embeddings_are_preconditioned_layers_with_a_diagonal_block() -> None:
    optimizer = EKFAC(make_bag())
    assert optimizer.preconditioned_layers == ["embedding", "head"]
    assert [type(block) for block in optimizer.blocks] == [EmbeddingDiagonalBlock, EKFACBlock]
    assert [type(block) for block in KFAC(make_bag()).blocks] == [EmbeddingDiagonalBlock, KFACBlock]


def test_embedding_tied_to_an_output_layer_is_left_to_that_layers_kronecker_block() -> None:
    torch.manual_seed(0)
    embedding, head = nn.Embedding(VOCABULARY, WIDTH), nn.Linear(WIDTH, VOCABULARY)
    head.weight = embedding.weight
    model = nn.Sequential(embedding, nn.Tanh(), head)
    optimizer = EKFAC(model, factor_update_interval=1, scale_update_interval=1)
    assert optimizer.preconditioned_layers == ["2"]
    tokens = torch.randint(0, VOCABULARY, (8,))
    before = embedding.weight.detach().clone()
    optimizer.zero_grad()
    F.cross_entropy(model(tokens), tokens).backward()
    optimizer.step()
    assert optimizer.blocks[0].ready and not torch.equal(embedding.weight, before)


def test_sparse_embedding_is_refused_with_an_error_that_says_what_to_do() -> None:
    model = nn.Sequential(nn.Embedding(5, 2, sparse=True), nn.Flatten(), nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"sparse=True.*sparse=False"):
        EKFAC(model)


def test_embedding_with_max_norm_trains_and_keeps_rows_within_the_norm() -> None:
    torch.manual_seed(0)
    model = Bag(max_norm=1.0)
    optimizer = EKFAC(model, lr=0.05, factor_update_interval=1, scale_update_interval=1)
    tokens, targets = make_tokens((8, 4))
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(tokens), targets)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert torch.isfinite(optimizer.blocks[0].diagonal).all()


def test_embedding_state_round_trips_and_a_wrong_diagonal_shape_is_refused() -> None:
    model = make_bag()
    tokens, targets = make_tokens((6, 5))
    optimizer, _ = natural_step(EKFAC, model, tokens, targets, damping=1e-2)
    saved = optimizer.state_dict()
    twin = EKFAC(make_bag(), factor_update_interval=1)
    twin.load_state_dict(saved)
    torch.testing.assert_close(twin.blocks[0].diagonal, optimizer.blocks[0].diagonal)
    saved["state"][0]["diagonal"] = torch.zeros(VOCABULARY + 1, WIDTH, dtype=torch.float64)
    with pytest.raises(ValueError, match="diagonal of layer embedding has shape"):
        twin.load_state_dict(saved)


# --- registry --------------------------------------------------------------------------------------------------
def test_registry_names_kfac_and_ekfac_and_lists_them_for_an_unknown_name() -> None:
    assert acktr_kfe.available_preconditioners()[:2] == ("kfac", "ekfac")
    assert acktr_kfe.preconditioner_class("kfac") is KFAC
    assert acktr_kfe.preconditioner_class("ekfac") is EKFAC
    assert issubclass(KFAC, KroneckerPreconditioner) and issubclass(EKFAC, KroneckerPreconditioner)
    with pytest.raises(ValueError, match=r"Invalid preconditioner: 'shampoo'\. Valid values: 'kfac', 'ekfac'"):
        acktr_kfe.preconditioner_class("shampoo")


class HalfDampedKFACBlock(KFACBlock):
    """A toy approximation for the registry test: K-FAC in the eigenbasis with half the damping."""

    def damped_kfe_curvature(self, damping: float) -> torch.Tensor:
        return torch.outer(self.eigvals_g, self.eigvals_a) + 0.5 * damping


@pytest.fixture
def registry_entry():
    names = []
    yield names
    for name in names:
        _PRECONDITIONERS.pop(name, None)


def test_a_new_preconditioner_is_one_block_class_and_one_register_call(registry_entry: list) -> None:
    registry_entry.append("half_damped")
    cls = acktr_kfe.register_preconditioner("half_damped", HalfDampedKFACBlock)
    assert acktr_kfe.preconditioner_class("half_damped") is cls
    assert "half_damped" in acktr_kfe.available_preconditioners()
    model = make_bag()
    tokens, targets = make_tokens((6, 5))
    optimizer = cls(model, factor_update_interval=1, block_options={"damping_mode": "eigen"})
    assert isinstance(optimizer, KroneckerPreconditioner)
    assert [type(block) for block in optimizer.blocks] == [EmbeddingDiagonalBlock, HalfDampedKFACBlock]
    optimizer.zero_grad()
    F.cross_entropy(model(tokens), targets).backward()
    optimizer.step()
    assert optimizer.steps == 1 and optimizer.blocks[1].ready
    with pytest.raises(ValueError, match="already registered"):
        acktr_kfe.register_preconditioner("half_damped", KFAC)


def test_register_preconditioner_refuses_bad_names_and_classes() -> None:
    with pytest.raises(ValueError, match="lower-case identifier"):
        acktr_kfe.register_preconditioner("Not A Name", KFACBlock)
    with pytest.raises(TypeError, match="KroneckerPreconditioner or CurvatureBlock"):
        acktr_kfe.register_preconditioner("adam", torch.optim.Adam)


# --- data parallelism --------------------------------------------------------------------------------------------
def test_blocks_name_their_statistics_their_basis_and_their_refresh_cost() -> None:
    model = make_bag()
    tokens, targets = make_tokens((6, 5))
    optimizer = EKFAC(model, factor_update_interval=1, scale_update_interval=1)
    embedding, head = optimizer.blocks
    assert head.statistics_tensors() == [] and head.basis_tensors() == []
    optimizer.zero_grad()
    F.cross_entropy(model(tokens), targets).backward()
    optimizer.step()
    state = optimizer.state[model.head.weight]
    assert [id(t) for t in head.statistics_tensors()] == [id(state[k]) for k in ("A", "G", "scale")]
    keys = ("eigvals_A", "eigvecs_A", "eigvals_G", "eigvecs_G", "scale")
    assert [id(t) for t in head.basis_tensors()] == [id(state[k]) for k in keys]
    assert head.refresh_cost() == (WIDTH + 1) ** 3 + CLASSES**3
    assert [id(t) for t in embedding.statistics_tensors()] == [id(optimizer.state[model.embedding.weight]["diagonal"])]
    assert embedding.basis_tensors() == [] and embedding.refresh_cost() == 0


def test_statistics_averaged_in_place_are_what_the_next_step_uses() -> None:
    """A data-parallel run averages statistics_tensors() in place: the block must read those same tensors."""
    model = make_bag()
    tokens, targets = make_tokens((6, 5))
    optimizer = KFAC(model, factor_update_interval=1, damping_mode="eigen")
    optimizer.zero_grad()
    F.cross_entropy(model(tokens), targets).backward()
    optimizer.step()
    head = optimizer.blocks[1]
    before = head.eigvals_a.clone(), head.eigvals_g.clone()
    for tensor in head.statistics_tensors():
        tensor.mul_(2.0)
    head.refresh(None)
    torch.testing.assert_close(head.eigvals_a, 2.0 * before[0])
    torch.testing.assert_close(head.eigvals_g, 2.0 * before[1])
    reconstructed = (head.eigvecs_a * head.eigvals_a) @ head.eigvecs_a.T
    torch.testing.assert_close(reconstructed, optimizer.state[model.head.weight]["A"])


def test_curvature_block_is_abstract() -> None:
    with pytest.raises(TypeError):
        CurvatureBlock("layer", None)  # type: ignore[abstract]


# --- trust regions -----------------------------------------------------------------------------------------------
def test_one_implicit_trust_region_reads_and_sets_the_groups_max_kl() -> None:
    params = [torch.zeros(2, requires_grad=True)]
    regions = TrustRegions(None, params, 0.01)
    group = {"max_kl": 0.01}
    assert len(regions) == 1 and regions.radii(group) == [0.01] and regions.region(params[0]) == 0
    regions.set_radius(0, 0.5, group)
    assert group["max_kl"] == 0.5
    with pytest.raises(IndexError, match="trust region 1 does not exist"):
        regions.set_radius(1, 0.5, group)


@pytest.mark.parametrize(("locations", "d_in", "d_out"), [(50, 5, 3), (2, 7, 6)])
def test_kfe_scale_takes_either_product_order_to_the_same_sum(locations: int, d_in: int, d_out: int) -> None:
    """The EKFAC scale sum_n (U_G^T grad_n U_A)^2 whether the rows are rotated first (few locations) or each
    example's gradient is formed first (many locations, as in an early convolution)."""
    from acktr_kfe.eigen import kfe_scale

    generator = torch.Generator().manual_seed(0)
    acts = torch.randn(4, locations, d_in, generator=generator, dtype=torch.float64)
    grads = torch.randn(4, locations, d_out, generator=generator, dtype=torch.float64)
    basis_a = torch.linalg.qr(torch.randn(d_in, d_in, generator=generator, dtype=torch.float64))[0]
    basis_g = torch.linalg.qr(torch.randn(d_out, d_out, generator=generator, dtype=torch.float64))[0]
    per_example = torch.einsum("nto,nti->noi", grads, acts)
    expected = (basis_g.T @ per_example @ basis_a).square().sum(0)
    torch.testing.assert_close(kfe_scale(acts, grads, basis_a, basis_g), expected)
