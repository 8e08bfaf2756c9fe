"""The agents package's public surface: SB3-style exports, Dict observations, normalization layers."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3 import A2C
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.envs import SimpleMultiObsEnv
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor

import agents

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_algorithm_and_policies_import_from_the_package_as_sb3_exports_them() -> None:
    from agents import (
        ACKTR,
        KroneckerActorCriticCnnPolicy,
        KroneckerActorCriticPolicy,
        KroneckerMultiInputActorCriticPolicy,
    )

    assert ACKTR.__module__ == "agents.acktr"
    assert issubclass(KroneckerActorCriticCnnPolicy, KroneckerActorCriticPolicy)
    assert issubclass(KroneckerMultiInputActorCriticPolicy, KroneckerActorCriticPolicy)
    assert set(agents.__all__) <= set(dir(agents))
    with pytest.raises(AttributeError, match="no attribute 'PPO'"):
        agents.PPO  # noqa: B018


def _dict_env() -> gym.Env:
    return SimpleMultiObsEnv(random_start=False)


@pytest.mark.parametrize("algorithm", ["acktr", "a2c_plugin"])
def test_multi_input_policy_trains_on_dict_observations(algorithm: str) -> None:
    env = make_vec_env(_dict_env, n_envs=2, seed=0)
    if algorithm == "acktr":
        model = agents.ACKTR("MultiInputPolicy", env, n_steps=4, seed=0)
    else:
        model = A2C(agents.KroneckerMultiInputActorCriticPolicy, env, n_steps=4, seed=0)
    before = [p.detach().clone() for p in model.policy.parameters()]
    model.learn(16)
    assert model.policy.optimizer.steps == 2
    assert all(torch.isfinite(p).all() for p in model.policy.parameters())
    assert any(not torch.equal(p0, p) for p0, p in zip(before, model.policy.parameters()))
    actions, _ = model.predict(env.reset(), deterministic=True)
    assert np.asarray(actions).shape == (2,)


class _BatchNormExtractor(BaseFeaturesExtractor):
    """A features extractor with a BatchNorm layer (batch statistics in training mode)."""

    def __init__(self, observation_space: gym.spaces.Box, features_dim: int = 16) -> None:
        super().__init__(observation_space, features_dim)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(int(np.prod(observation_space.shape)), features_dim),
            torch.nn.BatchNorm1d(features_dim),
            torch.nn.ReLU(),
        )

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        return self.net(observations.flatten(1))


@pytest.mark.parametrize("algorithm", ["acktr", "a2c_plugin"])
def test_policy_with_batch_norm_builds_and_trains(algorithm: str) -> None:
    env = make_vec_env("CartPole-v1", n_envs=2, seed=0)
    policy_kwargs = {"features_extractor_class": _BatchNormExtractor}
    if algorithm == "acktr":
        model = agents.ACKTR("MlpPolicy", env, n_steps=4, seed=0, policy_kwargs=policy_kwargs)
    else:
        model = A2C(agents.KroneckerActorCriticPolicy, env, n_steps=4, seed=0, policy_kwargs=policy_kwargs)
    batch_norm = model.policy.features_extractor.net[1]
    assert batch_norm.num_batches_tracked == 0, "building the trust regions left the running statistics alone"
    model.learn(16)
    assert model.policy.optimizer.steps == 2
    assert batch_norm.num_batches_tracked > 0
    assert all(torch.isfinite(p).all() for p in model.policy.parameters())
