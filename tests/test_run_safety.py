"""scripts/train.py and scripts/evaluate.py under faults and bad input: nothing overwritten, nothing mixed,
every failure a message naming the flag, value or file (docs/FAILURE_BEHAVIOUR.md)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from agents.acktr import ACKTR
from agents.rl_checkpoint import (
    CorruptedFileError,
    checkpoint_folders,
    latest_checkpoint,
    load_checkpoint,
    prune_tensorboard,
    read_meta,
)
from agents.rl_config import validate_config
from agents.run_folder import RunFolderError, RunLock, atomic_folder, temporary_path
from envs import make_env

from .test_train_script import load_script

pytestmark = pytest.mark.usefixtures("one_torch_thread")
# CartPole-v1 with configs/acktr.yml: 8 envs x 20 steps = 160 environment steps per update, VecNormalize on.
SHORT = ["--total-timesteps", "320", "--checkpoint-every", "160"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 320-step ACKTR run on CartPole-v1; tests work on copies of it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("finished") / "run"
    load_script("train").main([*SHORT, "--log-dir", str(run)])
    torch.set_num_threads(threads)
    return run


@pytest.fixture
def run_copy(finished_run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file of a folder and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def tensorboard_steps(run: Path, tag: str = "rollout/ep_rew_mean") -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = []
    for folder in sorted({p.parent for p in (run / "tb").rglob("events.out.tfevents.*")}):
        accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0})
        accumulator.Reload()
        steps += [event.step for event in accumulator.Scalars(tag)]
    return sorted(steps)


# --- a new run never overwrites ------------------------------------------------------------------------------
def test_new_run_in_an_existing_run_folder_refuses_naming_resume_and_a_fresh_log_dir(run_copy: Path) -> None:
    before = snapshot(run_copy)
    with pytest.raises(RunFolderError, match=r"already holds a run.*--resume.*fresh --log-dir"):
        load_script("train").main([*SHORT, "--log-dir", str(run_copy)])
    assert snapshot(run_copy) == before


def test_train_script_reports_refusals_as_one_line_without_a_traceback(run_copy: Path) -> None:
    script = Path(__file__).resolve().parents[1] / "scripts" / "train.py"
    done = subprocess.run(
        [sys.executable, str(script), "--log-dir", str(run_copy)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith("error: ") and "--resume" in done.stderr


# --- --resume checks the folder's run before anything is written ---------------------------------------------
@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--env", "Pendulum-v1"], "env 'Pendulum-v1'"),
        (["--preconditioner", "kfac"], "preconditioner 'kfac'"),
        (["--algo", "a2c"], "algo 'a2c'"),
        (["--seed", "3"], "seed 3"),
    ],
)
def test_resume_with_another_env_preconditioner_algo_or_seed_refuses_before_touching_any_file(
    run_copy: Path, flags: list[str], named: str
) -> None:
    before = snapshot(run_copy)
    with pytest.raises(RunFolderError, match=rf"cannot continue with another {named} \(the run has"):
        load_script("train").main(["--log-dir", str(run_copy), "--resume", "--total-timesteps", "480", *flags])
    assert snapshot(run_copy) == before


def test_resume_without_flags_continues_with_the_folders_env_algo_and_seed(run_copy: Path) -> None:
    result = load_script("train").main(["--log-dir", str(run_copy), "--resume", "--total-timesteps", "480"])
    assert result["timesteps"] == 480 and result["env"] == "CartPole-v1" and result["algo"] == "acktr"
    assert len((run_copy / "command.txt").read_text().splitlines()) == 2, "the commands of both sessions"


# --- one process per folder ----------------------------------------------------------------------------------
def test_second_concurrent_run_refuses_naming_the_first_runs_pid(run_copy: Path) -> None:
    before = snapshot(run_copy)
    with RunLock(run_copy), pytest.raises(RunFolderError, match=rf"in use by another run \(PID {os.getpid()}\)"):
        load_script("train").main(["--log-dir", str(run_copy), "--resume", "--total-timesteps", "480"])
    assert snapshot(run_copy) == before


def test_lock_left_by_a_dead_process_is_taken_over(run_copy: Path, capsys: pytest.CaptureFixture) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run_copy / ".lock").write_text(f"{dead.pid}\n")
    result = load_script("train").main(["--log-dir", str(run_copy), "--resume", "--total-timesteps", "480"])
    assert result["timesteps"] == 480
    assert f"left by PID {dead.pid}" in capsys.readouterr().out
    assert not (run_copy / ".lock").exists()


def test_lock_in_a_second_process_refuses_while_the_first_holds_it(tmp_path: Path) -> None:
    code = "import sys; from agents.run_folder import RunLock; RunLock(sys.argv[1]).acquire()"
    with RunLock(tmp_path):
        done = subprocess.run(
            [sys.executable, "-c", code, str(tmp_path)],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parents[1],
            timeout=60,
        )
    assert done.returncode != 0 and f"PID {os.getpid()}" in done.stderr
    with RunLock(tmp_path):  # released: free again
        pass


def test_temporary_files_and_folders_have_unique_names_and_vanish_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "model.zip"
    names = {temporary_path(target).name for _ in range(20)}
    assert len(names) == 20 and all(str(os.getpid()) in name for name in names)
    with pytest.raises(RuntimeError), atomic_folder(tmp_path / "checkpoint-1") as folder:
        (folder / "model.zip").write_bytes(b"half")
        raise RuntimeError("killed mid-save")
    assert list(tmp_path.iterdir()) == []


# --- checkpoints: one atomic unit, between updates, resumed exactly where the env allows ---------------------
def test_checkpoint_is_one_folder_holding_model_statistics_rng_and_env_state_of_one_step(finished_run: Path) -> None:
    folders = checkpoint_folders(finished_run)
    assert [steps for steps, _ in folders] == [320], "older checkpoints are removed once a newer one is in place"
    folder = folders[0][1]
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "model.zip", "state.pkl", "vecnormalize.pkl"]
    meta = read_meta(folder)
    assert meta["steps"] == 320 and meta["vecnormalize"] and meta["env_state"] and meta["env"] == "CartPole-v1"
    model, env, exact = load_checkpoint(
        folder, ACKTR, make_env("CartPole-v1", n_envs=8, normalize=True), device="cpu", tensorboard_log=None
    )
    assert exact and model.num_timesteps == 320 and env.obs_rms.count > 320


def test_failed_checkpoint_save_leaves_the_previous_checkpoint_and_no_partial_folder(
    run_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stable_baselines3.common.vec_env import VecNormalize

    def killed(self: VecNormalize, path: str) -> None:
        raise KeyboardInterrupt  # the run dies between the model and the statistics

    monkeypatch.setattr(VecNormalize, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        load_script("train").main(["--log-dir", str(run_copy), "--resume", "--total-timesteps", "480"])
    assert [p.name for p in run_copy.iterdir() if "checkpoint" in p.name] == ["checkpoint-000000000320"]
    assert not list(run_copy.glob(".*tmp*")) and not (run_copy / ".lock").exists()


def test_checkpoint_whose_model_and_meta_disagree_on_the_step_is_refused(run_copy: Path) -> None:
    folder = latest_checkpoint(run_copy)
    meta = (folder / "meta.json").read_text().replace('"steps": 320', '"steps": 160')
    (folder / "meta.json").write_text(meta)
    with pytest.raises(CorruptedFileError, match=r"model.zip is at step 320 but meta.json says 160"):
        load_script("train").main(["--log-dir", str(run_copy), "--resume", "--total-timesteps", "480"])


def test_resumed_run_ends_with_the_same_parameters_as_an_uninterrupted_one(run_copy: Path, tmp_path: Path) -> None:
    train = load_script("train")
    straight = train.main(["--total-timesteps", "640", "--log-dir", str(tmp_path / "straight")])
    resumed = train.main(["--log-dir", str(run_copy), "--resume", "--total-timesteps", "640"])
    assert resumed == {**straight}
    a = ACKTR.load(tmp_path / "straight" / "model.zip").policy.state_dict()
    b = ACKTR.load(run_copy / "model.zip").policy.state_dict()
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_tensorboard_after_a_resume_holds_each_step_once(run_copy: Path, tmp_path: Path) -> None:
    train = load_script("train")
    at_320 = tmp_path / "checkpoint-000000000320"
    shutil.copytree(latest_checkpoint(run_copy), at_320)
    train.main(["--log-dir", str(run_copy), "--resume", "--total-timesteps", "640"])
    # The run "crashed" after logging up to 640 with its last checkpoint at 320: put that one back.
    shutil.rmtree(latest_checkpoint(run_copy))
    shutil.copytree(at_320, run_copy / at_320.name)
    assert max(tensorboard_steps(run_copy)) == 640
    train.main(["--log-dir", str(run_copy), "--resume", "--total-timesteps", "800"])
    steps = tensorboard_steps(run_copy)
    assert steps == sorted(set(steps)) and steps[-1] == 800 and 480 in steps
    assert [p.name for p in (run_copy / "tb").iterdir()] == ["acktr_1"], "one TensorBoard folder across resumes"


def test_pruning_tensorboard_drops_a_record_cut_short_by_a_crash(run_copy: Path) -> None:
    events = next((run_copy / "tb").rglob("events.out.tfevents.*"))
    events.write_bytes(events.read_bytes() + b"\x10\x00\x00")
    prune_tensorboard(run_copy / "tb", 10**9)
    assert tensorboard_steps(run_copy) == [160, 320]


# --- bad input -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("gamma: 1.5", r"invalid gamma: 1.5 \(must be a finite number in \[0, 1\]\)"),
        ("damping: abc", r"invalid damping: 'abc' \(must be a number > 0\)"),
        ("n_envs: 2.5", r"invalid n_envs: 2.5 \(must be an integer >= 1\)"),
        ("learning_rate: lin_x", r"invalid learning_rate: 'lin_x'.*lin_<start>"),
        ("calibrate_kl: maybe", r"invalid calibrate_kl: 'maybe' \(must be true or false\)"),
        ("max_kl: .nan", r"invalid max_kl: nan"),
        ("kl_backtrack: 0.5", r"invalid kl_backtrack: 0.5 \(must be a finite number >= 1\)"),
        ("state_kl_bound: 0.5", r"invalid state_kl_bound: 0.5 \(must be a finite number >= 1\)"),
        ("preconditioner: shampoo", r"invalid preconditioner: 'shampoo' \(valid values: ekfac, kfac\)"),
        ("gamma: 0.9\n  gamma: 0.95", r"not valid YAML: the key 'gamma' is given twice in one mapping"),
        (
            "policy: MlpPolicyy",
            r"invalid policy: 'MlpPolicyy' \(valid values: CnnPolicy, .*MlpPolicy, MultiInputPolicy\)",
        ),
    ],
)
def test_config_value_of_wrong_type_or_out_of_range_names_the_key_and_the_file(
    tmp_path: Path, line: str, message: str
) -> None:
    config = tmp_path / "bad.yml"
    config.write_text(f"default:\n  {line}\n")
    with pytest.raises(ValueError, match=rf"bad\.yml: {message}"):
        load_script("train").main(["--config", str(config), "--log-dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists(), "nothing written for a refused config"


def test_config_numbers_written_as_strings_are_read_as_numbers() -> None:
    assert validate_config({"damping": "1e-3", "learning_rate": "lin_0.5"}, "x.yml") == {
        "damping": 1e-3,
        "learning_rate": "lin_0.5",
    }


def _with_garbage_policy(source: Path, target: Path) -> None:
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(target, "w") as damaged:
        for name in original.namelist():
            damaged.writestr(name, b"\x00garbage" if name == "policy.pth" else original.read(name))


def test_agent_zip_with_a_garbage_policy_pth_is_reported_as_corrupted_naming_file_and_member(run_copy: Path) -> None:
    model = run_copy / "model.zip"
    _with_garbage_policy(model, run_copy / "damaged.zip")
    os.replace(run_copy / "damaged.zip", model)
    with pytest.raises(CorruptedFileError, match=r"model\.zip is corrupted: its member policy\.pth") as caught:
        load_script("evaluate").main(["--run", str(run_copy), "--episodes", "1"])
    assert "weights_only" not in str(caught.value)
    checkpoint = latest_checkpoint(run_copy) / "model.zip"
    _with_garbage_policy(checkpoint, run_copy / "damaged.zip")
    os.replace(run_copy / "damaged.zip", checkpoint)
    with pytest.raises(CorruptedFileError, match=rf"{checkpoint.parent.name}/model\.zip is corrupted"):
        load_script("train").main(["--log-dir", str(run_copy), "--resume", "--total-timesteps", "480"])


def test_evaluate_names_a_corrupted_statistics_file_and_an_agent_of_another_env(run_copy: Path) -> None:
    evaluate = load_script("evaluate")
    with pytest.raises(ValueError, match=r"model\.zip does not fit Pendulum-v1: .*give the --env it was trained on"):
        evaluate.main(["--run", str(run_copy), "--env", "Pendulum-v1", "--episodes", "1"])
    (run_copy / "vecnormalize.pkl").write_bytes(b"\x80\x04garbage")
    with pytest.raises(CorruptedFileError, match=r"vecnormalize\.pkl is corrupted"):
        evaluate.main(["--run", str(run_copy), "--episodes", "1"])


def test_evaluate_refuses_an_algo_that_is_not_the_runs_and_a_model_saved_by_another_algorithm(
    run_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    evaluate = load_script("evaluate")
    with pytest.raises(SystemExit):
        evaluate.main(["--run", str(run_copy), "--algo", "ppo", "--episodes", "1"])
    assert "is a run of acktr, not ppo: leave --algo out" in capsys.readouterr().err
    model = str(run_copy / "model")  # the name as given to save(), without ".zip"
    with pytest.raises(
        ValueError, match=r"model\.zip holds an agent saved by ACKTR, not PPO: load it with ACKTR\.load"
    ):
        evaluate.main(["--model", model, "--env", "CartPole-v1", "--algo", "ppo", "--episodes", "1"])
    assert evaluate.main(["--model", model, "--env", "CartPole-v1", "--episodes", "1"])["mean_return"] > 0


def test_evaluate_uses_the_last_checkpoint_of_a_run_that_stopped_early(run_copy: Path) -> None:
    (run_copy / "model.zip").unlink()
    (run_copy / "vecnormalize.pkl").unlink()
    assert load_script("evaluate").main(["--run", str(run_copy), "--episodes", "1"])["mean_return"] > 0


def test_atari_id_while_ale_py_fails_to_import_says_so_and_why(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    import gymnasium as gym

    import envs

    real_import = builtins.__import__

    def failing_import(name: str, *args, **kwargs):
        if name == "ale_py":
            raise ImportError("libSDL2.so: cannot open shared object file")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", failing_import)
    monkeypatch.setattr(gym, "registry", {k: v for k, v in gym.registry.items() if not k.startswith("ALE/")})
    with pytest.raises(ValueError, match=r"ale_py package, which failed to import \(ImportError: libSDL2"):
        envs.env_kind("ALE/Pong-v5")
    with pytest.raises(ValueError, match="Did you mean: CartPole-v1"):  # other ids: the usual message
        envs.env_kind("CartPol-v1")


# --- a folder that stops accepting writes --------------------------------------------------------------------
def test_run_folder_made_read_only_mid_run_fails_at_next_write_and_last_checkpoint_stays_usable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    train = load_script("train")
    run = tmp_path / "run"
    original = train.save_checkpoint
    calls = []

    def read_only_after_first(model, run_dir: Path, identity: dict) -> Path:
        calls.append(model.num_timesteps)
        if model.num_timesteps > 160:  # as the kernel answers in a folder made read-only
            raise PermissionError(13, "Permission denied", str(run_dir / ".checkpoint-tmp"))
        return original(model, run_dir, identity)

    monkeypatch.setattr(train, "save_checkpoint", read_only_after_first)
    with pytest.raises(
        RunFolderError,
        match=r"cannot write to the run folder .*Permission denied.*checkpoint-000000000160 \(step 160\), is intact"
        r".*--resume",
    ):
        train.main(["--total-timesteps", "480", "--checkpoint-every", "160", "--log-dir", str(run)])
    assert calls == [0, 160, 320] and not (run / ".lock").exists()
    monkeypatch.setattr(train, "save_checkpoint", original)
    assert train.main(["--log-dir", str(run), "--resume", "--total-timesteps", "480"])["timesteps"] == 480


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_run_folder_made_read_only_for_real_fails_with_a_clear_message(run_copy: Path) -> None:
    run_copy.chmod(0o555)
    try:
        with pytest.raises(RunFolderError, match="cannot write to the run folder"):
            load_script("train").main(["--log-dir", str(run_copy), "--resume", "--total-timesteps", "480"])
    finally:
        run_copy.chmod(0o755)


def test_resume_removes_temporaries_of_a_killed_run_and_checks_the_saved_config(run_copy: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftover = run_copy / f".checkpoint-000000000480.tmp-{dead.pid}-abcd1234"
    leftover.mkdir()
    (leftover / "model.zip").write_bytes(b"half written")
    train = load_script("train")
    assert train.main(["--log-dir", str(run_copy), "--resume", "--total-timesteps", "480"])["timesteps"] == 480
    assert not leftover.exists()
    config = run_copy / "config.yml"
    config.write_text(config.read_text().replace("gamma: 0.99", "gamma: 1.5"))
    with pytest.raises(ValueError, match=r"config\.yml: invalid gamma: 1\.5"):
        train.main(["--log-dir", str(run_copy), "--resume", "--total-timesteps", "640"])
    config.write_text(config.read_text().replace("gamma: 1.5", "gamma: 0.99") + "learning_rat: 3\n")
    with pytest.raises(ValueError, match=r"config\.yml: unknown key\(s\) \['learning_rat'\]\. Valid keys: "):
        train.main(["--log-dir", str(run_copy), "--resume", "--total-timesteps", "640"])


def test_config_file_that_is_not_yaml_or_does_not_build_the_model_names_the_file_and_writes_nothing(
    tmp_path: Path,
) -> None:
    train = load_script("train")
    broken = tmp_path / "broken.yml"
    broken.write_text("default:\n  gamma: [0.9\n")
    with pytest.raises(ValueError, match=r"broken\.yml: not valid YAML"):
        train.main(["--config", str(broken), "--log-dir", str(tmp_path / "a")])
    odd = tmp_path / "odd.yml"
    odd.write_text("default:\n  policy_kwargs: {net_arch: abc}\n")
    with pytest.raises(ValueError, match=r"odd\.yml: these settings do not build ACKTR on CartPole-v1: TypeError"):
        train.main(["--config", str(odd), "--log-dir", str(tmp_path / "b")])
    assert not (tmp_path / "a").exists() and list((tmp_path / "b").iterdir()) == []


def test_run_killed_before_its_first_update_can_be_resumed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    train = load_script("train")
    run = tmp_path / "run"

    def killed(*args, **kwargs) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(ACKTR, "learn", killed)
    with pytest.raises(KeyboardInterrupt):
        train.main([*SHORT, "--log-dir", str(run)])
    monkeypatch.undo()
    assert "Interrupted. The last complete checkpoint, checkpoint-000000000000 (step 0)" in capsys.readouterr().err
    assert [steps for steps, _ in checkpoint_folders(run)] == [0]
    assert train.main(["--log-dir", str(run), "--resume", "--total-timesteps", "160"])["timesteps"] == 160


def test_resume_of_a_run_that_died_before_its_first_checkpoint_says_so(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yml").write_text("env: CartPole-v1\nalgo: acktr\nseed: 0\n")
    with pytest.raises(FileNotFoundError, match=r"stopped before its first checkpoint.*fresh --log-dir"):
        load_script("train").main(["--log-dir", str(run), "--resume"])


def test_normalize_advantage_returns_is_refused_for_sb3_algorithms_and_accepted_for_acktr() -> None:
    from stable_baselines3 import A2C

    from agents.acktr import ACKTR

    config = {"normalize_advantage": "returns"}
    assert validate_config(config, "x.yml", ACKTR) == config
    with pytest.raises(ValueError, match=r"x\.yml: invalid normalize_advantage: 'returns' \(ACKTR's option; A2C"):
        validate_config(config, "x.yml", A2C)
    for mode in ("running", "capped"):
        setting = {"normalize_advantage": mode}
        assert validate_config(setting, "x.yml", ACKTR) == setting
        with pytest.raises(ValueError, match=rf"x\.yml: invalid normalize_advantage: '{mode}' \(ACKTR's option; A2C"):
            validate_config(setting, "x.yml", A2C)
    with pytest.raises(ValueError, match="must be true, false, 'returns', 'running' or 'capped'"):
        validate_config({"normalize_advantage": "batch"}, "x.yml")


def test_auto_defaults_are_accepted_for_acktr_configs_and_refused_for_sb3_algorithms() -> None:
    from stable_baselines3 import PPO

    from agents.acktr import ACKTR

    config = {"n_steps": "auto", "gae_lambda": "auto", "max_kl": "auto"}
    assert validate_config(config, "x.yml", ACKTR) == config
    assert validate_config(config, "x.yml") == config
    with pytest.raises(ValueError, match=r"x\.yml: invalid n_steps: 'auto' \(ACKTR's option.*PPO takes a number"):
        validate_config({"n_steps": "auto"}, "x.yml", PPO)
    with pytest.raises(ValueError, match=r"invalid gamma: 'auto'"):
        validate_config({"gamma": "auto"}, "x.yml", ACKTR)


def test_ctrl_c_prints_how_to_resume_and_exits_130_without_a_traceback(tmp_path: Path) -> None:
    import signal
    import time

    from .test_train_script import ROOT

    run = tmp_path / "run"
    command = [
        sys.executable,
        str(ROOT / "scripts" / "train.py"),
        "--log-dir",
        str(run),
        "--total-timesteps",
        "10000000",
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (run / "config.yml").is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)  # the model is built and the folder written: training is under way
    time.sleep(1.0)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "Interrupted." in err and "--resume" in err
    assert "Traceback" not in err
