"""scripts/bench_rl.py: steps to threshold, the table with ratios to A2C, and one short real run per algorithm."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from .test_train_script import load_script

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def record(algo: str, returns: list[float], seconds: float = 10.0) -> dict:
    episodes = [(1000 * (i + 1), r) for i, r in enumerate(returns)]
    return {"algo": algo, "env": "CartPole-v1", "seed": 0, "steps": 100_000, "seconds": seconds, "episodes": episodes}


def test_steps_to_threshold_uses_the_rolling_mean_of_ten_episodes() -> None:
    bench = load_script("bench_rl")
    summary = bench.summarize(record("a2c", [100.0] * 10 + [500.0] * 9 + [480.0] * 5), threshold=475.0)
    # Episode 19 closes a window of one 100 and nine 500s (460); episode 20 one of nine 500s and a 480 (498).
    assert summary["reached"] == 20_000
    assert summary["final"] == pytest.approx((500 * 5 + 480 * 5) / 10)
    assert summary["fps"] == pytest.approx(10_000)
    assert summary["best"] == pytest.approx(498.0)  # episodes 11-20: the nine 500s and a 480
    fell_back = bench.summarize(record("a2c", [100.0] * 10 + [400.0] * 10 + [200.0] * 10), threshold=475.0)
    assert (fell_back["final"], fell_back["best"]) == (pytest.approx(200.0), pytest.approx(400.0))
    assert bench.summarize(record("a2c", [100.0] * 30), threshold=475.0)["reached"] is None


def test_table_gives_ratios_to_a2c_as_bounds_when_a_median_is_beyond_the_budget() -> None:
    bench = load_script("bench_rl")
    fast = record("acktr_ekfac", [500.0] * 12, seconds=20.0)
    never = record("a2c", [10.0] * 30)
    table = bench.table([fast, record("a2c", [10.0] * 10 + [500.0] * 20)])
    row = next(line for line in table.splitlines() if "acktr_ekfac" in line)
    # ACKTR: threshold at 10k steps, A2C at 20k; ACKTR took twice the seconds for the same steps.
    assert "10,000 (1/1)" in row and row.endswith("| 0.50 | 0.50 |")
    # A2C reaches on one seed of three: its median is beyond the 100k budget, so ACKTR's ratio is below 0.10.
    table = bench.table([fast, never, {**never, "seed": 1}, record("a2c", [10.0] * 10 + [500.0] * 20)])
    assert "| >100,000 (1/3) |" in next(line for line in table.splitlines() if "| a2c |" in line)
    assert "| <0.10 |" in next(line for line in table.splitlines() if "acktr_ekfac" in line)
    assert bench.steps_ratio(float("inf"), 20_000.0, 100_000) == ">5.00"
    assert bench.steps_ratio(float("inf"), float("inf"), 100_000) == ""


@pytest.mark.parametrize(
    "algo", ["acktr_ekfac", "acktr_kfac", "acktr_ief", "a2c", "ppo", "trpo", "a2c_kron", "ppo_kron"]
)
def test_each_algorithm_runs_with_its_config(algo: str) -> None:
    if algo == "trpo":
        pytest.importorskip("sb3_contrib", reason="the TRPO baseline needs sb3-contrib")
    bench = load_script("bench_rl")
    result = bench.run_one(algo, "CartPole-v1", seed=0, steps=2048, threads=1)
    assert result["episodes"] and result["seconds"] > 0
    assert 1.0 <= result["evaluation"] <= 500.0  # 10 deterministic episodes of the trained agent
    kronecker = algo.startswith("acktr") or algo.endswith("_kron")  # ACKTR's own policy, or the plug-in
    assert (result["policy"] == "KroneckerActorCriticPolicy") == kronecker


def test_plugin_runs_take_their_algorithms_hyperparameters_and_compare_with_it() -> None:
    """a2c_kron is SB3's A2C with its defaults and the Kronecker policy; its ratios in the table are to plain A2C,
    ppo_kron's to plain PPO, while ACKTR's stay ratios to A2C."""
    bench = load_script("bench_rl")
    result = bench.run_one("a2c_kron", "Pendulum-v1", seed=0, steps=20, threads=1, defaults_n_envs=1)
    assert result["policy"] == "KroneckerActorCriticPolicy" and result["timesteps"] == 20  # A2C's 5-step rollouts
    records = [
        record("a2c", [10.0] * 10 + [500.0] * 20),  # reaches at 20k steps
        record("a2c_kron", [500.0] * 12, seconds=40.0),  # at 10k, four times the seconds
        record("ppo", [500.0] * 10, seconds=5.0),  # at 10k
        record("ppo_kron", [10.0] * 10 + [500.0] * 20, seconds=10.0),  # at 20k, twice the seconds
        record("acktr_ekfac", [500.0] * 12, seconds=20.0),
    ]
    records[0]["evaluation"] = 487.25  # the other records were logged without an evaluation
    rows = {line.split(" | ")[1]: line for line in bench.table(records).splitlines() if "CartPole" in line}
    assert "| 487 |" in rows["a2c"] and "| - |" in rows["ppo"]
    assert rows["a2c_kron"].endswith("| 0.50 | 0.25 |")
    assert rows["ppo_kron"].endswith("| 2.00 | 0.50 |")
    assert rows["acktr_ekfac"].endswith("| 0.50 | 0.50 |")


def test_throughput_with_constructor_defaults_uses_raw_envs_and_the_defaults(tmp_path: Path) -> None:
    throughput = load_script("bench_throughput")
    code = throughput.main(
        ["--envs", "Pendulum-v1", "--algos", "a2c", "acktr_ekfac", "--defaults", "1", "--steps", "256",
         "--out", str(tmp_path)]
    )  # fmt: skip
    assert code == 0
    table = (tmp_path / "throughput.md").read_text()
    assert "| Pendulum-v1 | acktr_ekfac | 256 |" in table, table  # two whole 128-step rollouts of one env
    with pytest.raises(SystemExit):
        throughput.main(["--defaults", "0"])


def test_constructor_defaults_runs_are_recorded_and_reported_apart_from_configured_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json
    from concurrent.futures import ThreadPoolExecutor

    bench = load_script("bench_rl")
    monkeypatch.setattr(bench, "ProcessPoolExecutor", ThreadPoolExecutor)  # the loaded script cannot be pickled
    configured = {**record("a2c", [500.0] * 30), "env": "Pendulum-v1"}
    (tmp_path / "runs.jsonl").write_text(json.dumps(configured) + "\n")
    argv = ["--envs", "Pendulum-v1", "--algos", "acktr_ekfac", "--seeds", "0", "--steps", "256", "--out", str(tmp_path)]
    assert bench.main([*argv, "--defaults", "1"]) == 0
    records = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert records[-1]["defaults_n_envs"] == 1 and records[-1]["timesteps"] == 256  # two 128-step rollouts, one env
    table = (tmp_path / "results.md").read_text()
    assert "acktr_ekfac" in table and "| a2c |" not in table  # the configured A2C run is kept apart
    with pytest.raises(SystemExit):
        bench.main([*argv, "--defaults", "0"])


def test_report_rebuilds_table_and_plot_from_logs(tmp_path: Path) -> None:
    bench = load_script("bench_rl")
    import json

    (tmp_path / "runs.jsonl").write_text(
        "\n".join(json.dumps(r) for r in (record("a2c", [500.0] * 30), record("ppo", [200.0] * 30)))
    )
    assert bench.main(["--report", "--out", str(tmp_path), "--envs", "CartPole-v1"]) == 0
    assert (tmp_path / "curves.png").stat().st_size > 5_000 and "| ppo |" in (tmp_path / "results.md").read_text()


def test_report_with_no_matching_run_says_what_the_log_holds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    (tmp_path / "runs.jsonl").write_text(json.dumps({**record("a2c", [500.0] * 30), "defaults_n_envs": 1}) + "\n")
    with pytest.raises(SystemExit):
        load_script("bench_rl").main(["--report", "--out", str(tmp_path), "--envs", "CartPole-v1"])
    assert "it holds: CartPole-v1 a2c --defaults 1" in capsys.readouterr().err


def test_throughput_table_gives_ratios_to_a2c_and_a_short_run_measures_every_algorithm(tmp_path: Path) -> None:
    throughput = load_script("bench_throughput")
    table = throughput.table([("CartPole-v1", "a2c", 1000, 2.0), ("CartPole-v1", "acktr_ekfac", 1000, 1.0)])
    assert table.splitlines()[-1] == "| CartPole-v1 | acktr_ekfac | 1,000 | 1.0 | 1,000 | 2.00 |"
    # A plug-in run is compared with the algorithm whose policy it replaces.
    table = throughput.table(
        [("CartPole-v1", "a2c", 1000, 2.0), ("CartPole-v1", "ppo", 1000, 1.0), ("CartPole-v1", "ppo_kron", 1000, 4.0)]
    )
    assert table.splitlines()[-1] == "| CartPole-v1 | ppo_kron | 1,000 | 4.0 | 250 | 0.25 |"
    args = ["--envs", "CartPole-v1", "--algos", "a2c", "acktr_ekfac", "--steps", "320", "--out", str(tmp_path)]
    assert throughput.main(args) == 0
    rows = (tmp_path / "throughput.md").read_text().splitlines()[2:]
    assert [row.split(" | ")[1] for row in rows] == ["a2c", "acktr_ekfac"] and rows[0].endswith("| 1.00 |")


def test_missing_baseline_entries_and_a_missing_sb3_contrib_are_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    bench = load_script("bench_rl")
    assert bench.baseline_config("trpo", "ALE/Pong-v5") is None
    assert bench.baseline_config("trpo", "HalfCheetah-v5")["target_kl"] == 0.04
    with pytest.raises(ValueError, match="no trpo entry for ALE/Pong-v5"):
        bench.run_one("trpo", "ALE/Pong-v5", seed=0, steps=10, threads=1)
    monkeypatch.setitem(sys.modules, "sb3_contrib", None)  # as if it were not installed
    with pytest.raises(ImportError, match="pip install sb3-contrib"):
        bench.trpo_class()


def test_baselines_file_with_a_key_given_twice_is_refused_as_train_py_refuses_it(tmp_path: Path) -> None:
    bench = load_script("bench_rl")
    path = tmp_path / "baselines.yml"
    path.write_text("a2c:\n  CartPole-v1:\n    n_envs: 8\n    n_envs: 16\n")
    with pytest.raises(ValueError, match=rf"{path}: not valid YAML: .*n_envs"):
        bench.baseline_entries(path)
    path.write_text("a2c:\n  CartPole-v1:\n    n_envs: 8\n")
    assert bench.baseline_entries(path) == {"a2c": {"CartPole-v1": {"n_envs": 8}}}


def test_validated_on_set_is_kept_apart_from_the_tuned_on_set_and_labelled_in_the_report(tmp_path: Path) -> None:
    import json

    bench = load_script("bench_rl")
    assert not set(bench.TUNED_ON) & set(bench.VALIDATED_ON)
    runs = [record("a2c", [500.0] * 30), {**record("a2c", [-90.0] * 30), "env": "Acrobot-v1"}]
    (tmp_path / "runs.jsonl").write_text("\n".join(json.dumps(r) for r in runs))
    assert bench.main(["--report", "--out", str(tmp_path), "--set", "validated"]) == 0
    table = (tmp_path / "results.md").read_text()
    assert "Acrobot-v1, validated on" in table and "CartPole-v1" not in table
    assert bench.main(["--report", "--out", str(tmp_path)]) == 0  # the tuned-on set by default
    table = (tmp_path / "results.md").read_text()
    assert "CartPole-v1" in table and "Acrobot-v1" not in table


def test_untuned_probe_is_apart_from_both_sets_and_an_env_without_threshold_reports_returns_only(
    tmp_path: Path,
) -> None:
    import json

    bench = load_script("bench_rl")
    assert not set(bench.UNTUNED) & (set(bench.TUNED_ON) | set(bench.VALIDATED_ON))
    assert bench.summarize({**record("a2c", [500.0] * 30), "env": "Humanoid-v5"}, None)["reached"] is None
    runs = [
        {**record(algo, [ret] * 30), "env": "Humanoid-v5", "steps": 200_000}
        for algo, ret in (("acktr_ekfac", 560.0), ("a2c", 170.0))
    ] + [{**record("a2c", [-100.0] * 30), "env": "MountainCar-v0", "steps": 200_000}]
    (tmp_path / "runs.jsonl").write_text("\n".join(json.dumps(r) for r in runs))
    assert bench.main(["--report", "--out", str(tmp_path), "--set", "untuned"]) == 0
    rows = (tmp_path / "results.md").read_text().splitlines()
    humanoid = next(row for row in rows if row.startswith("| Humanoid-v5") and "acktr_ekfac" in row)
    # No threshold: no steps and no steps ratio, but the returns and the throughput ratio.
    assert humanoid.startswith("| Humanoid-v5, untuned (200,000 steps) | acktr_ekfac | no threshold | 560 | ")
    assert humanoid.endswith("|  | 1.00 |")
    car = next(row for row in rows if row.startswith("| MountainCar-v0"))
    assert "(≥-110, 200,000 steps) | a2c | 10,000 (1/1) |" in car  # gymnasium's reward_threshold for the env
    assert (tmp_path / "curves.png").stat().st_size > 5_000


@pytest.mark.parametrize(
    ("argv", "hide_sb3_contrib", "expected"),
    [
        # Every missing pair is named (ACKTR's runs take configs/acktr.yml; TRPO has a Walker2d-v5 entry).
        (
            ["--envs", "Walker2d-v5", "InvertedDoublePendulum-v5", "--algos", "trpo", "a2c_kron", "acktr_ekfac"],
            False,
            "no rl-zoo entry for trpo on InvertedDoublePendulum-v5, a2c_kron on Walker2d-v5, a2c_kron on "
            "InvertedDoublePendulum-v5:",
        ),
        (["--envs", "CartPole-v1", "--algos", "a2c", "trpo"], True, "pip install sb3-contrib"),
        (["--envs", "CartPole-v1", "--algos", "a2c", "trpo", "--defaults", "1"], True, "pip install sb3-contrib"),
    ],
)
def test_a_run_that_cannot_start_is_refused_before_any_run_starts(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    argv: list[str],
    hide_sb3_contrib: bool,
    expected: str,
) -> None:
    bench = load_script("bench_rl")
    started: list[tuple] = []
    monkeypatch.setattr(bench, "run_one", lambda *job: started.append(job))
    if hide_sb3_contrib:
        monkeypatch.setitem(sys.modules, "sb3_contrib", None)  # as if it were not installed
    with pytest.raises(SystemExit):
        bench.main([*argv, "--out", str(tmp_path)])
    assert expected in capsys.readouterr().err
    assert not started and not (tmp_path / "runs.jsonl").exists()


def test_progress_line_of_an_env_without_a_threshold_gives_its_returns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    bench = load_script("bench_rl")
    monkeypatch.setattr(bench, "ProcessPoolExecutor", ThreadPoolExecutor)  # the loaded script cannot be pickled
    monkeypatch.setattr(
        bench, "run_one", lambda algo, env, seed, *rest: {**record(algo, [560.0] * 30), "env": env, "seed": seed}
    )
    argv = ["--envs", "Humanoid-v5", "--algos", "acktr_ekfac", "--seeds", "0", "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    assert "[1/1] Humanoid-v5 acktr_ekfac seed 0: no threshold, final 560.0" in capsys.readouterr().out
