"""Programs that tests/test_distributed.py runs in several processes at once (one per rank).

    python -m tests.distributed_workers NAME OUT_DIR

Each process reads torchrun's variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, and DIST_TIMEOUT in seconds
for the process group), runs the program NAME and saves what it measured to OUT_DIR/rank<R>.pt.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

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
    }


@program
def peer_dies(rank: int, size: int) -> dict[str, Any]:
    """The last rank exits abruptly after one collective; the others try a second one."""
    tensors = [torch.ones(4)]
    distributed.all_reduce_mean(tensors, what="statistics")
    if rank == size - 1:
        os._exit(3)
    time.sleep(0.5)
    started = time.monotonic()
    try:
        distributed.all_reduce_mean(tensors, what="statistics")
    except RuntimeError as error:
        return {"error": str(error), "type": type(error).__name__, "seconds": time.monotonic() - started}
    return {"error": None}


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
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
