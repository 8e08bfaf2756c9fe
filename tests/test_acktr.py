"""The ACKTR agent as an SB3 algorithm: action spaces, preconditioners, save/load, learning CartPole."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy

from agents.acktr import ACKTR

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("preconditioner", ["ekfac", "kfac"])
@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
def test_acktr_updates_discrete_and_gaussian_policies(env_id: str, preconditioner: str) -> None:
    env = make_vec_env(env_id, n_envs=2, seed=0)
    model = ACKTR("MlpPolicy", env, n_steps=8, preconditioner=preconditioner, seed=0)
    before = [p.detach().clone() for p in model.policy.parameters()]
    model.learn(64)
    assert model._n_updates == 4
    assert all(torch.isfinite(p).all() for p in model.policy.parameters())
    assert any(not torch.equal(p0, p) for p0, p in zip(before, model.policy.parameters()))
    logged = model.logger.name_to_value
    for key in ("train/kl_clip_scale", "train/predicted_kl", "train/measured_kl", "time/eigh_ms"):
        assert np.isfinite(logged[key]), key
    assert 0.0 < logged["train/kl_clip_scale"] <= 1.0
    if env_id == "Pendulum-v1":
        assert model.policy.optimizer._fisher_diagonals, "log_std must take its Fisher-diagonal step"


def test_acktr_save_and_load_give_same_actions(tmp_path: Path) -> None:
    env = make_vec_env("CartPole-v1", n_envs=2, seed=0)
    model = ACKTR("MlpPolicy", env, n_steps=8, seed=0)
    model.learn(64)
    model.save(tmp_path / "acktr")
    loaded = ACKTR.load(tmp_path / "acktr", env=env)
    observations = env.reset()
    for _ in range(5):
        actions, _ = model.predict(observations, deterministic=True)
        loaded_actions, _ = loaded.predict(observations, deterministic=True)
        np.testing.assert_array_equal(actions, loaded_actions)
        observations, *_ = env.step(actions)
    assert loaded.policy.optimizer.steps == model.policy.optimizer.steps
    assert loaded.policy.optimizer.state_dict()["kronecker"]["step"] == 4


def test_acktr_rejects_invalid_hyperparameters_before_building() -> None:
    with pytest.raises(ValueError, match=r"Invalid preconditioner: 'shampoo'\. Valid values: ekfac, kfac"):
        ACKTR("MlpPolicy", "CartPole-v1", preconditioner="shampoo")
    with pytest.raises(ValueError, match="Invalid damping: -1"):
        ACKTR("MlpPolicy", "CartPole-v1", damping=-1.0)


def test_acktr_solves_cartpole_within_budget() -> None:
    env = make_vec_env("CartPole-v1", n_envs=8, seed=0)
    model = ACKTR("MlpPolicy", env, seed=0)
    model.learn(30_000)
    mean_return, _ = evaluate_policy(model, make_vec_env("CartPole-v1", n_envs=4, seed=100), n_eval_episodes=20)
    assert mean_return >= 475.0


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_acktr_cnn_policy_with_shared_trunk_updates_on_atari() -> None:
    from envs import make_env

    env = make_env("ALE/Pong-v5", n_envs=2, seed=0)
    model = ACKTR("CnnPolicy", env, n_steps=5, seed=0)
    optimizer = model.policy.optimizer
    assert {"features_extractor.cnn.0", "features_extractor.linear.0", "action_net", "value_net"} <= set(
        optimizer.preconditioned_layers
    )
    trunk = model.policy.features_extractor.cnn[0].weight
    before = trunk.detach().clone()
    model.learn(20)
    assert model._n_updates == 2
    assert not torch.equal(before, trunk) and torch.isfinite(trunk).all()
    assert optimizer.state[trunk]["factor_updates"] == 2
    env.close()
