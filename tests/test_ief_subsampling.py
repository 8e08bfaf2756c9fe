"""iEF statistics on a random part of the batch (``statistics_fraction``): each kept example is divided by its own
logit-gradient norm."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from acktr_kfe import KFAC
from acktr_kfe.capture import Record


def ief_factors(model: nn.Module, x: torch.Tensor, y: torch.Tensor, fraction: float) -> torch.Tensor:
    optimizer = KFAC(model, curvature="ief", statistics_fraction=fraction, factor_update_interval=1)
    optimizer.zero_grad()
    logits = model(x)
    optimizer.curvature_backward(F.cross_entropy(logits, y), logits=logits, accumulate_grad=True)
    optimizer.step()
    return optimizer.state[model[2].weight]["G"], optimizer


def test_ief_with_statistics_fraction_equals_ief_on_the_kept_examples() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4)).double()
    x, y = torch.randn(10, 5, dtype=torch.float64), torch.randint(0, 4, (10,))
    twin = copy.deepcopy(model)
    g_half, optimizer = ief_factors(model, x, y, 0.5)
    # The examples the optimizer kept at step 0 for layer "2" (one record): the subset of an index record.
    optimizer._step = 0
    index_record = Record(torch.arange(10.0).reshape(10, 1), torch.zeros(10, 1))
    kept = optimizer._subsample(optimizer.blocks[1], index_record, 0).layer_input.reshape(-1).long()
    assert kept.numel() == 5
    g_kept, _ = ief_factors(twin, x[kept], y[kept], 1.0)
    torch.testing.assert_close(g_half, g_kept)
