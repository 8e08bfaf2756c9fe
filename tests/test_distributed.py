"""Data parallel on torch.distributed: 2 processes with gloo on CPU, each a subprocess with a hard timeout.

Each launch starts one process per rank running a program of tests/distributed_workers.py with torchrun's
variables (a free port on 127.0.0.1), waits for all of them at most ``timeout`` seconds, kills what is left, and
returns each rank's exit code, output and saved results. Launches are shared between the tests that read them
(module-scoped fixtures), since each costs a torch import per process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from acktr_kfe import distributed

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RankOutcome:
    returncode: int | None  # None: killed at the launch's timeout
    output: str
    result: dict[str, Any] | None


def launch(
    program: str,
    out_dir: Path,
    world_size: int = 2,
    timeout: float = 60.0,
    dist_timeout: float = 30.0,
    wait_for: int | None = None,
) -> list[RankOutcome]:
    """Run ``program`` in ``world_size`` processes; never longer than ``timeout`` seconds (per attempt).

    ``wait_for``: once ranks ``0 .. wait_for - 1`` have exited, kill the others (default: wait for all). A launch
    whose port was taken between ``free_port()`` and rank 0's bind is tried again on another port.
    """
    for _ in range(3):
        outcomes = _launch_once(program, out_dir, world_size, timeout, dist_timeout, wait_for)
        if not any("address already in use" in outcome.output.lower() for outcome in outcomes):
            break
    return outcomes


def _launch_once(
    program: str, out_dir: Path, world_size: int, timeout: float, dist_timeout: float, wait_for: int | None
) -> list[RankOutcome]:
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("rank*.pt"):  # an earlier attempt's
        stale.unlink()
    port = free_port()
    processes = []
    for rank in range(world_size):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "DIST_TIMEOUT": str(dist_timeout),
            "OMP_NUM_THREADS": "1",
        }
        log = (out_dir / f"rank{rank}.log").open("w")
        command = [sys.executable, "-m", "tests.distributed_workers", program, str(out_dir)]
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        processes.append((process, log))
    deadline = time.monotonic() + timeout
    outcomes = []
    wait_for = world_size if wait_for is None else wait_for
    for rank, (process, log) in enumerate(processes):
        try:
            left = deadline - time.monotonic() if rank < wait_for else 0.0
            returncode: int | None = process.wait(timeout=max(0.1, left))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            returncode = None
        log.close()
        path = out_dir / f"rank{rank}.pt"
        result = torch.load(path, weights_only=False) if path.is_file() else None
        outcomes.append(RankOutcome(returncode, (out_dir / f"rank{rank}.log").read_text(), result))
    return outcomes


def results_of(outcomes: list[RankOutcome]) -> list[dict[str, Any]]:
    """Each rank's results, after checking that every rank finished cleanly (with its output otherwise)."""
    for rank, outcome in enumerate(outcomes):
        assert outcome.returncode == 0 and outcome.result is not None, f"rank {rank}:\n{outcome.output}"
    return [outcome.result for outcome in outcomes]  # type: ignore[misc]


# --- single-process behaviour ------------------------------------------------------------------------------------


def test_helpers_do_nothing_without_a_process_group() -> None:
    tensor = torch.arange(4.0)
    distributed.traffic.reset()
    assert not distributed.is_active()
    assert distributed.all_reduce_mean([tensor]) == 0
    assert distributed.broadcast_from_owners([[tensor]], [0]) == 0
    assert distributed.agree_any(True) and not distributed.agree_any(False)
    assert torch.equal(tensor, torch.arange(4.0))
    assert distributed.traffic.total() == 0
    assert (distributed.rank(), distributed.world_size()) == (0, 1)


def test_assignment_is_deterministic_and_balances_costs() -> None:
    costs = [1000.0, 8.0, 500.0, 490.0, 27.0, 1.0, 300.0]
    owners = distributed.assign_by_cost(costs, 2)
    assert owners == distributed.assign_by_cost(list(costs), 2)
    loads = [sum(c for c, o in zip(costs, owners) if o == r) for r in range(2)]
    # LPT: 1000 | 500 + 490, then 300, 27, 8, 1 each to the lighter rank: 1036 | 1290 (here also the optimum).
    assert owners[0] != owners[2] and owners[2] == owners[3] == owners[6]
    assert sorted(loads) == [1036.0, 1290.0]
    assert max(loads) <= 4 / 3 * max(sum(costs) / 2, max(costs))
    # More ranks than items: each item alone; equal costs go round-robin from rank 0.
    assert sorted(distributed.assign_by_cost([3.0, 2.0, 1.0], 4)) == [0, 1, 2]
    assert distributed.assign_by_cost([1.0] * 4, 2) == [0, 1, 0, 1]
    with pytest.raises(ValueError, match="ranks"):
        distributed.assign_by_cost([1.0], 0)


# --- two processes -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def helper_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return results_of(launch("helpers", tmp_path_factory.mktemp("helpers")))


def test_bucketed_all_reduce_gives_every_rank_the_mean(helper_results: list[dict[str, Any]]) -> None:
    first, second = helper_results
    for index, (a, b) in enumerate(zip(first["local"], second["local"])):
        mean = (a + b) / 2
        assert first["reduced"][index].dtype == a.dtype
        torch.testing.assert_close(first["reduced"][index], mean)
        torch.testing.assert_close(second["reduced"][index], mean)
    # 35 + 300 float32 and 8 float32 after the float64 tensor: split by size (1 KiB) and by dtype.
    assert first["calls"] >= 3
    assert first["sent"] == sum(t.numel() * t.element_size() for t in first["local"])


def test_broadcast_gives_every_rank_the_owners_results(helper_results: list[dict[str, Any]]) -> None:
    first, second = helper_results
    owners = first["owners"]
    assert owners == second["owners"] and set(owners) == {0, 1}
    for index, owner in enumerate(owners):
        for rank_results in (first, second):
            vector, matrix = rank_results["items"][index]
            torch.testing.assert_close(vector, torch.full((3,), 10.0 * index + owner))
            torch.testing.assert_close(matrix, torch.full((2, 2), float(owner), dtype=torch.float64))


def test_agreement_is_true_on_every_rank_when_one_rank_flags(helper_results: list[dict[str, Any]]) -> None:
    for rank_results in helper_results:
        assert rank_results["agreed_true"] is True
        assert rank_results["agreed_false"] is False


def test_gradient_averaging_gives_the_mean_gradient(helper_results: list[dict[str, Any]]) -> None:
    # d(sum(W x))/dW = 4 x^T rows of value rank + 1: the mean over ranks 1 and 2 is 1.5 * 4.
    for rank_results in helper_results:
        torch.testing.assert_close(rank_results["weight_grad"], torch.full((2, 3), 6.0))


def test_moments_and_flags_combine_every_ranks_batch(helper_results: list[dict[str, Any]]) -> None:
    union = torch.cat([r["observations"] for r in helper_results])
    for rank_results in helper_results:
        mean, var, count = rank_results["moments"]
        torch.testing.assert_close(mean, union.mean(0))
        torch.testing.assert_close(var, union.var(0, unbiased=False))
        assert count == 100.0
        assert rank_results["flags"] == [True, False, True]
        assert float(rank_results["mean"]) == 0.5


def test_a_rank_that_dies_makes_the_others_optimizer_step_raise_a_clear_error(tmp_path: Path) -> None:
    started = time.monotonic()
    outcomes = launch("peer_dies", tmp_path, timeout=60.0, dist_timeout=20.0)
    assert time.monotonic() - started < 60.0
    assert outcomes[1].returncode == 3
    survivor = outcomes[0].result
    assert survivor is not None, outcomes[0].output
    assert survivor["type"] == "DistributedError"
    # The optimizer's step on the survivor: its first collective, the gradients' all-reduce, fails at once.
    assert survivor["error"].startswith("rank 0 of 2: all_reduce of gradients failed: another rank died")
    assert "timeout of 20 s" in survivor["error"]
    assert survivor["seconds"] < 20.0


def test_a_rank_that_hangs_makes_the_other_raise_at_the_timeout(tmp_path: Path) -> None:
    outcomes = launch("peer_hangs", tmp_path, timeout=40.0, dist_timeout=3.0, wait_for=1)
    survivor = outcomes[0].result
    assert survivor is not None, outcomes[0].output
    assert survivor["type"] == "DistributedError"
    assert "rank 0 of 2: all_reduce (MAX) of the skip decision failed" in survivor["error"]
    assert "timeout of 3 s" in survivor["error"]
    assert 2.5 < survivor["seconds"] < 15.0
    assert outcomes[1].returncode is None  # still asleep: killed by the launcher


# --- the scripts under torchrun ----------------------------------------------------------------------------------


def torchrun(script: str, argv: list[str], tmp_path: Path, timeout: float = 120.0) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 scripts/<script>.py argv`` (its rendezvous on a port the system
    picks), killed after ``timeout`` seconds."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "scripts" / f"{script}.py"), *argv]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


def test_supervised_script_under_torchrun_trains_a_conv_net_on_two_ranks_and_only_rank_0_writes(
    tmp_path: Path,
) -> None:
    from tests.test_supervised import write_cifar_batch

    data = tmp_path / "data" / "cifar-10-batches-py"
    data.mkdir(parents=True)
    write_cifar_batch(data / "data_batch_1", 64, seed=1)
    write_cifar_batch(data / "test_batch", 16, seed=3)
    log_dir = tmp_path / "run"
    argv = ["--task", "cifar10_vgg11", "--width", "4", "--optimizer", "ekfac", "--batch-size", "8", "--epochs", "1",
            "--data-dir", str(data.parent), "--log-dir", str(log_dir), "--no-progress", "--threads", "1"]  # fmt: skip
    finished = torchrun("supervised", argv, tmp_path)
    output = f"{finished.stdout[-2000:]}\n{finished.stderr[-3000:]}"
    assert finished.returncode == 0, output
    assert finished.stdout.count('"world_size": 2') == 1, output  # the summary of rank 0 only
    config = yaml.safe_load((log_dir / "config.yml").read_text())
    assert config["world_size"] == 2 and config["batch_size"] == 8, config
    with (log_dir / "steps.csv").open() as handle:
        rows = handle.read().strip().splitlines()
    assert len(rows) == 1 + 64 // (2 * 8), rows  # global batches of 2 x 8
    assert (log_dir / "epochs.csv").is_file()


def test_a_run_folder_rank_0_refuses_stops_every_rank_before_training(tmp_path: Path) -> None:
    log_dir = tmp_path / "run"
    log_dir.mkdir()
    (log_dir / "steps.csv").write_text("an earlier run\n")
    argv = ["--task", "cifar10_vgg11", "--width", "4", "--batch-size", "8", "--data-dir", str(tmp_path / "data"),
            "--log-dir", str(log_dir), "--no-progress"]  # fmt: skip
    from tests.test_supervised import write_cifar_batch

    data = tmp_path / "data" / "cifar-10-batches-py"
    data.mkdir(parents=True)
    write_cifar_batch(data / "data_batch_1", 32, seed=1)
    write_cifar_batch(data / "test_batch", 8, seed=3)
    finished = torchrun("supervised", argv, tmp_path)
    assert finished.returncode != 0
    assert finished.stderr.count("already holds a run") == 1  # rank 0's message, once
    assert "rank 0 could not use the run folder" in finished.stderr  # and rank 1 stopped with it
    assert sorted(p.name for p in log_dir.iterdir()) == ["steps.csv"]
    assert (log_dir / "steps.csv").read_text() == "an earlier run\n"


@pytest.mark.slow  # about 10 s; the acktr_lockstep program covers ACKTR's data parallel in the fast suite
def test_train_script_under_torchrun_runs_acktr_on_two_ranks_and_only_rank_0_writes(tmp_path: Path) -> None:
    log_dir = tmp_path / "run"
    argv = ["--env", "CartPole-v1", "--total-timesteps", "640", "--log-dir", str(log_dir), "--checkpoint-every",
            "100000"]  # fmt: skip
    finished = torchrun("train", argv, tmp_path)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert finished.stdout.count("mean return") == 1
    results = json.loads((log_dir / "results.json").read_text())
    assert results["world_size"] == 2 and results["timesteps"] == 640
    assert yaml.safe_load((log_dir / "config.yml").read_text())["world_size"] == 2


# --- the optimizer, data parallel --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def equivalence_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return results_of(launch("optimizer_equivalence", tmp_path_factory.mktemp("equivalence"), timeout=120.0))


CASES = ["mlp-kfac", "mlp-ekfac", "conv-kfac", "conv-ekfac"]


@pytest.mark.parametrize("case", CASES)
def test_data_parallel_steps_keep_parameters_identical_on_every_rank(
    equivalence_results: list[dict[str, Any]], case: str
) -> None:
    first, second = (results[case] for results in equivalence_results)
    for a, b in zip(first["parameters"], second["parameters"]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("case", CASES)
def test_data_parallel_steps_equal_one_process_on_the_combined_batch(
    equivalence_results: list[dict[str, Any]], case: str
) -> None:
    entry = equivalence_results[0][case]
    for parallel, alone, initial in zip(entry["parameters"], entry["alone"], entry["initial"]):
        torch.testing.assert_close(parallel, alone, rtol=1e-9, atol=1e-10)
        assert (parallel - initial).abs().max() > 1e-4  # the steps moved every parameter
    # The MLP's gradients were averaged by the optimizer, the conv net's by DDP (the optimizer saw the wrapper).
    assert entry["average_gradients"] is case.startswith("mlp")
    assert not any(name.startswith("module.") for name in entry["layers"])
    assert entry["bytes"]["all_reduce:curvature statistics"] > 0 and entry["bytes"]["broadcast:eigenbases"] > 0


@pytest.mark.parametrize("case", CASES)
def test_each_rank_computes_only_its_assigned_eigendecompositions(
    equivalence_results: list[dict[str, Any]], case: str
) -> None:
    entries = [results[case] for results in equivalence_results]
    owners = entries[0]["last_refresh_owners"]
    assert owners == entries[1]["last_refresh_owners"]
    names = list(entries[0]["costs"])
    assert [owners[n] for n in names] == distributed.assign_by_cost([entries[0]["costs"][n] for n in names], 2)
    assert set(owners.values()) == {0, 1}
    # 7 steps with a refresh every 2: rounds at steps 0, 2, 4, 6. The first round runs on every rank (it creates
    # the bases there); the three after it only on each layer's owner.
    for rank, entry in enumerate(entries):
        for name in names:
            assert entry["computed_refreshes"][name] == (4 if owners[name] == rank else 1), (rank, name)


def test_a_non_finite_gradient_on_one_rank_makes_every_rank_skip_the_step(
    equivalence_results: list[dict[str, Any]],
) -> None:
    first, second = (results["skip"] for results in equivalence_results)
    assert first["skipped"] == second["skipped"] == 1
    assert first["steps"] == second["steps"] == 2
    for a, b in zip(first["parameters"], second["parameters"]):
        assert torch.equal(a, b) and bool(torch.isfinite(a).all())


@pytest.mark.parametrize(
    ("step_norm", "why"),
    [
        ("natural", "non-finite preconditioned direction or trust-region scale"),
        ("adam", "non-finite preconditioned direction or step size"),
    ],
)
def test_a_non_finite_direction_or_step_size_on_one_rank_makes_every_rank_skip_the_step(
    equivalence_results: list[dict[str, Any]], step_norm: str, why: str
) -> None:
    first, second = (results[f"direction-{step_norm}"] for results in equivalence_results)
    assert first["skipped"] == second["skipped"] == 1
    for results in (first, second):  # the rank that overflowed and the one that did not give the same reason
        assert any(why in message for message in results["messages"]), results["messages"]
    assert first["steps"] == second["steps"] == 2
    for a, b in zip(first["parameters"], second["parameters"]):
        assert torch.equal(a, b) and bool(torch.isfinite(a).all())


def test_acktr_ranks_step_their_own_environments_and_keep_identical_policies_and_normalization(tmp_path: Path) -> None:
    first, second = results_of(launch("acktr_lockstep", tmp_path, timeout=90.0))
    # start_alike gave the follower rank 0's calibration (kept on the host), not only its buffers.
    assert first["calibration_after_start"] == second["calibration_after_start"] == [0.7, -0.3]
    assert not torch.equal(first["observations"], second["observations"])
    assert first["state"].keys() == second["state"].keys()
    for key, value in first["state"].items():
        assert torch.equal(value, second["state"][key]), key
    assert first["computed_refreshes"] != second["computed_refreshes"]
    for a, b in zip(first["vecnormalize"], second["vecnormalize"]):  # combined after each rollout
        assert torch.equal(a, b)
