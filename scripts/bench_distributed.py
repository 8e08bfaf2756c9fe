"""Data-parallel K-FAC / EKFAC: throughput with 1 and 2 processes, bytes communicated, and a scaling model.

    python scripts/bench_distributed.py                       # both tasks, 1 and 2 processes (a few minutes)
    python scripts/bench_distributed.py --tasks autoencoder --ranks 1 2 4 --out bench.json

Each configuration runs as N local processes with torchrun's variables (gloo on CPU, one torch thread each):
- autoencoder: the MNIST deep autoencoder with EKFAC at configs/supervised.yml's settings (true Fisher, factors and
  scale every 10 steps, eigenbases every 50), the model in DistributedDataParallel, ``--ae-batch`` examples per
  rank; timed over ``--ae-steps`` steps after the first (which holds the first eigendecompositions), a window that
  holds one refresh round when it is a multiple of 50. MNIST from ``--data-dir`` (default
  ../shared/datasets/mnist); without it, a synthetic low-rank image set (noted in the output).
- acktr: ACKTR (EKFAC) on a MuJoCo task with configs/acktr.yml's settings, each rank its own ``n_envs``
  environments (seed + 1000 rank), timed over ``--rl-updates`` updates after two warm-up updates.

Per configuration: samples (or environment steps) per second over all ranks, the scaling efficiency against one
process (throughput of N processes / N / throughput of one), the bytes each rank sent per step by kind (statistics
all-reduce, eigenbasis broadcasts, and the gradient all-reduce of DDP, which is the parameters' size), the time of
an eigendecomposition round, and the training loss. From these measured costs, a model of N ranks: which costs
stay per rank, which shrink (eigendecompositions, split by cost with the same LPT assignment as the optimizer),
and which grow (ring all-reduce bytes 2 (N-1)/N of the payload; each rank receives the bases it did not compute).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_DATA = ROOT.parent / "shared" / "datasets" / "mnist"


# --- the workers (one per rank) --------------------------------------------------------------------------------


def _autoencoder_worker(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from torch import nn

    import acktr_kfe
    from acktr_kfe import distributed
    from agents.supervised.data import DatasetFilesMissingError
    from agents.supervised.models import MNISTAutoencoder, autoencoder_loss
    from agents.supervised.training import build_optimizer, load_autoencoder_images, training_step

    rank, ranks = distributed.rank(), distributed.world_size()
    try:
        images, synthetic = load_autoencoder_images(args.data_dir), False
    except DatasetFilesMissingError:
        generator = torch.Generator().manual_seed(0)
        basis = torch.rand(30, 784, generator=generator)
        images = (torch.rand(20_000, 30, generator=generator) @ basis / 30).clamp(0, 1)
        synthetic = True
    torch.manual_seed(0)
    # Without DDP: the optimizer averages the gradients itself, so their all-reduce is counted and timed too (DDP
    # sends the same bytes, overlapped with the backward).
    model: nn.Module = MNISTAutoencoder()
    optimizer = build_optimizer("ekfac", model, "mnist_autoencoder")
    if rank:
        torch.manual_seed(1000 * rank)
    # Timed: steps 1 .. ae_steps. Run on to ae_run_steps for the loss at equal samples across world sizes.
    batch = args.ae_batch // ranks if args.strong else args.ae_batch
    steps = max(args.ae_steps, args.ae_run_steps) + 1
    generator = torch.Generator().manual_seed(0)
    losses, times, eigh_ms = [], [], []
    traffic_window: dict[str, int] = {}
    seconds_window: dict[str, float] = {}
    for step in range(steps):
        if step == 1:
            distributed.traffic.reset()
        if step == args.ae_steps + 1:
            traffic_window = dict(distributed.traffic.bytes)
            seconds_window = dict(distributed.traffic.seconds)
        order = torch.randperm(len(images), generator=generator)[: batch * ranks]
        x = images[order[rank * batch : (rank + 1) * batch]]
        started = time.perf_counter()
        losses.append(training_step(model, optimizer, x, x, autoencoder_loss, acktr_kfe.bernoulli_fisher_loss))
        times.append(time.perf_counter() - started)
        if step % optimizer.eigen_update_interval == 0:
            eigh_ms.append(optimizer.last_eigh_ms)
    if steps == args.ae_steps + 1:
        traffic_window = dict(distributed.traffic.bytes)
        seconds_window = dict(distributed.traffic.seconds)
    loss = torch.tensor(losses, dtype=torch.float64)
    distributed.all_reduce_mean([loss], what="the losses")
    parameters = sum(p.numel() * p.element_size() for p in model.parameters())
    blocks = optimizer.blocks
    return {
        "rank": rank,
        "world_size": ranks,
        "batch_per_rank": batch,
        "synthetic_data": synthetic,
        "timed_steps": args.ae_steps,
        "seconds": sum(times[1 : args.ae_steps + 1]),
        "first_step_seconds": times[0],
        "losses": loss.tolist(),
        "eigh_ms": eigh_ms,
        "bytes": traffic_window,
        "communication_seconds": sum(seconds_window.values()),
        "parameter_bytes": parameters,
        "refresh_costs": [float(block.refresh_cost()) for block in blocks],
        "basis_bytes": sum(t.numel() * t.element_size() for b in blocks for t in b.basis_tensors()),
        "statistics_bytes": sum(t.numel() * t.element_size() for b in blocks for t in b.statistics_tensors()),
        "computed_refreshes": dict(optimizer.computed_refreshes),
    }


def _acktr_worker(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from acktr_kfe import distributed
    from agents.rl_config import ALGORITHMS, env_options, model_arguments, resolve_config, validate_config
    from envs import make_env

    rank, ranks = distributed.rank(), distributed.world_size()
    path = ROOT / "configs" / "acktr.yml"
    config = validate_config(resolve_config(path, args.env, ALGORITHMS["acktr"]), path)
    config.setdefault("n_envs", 8)
    policy, kwargs = model_arguments(config)
    env = make_env(args.env, n_envs=config["n_envs"], seed=1000 * rank, **env_options(config))
    model = ALGORITHMS["acktr"](policy, env, seed=0, device="cpu", **kwargs)
    model.set_random_seed(1000 * rank)
    state = [t for t in model.policy.state_dict().values() if isinstance(t, torch.Tensor)]
    distributed.broadcast_from_owners([state], [0], what="the initial policy")
    per_update = config["n_envs"] * model.n_steps
    model.learn(2 * per_update)
    distributed.traffic.reset()
    started = time.perf_counter()
    model.learn(args.rl_updates * per_update, reset_num_timesteps=False)
    seconds = time.perf_counter() - started
    env.close()
    parameters = sum(p.numel() * p.element_size() for p in model.policy.parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in model.policy.parameters()])
    mean = distributed.mean_over_ranks(flat.double())
    return {
        "rank": rank,
        "world_size": ranks,
        "env_steps_per_rank": args.rl_updates * per_update,
        "transitions_per_update_per_rank": per_update,
        "timed_updates": args.rl_updates,
        "seconds": seconds,
        "bytes": dict(distributed.traffic.bytes),
        "communication_seconds": sum(distributed.traffic.seconds.values()),
        "parameter_bytes": parameters,
        "max_parameter_difference_across_ranks": float((flat.double() - mean).abs().max()),
        "eigh_ms": float(model.policy.optimizer.last_eigh_ms),
    }


def worker_main(args: argparse.Namespace) -> int:
    import torch

    from acktr_kfe import distributed

    torch.set_num_threads(1)
    distributed.init_from_environment("cpu", timeout=300.0)
    finished = False
    try:
        result = _autoencoder_worker(args) if args.worker == "autoencoder" else _acktr_worker(args)
        Path(args.result).write_text(json.dumps(result))
        finished = True
    finally:
        distributed.shutdown(synchronize=finished)
    return 0


# --- the launcher ----------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(
    task: str, ranks: int, args: argparse.Namespace, folder: Path, independent: bool = False
) -> list[dict[str, Any]]:
    """Run one configuration as ``ranks`` local processes; each rank's result. ``independent``: the processes
    run the same work at the same time without a process group (what the machine gives N processes that never
    communicate: the baseline that separates the design's overhead from the cores' contention)."""
    port = _free_port()
    processes = []
    tag = f"{task}-{ranks}{'-independent' if independent else ''}"
    for rank in range(ranks):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(ranks),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}  # fmt: skip
        if independent:
            env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        result = folder / f"{tag}-rank{rank}.json"
        forwarded = _forwarded(args, ranks)
        if independent and args.strong:  # the share of the global batch each rank would take
            forwarded[1] = str(args.ae_batch // ranks)
        command = [sys.executable, __file__, "--worker", task, "--result", str(result), *forwarded]
        log = (folder / f"{tag}-rank{rank}.log").open("w")
        processes.append((subprocess.Popen(command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT), result))
    deadline = time.monotonic() + args.timeout
    for process, _ in processes:
        try:
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for other, _ in processes:
                other.kill()
            raise SystemExit(f"{task} with {ranks} processes did not finish in {args.timeout} s") from None
        if process.returncode:
            logs = "".join(p.read_text()[-2000:] for p in sorted(folder.glob(f"{tag}-rank*.log")))
            raise SystemExit(f"{task} with {ranks} processes failed (exit code {process.returncode}):\n{logs}")
    return [json.loads(result.read_text()) for _, result in processes]


def _forwarded(args: argparse.Namespace, ranks: int) -> list[str]:
    # Every world size runs to the samples the largest one sees in its timed steps.
    run_steps = args.ae_steps if args.strong else args.ae_steps * max(args.ranks) // ranks
    return ["--ae-batch", str(args.ae_batch), "--ae-steps", str(args.ae_steps), "--ae-run-steps", str(run_steps),
            "--data-dir", str(args.data_dir), "--env", args.env, "--rl-updates", str(args.rl_updates),
            *(["--strong"] if args.strong else [])]  # fmt: skip


def _per_step(byte_counts: dict[str, int], steps: int) -> dict[str, float]:
    return {kind: count / steps for kind, count in sorted(byte_counts.items())}


def summarize(task: str, runs: dict[tuple[int, bool], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per configuration (world size, independent): throughput, efficiency, bytes per step by kind."""
    rows = []
    base = None
    for (ranks, independent), results in sorted(runs.items()):
        seconds = max(r["seconds"] for r in results)  # the ranks step together: the slowest sets the pace
        if task == "autoencoder":
            steps = results[0]["timed_steps"]
            throughput = ranks * results[0]["batch_per_rank"] * steps / seconds
            sent = {}
            for r in results:
                for kind, count in _per_step(r["bytes"], steps).items():
                    sent[kind] = sent.get(kind, 0.0) + count / ranks
            losses = results[0]["losses"]
            extra = {
                "loss_first": losses[0],
                # At the same number of samples for every world size: the mean over the last 5 steps.
                "samples": len(losses[1:]) * ranks * results[0]["batch_per_rank"],
                "loss_last": sum(losses[-5:]) / len(losses[-5:]),
                "eigh_round_ms": results[0]["eigh_ms"][-1] if results[0]["eigh_ms"] else None,
                "synthetic_data": results[0]["synthetic_data"],
            }
        else:
            steps = results[0]["timed_updates"]
            throughput = sum(r["env_steps_per_rank"] for r in results) / seconds
            sent = {}
            for r in results:
                for kind, count in _per_step(r["bytes"], steps).items():
                    sent[kind] = sent.get(kind, 0.0) + count / ranks
            extra = {"max_parameter_difference_across_ranks": max(
                r["max_parameter_difference_across_ranks"] for r in results)}  # fmt: skip
        base = throughput if ranks == 1 else base
        communication = max(r["communication_seconds"] for r in results) / steps
        rows.append({
            "task": task,
            "ranks": ranks,
            "independent": independent,
            "throughput": throughput,
            "efficiency": throughput / ranks / base if base else None,
            "seconds": seconds,
            "communication_s_per_step": communication,
            "communication_share": communication / (seconds / steps),
            "bytes_per_step_per_rank": sent,
            **extra,
        })  # fmt: skip
    return rows


def scaling_model(results: list[dict[str, Any]], sizes: list[int], bandwidth: float) -> list[dict[str, Any]]:
    """Modelled cost per autoencoder step on N ranks from the one-process costs measured here.

    Per step and rank: forward, backward and curvature pass at a fixed per-rank batch (constant in N); the eigen-
    decompositions, one round per ``eigen_interval`` steps, split by the LPT assignment of the layers' costs (the
    longest layer bounds the split); a ring all-reduce of the statistics (every ``factor_interval`` steps) and of
    the gradients, each rank sending ``2 (N-1)/N`` of the payload; the broadcast of the bases it did not compute,
    ``(N-1)/N`` of them per round. Communication time is bytes / ``bandwidth`` (bytes per second), latency ignored.
    """
    from acktr_kfe.distributed import assign_by_cost

    one = results[0]
    step_seconds = one["seconds"] / one["timed_steps"]
    eigh_round = (one["eigh_ms"][-1] if one["eigh_ms"] else 0.0) / 1000
    eigen_interval, factor_interval = 50, 10
    compute = step_seconds - eigh_round / eigen_interval
    costs = one["refresh_costs"] or [1.0]
    rows = []
    for n in sizes:
        owners = assign_by_cost(costs, n)
        loads = [sum(c for c, o in zip(costs, owners) if o == r) for r in range(n)]
        eigh = eigh_round * max(loads) / sum(costs)
        ring = 2 * (n - 1) / n
        statistics = ring * one["statistics_bytes"] / factor_interval
        gradients = ring * one["parameter_bytes"]
        bases = (n - 1) / n * one["basis_bytes"] / eigen_interval
        communicated = statistics + gradients + bases
        total = compute + eigh / eigen_interval + communicated / bandwidth
        rows.append({
            "ranks": n,
            "compute_s": compute,
            "eigh_per_step_s": eigh / eigen_interval,
            "bytes_per_step_per_rank": communicated,
            "communication_s": communicated / bandwidth,
            "step_s": total,
            "weak_scaling_efficiency": step_seconds / total,
        })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", choices=["autoencoder", "acktr"], default=["autoencoder", "acktr"])
    parser.add_argument("--ranks", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--ae-batch", type=int, default=1000, help="autoencoder examples per rank and step")
    parser.add_argument("--ae-steps", type=int, default=50, help="timed autoencoder steps (after the first)")
    parser.add_argument(
        "--strong", action="store_true", help="autoencoder: --ae-batch is the global batch, split over the ranks"
    )
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--env", default="HalfCheetah-v5")
    parser.add_argument("--rl-updates", type=int, default=60, help="timed ACKTR updates (after two)")
    parser.add_argument(
        "--independent", action="store_true", help="also N processes at once without communication (contention)"
    )
    parser.add_argument("--model-ranks", nargs="+", type=int, default=[1, 2, 4, 8, 16, 64])
    parser.add_argument("--bandwidth-gbps", type=float, default=100.0, help="link of the model (Gbit/s)")
    parser.add_argument("--timeout", type=float, default=600.0, help="per configuration, seconds")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--ae-run-steps", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=["autoencoder", "acktr"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        return worker_main(args)

    report: dict[str, Any] = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, no GPU; load average "
        f"{os.getloadavg()[0]:.1f} at the start",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "rows": [],
    }
    with tempfile.TemporaryDirectory() as folder:
        for task in args.tasks:
            runs = {(n, False): launch(task, n, args, Path(folder)) for n in args.ranks}
            for n in args.ranks if args.independent else []:
                if n > 1:
                    runs[(n, True)] = launch(task, n, args, Path(folder), independent=True)
            report["rows"] += summarize(task, runs)
            if task == "autoencoder" and (1, False) in runs:
                one = runs[(1, False)]
                report["model"] = scaling_model(one, args.model_ranks, args.bandwidth_gbps * 1e9 / 8)
    print_report(report)
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def print_report(report: dict[str, Any]) -> None:
    """Markdown tables of the measurements and the model."""
    print(f"machine: {report['machine']}; {report['date']}; command: {report['command']}\n")
    print("| task | processes | samples/s (all ranks) | efficiency | in collectives (ms/step, share) "
          "| bytes/step/rank: statistics | bases | gradients | other | eigh round (ms) | loss |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in report["rows"]:
        sent = row["bytes_per_step_per_rank"]
        statistics = sum(v for k, v in sent.items() if k.endswith("statistics") and k.startswith("all_reduce:"))
        bases = sum(v for k, v in sent.items() if k == "broadcast:eigenbases")
        gradients = sum(v for k, v in sent.items() if "gradients" in k)
        other = sum(sent.values()) - statistics - bases - gradients
        loss = f"{row['loss_last']:.1f} after {row['samples']:,} samples" if "loss_last" in row else ""
        loss = "" if row["independent"] else loss  # each of them trains alone on its own batches
        eigh = f"{row['eigh_round_ms']:.0f}" if row.get("eigh_round_ms") is not None else ""
        efficiency = f"{row['efficiency']:.2f}" if row["efficiency"] is not None else ""
        waiting = f"{1000 * row['communication_s_per_step']:.1f} ({row['communication_share']:.0%})"
        processes = f"{row['ranks']}{' independent' if row['independent'] else ''}"
        print(f"| {row['task']} | {processes} | {row['throughput']:.0f} | {efficiency} | {waiting} | "
              f"{statistics:,.0f} | {bases:,.0f} | {gradients:,.0f} | {other:,.0f} | {eigh} | {loss} |")  # fmt: skip
    if "model" in report:
        print("\n| N ranks | compute (s/step) | eigh (s/step) | bytes/step/rank | communication (s/step) | step (s) "
              "| weak-scaling efficiency |")  # fmt: skip
        print("|---|---|---|---|---|---|---|")
        for row in report["model"]:
            print(f"| {row['ranks']} | {row['compute_s']:.3f} | {row['eigh_per_step_s']:.4f} | "
                  f"{row['bytes_per_step_per_rank']:,.0f} | {row['communication_s']:.4f} | {row['step_s']:.3f} | "
                  f"{row['weak_scaling_efficiency']:.2f} |")  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
