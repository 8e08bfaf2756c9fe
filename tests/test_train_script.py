"""scripts/train.py: run folder contents, --resume, config validation, SB3 algorithms with --preconditioner."""

from __future__ import annotations

import importlib.util
import inspect
import json
from pathlib import Path

import pytest
import torch
import yaml
from stable_baselines3 import PPO

from agents.acktr import ACKTR
from agents.policies import KroneckerActorCriticPolicy
from agents.rl_config import model_arguments, resolve_config

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def load_script(name: str):
    """Import scripts/<name>.py as a module."""
    spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_writes_run_folder_and_resume_continues_from_checkpoint(tmp_path: Path) -> None:
    train = load_script("train")
    run = tmp_path / "run"
    first = train.main(["--total-timesteps", "320", "--log-dir", str(run), "--checkpoint-every", "160"])
    for name in ("config.yml", "command.txt", "model.zip", "results.json"):
        assert (run / name).is_file(), name
    assert [p.name for p in run.glob("checkpoint-*")] == ["checkpoint-000000000320"], "only the newest checkpoint"
    assert any((run / "tb").iterdir()), "TensorBoard logs"
    assert first["timesteps"] == 320 and json.loads((run / "results.json").read_text())["algo"] == "acktr"
    assert not list(run.glob(".*tmp*")) and not (run / ".lock").exists(), "no temporary or lock files left behind"
    resumed = train.main(["--total-timesteps", "640", "--log-dir", str(run), "--resume"])
    assert resumed["timesteps"] == 640
    assert ACKTR.load(run / "model.zip").policy.optimizer.steps == 4


def test_classic_control_env_without_an_entry_runs_on_one_env_and_the_tuned_entries_keep_eight() -> None:
    config_path = ROOT / "configs" / "acktr.yml"
    for env_id in ("Acrobot-v1", "MountainCar-v0"):  # the classic family: ACKTR("MlpPolicy", env) on one env
        config = resolve_config(config_path, env_id, ACKTR)
        assert config["n_envs"] == 1 and not config.get("normalize"), env_id
        assert not {"n_steps", "max_kl", "gae_lambda"} & set(config), env_id  # left to the action space
    for env_id in ("CartPole-v1", "Pendulum-v1", "MountainCarContinuous-v0"):  # tuned with 8 envs
        assert resolve_config(config_path, env_id, ACKTR)["n_envs"] == 8, env_id


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_mujoco_run_trains_the_constructor_defaults_on_one_raw_env_and_resume_keeps_observation_statistics(
    tmp_path: Path,
) -> None:
    train = load_script("train")
    run = tmp_path / "cheetah"
    argv = ["--env", "HalfCheetah-v5", "--log-dir", str(run), "--checkpoint-every", "256"]
    first = train.main([*argv, "--total-timesteps", "512"])
    assert first["timesteps"] == 512
    assert not (run / "vecnormalize.pkl").exists(), "the mujoco family runs on the raw env"
    model = ACKTR.load(run / "model.zip")
    # ACKTR("MlpPolicy", env)'s Box defaults: one env, 128-step rollouts, GAE 0.95, radius 0.01, and four steps of
    # the critic alone after each joint step (4 updates, 20 optimizer steps).
    assert model.n_envs == 1 and model.n_steps == 128 and model.gae_lambda == 0.95 and model.max_kl == 0.01
    assert model.n_critic_updates == 5 and model.policy.optimizer.steps == 20 and not model.shared_layers
    assert int(model.policy.observation_count) == 512  # the policy's own observation statistics
    # The advantages' divisor is the constructor's default, through configs/acktr.yml's default section.
    default_mode = inspect.signature(ACKTR).parameters["normalize_advantage"].default
    assert model.normalize_advantage == default_mode == "capped"
    # The family anneals the step over the run: the rate falls linearly from 0.25 to 0.
    assert yaml.safe_load((run / "config.yml").read_text())["learning_rate"] == "lin_0.25"
    assert model.lr_schedule(1.0) == pytest.approx(0.25) and model.lr_schedule(0.5) == pytest.approx(0.125)
    resumed = train.main([*argv, "--total-timesteps", "1024", "--resume"])
    assert resumed["timesteps"] == 1024
    continued = ACKTR.load(run / "model.zip").policy
    assert continued.optimizer.steps == 40 and int(continued.observation_count) == 1024


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_mujoco_run_behind_vecnormalize_resumes_and_evaluates_with_its_normalization_statistics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stable_baselines3.common.vec_env import VecNormalize

    train = load_script("train")
    config = tmp_path / "acktr.yml"
    config.write_text("mujoco: {n_envs: 4, n_steps: 64, normalize: true, total_timesteps: 1000000}\n")
    run = tmp_path / "cheetah"
    argv = ["--log-dir", str(run), "--checkpoint-every", "256"]
    first = train.main([*argv, "--env", "HalfCheetah-v5", "--config", str(config), "--total-timesteps", "512"])
    assert first["timesteps"] == 512
    count = VecNormalize.load(str(run / "vecnormalize.pkl"), _dummy()).obs_rms.count
    assert count > 500  # statistics of every observation seen in training
    assert ACKTR.load(run / "model.zip").policy.optimizer.steps == 2 * 5  # two updates of five steps
    resumed = train.main([*argv, "--total-timesteps", "1024", "--resume"])  # the run's own config.yml
    assert resumed["timesteps"] == 1024
    continued = VecNormalize.load(str(run / "vecnormalize.pkl"), _dummy())
    assert continued.obs_rms.count > count + 500  # the resumed run kept updating the restored statistics

    # A folder written before the mujoco family ran raw: its config.yml has no normalize key, its statistics are
    # beside the model (or, when model.zip is missing, in the last checkpoint); evaluate.py normalizes either way.
    evaluate = load_script("evaluate")
    saved = yaml.safe_load((run / "config.yml").read_text())
    del saved["normalize"]
    (run / "config.yml").write_text(yaml.safe_dump(saved))
    made = _record_made_envs(evaluate, monkeypatch)
    for missing in ([], ["model.zip", "vecnormalize.pkl"]):
        for name in missing:
            (run / name).unlink()
        assert evaluate.main(["--run", str(run), "--episodes", "1"])["mean_return"] != 0
        assert isinstance(made[-1], VecNormalize), missing


def _record_made_envs(evaluate, monkeypatch: pytest.MonkeyPatch) -> list:
    """Make evaluate.py's module keep every env it builds (the last is the one it evaluates on)."""
    from envs import make_env

    made = []

    def recording_make_env(*args, **kwargs):
        made.append(make_env(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(evaluate, "make_env", recording_make_env)
    return made


def _dummy():
    """A raw HalfCheetah VecEnv to load saved VecNormalize statistics onto."""
    from envs import make_env

    return make_env("HalfCheetah-v5", normalize=False)


def test_resume_without_checkpoint_and_unknown_env_fail_clearly(tmp_path: Path) -> None:
    train = load_script("train")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train.main(["--log-dir", str(tmp_path / "empty"), "--resume"])
    with pytest.raises(ValueError, match="Did you mean: CartPole-v1"):
        train.main(["--env", "CartPol-v1", "--log-dir", str(tmp_path / "typo")])


def test_sb3_algorithm_runs_with_preconditioner_flag(tmp_path: Path) -> None:
    train = load_script("train")
    result = train.main(["--algo", "a2c", "--preconditioner", "ekfac", "--total-timesteps", "200",
                         "--log-dir", str(tmp_path / "a2c")])  # fmt: skip
    assert result["timesteps"] >= 200
    config = yaml.safe_load((tmp_path / "a2c" / "config.yml").read_text())
    assert config["policy"] == "KroneckerActorCriticPolicy"
    assert config["n_envs"] == 8 and config["ent_coef"] == 0.0  # rl-zoo's A2C entry (configs/baselines.yml)


def test_config_unknown_key_lists_valid_keys(tmp_path: Path) -> None:
    path = tmp_path / "bad.yml"
    path.write_text("default:\n  learning_rat: 0.1\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['learning_rat'\].*Valid keys: .*learning_rate"):
        resolve_config(path, "CartPole-v1", ACKTR)
    resolved = resolve_config(ROOT / "configs" / "acktr.yml", "CartPole-v1", ACKTR)
    assert resolved["total_timesteps"] == 100_000 and resolved["policy"] == "MlpPolicy"
    assert resolve_config(ROOT / "configs" / "acktr.yml", "ALE/Pong-v5", ACKTR)["policy"] == "CnnPolicy"


def test_config_file_with_no_settings_for_the_env_says_the_defaults_apply(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty.yml"
    empty.write_text("# nothing set yet\n")
    args = load_script("train").parse_args(["--config", str(empty), "--env", "CartPole-v1"])
    config = load_script("train").build_config(args, ACKTR)
    assert (
        "empty.yml sets nothing for CartPole-v1: ACKTR runs with its constructor's defaults" in capsys.readouterr().out
    )
    # One env, as configs/acktr.yml's default section: the constructor's defaults on one env.
    assert config == {"policy": "MlpPolicy", "n_envs": 1, "total_timesteps": 100_000, "eval_episodes": 10}


def test_config_section_that_is_no_env_id_nor_family_is_refused_with_the_closest_ids(tmp_path: Path) -> None:
    path = tmp_path / "typo.yml"
    path.write_text("default:\n  n_envs: 2\nCartpole-v1:\n  n_envs: 4\n")
    with pytest.raises(ValueError, match=r"section 'Cartpole-v1' is neither 'default', a family .*CartPole-v1"):
        resolve_config(path, "CartPole-v1", ACKTR)


def test_config_keyed_by_algorithm_gives_the_running_algorithms_section(tmp_path: Path) -> None:
    ppo = resolve_config(ROOT / "configs" / "baselines.yml", "CartPole-v1", PPO)
    assert ppo["n_steps"] == 32 and ppo["n_epochs"] == 20  # rl-zoo's PPO entry, not A2C's or TRPO's
    with pytest.raises(ValueError, match=r"settings for a2c, ppo, trpo, none for acktr"):
        resolve_config(ROOT / "configs" / "baselines.yml", "CartPole-v1", ACKTR)


def test_config_schedules_activations_and_policy_names_become_objects() -> None:
    policy, kwargs = model_arguments(
        {
            "policy": "KroneckerActorCriticPolicy",
            "n_envs": 4,
            "learning_rate": "lin_0.5",
            "policy_kwargs": {"activation_fn": "relu", "net_arch": [8]},
        }
    )
    assert policy is KroneckerActorCriticPolicy and "n_envs" not in kwargs
    assert kwargs["learning_rate"](1.0) == pytest.approx(0.5) and kwargs["learning_rate"](0.5) == pytest.approx(0.25)
    assert kwargs["policy_kwargs"] == {"activation_fn": torch.nn.ReLU, "net_arch": [8]}
    assert model_arguments({"learning_rate": 0.1})[0] == "MlpPolicy"
    with pytest.raises(ValueError, match=r"Invalid learning_rate: 'exp_0.1'.*lin_<start>"):
        model_arguments({"learning_rate": "exp_0.1"})
    with pytest.raises(ValueError, match=r"Invalid policy_kwargs.activation_fn: 'gelu'. Valid values: tanh, relu"):
        model_arguments({"policy_kwargs": {"activation_fn": "gelu"}})


def test_evaluate_and_plot_read_train_run_folders(tmp_path: Path) -> None:
    train, evaluate, plot = load_script("train"), load_script("evaluate"), load_script("plot")
    for seed in (0, 1):
        train.main(["--total-timesteps", "960", "--seed", str(seed), "--log-dir", str(tmp_path / f"s{seed}")])
    result = evaluate.main(["--run", str(tmp_path / "s0"), "--episodes", "3"])
    assert result["mean_return"] > 0
    counts = plot.main([str(tmp_path), "--out", str(tmp_path / "curves.png")])
    assert counts == {"ACKTR (EKFAC) on CartPole-v1": 2}
    assert (tmp_path / "curves.png").stat().st_size > 10_000


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("with_statistics", [False, True])
def test_evaluate_of_a_bare_model_normalizes_only_when_statistics_come_with_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, with_statistics: bool
) -> None:
    from stable_baselines3.common.vec_env import VecNormalize

    from envs import make_env

    evaluate = load_script("evaluate")
    training_env = make_env("Hopper-v5", normalize=with_statistics)
    ACKTR("MlpPolicy", training_env, n_steps=8, seed=0).save(tmp_path / "agent.zip")
    if with_statistics:
        training_env.save(str(tmp_path / "vecnormalize.pkl"))
    made = _record_made_envs(evaluate, monkeypatch)
    result = evaluate.main(["--model", str(tmp_path / "agent.zip"), "--env", "Hopper-v5", "--episodes", "1"])
    assert result["mean_return"] != 0
    # An agent trained on the raw env (scripts/train.py's mujoco family) must not see VecNormalize's clipping.
    assert isinstance(made[0], VecNormalize) is with_statistics


def test_evaluate_reports_missing_and_corrupted_agents(tmp_path: Path) -> None:
    evaluate = load_script("evaluate")
    with pytest.raises(FileNotFoundError, match="no saved agent"):
        evaluate.main(["--model", str(tmp_path / "none.zip"), "--env", "CartPole-v1"])
    broken = tmp_path / "broken.zip"
    broken.write_bytes(b"not a zip archive")
    with pytest.raises(ValueError, match=r"broken\.zip is corrupted: it is not a readable zip archive"):
        evaluate.main(["--model", str(broken), "--env", "CartPole-v1"])


def test_quickstart_rerun_writes_a_new_numbered_folder_and_leaves_the_earlier_run(tmp_path: Path) -> None:
    quickstart = load_script("quickstart")
    first = tmp_path / "quickstart"
    assert quickstart.fresh_folder(first) == first
    first.mkdir()
    (first / "loss.png").write_bytes(b"earlier run")
    second = quickstart.fresh_folder(first)
    assert second == tmp_path / "quickstart_2"
    second.mkdir()
    (second / "loss.png").write_bytes(b"second run")
    assert quickstart.fresh_folder(first) == tmp_path / "quickstart_3"
    assert (first / "loss.png").read_bytes() == b"earlier run"


def test_train_feeds_each_rollout_to_the_kronecker_policy_under_sb3_a2c(tmp_path: Path) -> None:
    from stable_baselines3 import A2C

    train = load_script("train")
    run = tmp_path / "a2c"
    train.main(["--algo", "a2c", "--preconditioner", "ekfac", "--total-timesteps", "200", "--log-dir", str(run)])
    model = A2C.load(run / "model.zip", device="cpu")
    assert isinstance(model.policy, KroneckerActorCriticPolicy)
    # ValueTargetScale ran: the value scale left 1 and the observation statistics were fed.
    assert float(model.policy.value_scale) != 1.0 and float(model.policy.observation_count) > 0


def test_threads_default_to_one_for_mlp_policies_and_torch_default_for_cnn_policies() -> None:
    train = load_script("train")
    assert train.default_threads({"policy": "MlpPolicy"}) == 1
    assert train.default_threads({}) == 1
    assert train.default_threads({"policy": "CnnPolicy"}) == train.TORCH_DEFAULT_THREADS


def test_default_run_folder_is_named_env_algo_seed_with_an_atari_ids_slash_replaced() -> None:
    train = load_script("train")
    assert train.default_run_dir(train.parse_args([])) == ROOT / "runs" / "CartPole-v1_acktr_seed0"
    args = train.parse_args(["--env", "ALE/Pong-v5", "--algo", "ppo", "--seed", "3"])
    assert train.default_run_dir(args) == ROOT / "runs" / "ALE_Pong-v5_ppo_seed3"


def test_negative_seed_is_refused_by_the_argument_parser(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        load_script("train").parse_args(["--seed", "-1"])
    assert "--seed must be >= 0, got -1" in capsys.readouterr().err


def test_plot_of_a_missing_folder_is_an_argument_error_naming_it(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        load_script("plot").main(["/no/such/runs", "--out", "unused.png"])
    assert "no such run folder: /no/such/runs" in capsys.readouterr().err


def test_a_budget_that_is_not_whole_rollouts_is_announced_with_the_step_the_run_ends_at(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = load_script("train").main(["--total-timesteps", "100", "--log-dir", str(tmp_path / "run")])
    assert "(a rollout is 20 steps x 8 envs: the run ends at 160 steps)" in capsys.readouterr().out
    assert result["timesteps"] == 160


def test_config_sections_are_not_checked_against_the_registry_while_ale_py_fails_to_import(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import envs

    # The older Atari ids (PongNoFrameskip-v4) come from ale_py too: unknown while it fails, not misspelt.
    monkeypatch.setattr(envs, "ale_import_error", lambda: "ImportError: no module named ale_py")
    path = tmp_path / "atari.yml"
    path.write_text("default:\n  n_envs: 2\nUnregisteredNoFrameskip-v4:\n  n_envs: 16\n")
    assert resolve_config(path, "CartPole-v1", ACKTR)["n_envs"] == 2
