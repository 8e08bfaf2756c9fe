"""The one-line SB3 plug-in: A2C and PPO with the Kronecker-preconditioned policy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from stable_baselines3 import A2C, PPO
from stable_baselines3.common.env_util import make_vec_env

import acktr_kfe
from agents.policies import KroneckerActorCriticPolicy

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
@pytest.mark.parametrize("algo", [A2C, PPO])
def test_sb3_algorithm_trains_with_kronecker_policy(algo: type, env_id: str) -> None:
    env = make_vec_env(env_id, n_envs=2, seed=0)
    kwargs = {"n_steps": 16, "batch_size": 16, "n_epochs": 2} if algo is PPO else {"n_steps": 8}
    model = algo(KroneckerActorCriticPolicy, env, learning_rate=0.1, seed=0, **kwargs)
    assert isinstance(model.policy.optimizer, acktr_kfe.EKFAC)
    before = [p.detach().clone() for p in model.policy.parameters()]
    model.learn(64)
    optimizer = model.policy.optimizer
    assert optimizer.steps > 0 and optimizer.skipped_steps == 0
    assert "A" in optimizer.state[model.policy.action_net.weight], "the curvature pass recorded statistics"
    assert all(torch.isfinite(p).all() for p in model.policy.parameters())
    assert any(not torch.equal(p0, p) for p0, p in zip(before, model.policy.parameters()))
    actions, _ = model.predict(env.reset(), deterministic=True)
    assert np.asarray(actions).shape[0] == 2


def test_curvature_comes_from_sampled_actions_not_the_advantage_weighted_loss() -> None:
    env = make_vec_env("CartPole-v1", n_envs=2, seed=0)
    model = A2C(KroneckerActorCriticPolicy, env, n_steps=8, seed=0)
    policy = model.policy
    obs = torch.as_tensor(env.reset(), dtype=torch.float32)
    policy.set_training_mode(True)
    values, log_prob, _ = policy.evaluate_actions(obs, torch.zeros(2))
    records = policy.optimizer._capture._records
    assert records, "evaluate_actions in training recorded the Fisher pass"
    recorded = sum(len(r) for r in records.values())
    (values.sum() + log_prob.sum()).backward()  # the training loss's backward is not recorded
    assert sum(len(r) for r in records.values()) == recorded


def test_kfac_and_invalid_preconditioner_names() -> None:
    env = make_vec_env("CartPole-v1", n_envs=1, seed=0)
    model = A2C(KroneckerActorCriticPolicy, env, policy_kwargs={"preconditioner": "kfac"})
    assert isinstance(model.policy.optimizer, acktr_kfe.KFAC)
    with pytest.raises(ValueError, match="Invalid preconditioner: 'adam'"):
        A2C(KroneckerActorCriticPolicy, env, policy_kwargs={"preconditioner": "adam"})
