"""Environment factories: Atari preprocessing, MuJoCo normalization, classic control, unknown ids."""

from __future__ import annotations

import numpy as np
import pytest
from stable_baselines3.common.vec_env import VecFrameStack, VecNormalize

from envs import EVAL_SEED_OFFSET, env_kind, evaluation_env, make_env


def test_unknown_env_id_names_close_matches() -> None:
    with pytest.raises(ValueError, match=r"Unknown environment id: 'CartPol-v1'\. Did you mean: CartPole-v1"):
        make_env("CartPol-v1")
    with pytest.raises(ValueError, match=r"ALE/Pong-v5"):
        make_env("ALE/Pongg-v5")
    with pytest.raises(ValueError, match="Invalid n_envs: 0"):
        make_env("CartPole-v1", n_envs=0)


def test_registered_id_that_cannot_be_built_here_is_refused_with_its_reason() -> None:
    # gymnasium registers the MuJoCo v2 / v3 ids, whose mujoco-py bindings are gone: an ImportError at make time.
    with pytest.raises(ValueError, match=r"Cannot make 'Hopper-v2': .*gymnasium-robotics"):
        make_env("Hopper-v2")


@pytest.mark.parametrize("n_envs", [True, 0, 2.0, "2"])
def test_env_count_must_be_a_positive_integer_and_not_a_bool(n_envs: object) -> None:
    with pytest.raises(ValueError, match=rf"Invalid n_envs: {n_envs!r} \(must be an integer >= 1\)"):
        make_env("CartPole-v1", n_envs=n_envs)


def test_env_count_may_be_a_numpy_integer_read_from_a_config() -> None:
    env = make_env("CartPole-v1", n_envs=np.int64(2), seed=0)
    assert env.num_envs == 2
    env.close()


@pytest.mark.parametrize(
    ("env_id", "kind"), [("CartPole-v1", "classic"), ("HalfCheetah-v5", "mujoco"), ("ALE/Pong-v5", "atari")]
)
def test_env_kind_recognizes_families(env_id: str, kind: str) -> None:
    assert env_kind(env_id) == kind


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_atari_env_has_deepmind_preprocessing_and_true_scores_for_evaluation() -> None:
    env = make_env("ALE/Pong-v5", n_envs=2, seed=0)
    assert isinstance(env, VecFrameStack)
    observations = env.reset()
    assert observations.shape == (2, 84, 84, 4) and observations.dtype == np.uint8
    observations, rewards, _, _ = env.step(np.zeros(2, dtype=np.int64))
    assert set(np.unique(rewards)) <= {-1.0, 0.0, 1.0}
    ale = env.venv.envs[0].unwrapped
    assert ale._frameskip == 1, "the ALE must not skip frames: AtariWrapper skips 4 with max-pooling"
    evaluation = make_env("ALE/Pong-v5", n_envs=1, seed=0, training=False)
    wrappers = repr(evaluation.venv.envs[0])
    assert "EpisodicLifeEnv" not in wrappers and "ClipRewardEnv" not in wrappers
    env.close()
    evaluation.close()


def test_frame_stack_for_an_env_that_is_not_atari_is_refused_naming_the_env() -> None:
    with pytest.raises(
        ValueError, match=r"frame_stack=4 applies to Atari envs \(ALE/\.\.\.\) only; CartPole-v1 is classic"
    ):
        make_env("CartPole-v1", n_envs=1, frame_stack=4)
    assert make_env("CartPole-v1", n_envs=1).observation_space.shape == (4,)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_mujoco_env_is_normalized_and_statistics_round_trip(tmp_path) -> None:
    env = make_env("HalfCheetah-v5", n_envs=2, seed=0)
    assert isinstance(env, VecNormalize) and env.training and env.norm_reward
    env.reset()
    for _ in range(5):
        env.step(np.zeros((2, 6), dtype=np.float32))
    env.save(str(tmp_path / "vecnormalize.pkl"))
    evaluation = VecNormalize.load(str(tmp_path / "vecnormalize.pkl"), make_env("HalfCheetah-v5", normalize=False))
    np.testing.assert_allclose(evaluation.obs_rms.mean, env.obs_rms.mean)
    frozen = make_env("HalfCheetah-v5", training=False)
    assert isinstance(frozen, VecNormalize) and not frozen.training and not frozen.norm_reward


def test_normalize_may_ask_for_rewards_only_and_rejects_unknown_options() -> None:
    env = make_env("CartPole-v1", n_envs=2, seed=0, normalize={"norm_obs": False})
    assert isinstance(env, VecNormalize) and env.norm_reward and not env.norm_obs
    assert not isinstance(make_env("CartPole-v1", normalize={"norm_obs": False, "norm_reward": False}), VecNormalize)
    with pytest.raises(ValueError, match=r"Invalid normalize keys \[.clip_obs.\]: allowed are norm_obs"):
        make_env("CartPole-v1", normalize={"clip_obs": 5.0})
    with pytest.raises(ValueError, match="Invalid normalize: 'yes'"):
        make_env("CartPole-v1", normalize="yes")


def test_reward_normalization_discounts_with_the_algorithms_gamma() -> None:
    """VecNormalize divides rewards by the spread of returns discounted with the agent's gamma (as rl-zoo does):
    a config's ``gamma`` reaches it through ``env_options``, and a bad value is refused before any env is built."""
    from agents.rl_config import env_options

    options = env_options({"normalize": True, "gamma": 0.9999, "learning_rate": 0.25})
    assert options == {"normalize": True, "gamma": 0.9999}
    env = make_env("CartPole-v1", n_envs=2, seed=0, **options)
    assert isinstance(env, VecNormalize) and env.gamma == 0.9999
    env.reset()
    rewards = [env.step(np.zeros(2, dtype=np.int64))[1] for _ in range(3)]
    # CartPole pays 1 per step: the running discounted return after three steps is 1 + g + g^2.
    np.testing.assert_allclose(env.returns, [1 + 0.9999 + 0.9999**2] * 2, rtol=1e-6)
    assert all(np.isfinite(r).all() for r in rewards)
    assert make_env("CartPole-v1", normalize=True).gamma == 0.99
    with pytest.raises(ValueError, match=r"Invalid gamma: 1.5 \(must be a float in \[0, 1\]\)"):
        make_env("CartPole-v1", normalize=True, gamma=1.5)


def test_evaluation_env_takes_the_training_runs_frozen_observation_statistics_and_gives_raw_rewards() -> None:
    train = make_env("Hopper-v5", n_envs=1, seed=0)
    train.reset()
    for _ in range(20):
        train.step(np.zeros((1, 3), dtype=np.float32))
    evaluation = evaluation_env("Hopper-v5", EVAL_SEED_OFFSET, train)
    assert isinstance(evaluation, VecNormalize) and evaluation.obs_rms is train.obs_rms
    assert not evaluation.training and not evaluation.norm_reward
    raw = evaluation_env("Hopper-v5", EVAL_SEED_OFFSET, train, normalize=False)  # the mujoco family's raw env
    assert not isinstance(raw, VecNormalize)
    for env in (train, evaluation, raw):
        env.close()
