"""Programs that tests/test_distributed.py runs in several processes at once (one per rank).

    python -m tests.distributed_workers NAME OUT_DIR

Each process reads torchrun's variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, and DIST_TIMEOUT in seconds
for the process group), runs the program NAME and saves what it measured to OUT_DIR/rank<R>.pt.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import acktr_kfe
from acktr_kfe import distributed

PROGRAMS: dict[str, Callable[[int, int], dict[str, Any]]] = {}


def program(function: Callable[[int, int], dict[str, Any]]) -> Callable[[int, int], dict[str, Any]]:
    PROGRAMS[function.__name__] = function
    return function


@program
def helpers(rank: int, size: int) -> dict[str, Any]:
    """Every helper once: bucketed mean, broadcast from owners, agreement, gradient averaging."""
    generator = torch.Generator().manual_seed(100 + rank)
    # Several shapes and two dtypes, with a bucket limit that splits them into several all-reduces.
    local = [torch.randn(5, 7, generator=generator), torch.randn(300, generator=generator),
             torch.randn(3, 3, generator=generator).double(), torch.randn(2, 2, 2, generator=generator)]  # fmt: skip
    reduced = [t.clone() for t in local]
    distributed.traffic.reset()
    sent = distributed.all_reduce_mean(reduced, bucket_bytes=1024, what="statistics")
    calls = distributed.traffic.calls["all_reduce:statistics"]

    owners = distributed.assign_by_cost([5.0, 1.0, 4.0, 2.0], size)
    items = [[torch.full((3,), 10.0 * i + rank), torch.full((2, 2), float(rank), dtype=torch.float64)]
             for i in range(4)]  # fmt: skip
    distributed.broadcast_from_owners(items, owners, what="bases")

    agreed_true = distributed.agree_any(rank == size - 1)
    agreed_false = distributed.agree_any(False)

    observations = torch.randn(50, 3, generator=generator, dtype=torch.float64) * (rank + 1) + rank
    moments = distributed.combine_moments(observations.mean(0), observations.var(0, unbiased=False), 50.0)

    layer = torch.nn.Linear(3, 2)
    torch.manual_seed(0)
    torch.nn.init.ones_(layer.weight)
    layer(torch.full((4, 3), float(rank + 1))).sum().backward()
    distributed.average_gradients(layer.parameters())
    return {
        "local": local,
        "reduced": reduced,
        "sent": sent,
        "calls": calls,
        "owners": owners,
        "items": items,
        "agreed_true": agreed_true,
        "agreed_false": agreed_false,
        "weight_grad": layer.weight.grad.clone(),
        "observations": observations,
        "moments": moments,
        "flags": distributed.agree_flags([rank == 0, False, True]),
        "mean": distributed.mean_over_ranks(torch.tensor(float(rank))),
    }


@program
def peer_dies(rank: int, size: int) -> dict[str, Any]:
    """EKFAC on every rank; after two steps the last rank exits abruptly, and the others take a third."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    optimizer = acktr_kfe.EKFAC(model, factor_update_interval=1, eigen_update_interval=1)
    for step in range(3):
        if step == 2 and rank == size - 1:
            os._exit(3)
        if step == 2:
            time.sleep(0.5)
        optimizer.zero_grad()
        model(torch.randn(16, 6)).square().mean().backward()
        started = time.monotonic()
        try:
            optimizer.step()
        except RuntimeError as error:
            return {"error": str(error), "type": type(error).__name__, "seconds": time.monotonic() - started}
    return {"error": None}


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 4))


def _conv_net() -> nn.Module:
    # Every factor of full rank at these batches: EKFAC's scale is that of a basis, which a degenerate eigenspace
    # (a rank-deficient factor) leaves free, so its steps would depend on rounding in that eigenspace.
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(8, 5),
    )  # fmt: skip


def _train(
    name: str,
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    steps: int,
    nan_at: int | None = None,
    **options: Any,
) -> acktr_kfe.KroneckerPreconditioner:
    """``steps`` steps on the same batch (a slice per rank, or all of it), with short intervals."""
    intervals = {"factor_update_interval": 1, "eigen_update_interval": 2}
    if name == "ekfac":
        intervals["scale_update_interval"] = 1
    optimizer = acktr_kfe.preconditioner_class(name)(model, lr=0.05, **intervals, **options)
    for step in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(inputs), targets).backward()
        if step == nan_at:
            next(model.parameters()).grad.view(-1)[0] = float("nan")  # this rank only: a local overflow
        optimizer.step()
    return optimizer


@program
def optimizer_equivalence(rank: int, size: int) -> dict[str, Any]:
    """K-FAC and EKFAC on an MLP (gradients averaged by the optimizer) and a conv net (in DDP), float64: each rank
    on its slice of one batch; rank 0 also runs one process on the whole batch (``distributed=False``)."""
    torch.set_default_dtype(torch.float64)
    generator = torch.Generator().manual_seed(7)
    cases = {
        "mlp": (_mlp, torch.randn(2 * 32, 10, generator=generator), False),
        "conv": (_conv_net, torch.randn(2 * 12, 3, 8, 8, generator=generator), True),
    }
    results: dict[str, Any] = {}
    for case, (build, inputs, in_ddp) in cases.items():
        targets = torch.randint(0, 4, (len(inputs),), generator=generator)
        share = len(inputs) // size
        local = slice(rank * share, (rank + 1) * share)
        for name in ("kfac", "ekfac"):
            torch.manual_seed(0)
            model = build()
            initial = [p.detach().clone() for p in model.parameters()]
            wrapped = nn.parallel.DistributedDataParallel(model) if in_ddp else model
            distributed.traffic.reset()
            optimizer = _train(name, wrapped, inputs[local], targets[local], steps=7)
            entry: dict[str, Any] = {
                "parameters": [p.detach().clone() for p in model.parameters()],
                "initial": initial,
                "computed_refreshes": dict(optimizer.computed_refreshes),
                "last_refresh_owners": dict(optimizer.last_refresh_owners),
                "costs": {b.name: b.refresh_cost() for b in optimizer.blocks},
                "layers": optimizer.preconditioned_layers,
                "average_gradients": optimizer.average_gradients,
                "bytes": dict(distributed.traffic.bytes),
            }
            if rank == 0:
                torch.manual_seed(0)
                alone = build()
                _train(name, alone, inputs, targets, steps=7, distributed=False)
                entry["alone"] = [p.detach().clone() for p in alone.parameters()]
            results[f"{case}-{name}"] = entry
    # A non-finite gradient on one rank only (after DDP's averaging): every rank skips that step.
    torch.manual_seed(0)
    model = _mlp()
    wrapped = nn.parallel.DistributedDataParallel(model)
    inputs, targets = torch.randn(8, 10, generator=generator), torch.randint(0, 4, (8,), generator=generator)
    nan_at = 1 if rank == size - 1 else None
    optimizer = _train("ekfac", wrapped, inputs, targets, steps=3, nan_at=nan_at)
    results["skip"] = {
        "skipped": optimizer.skipped_steps,
        "steps": optimizer.steps,
        "parameters": [p.detach().clone() for p in model.parameters()],
    }
    # A non-finite preconditioned direction (natural step) or step size (grafted step, step_norm="adam") on one rank
    # only, its gradient finite: every rank skips that step, and says why.
    for step_norm in ("natural", "adam"):
        torch.manual_seed(0)
        model = _mlp()
        wrapped = nn.parallel.DistributedDataParallel(model)
        optimizer = acktr_kfe.EKFAC(wrapped, lr=0.05, factor_update_interval=1, step_norm=step_norm)
        adapter = optimizer.blocks[0].adapter
        messages: list[str] = []
        for step in range(3):
            optimizer.zero_grad()
            nn.functional.cross_entropy(wrapped(inputs), targets).backward()
            if step == 1 and rank == size - 1:
                if step_norm == "natural":  # the direction of the first layer
                    original_matrix = adapter.grad_matrix
                    adapter.grad_matrix = lambda f=original_matrix: f() * float("nan")  # type: ignore[method-assign]
                else:  # Adam's step length, with every direction finite
                    original_step = optimizer._adam_step
                    optimizer._adam_step = lambda *a, f=original_step: f(*a) * float("nan")  # type: ignore[method-assign]
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                optimizer.step()
            messages += [str(w.message) for w in caught]
            adapter.__dict__.pop("grad_matrix", None)
            optimizer.__dict__.pop("_adam_step", None)
        results[f"direction-{step_norm}"] = {
            "skipped": optimizer.skipped_steps,
            "steps": optimizer.steps,
            "parameters": [p.detach().clone() for p in model.parameters()],
            "messages": messages,
        }
    return results


@program
def acktr_lockstep(rank: int, size: int) -> dict[str, Any]:
    """ACKTR on CartPole-v1 behind VecNormalize, each rank with its own environments, as scripts/train.py runs it;
    rank 0 starts with a calibration of its own, as after a resume."""
    from agents import ACKTR
    from agents.data_parallel import SynchronizedNormalization, rank_seed, start_alike
    from envs import make_env

    env = make_env("CartPole-v1", n_envs=4, seed=rank_seed(0), normalize=True)
    model = ACKTR("MlpPolicy", env, n_steps=8, seed=0, device="cpu", eigen_update_interval=2)
    model.set_random_seed(rank_seed(0))
    if rank == 0:  # as a resumed run's rank 0 has it: a calibration learned before (the followers start fresh)
        model.policy.trust_regions.log_bias[:] = [0.7, -0.3]
    start_alike(model)
    calibration = list(model.policy.trust_regions.log_bias)
    model.learn(4 * 4 * 8, callback=SynchronizedNormalization())
    normalize = model.get_vec_normalize_env()
    env.close()
    return {
        "state": {k: v.clone() for k, v in model.policy.state_dict().items()},
        "calibration_after_start": calibration,
        "observations": torch.as_tensor(model.rollout_buffer.observations).clone(),
        "computed_refreshes": dict(model.policy.optimizer.computed_refreshes),
        "vecnormalize": [
            torch.as_tensor(v) for v in (normalize.obs_rms.mean, normalize.obs_rms.var, normalize.ret_rms.var)
        ],
    }


@program
def peer_hangs(rank: int, size: int) -> dict[str, Any]:
    """The last rank stops taking part (sleeps); the others wait for it in an agreement until the timeout."""
    distributed.agree_any(False)
    if rank == size - 1:
        time.sleep(60)
        os._exit(0)
    started = time.monotonic()
    try:
        distributed.agree_any(True, what="the skip decision")
    except RuntimeError as error:
        return {"error": str(error), "type": type(error).__name__, "seconds": time.monotonic() - started}
    return {"error": None}


def main(argv: list[str]) -> int:
    name, out_dir = argv[0], Path(argv[1])
    rank, size = distributed.init_from_environment("cpu", timeout=float(os.environ.get("DIST_TIMEOUT", "30")))
    torch.set_num_threads(1)
    result = PROGRAMS[name](rank, size)
    torch.save(result, out_dir / f"rank{rank}.pt")
    distributed.shutdown(synchronize=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
