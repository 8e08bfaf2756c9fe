"""The one-line SB3 plug-in: A2C and PPO with the Kronecker-preconditioned policy."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from stable_baselines3 import A2C, PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env

import acktr_kfe
from agents.policies import KroneckerActorCriticPolicy, ValueTargetScale
from tests.shared_trunk import SHARED_TRUNK

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
@pytest.mark.parametrize("algo", [A2C, PPO])
def test_sb3_algorithm_trains_with_kronecker_policy(algo: type, env_id: str) -> None:
    env = make_vec_env(env_id, n_envs=2, seed=0)
    kwargs = {"n_steps": 16, "batch_size": 16, "n_epochs": 2} if algo is PPO else {"n_steps": 8}
    model = algo(KroneckerActorCriticPolicy, env, seed=0, **kwargs)  # SB3's own learning rate
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


def test_plugin_grafts_adams_step_length_and_acktr_takes_the_natural_step() -> None:
    import agents

    env = make_vec_env("CartPole-v1", n_envs=2, seed=0)
    plugin = A2C(KroneckerActorCriticPolicy, env, n_steps=8, seed=0)
    acktr = agents.ACKTR("MlpPolicy", env, n_steps=8, seed=0)
    assert plugin.policy.optimizer.step_norm is acktr_kfe.StepNorm.ADAM
    assert acktr.policy.optimizer.step_norm is acktr_kfe.StepNorm.NATURAL
    natural = A2C(
        KroneckerActorCriticPolicy, env, seed=0, policy_kwargs={"preconditioner_kwargs": {"step_norm": "natural"}}
    )
    assert natural.policy.optimizer.step_norm is acktr_kfe.StepNorm.NATURAL
    # Under SB3's learning rate (7e-4) a grafted step moves each layer by about Adam's step: far from nothing.
    before = [p.detach().clone() for p in plugin.policy.action_net.parameters()]
    plugin.learn(16)
    moved = max((p - p0).abs().max().item() for p0, p in zip(before, plugin.policy.action_net.parameters()))
    assert 1e-5 < moved < 1e-1


def test_kfac_and_invalid_preconditioner_names() -> None:
    env = make_vec_env("CartPole-v1", n_envs=1, seed=0)
    model = A2C(KroneckerActorCriticPolicy, env, policy_kwargs={"preconditioner": "kfac"})
    assert isinstance(model.policy.optimizer, acktr_kfe.KFAC)
    with pytest.raises(ValueError, match="Invalid preconditioner: 'adam'"):
        A2C(KroneckerActorCriticPolicy, env, policy_kwargs={"preconditioner": "adam"})


class _PolicyKLRecorder(BaseCallback):
    """The plug-in policy's measured KL of each update (A2C: one optimizer step per update)."""

    def __init__(self) -> None:
        super().__init__()
        self.kls: list[float] = []

    def _on_step(self) -> bool:
        return True

    def _on_rollout_start(self) -> None:
        value = self.model.policy.last_measured_kl
        if np.isfinite(value):
            self.kls.append(value)


def test_plugin_trust_region_keeps_measured_kl_near_max_kl_in_a2c() -> None:
    max_kl = 1e-3
    env = make_vec_env("CartPole-v1", n_envs=4, seed=0)
    # A learning rate far above A2C's (Adam-length steps of 0.25): the region, not the step length, bounds the KL.
    model = A2C(KroneckerActorCriticPolicy, env, learning_rate=0.25, seed=0, policy_kwargs={"max_kl": max_kl})
    policy = model.policy
    assert not policy.trust_regions.shared_layers and len(policy.trust_regions.regions) == 2
    recorder = _PolicyKLRecorder()
    model.learn(4000, callback=recorder)
    ratios = np.array(recorder.kls[len(recorder.kls) // 4 :]) / max_kl  # after the calibration warm-up
    assert len(ratios) > 100
    # A2C's raw advantages leave many steps inside the region (unclipped, below max_kl); none goes far beyond it.
    assert np.median(ratios) <= 1.5, ratios
    assert np.percentile(ratios, 90) <= 3.0, ratios
    assert policy.trust_regions.kl_bias != 1.0, "the calibration learned the model's bias"


def _radii(policy: KroneckerActorCriticPolicy) -> list[float | None]:
    optimizer = policy.optimizer
    return optimizer.trust_regions.radii(optimizer.param_groups[0])


@pytest.mark.parametrize("shared", [False, True])
def test_plugin_without_the_callback_warns_once_and_leaves_the_critics_region_off_until_returns_are_seen(
    shared: bool,
) -> None:
    """A radius in units of the returns' scale would bind at whatever scale the rewards have while that scale is
    unknown (SB3's A2C without ValueTargetScale): the region holding the critic is off (with shared layers the joint
    one, so nothing bounds the policy either until then); a separate policy's region is kept."""
    env = make_vec_env("CartPole-v1", n_envs=2, seed=0)
    kwargs = SHARED_TRUNK if shared else {}
    model = A2C(KroneckerActorCriticPolicy, env, n_steps=8, seed=0, policy_kwargs=kwargs)
    policy = model.policy
    assert policy.trust_regions.shared_layers is shared
    obs = torch.as_tensor(env.reset(), dtype=torch.float32)
    policy.set_training_mode(True)
    with pytest.warns(UserWarning, match=r"callback=ValueTargetScale\(\)"):
        policy.evaluate_actions(obs, torch.zeros(2))
    assert _radii(policy) == ([None] if shared else [pytest.approx(policy.max_kl), None])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        policy.evaluate_actions(obs, torch.zeros(2))  # warned once per policy
    assert not any("ValueTargetScale" in str(w.message) for w in caught)
    model.learn(16)  # without the callback: trains, critic unbounded
    assert all(torch.isfinite(p).all() for p in policy.parameters())
    model.learn(16, callback=ValueTargetScale())
    policy.evaluate_actions(obs, torch.zeros(2))
    expected = [policy.max_kl] if shared else [policy.max_kl, policy.vf_max_kl]
    # Both regions back, at their (calibrated) radii.
    assert all(r is not None and 0 < r <= 10 * target for r, target in zip(_radii(policy), expected))


def test_every_plugin_policy_without_the_callback_warns_once_even_when_trained_from_the_same_line() -> None:
    env = make_vec_env("CartPole-v1", n_envs=1, seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # Python's own: once per location
        for _ in range(2):
            A2C(KroneckerActorCriticPolicy, env, n_steps=4, seed=0).learn(8)
    messages = [w for w in caught if "ValueTargetScale" in str(w.message)]
    assert len(messages) == 2
    assert messages[0].filename.endswith("a2c.py"), "attributed to SB3's train, which called evaluate_actions"


def test_backtracking_leaves_the_critic_alone_while_its_region_is_off() -> None:
    env = make_vec_env("CartPole-v1", n_envs=2, seed=0)
    model = A2C(
        KroneckerActorCriticPolicy, env, n_steps=8, seed=0, learning_rate=0.05, policy_kwargs={"kl_backtrack": 1.0}
    )
    policy = model.policy
    seen: list[tuple[float, list[float]]] = []
    policy.optimizer.register_step_post_hook(
        lambda *_: seen.append((policy.last_measured_vf_kl, list(policy.last_backtrack_factors)))
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model.learn(64)
    # The critic's steps went past its radius in units of sigma = 1, and were kept as taken.
    assert max(kl for kl, _ in seen) > policy.vf_max_kl
    assert all(factors[1] == 1.0 for _, factors in seen)


def test_a_loaded_trained_plugin_knows_its_value_scale_and_does_not_warn(tmp_path) -> None:
    env = make_vec_env("CartPole-v1", n_envs=2, seed=0)
    model = A2C(KroneckerActorCriticPolicy, env, n_steps=8, seed=0)
    model.learn(16, callback=ValueTargetScale())
    model.save(tmp_path / "plugin")
    loaded = A2C.load(tmp_path / "plugin", env=env)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded.learn(16)
    assert not any("ValueTargetScale" in str(w.message) for w in caught)
    assert None not in _radii(loaded.policy)


def test_plugin_measures_every_ppo_minibatch_step_and_rejects_reserved_kwargs() -> None:
    env = make_vec_env("CartPole-v1", n_envs=2, seed=0)
    model = PPO(KroneckerActorCriticPolicy, env, n_steps=16, batch_size=8, n_epochs=2, learning_rate=0.1, seed=0)
    steps: list[float] = []
    model.policy.optimizer.register_step_post_hook(lambda *_: steps.append(model.policy.last_measured_kl))
    model.learn(32)
    assert len(steps) == model.policy.optimizer.steps == 8  # 2 epochs x 4 minibatches of one 32-step rollout
    assert all(np.isfinite(kl) and kl >= 0 for kl in steps)
    with pytest.raises(ValueError, match="may not set \\['max_kl'\\]"):
        A2C(KroneckerActorCriticPolicy, env, policy_kwargs={"preconditioner_kwargs": {"max_kl": 0.01}})


def test_plugin_policy_settings_survive_save_and_load(tmp_path) -> None:
    env = make_vec_env("CartPole-v1", n_envs=1, seed=0)
    kwargs = {"preconditioner": "kfac", "max_kl": 0.002, "vf_max_kl": None, "preconditioner_kwargs": {"damping": 0.05}}
    model = A2C(KroneckerActorCriticPolicy, env, n_steps=8, seed=0, policy_kwargs=kwargs)
    model.learn(16)
    model.save(tmp_path / "a2c")
    loaded = A2C.load(tmp_path / "a2c", env=env)
    policy = loaded.policy
    assert isinstance(policy.optimizer, acktr_kfe.KFAC)
    assert policy.trust_regions.targets == [0.002, None]
    assert policy.optimizer.param_groups[0]["damping"] == 0.05
    obs = env.reset()
    assert np.array_equal(model.predict(obs, deterministic=True)[0], loaded.predict(obs, deterministic=True)[0])
    # The KL calibration is saved with the parameters and restored into the trust regions.
    assert model.policy.trust_regions.log_bias[0] != 0.0
    assert policy.trust_regions.log_bias == pytest.approx(model.policy.trust_regions.log_bias)
    state = {k: v for k, v in model.policy.state_dict().items() if k != "kl_log_bias"}
    policy.load_state_dict(state)  # a policy saved before the calibration was: it starts afresh
    assert policy.trust_regions.log_bias == [0.0, 0.0]


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
def test_ief_output_grad_norms_equal_autograd_at_the_action_network_outputs(env_id: str) -> None:
    from agents.policies import ief_output_grad_norms

    env = make_vec_env(env_id, n_envs=1, seed=0)
    policy = A2C(KroneckerActorCriticPolicy, env, seed=0, policy_kwargs={"curvature": "ief"}).policy
    obs = torch.as_tensor(np.stack([env.observation_space.sample() for _ in range(5)]), dtype=torch.float32)
    features = policy.extract_features(obs)
    latent = policy.mlp_extractor.forward_actor(features if isinstance(features, torch.Tensor) else features[0])
    outputs = policy.action_net(latent).detach().requires_grad_(True)
    if env_id == "CartPole-v1":
        distribution = policy.action_dist.proba_distribution(action_logits=outputs)
    else:
        distribution = policy.action_dist.proba_distribution(outputs, policy.log_std)
    actions = distribution.sample().detach()
    (grad,) = torch.autograd.grad(-distribution.log_prob(actions).sum(), outputs)
    torch.testing.assert_close(ief_output_grad_norms(distribution, actions), grad.norm(dim=1))


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
@pytest.mark.parametrize("algorithm", ["acktr", "a2c"])
def test_ief_curvature_divides_each_examples_policy_gradient_by_its_norm(algorithm: str, env_id: str) -> None:
    import agents

    env = make_vec_env(env_id, n_envs=2, seed=0)
    if algorithm == "acktr":
        model = agents.ACKTR("MlpPolicy", env, n_steps=8, seed=0, curvature="ief", vf_fisher_coef=0.5)
    else:
        kwargs = {"curvature": "ief", "vf_fisher_coef": 0.5}
        model = A2C(KroneckerActorCriticPolicy, env, n_steps=8, seed=0, policy_kwargs=kwargs)
    model.learn(16)  # one update: the factors are that batch's statistics
    optimizer = model.policy.optimizer
    # One optimizer step per update, and for ACKTR with Box actions four more of the critic alone (no statistics).
    steps = model.n_critic_updates if algorithm == "acktr" else 1
    assert optimizer.curvature is acktr_kfe.Curvature.IEF and optimizer.steps == steps
    # Unit-norm output gradients at the action network: trace(G) = E ||g_n||^2 = 1. The critic's Gauss-Newton
    # output gradient is vf_fisher_coef per example, as with the Fisher.
    action_g = optimizer.state[model.policy.action_net.weight]["G"]
    value_g = optimizer.state[model.policy.value_net.weight]["G"]
    assert float(torch.trace(action_g)) == pytest.approx(1.0, rel=1e-5)
    assert float(torch.trace(value_g)) == pytest.approx(0.25, rel=1e-5)


def test_ief_curvature_pass_leaves_the_gradients_alone_and_bad_curvatures_are_refused() -> None:
    import agents

    env = make_vec_env("CartPole-v1", n_envs=2, seed=0)
    model = A2C(KroneckerActorCriticPolicy, env, n_steps=8, seed=0, policy_kwargs={"curvature": "ief"})
    policy = model.policy
    policy.set_training_mode(True)
    obs = torch.as_tensor(env.reset(), dtype=torch.float32)
    policy.evaluate_actions(obs, torch.zeros(2))
    assert all(p.grad is None for p in policy.parameters()), "the curvature pass does not touch .grad"
    assert policy.optimizer._capture.has_records()
    with pytest.raises(ValueError, match=r"Invalid curvature: 'empirical'\. Valid values: fisher, ief"):
        agents.ACKTR("MlpPolicy", env, curvature="empirical")
    with pytest.raises(ValueError, match="Invalid curvature: 'gn'"):
        A2C(KroneckerActorCriticPolicy, env, policy_kwargs={"curvature": "gn"})


def test_linear_schedule_past_the_last_rollout_gives_zero_learning_rate_not_an_error() -> None:
    from agents.policies import NonNegativeProgress, ValueTargetScale

    env = make_vec_env("CartPole-v1", n_envs=1, seed=0)
    # 40 steps of rollouts for a 30-step run: SB3's progress remaining ends at 1 - 40 / 30 < 0.
    model = A2C(KroneckerActorCriticPolicy, env, n_steps=20, seed=0, learning_rate=lambda progress: 0.25 * progress)
    model.learn(30, callback=ValueTargetScale())
    assert model.num_timesteps == 40 and model._current_progress_remaining < 0
    assert model.policy.optimizer.param_groups[0]["lr"] == 0.0
    model.learn(30, callback=ValueTargetScale())  # a second learn wraps the schedule once, not twice
    assert isinstance(model.lr_schedule, NonNegativeProgress)
    assert not isinstance(model.lr_schedule.schedule, NonNegativeProgress)


def test_schedule_past_the_last_rollout_without_the_callback_warns_and_steps_at_zero_instead_of_raising() -> None:
    env = make_vec_env("CartPole-v1", n_envs=1, seed=0)
    model = A2C(KroneckerActorCriticPolicy, env, n_steps=20, seed=0, learning_rate=lambda progress: 0.25 * progress)
    before = [p.detach().clone() for p in model.policy.parameters()]
    with pytest.warns(RuntimeWarning, match="schedule went past the end of the run"):
        model.learn(30)  # the last rollout overshoots: progress 1 - 40 / 30 < 0
    assert model.policy.optimizer.param_groups[0]["lr"] == 0.0
    assert model.policy.optimizer.steps == 2
    assert any(not torch.equal(b, p) for b, p in zip(before, model.policy.parameters()))


def test_schedule_negative_from_the_first_update_is_refused_with_its_value() -> None:
    env = make_vec_env("CartPole-v1", n_envs=1, seed=0)
    # Valid when the policy is built (progress 1), negative at the first update (progress 1 - 20 / 20 = 0).
    model = A2C(KroneckerActorCriticPolicy, env, n_steps=20, seed=0, learning_rate=lambda progress: progress - 0.5)
    with pytest.raises(ValueError, match=r"Invalid learning rate: -0\.5 \(must be a finite float >= 0\)"):
        model.learn(20)
