"""Data-parallel helpers on ``torch.distributed`` for the Kronecker-factored preconditioners.

The design is KAISA's (Pauloski et al. 2021) at its communication-optimal end (gradient-worker fraction 1): every
rank holds every layer's factors and bases and preconditions its own (averaged) gradient. The statistics of a step
(Kronecker factors, the EKFAC scale) are averaged across ranks in one bucketed all-reduce, each layer's
eigendecomposition runs on one rank chosen by cost (greedy longest-processing-time, the same assignment on every
rank without communication), and its result is broadcast from that rank.

Every helper is a no-op (and communicates nothing) when ``torch.distributed`` is not initialized or the world has
one process, so single-process code calls them unconditionally. The backend is the process group's: gloo on CPU,
NCCL on CUDA (``init_from_environment`` picks it from the device).

Failures. A collective that fails, because a peer process died (gloo: the connection is reset, seen at once) or
hung past the process group's ``timeout`` (gloo: the receive times out), raises :class:`DistributedError`, a
``RuntimeError`` that names this rank, the operation and the timeout, instead of hanging.

Traffic. Each helper adds the bytes it sent and the seconds it spent to :data:`traffic` (payload bytes per rank
and call, by operation), which the benchmark reads per step.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "DEFAULT_BUCKET_BYTES",
    "DistributedError",
    "Traffic",
    "agree_any",
    "agree_flags",
    "all_reduce_mean",
    "assign_by_cost",
    "average_gradients",
    "broadcast_from_owners",
    "combine_moments",
    "init_from_environment",
    "is_active",
    "is_wrapped_by_ddp",
    "mean_over_ranks",
    "rank",
    "shutdown",
    "torchrun_world_size",
    "traffic",
    "world_size",
]

# Bucket size of the all-reduces: DistributedDataParallel's default (25 MiB).
DEFAULT_BUCKET_BYTES = 25 * 2**20


class DistributedError(RuntimeError):
    """A collective failed: a peer process died, hung past the process group's timeout, or was unreachable.

    Attributes:
        rank: the rank that raised.
        operation: the collective and what it carried (``"all_reduce of statistics"``).
    """

    def __init__(self, rank: int, operation: str, cause: BaseException) -> None:
        timeout = _timeout_seconds()
        within = f" within the process group's timeout of {timeout:g} s" if timeout is not None else ""
        super().__init__(
            f"rank {rank} of {world_size()}: {operation} failed: another rank died, hung or could not be "
            f"reached{within} (check the other ranks' logs; the first to fail names the cause). "
            f"{type(cause).__name__}: {cause}"
        )
        self.rank, self.operation = rank, operation


@dataclass
class Traffic:
    """Bytes this rank sent through the helpers (payload only), the number of collectives, and the seconds spent
    in them (waiting for the other ranks included), by operation."""

    bytes: dict[str, int] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, operation: str, nbytes: int) -> None:
        """Count one collective of ``nbytes`` under ``operation``."""
        self.bytes[operation] = self.bytes.get(operation, 0) + int(nbytes)
        self.calls[operation] = self.calls.get(operation, 0) + 1

    def total(self) -> int:
        """All bytes counted since the last ``reset``."""
        return sum(self.bytes.values())

    def reset(self) -> None:
        """Forget the counts."""
        self.bytes.clear()
        self.calls.clear()
        self.seconds.clear()


# The process-wide counter every helper adds to.
traffic = Traffic()
_timeout: datetime.timedelta | None = None


def is_active() -> bool:
    """Whether a process group of more than one process is initialized."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """The number of processes (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _timeout_seconds() -> float | None:
    return _timeout.total_seconds() if _timeout is not None else None


@contextlib.contextmanager
def _collective(operation: str, kind: str) -> Iterator[None]:
    """Time a collective into ``traffic.seconds[kind]``; turn its failure (gloo and NCCL raise ``RuntimeError``
    subclasses) into a ``DistributedError``."""
    started = time.perf_counter()
    try:
        yield
    except DistributedError:
        raise
    except RuntimeError as error:
        raise DistributedError(rank(), operation, error) from error
    finally:
        traffic.seconds[kind] = traffic.seconds.get(kind, 0.0) + time.perf_counter() - started


def torchrun_world_size() -> int:
    """``WORLD_SIZE`` as torchrun (or any launcher of the same convention) sets it; 1 when absent."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_environment(
    device: torch.device | str = "cpu", timeout: datetime.timedelta | float = 600.0
) -> tuple[int, int]:
    """Initialize the default process group from torchrun's variables, if they ask for more than one process.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` (set by ``torchrun``).
    The backend is NCCL for a CUDA ``device`` (each process then uses ``cuda:LOCAL_RANK``) and gloo otherwise.
    Nothing happens when ``WORLD_SIZE`` is absent or 1, or when a group is already initialized.

    Args:
        device: the device the run trains on.
        timeout: seconds (or a ``timedelta``) after which a collective that waits for a hung peer fails with a
            :class:`DistributedError` (a dead peer is reported at once on gloo).

    Returns:
        ``(rank, world_size)``.
    """
    global _timeout
    if isinstance(timeout, int | float):
        timeout = datetime.timedelta(seconds=float(timeout))
    if timeout.total_seconds() <= 0:
        raise ValueError(f"Invalid timeout: {timeout} (must be > 0)")
    size = torchrun_world_size()
    if size <= 1 or dist.is_initialized():  # (a group initialized elsewhere keeps its own timeout)
        return rank(), world_size()
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise RuntimeError(f"WORLD_SIZE={size} but {name} is not set: launch with torchrun --nproc_per_node N")
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    _timeout = timeout
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    return rank(), world_size()


def shutdown(synchronize: bool = False) -> None:
    """Destroy the default process group, if one is initialized (at the end of a script; safe to call always).

    Args:
        synchronize: first wait at a barrier until every rank got here (on a normal exit): a rank that tears its
            group down while a peer still talks to it can abort in gloo's threads ("terminate called without an
            active exception"). Leave it off on an error path, where a hung peer would hold the barrier until the
            timeout; a barrier that fails (a peer gone) is ignored.
    """
    global _timeout
    if dist.is_available() and dist.is_initialized():
        if synchronize:
            with contextlib.suppress(RuntimeError):  # a peer is gone: there is nothing left to wait for
                dist.barrier()
        dist.destroy_process_group()
    _timeout = None


def _communication_device(tensor: Tensor) -> torch.device:
    """Where a collective on ``tensor`` runs: CUDA for NCCL (a CPU tensor goes to this rank's GPU), else as is."""
    if tensor.device.type == "cpu" and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return tensor.device


def _buckets(tensors: Sequence[Tensor], bucket_bytes: int) -> Iterator[list[Tensor]]:
    """Consecutive groups of tensors of one dtype and device, each under ``bucket_bytes`` (a larger tensor alone)."""
    bucket: list[Tensor] = []
    size = 0
    for tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        same_kind = not bucket or (tensor.dtype == bucket[0].dtype and tensor.device == bucket[0].device)
        if bucket and (not same_kind or size + nbytes > bucket_bytes):
            yield bucket
            bucket, size = [], 0
        bucket.append(tensor)
        size += nbytes
    if bucket:
        yield bucket


def all_reduce_mean(
    tensors: Sequence[Tensor], *, bucket_bytes: int = DEFAULT_BUCKET_BYTES, what: str = "tensors"
) -> int:
    """Replace each tensor, in place, by its mean over the ranks.

    The tensors are flattened into buckets of at most ``bucket_bytes`` (one dtype and device each; a larger
    tensor forms a bucket of its own) and each bucket takes one all-reduce. Every rank must pass tensors of the
    same shapes, dtypes and order.

    Args:
        tensors: the tensors to average (contiguous or not; written in place).
        bucket_bytes: the bucket size limit.
        what: what the tensors are, for :data:`traffic` and error messages.

    Returns:
        the bytes this rank sent (0 when not distributed).
    """
    if not is_active() or not tensors:
        return 0
    size = world_size()
    sent = 0
    for bucket in _buckets(list(tensors), bucket_bytes):
        flat = torch.cat([t.detach().reshape(-1) for t in bucket]) if len(bucket) > 1 else bucket[0].detach().clone()
        flat = flat.to(_communication_device(flat))
        with _collective(f"all_reduce of {what}", f"all_reduce:{what}"):
            dist.all_reduce(flat.view(-1), op=dist.ReduceOp.SUM)
        flat.div_(size)
        offset = 0
        for tensor in bucket:
            count = tensor.numel()
            tensor.detach().copy_(flat.view(-1)[offset : offset + count].view_as(tensor), non_blocking=False)
            offset += count
        nbytes = flat.numel() * flat.element_size()
        traffic.add(f"all_reduce:{what}", nbytes)
        sent += nbytes
    return sent


def mean_over_ranks(tensor: Tensor, what: str = "a statistic") -> Tensor:
    """A copy of ``tensor`` averaged over the ranks (``tensor`` itself when not distributed)."""
    if not is_active():
        return tensor
    result = tensor.detach().clone()
    all_reduce_mean([result], what=what)
    return result


def combine_moments(
    mean: Tensor, var: Tensor, count: float, what: str = "batch moments"
) -> tuple[Tensor, Tensor, float]:
    """The mean, (biased) variance and count of the union of every rank's batch, from each batch's own.

    Every rank's batch must hold ``count`` examples (one all-reduce of the means and second moments).
    """
    if not is_active():
        return mean, var, count
    moments = [mean.detach().clone(), (var + mean.square()).detach()]
    all_reduce_mean(moments, what=what)
    return moments[0], (moments[1] - moments[0].square()).clamp_min(0), count * world_size()


def assign_by_cost(costs: Sequence[float], ranks: int | None = None) -> list[int]:
    """The owner rank of each work item: greedy longest-processing-time over the items' costs.

    Items are taken from the most to the least costly (ties by index) and each goes to the rank with the least
    total cost so far (ties to the lowest rank). The result depends only on ``costs`` and ``ranks``, so every
    rank computes the same assignment without communicating. LPT's makespan is within 4/3 of the optimum.

    Args:
        costs: a non-negative cost per item (e.g. the flops of its eigendecompositions).
        ranks: the number of ranks (default: the world size).

    Returns:
        ``owners[i]``, the rank that computes item ``i``.
    """
    ranks = world_size() if ranks is None else int(ranks)
    if ranks < 1:
        raise ValueError(f"Invalid number of ranks: {ranks} (must be >= 1)")
    loads = [0.0] * ranks
    owners = [0] * len(costs)
    for index in sorted(range(len(costs)), key=lambda i: (-float(costs[i]), i)):
        owner = min(range(ranks), key=lambda r: (loads[r], r))
        owners[index] = owner
        loads[owner] += float(costs[index])
    return owners


def broadcast_from_owners(
    items: Sequence[Sequence[Tensor]],
    owners: Sequence[int],
    *,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    what: str = "results",
) -> int:
    """Give every rank the tensors of each item as its owner computed them (in place).

    Each owner's tensors are flattened into buckets (one dtype and device each) and each bucket takes one
    broadcast from that owner. Every rank must pass tensors of the same shapes, dtypes and order (on non-owners
    they are overwritten).

    Args:
        items: per item, its result tensors.
        owners: per item, the rank that holds the result (``assign_by_cost``).
        bucket_bytes: the bucket size limit.
        what: what the tensors are, for :data:`traffic` and error messages.

    Returns:
        the bytes this rank sent (a rank counts what it broadcast as owner).
    """
    if len(items) != len(owners):
        raise ValueError(f"{len(items)} items but {len(owners)} owners")
    if not is_active():
        return 0
    me = rank()
    sent = 0
    for owner in sorted(set(owners)):
        tensors = [t for item, o in zip(items, owners) if o == owner for t in item]
        for bucket in _buckets(tensors, bucket_bytes):
            flat = torch.cat([t.detach().reshape(-1) for t in bucket])
            flat = flat.to(_communication_device(flat))
            with _collective(f"broadcast of {what} from rank {owner}", f"broadcast:{what}"):
                dist.broadcast(flat, src=owner)
            if me != owner:
                offset = 0
                for tensor in bucket:
                    count = tensor.numel()
                    tensor.detach().copy_(flat[offset : offset + count].view_as(tensor))
                    offset += count
            else:
                nbytes = flat.numel() * flat.element_size()
                traffic.add(f"broadcast:{what}", nbytes)
                sent += nbytes
    return sent


def average_gradients(parameters: Iterable[Tensor], *, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> int:
    """Average the ``.grad`` of each parameter over the ranks (for models not wrapped in DDP).

    Parameters without a gradient are left out; every rank must have gradients for the same parameters.

    Returns:
        the bytes this rank sent.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    return all_reduce_mean(grads, bucket_bytes=bucket_bytes, what="gradients")


def agree_any(flag: bool | Tensor, what: str = "a skip decision") -> bool:
    """Whether ``flag`` holds on any rank (an all-reduce with MAX), so that every rank takes the same decision.

    Args:
        flag: this rank's decision (a bool, or a tensor that is nonzero for True).
        what: what is decided, for error messages.
    """
    value = bool(flag) if not isinstance(flag, Tensor) else bool(flag.detach().ne(0).any())
    if not is_active():
        return value
    tensor = torch.tensor([1.0 if value else 0.0])
    tensor = tensor.to(_communication_device(tensor))
    with _collective(f"all_reduce (MAX) of {what}", "all_reduce:agreement"):
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    traffic.add("all_reduce:agreement", tensor.element_size())
    return bool(tensor.item() > 0)


def agree_flags(flags: Sequence[bool], what: str = "decisions") -> list[bool]:
    """Each flag as it holds on any rank: several decisions agreed in one all-reduce (MAX)."""
    values = [bool(flag) for flag in flags]
    if not is_active() or not values:
        return values
    tensor = torch.tensor([1.0 if value else 0.0 for value in values])
    tensor = tensor.to(_communication_device(tensor))
    with _collective(f"all_reduce (MAX) of {what}", "all_reduce:agreement"):
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    traffic.add("all_reduce:agreement", tensor.numel() * tensor.element_size())
    return [bool(v > 0) for v in tensor.tolist()]


def is_wrapped_by_ddp(model: nn.Module) -> bool:
    """Whether ``model`` is a ``DistributedDataParallel`` wrapper (whose backward already averages gradients)."""
    return isinstance(model, nn.parallel.DistributedDataParallel)
