"""refresh_delay: basis refreshes in a background thread, installed a fixed number of steps later."""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import acktr_kfe.blocks
from acktr_kfe import EKFAC, KFAC
from acktr_kfe.eigen import robust_eigh

from .test_optimizer_behaviour import batch, mlp

OPTIONS = {"factor_update_interval": 1, "eigen_update_interval": 4, "momentum": 0.9, "max_kl": 1e-2}


def one_step(optimizer: torch.optim.Optimizer, model: torch.nn.Module, seed: int) -> None:
    x, y = batch(seed)
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()


def trained(cls: type, steps: int, **options) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = mlp()
    optimizer = cls(model, lr=0.1, **{**OPTIONS, **options})
    for seed in range(steps):
        one_step(optimizer, model, seed)
    return model, optimizer


@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_delayed_refresh_installs_the_decomposition_of_the_factors_it_started_from(cls: type) -> None:
    model = mlp()
    optimizer = cls(model, lr=0.1, refresh_delay=2, **OPTIONS)
    block = optimizer.blocks[0]
    for seed in range(4):  # step 0 computes the first basis in the step
        one_step(optimizer, model, seed)
    first_basis = block.eigvecs_a
    one_step(optimizer, model, 4)  # step 4 starts a refresh from the factors of step 4
    started_from = block.factor_a.clone()
    assert block.eigvecs_a is first_basis
    one_step(optimizer, model, 5)
    assert block.eigvecs_a is first_basis  # step 5 still uses the old basis
    one_step(optimizer, model, 6)  # installed at the start of step 6
    assert torch.equal(block.eigvecs_a, robust_eigh(started_from)[1])


def test_delayed_refresh_runs_the_decompositions_off_the_training_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    threads = []

    def recording_eigh(matrix):
        threads.append(threading.current_thread())
        return robust_eigh(matrix)

    monkeypatch.setattr(acktr_kfe.blocks, "robust_eigh", recording_eigh)
    trained(EKFAC, 10, refresh_delay=1)
    main = threading.main_thread()
    first, later = threads[:4], threads[4:]  # two layers, two factors: the first bases are computed in the step
    assert all(thread is main for thread in first)
    assert later and all(thread is not main for thread in later)


def test_delayed_refresh_does_not_depend_on_how_long_the_decompositions_take(monkeypatch: pytest.MonkeyPatch) -> None:
    fast_model, _ = trained(EKFAC, 12, refresh_delay=2)

    def slow_eigh(matrix):
        time.sleep(0.02)
        return robust_eigh(matrix)

    monkeypatch.setattr(acktr_kfe.blocks, "robust_eigh", slow_eigh)
    slow_model, _ = trained(EKFAC, 12, refresh_delay=2)
    for p, q in zip(fast_model.parameters(), slow_model.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_state_saved_while_a_refresh_is_pending_resumes_bit_for_bit(cls: type) -> None:
    model, optimizer = trained(cls, 5, refresh_delay=3)  # step 4 started a refresh due at step 7
    assert optimizer._pending_refresh is not None
    saved = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, saved)
    for seed in range(5, 11):
        one_step(optimizer, model, seed)

    saved.seek(0)
    checkpoint = torch.load(saved)
    resumed_model = mlp(seed=7)
    resumed_model.load_state_dict(checkpoint["model"])
    resumed = cls(resumed_model, lr=0.1, refresh_delay=3, **OPTIONS)
    resumed.load_state_dict(checkpoint["optimizer"])
    for seed in range(5, 11):
        one_step(resumed, resumed_model, seed)
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)


def test_corrupted_pending_refresh_is_refused_on_load() -> None:
    _, optimizer = trained(EKFAC, 5, refresh_delay=3)
    state = optimizer.state_dict()
    pending = state["kronecker"]["pending_refresh"]
    name = next(iter(pending["blocks"]))
    pending["blocks"][name]["eigvecs_A"] = torch.full_like(pending["blocks"][name]["eigvecs_A"], float("nan"))
    fresh = EKFAC(mlp(), lr=0.1, refresh_delay=3, **OPTIONS)
    with pytest.raises(ValueError, match="pending_refresh eigvecs_A"):
        fresh.load_state_dict(state)


@pytest.mark.parametrize("delay", [-1, 1.5, True, 4])
def test_invalid_refresh_delay_is_refused(delay) -> None:
    with pytest.raises(ValueError, match="refresh_delay"):
        EKFAC(mlp(), lr=0.1, refresh_delay=delay, **OPTIONS)


def test_numpy_integer_refresh_delay_is_accepted_as_an_int() -> None:
    optimizer = EKFAC(mlp(), lr=0.1, refresh_delay=np.int64(2), **OPTIONS)
    assert optimizer.refresh_delay == 2 and type(optimizer.refresh_delay) is int


def test_refresh_delay_is_refused_under_data_parallel_before_the_first_step(monkeypatch: pytest.MonkeyPatch) -> None:
    model = mlp()
    optimizer = EKFAC(model, lr=0.1, refresh_delay=1, **OPTIONS)
    monkeypatch.setattr(EKFAC, "synchronized", property(lambda self: True))  # as with a process group of 2 ranks
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="refresh_delay=1 is not supported with data parallel"):
        one_step(optimizer, model, 0)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
