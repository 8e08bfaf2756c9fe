"""KFAC and EKFAC as drop-in optimizers: the plain loop with every default, on any model a user hands over."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from acktr_kfe import EKFAC, KFAC

ROOT = Path(__file__).resolve().parents[1]
CLASSES = [pytest.param(KFAC, id="kfac"), pytest.param(EKFAC, id="ekfac")]


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))


def data(n: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=generator), torch.randint(0, 4, (n,), generator=generator)


def statistics(optimizer: torch.optim.Optimizer, model: nn.Module) -> list[torch.Tensor]:
    tensors = []
    for layer in (model[0], model[2]):
        state = optimizer.state[layer.weight]
        tensors += [state["A"], state["G"]] + ([state["scale"]] if "scale" in state else [])
    return tensors


@pytest.mark.parametrize("curvature", ["empirical", "fisher"])
@pytest.mark.parametrize("cls", CLASSES)
def test_accumulated_micro_batches_give_the_statistics_of_the_combined_batch(cls: type, curvature: str) -> None:
    x, y = data()
    options = {"factor_update_interval": 1, "eigen_update_interval": 1, "curvature": curvature}
    if cls is EKFAC:
        options["scale_update_interval"] = 1
    x = x.double()
    whole_model, split_model = mlp().double(), mlp().double()
    whole, split = cls(whole_model, **options), cls(split_model, **options)
    with torch.no_grad():
        probabilities = F.softmax(whole_model(x), -1)
    sampled = torch.multinomial(probabilities, 1, generator=torch.Generator().manual_seed(0)).squeeze(1)

    def backward(optimizer: torch.optim.Optimizer, model: nn.Module, part: slice, parts: int) -> None:
        """The standard accumulation recipe: each micro-batch's mean loss divided by the number of parts."""
        logits = model(x[part])
        if curvature == "fisher":
            optimizer.curvature_backward(F.cross_entropy(logits, sampled[part]) / parts, retain_graph=True)
        (F.cross_entropy(logits, y[part]) / parts).backward()

    backward(whole, whole_model, slice(0, 32), 1)
    for part in (slice(0, 16), slice(16, 32)):
        backward(split, split_model, part, 2)
    whole.step()
    split.step()
    for a, b in zip(statistics(whole, whole_model), statistics(split, split_model)):
        torch.testing.assert_close(a, b)
    for p, q in zip(whole_model.parameters(), split_model.parameters()):
        torch.testing.assert_close(p, q)


@pytest.mark.parametrize("cls", CLASSES)
def test_layer_applied_twice_in_one_loss_is_not_taken_for_accumulation(cls: type) -> None:
    """Two forwards before one backward (a shared encoder) form one micro-batch: each example counts once."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh())
    head = nn.Linear(12, 4)
    optimizer = cls(nn.ModuleList([model, head]), factor_update_interval=1, eigen_update_interval=1)
    x, y = data()
    F.cross_entropy(head(torch.cat([model(x), model(x.flip(0))], 1)), y).backward()
    records = optimizer._capture.pop_records()
    assert {record.generation for record in records[model[0]]} == {0}
