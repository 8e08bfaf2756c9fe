"""The agents package's public surface: SB3-style exports, Dict observations, normalization layers."""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.wrappers import TransformReward
from stable_baselines3 import A2C
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.envs import SimpleMultiObsEnv
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.common.utils import set_random_seed

import agents

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_algorithm_and_policies_import_from_the_package_as_sb3_exports_them() -> None:
    from agents import (
        ACKTR,
        KroneckerActorCriticCnnPolicy,
        KroneckerActorCriticPolicy,
        KroneckerMultiInputActorCriticPolicy,
        ValueTargetScale,
    )

    assert ACKTR.__module__ == "agents.acktr"
    assert issubclass(KroneckerActorCriticCnnPolicy, KroneckerActorCriticPolicy)
    assert issubclass(KroneckerMultiInputActorCriticPolicy, KroneckerActorCriticPolicy)
    assert ValueTargetScale.__module__ == "agents.policies"
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


# -- the critic's trust region is free of the reward's units ---------------------------------------------------------


class _TrustRegionRecorder(BaseCallback):
    """Per optimizer step (ACKTR's joint step and its critic's own steps alike): both regions' clip factors, the
    measured KLs and the value scale."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[float]] = []

    def _on_training_start(self) -> None:
        policy = self.model.policy
        policy.optimizer.register_step_post_hook(lambda *_: self._record(policy))

    def _record(self, policy: agents.KroneckerActorCriticPolicy) -> None:
        scales = policy.optimizer.last_kl_clip_scales.tolist()
        self.rows.append([*scales, policy.last_measured_kl, policy.last_measured_vf_kl, float(policy.value_scale)])

    def _on_step(self) -> bool:
        return True


def _scaled_reward_run(algorithm: str, env_id: str, reward_scale: float, steps: int) -> np.ndarray:
    env = make_vec_env(
        env_id,
        n_envs=4,
        seed=0,
        wrapper_class=TransformReward,
        wrapper_kwargs={"func": lambda reward: reward_scale * reward},
    )
    recorder = _TrustRegionRecorder()
    if algorithm == "acktr":  # the default, normalize_advantage="capped"
        agents.ACKTR("MlpPolicy", env, n_steps=8, seed=0).learn(steps, callback=recorder)
    elif algorithm == "acktr_batch_normalized":  # advantages normalized over the batch instead
        agents.ACKTR("MlpPolicy", env, n_steps=8, seed=0, normalize_advantage=True).learn(steps, callback=recorder)
    elif algorithm in ("acktr_running", "acktr_returns"):  # by their own running RMS, or the spread uncapped
        mode = algorithm.removeprefix("acktr_")
        model = agents.ACKTR("MlpPolicy", env, n_steps=8, seed=0, normalize_advantage=mode)
        model.learn(steps, callback=recorder)
    else:
        # A learning rate large enough that both regions bind (at A2C's own 7e-4 they rarely do this early).
        model = A2C(
            agents.KroneckerActorCriticPolicy, env, learning_rate=0.25, n_steps=8, normalize_advantage=True, seed=0
        )
        model.learn(steps, callback=[recorder, agents.ValueTargetScale()])
    return np.array(recorder.rows)


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
@pytest.mark.parametrize(
    "algorithm", ["acktr", "acktr_batch_normalized", "acktr_running", "acktr_returns", "a2c_plugin"]
)
def test_trust_region_scales_do_not_depend_on_the_reward_scale(algorithm: str, env_id: str) -> None:
    # 12 updates; 5 for ACKTR on Pendulum-v1, where it takes five optimizer steps per update (the joint step and
    # four of the critic's own), 25 steps in all.
    steps = 160 if env_id == "Pendulum-v1" and algorithm.startswith("acktr") else 384
    runs = {scale: _scaled_reward_run(algorithm, env_id, scale, steps=steps) for scale in (0.01, 1.0, 100.0)}
    reference = runs[1.0]
    assert len(reference) >= 10
    assert (reference[:, 0] < 1).any() and (reference[:, 1] < 1).any(), "both regions were active"
    for scale, rows in runs.items():
        # Clip factors and measured KLs (nats) agree; the value scale follows the rewards. They agree to float32's
        # 1e-7 at the first step, and training amplifies that roundoff (to at most 4e-4 by ACKTR's 25th step on
        # Pendulum-v1, 1e-3 by its 26th, a few percent by its 60th); a radius in reward units would be off by factors
        # of 100.
        np.testing.assert_allclose(rows[:, :4], reference[:, :4], rtol=1e-3, atol=1e-9)
        np.testing.assert_allclose(rows[:, 4], scale * reference[:, 4], rtol=1e-3)


# -- one actor-critic protocol -----------------------------------------------------------------------------------


def _collect_rollout(model: OnPolicyAlgorithm) -> None:
    _, callback = model._setup_learn(model.n_steps * model.n_envs)
    callback.on_training_start(locals(), globals())
    model.collect_rollouts(model.env, callback, model.rollout_buffer, n_rollout_steps=model.n_steps)


@pytest.mark.parametrize(("kl_backtrack", "state_kl_bound"), [(None, None), (1.0, None), (None, 1.0)])
@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
def test_acktr_update_equals_a2c_step_with_the_kronecker_policy_on_the_same_batch(
    env_id: str, kl_backtrack: float | None, state_kl_bound: float | None
) -> None:
    env = make_vec_env(env_id, n_envs=2, seed=0)
    # Batch-normalized advantages, which A2C also has (ACKTR's default divides them by the spread of the returns).
    # Momentum 0.9 (ACKTR's default is 0) so that the momentum buffers are compared too.
    acktr = agents.ACKTR(
        "MlpPolicy",
        env,
        n_steps=8,
        seed=0,
        ent_coef=0.01,
        vf_coef=0.5,
        normalize_advantage=True,
        momentum=0.9,
        n_critic_updates=1,  # the joint step alone (the Box default follows it with four steps of the critic)
        kl_backtrack=kl_backtrack,
        state_kl_bound=state_kl_bound,
    )
    a2c = A2C(
        agents.KroneckerActorCriticPolicy,
        env,
        learning_rate=acktr.learning_rate,
        n_steps=8,
        gae_lambda=acktr.gae_lambda,  # ACKTR's defaults for the action space (GAE and radius for Box actions)
        ent_coef=0.01,
        vf_coef=0.5,
        max_grad_norm=float("inf"),
        normalize_advantage=True,
        seed=0,
        # ACKTR's preconditioner takes the natural step; the policy's own default (for SB3's learning rates) grafts
        # Adam's step length, so the plug-in is told to take ACKTR's.
        policy_kwargs={
            **acktr.policy_kwargs,
            "max_kl": acktr.max_kl,
            "kl_backtrack": kl_backtrack,
            "state_kl_bound": state_kl_bound,
            "preconditioner_kwargs": {"step_norm": "natural", "momentum": acktr.momentum},
        },
    )
    a2c.policy.load_state_dict(acktr.policy.state_dict())
    backtracked, shrunk = [], []
    for _ in range(3):  # three updates: momentum, calibration and the value scale come into play
        _collect_rollout(acktr)
        a2c._setup_learn(1)
        a2c.rollout_buffer = acktr.rollout_buffer
        a2c.policy.observe_rollout(a2c.rollout_buffer)  # what ValueTargetScale does
        for model in (acktr, a2c):  # the same batch order and the same sampled actions in the curvature pass
            set_random_seed(1)
            model.train()
        for (name, p_acktr), p_a2c in zip(acktr.policy.named_parameters(), a2c.policy.parameters()):
            torch.testing.assert_close(p_acktr, p_a2c, rtol=0, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
        assert acktr.policy.last_backtrack_factors == pytest.approx(a2c.policy.last_backtrack_factors)
        backtracked += [factor < 1.0 for factor in acktr.policy.last_backtrack_factors]
        assert acktr.policy.last_state_kl_factor == pytest.approx(a2c.policy.last_state_kl_factor)
        shrunk.append(acktr.policy.last_state_kl_factor < 1.0)
    assert any(backtracked) == (kl_backtrack is not None)  # the backtracked steps are compared too
    assert any(shrunk) == (state_kl_bound is not None)  # and the steps shrunk at the states of earlier rollouts
    assert acktr.policy.trust_regions.log_bias == pytest.approx(a2c.policy.trust_regions.log_bias)
    assert float(acktr.policy.value_scale) == pytest.approx(float(a2c.policy.value_scale))


def _assert_same_state(actual: object, expected: object, where: str = "state") -> None:
    """Nested dicts and lists of tensors and plain values are equal (tensors exactly)."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and actual.keys() == expected.keys(), where
        for key in expected:
            _assert_same_state(actual[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert isinstance(actual, (list, tuple)) and len(actual) == len(expected), where
        for index, (a, e) in enumerate(zip(actual, expected)):
            _assert_same_state(a, e, f"{where}[{index}]")
    elif isinstance(expected, torch.Tensor):
        assert torch.equal(actual, expected), where
    else:
        assert actual == expected, where


def _policy_state(model: OnPolicyAlgorithm) -> dict[str, object]:
    policy = model.policy
    return {
        "log_bias": list(policy.trust_regions.log_bias),
        "value_scale": float(policy.value_scale),
        "value_target_moments": policy.value_target_moments.tolist(),
        "value_target_stats": policy.value_target_stats.tolist(),
        "advantage_moments": policy.advantage_moments.tolist(),
        "episode_end_moments": policy.episode_end_moments.tolist(),
        "optimizer": policy.optimizer.state_dict(),
    }


@pytest.mark.parametrize("algorithm", ["acktr", "a2c_plugin"])
def test_save_and_load_round_trip_calibration_value_scale_and_statistics(algorithm: str, tmp_path: Path) -> None:
    # A 50-step time limit, so that episodes end within the run.
    env = make_vec_env("Pendulum-v1", n_envs=2, seed=0, env_kwargs={"max_episode_steps": 50})
    if algorithm == "acktr":
        model = agents.ACKTR("MlpPolicy", env, n_steps=8, seed=0)
        model.learn(160)
        assert model.policy.episode_end_moments.tolist()[1] > 0
        cls: type[OnPolicyAlgorithm] = agents.ACKTR
    else:
        model = A2C(agents.KroneckerActorCriticPolicy, env, n_steps=8, seed=0)
        model.learn(160, callback=agents.ValueTargetScale())
        cls = A2C
    model.save(tmp_path / "model")
    loaded = cls.load(tmp_path / "model", env=env)
    saved, restored = _policy_state(model), _policy_state(loaded)
    assert saved["log_bias"] != [0.0, 0.0] and saved["value_scale"] != 1.0
    assert saved["advantage_moments"][1] > 0
    keys = ("log_bias", "value_scale", "value_target_moments", "value_target_stats", "advantage_moments")
    for key in (*keys, "episode_end_moments"):
        assert restored[key] == pytest.approx(saved[key]), key
    _assert_same_state(restored["optimizer"], saved["optimizer"])
    # The next update from the same batch is the same step.
    _collect_rollout(model)
    loaded._setup_learn(1)
    loaded.rollout_buffer = model.rollout_buffer
    for algo in (model, loaded):
        if algorithm != "acktr":
            algo.policy.observe_rollout(algo.rollout_buffer)
        set_random_seed(1)
        algo.train()
    for p_model, p_loaded in zip(model.policy.parameters(), loaded.policy.parameters()):
        torch.testing.assert_close(p_model, p_loaded, rtol=0, atol=0)


def test_observation_normalization_keeps_running_moments_and_normalizes_the_inputs(tmp_path: Path) -> None:
    env = make_vec_env("Pendulum-v1", n_envs=2, seed=0)
    model = agents.ACKTR("MlpPolicy", env, n_steps=8, seed=0, policy_kwargs={"normalize_observations": True})
    policy = model.policy
    rng = np.random.default_rng(0)
    batches = [rng.normal(3.0, 5.0, size=(n, 3)) for n in (7, 20, 1)]
    for batch in batches:
        policy.observe_observations(batch)
    stacked = np.concatenate(batches)
    np.testing.assert_allclose(policy.observation_mean.numpy(), stacked.mean(0), rtol=1e-12)
    np.testing.assert_allclose(policy.observation_var.numpy(), stacked.var(0), rtol=1e-12)
    seen: list[torch.Tensor] = []
    for extractor in (policy.pi_features_extractor, policy.vf_features_extractor):
        extractor.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    obs = torch.as_tensor(stacked[:4], dtype=torch.float32)
    expected = (stacked[:4] - stacked.mean(0)) / stacked.std(0)
    # Every way SB3 reaches the features: forward, predict_values, get_distribution (predict), evaluate_actions.
    policy(obs)
    policy.predict_values(obs)
    policy.get_distribution(obs)
    policy.evaluate_actions(obs, torch.zeros(4, 1))
    assert len(seen) >= 6
    for inputs in seen:
        np.testing.assert_allclose(inputs.detach().numpy(), expected, rtol=1e-5, atol=1e-6)
    model.save(tmp_path / "model")
    loaded = agents.ACKTR.load(tmp_path / "model", env=env)
    assert torch.equal(loaded.policy.observation_var, policy.observation_var)
    assert loaded.policy.normalize_observations


class _VectorDictEnv(gym.Env):
    """Dict observations with one vector entry far from zero mean and unit scale; 20-step episodes."""

    observation_space = gym.spaces.Dict({"vec": gym.spaces.Box(-100.0, 100.0, (3,), dtype=np.float32)})
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), dtype=np.float32)

    def _obs(self) -> dict[str, np.ndarray]:
        return {"vec": self.np_random.normal(5.0, 3.0, size=3).astype(np.float32)}

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]:
        super().reset(seed=seed)
        self.t = 0
        return self._obs(), {}

    def step(self, action: np.ndarray) -> tuple[dict, float, bool, bool, dict]:
        self.t += 1
        return self._obs(), -float(np.square(action).sum()), False, self.t >= 20, {}


def test_dict_observations_are_normalized_as_the_same_flat_observations_are() -> None:
    # SB3's test_consistency: a MultiInputPolicy on Dict observations with one vector entry and an MlpPolicy on the
    # flattened env train alike. The Dict's flat Box entries are normalized as a flat observation would be.
    kwargs = {"n_steps": 16, "seed": 1, "policy_kwargs": {"net_arch": [8]}}
    dict_model = agents.ACKTR("MultiInputPolicy", _VectorDictEnv(), **kwargs)
    flat_model = agents.ACKTR("MlpPolicy", gym.wrappers.FlattenObservation(_VectorDictEnv()), **kwargs)
    dict_model.learn(64)
    flat_model.learn(64)  # the same observations (the envs draw them alike), other sampled actions
    assert float(dict_model.policy.observation_count) == 64
    assert abs(float(dict_model.policy.observation_mean[0]) - 5) < 1
    for name in ("observation_mean", "observation_var", "observation_count"):
        torch.testing.assert_close(getattr(dict_model.policy, name), getattr(flat_model.policy, name))
    # With the dict policy's parameters, the flat one acts alike on the same vector.
    flat_model.policy.load_state_dict(dict_model.policy.state_dict())
    obs = {"vec": np.array([[4.0, 9.0, -1.0], [25.0, 0.0, 3.0]], dtype=np.float32)}
    normalized = dict_model.policy.normalize_observation({"vec": torch.as_tensor(obs["vec"])})["vec"]
    torch.testing.assert_close(normalized, flat_model.policy.normalize_observation(torch.as_tensor(obs["vec"])))
    assert normalized[1, 0] > 3  # 25 is several standard deviations above the mean of about 5
    np.testing.assert_allclose(
        dict_model.predict(obs, deterministic=True)[0], flat_model.predict(obs["vec"], deterministic=True)[0], rtol=1e-6
    )


class _TwoVectorDictEnv(_VectorDictEnv):
    """Dict observations with two vector entries of other sizes and scales (the flattened order: "a", then "b")."""

    observation_space = gym.spaces.Dict(
        {"a": gym.spaces.Box(-100.0, 100.0, (2,), dtype=np.float32), "b": gym.spaces.Box(-1e3, 1e3, (3,))}
    )

    def _obs(self) -> dict[str, np.ndarray]:
        return {"a": self.np_random.normal(5.0, 3.0, size=2).astype(np.float32), "b": self.np_random.normal(-50, 20, 3)}


def test_dict_observations_with_several_vector_entries_are_normalized_as_their_flattened_vector() -> None:
    # SB3's test_spaces trains on Dict({"a": Box(2), "b": Box(2)}): each entry is standardized by its own slice of
    # the one statistics vector, as FlattenObservation's flat vector would be.
    kwargs = {"n_steps": 16, "seed": 1, "policy_kwargs": {"net_arch": [8]}}
    dict_model = agents.ACKTR("MultiInputPolicy", _TwoVectorDictEnv(), **kwargs)
    flat_model = agents.ACKTR("MlpPolicy", gym.wrappers.FlattenObservation(_TwoVectorDictEnv()), **kwargs)
    dict_model.learn(32)
    flat_model.learn(32)
    assert dict_model.policy.observation_mean.shape == (5,)
    for name in ("observation_mean", "observation_var", "observation_count"):
        torch.testing.assert_close(getattr(dict_model.policy, name), getattr(flat_model.policy, name))
    obs = {"a": torch.tensor([[4.0, 30.0]]), "b": torch.tensor([[-50.0, 0.0, -120.0]], dtype=torch.float64)}
    normalized = dict_model.policy.normalize_observation(obs)
    flat = flat_model.policy.normalize_observation(torch.cat([obs["a"], obs["b"].float()], dim=1))
    torch.testing.assert_close(normalized["a"], flat[:, :2])
    torch.testing.assert_close(normalized["b"].float(), flat[:, 2:])
    assert normalized["a"].dtype == torch.float32 and normalized["b"].dtype == torch.float64


def test_dict_observations_normalize_only_their_flat_box_entries() -> None:
    model = agents.ACKTR("MultiInputPolicy", make_vec_env(_dict_env, n_envs=1, seed=0), n_steps=4, seed=0)
    policy = model.policy
    assert policy._normalized_keys == ("vec",) and policy.observation_mean.shape == (5,)
    model.learn(8)
    obs = {key: torch.as_tensor(value) for key, value in model.env.reset().items()}
    normalized = policy.normalize_observation(obs)
    assert torch.equal(normalized["img"], obs["img"]) and not torch.equal(normalized["vec"], obs["vec"])


def test_dict_policy_saved_before_its_vector_entries_were_normalized_keeps_taking_them_raw(tmp_path: Path) -> None:
    model = agents.ACKTR("MultiInputPolicy", _VectorDictEnv(), n_steps=16, seed=1)
    model.learn(32)
    state = dict(model.policy.state_dict())
    # The older state: scalar observation statistics (nothing normalized).
    state.update({name: torch.zeros((), dtype=torch.float64) for name in ("observation_mean", "observation_count")})
    state["observation_var"] = torch.ones((), dtype=torch.float64)
    loaded = agents.ACKTR("MultiInputPolicy", _VectorDictEnv(), n_steps=16, seed=1)
    loaded.policy.load_state_dict(state)
    assert not loaded.policy.normalize_observations and not loaded.policy._normalizes_observations
    # It trains on, saves and loads as a policy whose observations pass raw.
    loaded.learn(32)
    loaded.save(tmp_path / "agent")
    again = agents.ACKTR.load(tmp_path / "agent")
    for policy in (loaded.policy, again.policy):
        assert float(policy.observation_count) == 0 and policy.observation_mean.shape == ()
        obs = {"vec": torch.tensor([[40.0, -3.0, 2.0]])}
        assert torch.equal(policy.normalize_observation(obs)["vec"], obs["vec"])
    assert not again.policy.normalize_observations


def test_dict_images_marked_normalized_are_left_to_the_extractor() -> None:
    space = gym.spaces.Dict(
        {
            "img": gym.spaces.Box(0.0, 1.0, (1, 36, 36), dtype=np.float32),
            "vec": gym.spaces.Box(-1.0, 1.0, (5,), dtype=np.float32),
        }
    )
    action_space = gym.spaces.Discrete(3)
    as_images = agents.KroneckerMultiInputActorCriticPolicy(
        space, action_space, lambda _: 0.1, features_extractor_kwargs={"normalized_image": True}
    )
    assert as_images._normalized_keys == ("vec",) and as_images.observation_mean.shape == (5,)
    # Without the flag SB3 flattens a float entry as a vector, so it is normalized as one.
    as_vectors = agents.KroneckerMultiInputActorCriticPolicy(space, action_space, lambda _: 0.1)
    assert as_vectors._normalized_keys == ("img", "vec") and as_vectors.observation_mean.shape == (36 * 36 + 5,)


def test_acktr_loads_with_the_policy_kwargs_it_was_built_with(tmp_path: Path) -> None:
    # SB3's load refuses policy_kwargs that differ from the saved ones (its test_save_load_env_cnn loads so): ACKTR
    # keeps its own arguments out of the saved policy_kwargs and still builds the policy with them.
    env = make_vec_env("Pendulum-v1", n_envs=1, seed=0)
    kwargs = {"policy_kwargs": {"net_arch": [16]}}
    model = agents.ACKTR(
        "MlpPolicy", env, n_steps=4, seed=0, max_kl=0.002, preconditioner="kfac", damping=0.2, **kwargs
    )
    assert model.policy_kwargs == {"net_arch": [16]}
    assert model.policy.max_kl == 0.002 and model.policy.preconditioner == "kfac"
    assert model.policy.optimizer.param_groups[0]["damping"] == 0.2
    model.learn(8)
    model.save(tmp_path / "model")
    loaded = agents.ACKTR.load(tmp_path / "model", env=env, **kwargs)
    assert loaded.policy.max_kl == 0.002 and loaded.policy.preconditioner == "kfac"
    assert loaded.policy.optimizer.param_groups[0]["damping"] == 0.2
    assert loaded.policy.net_arch == [16]
    loaded.learn(8)


def _running_spread(rollouts: list[torch.Tensor]) -> float:
    """The running standard deviation of the value targets: decay 0.9 per rollout, normalized by the total weight."""
    weights = torch.tensor([0.1 * 0.9 ** (len(rollouts) - 1 - i) for i in range(len(rollouts))], dtype=torch.float64)
    mean = float((weights * torch.stack([r.mean() for r in rollouts])).sum() / weights.sum())
    square = float((weights * torch.stack([r.square().mean() for r in rollouts])).sum() / weights.sum())
    return (square - mean**2) ** 0.5


def test_value_target_spread_is_the_running_one_held_above_a_whole_run_floor_at_or_above_the_mean_return() -> None:
    from agents.policies import WHOLE_RUN_SPREAD_FLOOR

    env = make_vec_env("CartPole-v1", n_envs=2, seed=0)
    policy = agents.ACKTR("MlpPolicy", env, n_steps=8, seed=0).policy
    assert policy.value_target_spread() == 1.0, "no rollout observed yet"
    first = torch.tensor([1.0, 3.0, 5.0, 7.0], dtype=torch.float64)
    policy.observe_value_targets(first)
    assert policy.value_target_spread() == pytest.approx(float(first.std(unbiased=False)))
    second = 100 + first
    policy.observe_value_targets(second)
    assert policy.value_target_spread() == pytest.approx(_running_spread([first, second]))
    # Many rollouts of nearly constant returns (a policy that has learned its task): the running spread collapses
    # with them; the floor, a fraction of the whole run's spread, holds the scale.
    later = [100 + 0.01 * torch.arange(6, dtype=torch.float64) for _ in range(60)]
    for rollout in later:
        policy.observe_value_targets(rollout)
    whole_run = float(torch.cat([first, second, *later]).std(unbiased=False))
    assert _running_spread([first, second, *later]) < 0.5 * WHOLE_RUN_SPREAD_FLOOR * whole_run
    assert policy.value_target_spread() == pytest.approx(WHOLE_RUN_SPREAD_FLOOR * whole_run, rel=1e-9)
    # A rollout that spreads more is followed at once.
    wide = torch.tensor([0.0, 400.0], dtype=torch.float64)
    policy.observe_value_targets(wide)
    assert policy.value_target_spread() == pytest.approx(_running_spread([first, second, *later, wide]))
    # Constant returns below the run's mean (every episode failing alike) keep the collapsed running spread.
    stuck = [0.01 * torch.arange(6, dtype=torch.float64) for _ in range(60)]
    for rollout in stuck:
        policy.observe_value_targets(rollout)
    rollouts = [first, second, *later, wide, *stuck]
    assert float(policy.value_target_stats[1]) > 1.0, "the run's mean return is above the stuck returns"
    assert policy.value_target_spread() == pytest.approx(_running_spread(rollouts), rel=1e-6)
    assert policy.value_target_spread() < 0.5 * WHOLE_RUN_SPREAD_FLOOR * float(torch.cat(rollouts).std(unbiased=False))


def test_capped_divisor_is_the_running_spread_capped_by_the_advantage_scale_then_held_at_the_scaled_floor() -> None:
    from agents.policies import CAPPED_SPREAD_FACTOR, WHOLE_RUN_SPREAD_FLOOR

    env = make_vec_env("CartPole-v1", n_envs=2, seed=0)
    policy = agents.ACKTR("MlpPolicy", env, n_steps=8, seed=0).policy
    assert policy.capped_divisor() == 1.0, "no rollout observed yet"
    targets = torch.tensor([-10.0, 10.0], dtype=torch.float64)  # running spread 10, floor 2.5 (one rollout)
    policy.observe_value_targets(targets)
    assert policy.value_target_spread() == pytest.approx(10.0)
    # Advantages large against the returns: the spread binds.
    policy.observe_advantages(np.array([6.0, -6.0]))
    assert policy.capped_divisor() == pytest.approx(10.0)
    # A critic that fits well: the cap binds, holding the divided advantages at an RMS of 1 / CAPPED_SPREAD_FACTOR.
    fitted = agents.ACKTR("MlpPolicy", env, n_steps=8, seed=0).policy
    fitted.observe_value_targets(targets)
    fitted.observe_advantages(np.array([1.0, -1.0]))
    assert CAPPED_SPREAD_FACTOR * fitted.advantage_scale() == pytest.approx(3.0)
    assert fitted.capped_divisor() == pytest.approx(3.0)
    # Advantages that are noise against a task's returns: the whole run's floor binds, as in value_target_spread.
    noise = agents.ACKTR("MlpPolicy", env, n_steps=8, seed=0).policy
    noise.observe_value_targets(targets)
    noise.observe_advantages(np.array([0.1, -0.1]))
    assert noise.capped_divisor() == pytest.approx(WHOLE_RUN_SPREAD_FLOOR * 10.0)
    # Below the run's mean return the floor is 0 (value_target_spread's rule), so the cap binds however small.
    for _ in range(30):
        noise.observe_value_targets(torch.tensor([-100.0, -98.0], dtype=torch.float64))
    assert noise.capped_divisor() == pytest.approx(CAPPED_SPREAD_FACTOR * noise.advantage_scale())
    assert noise.capped_divisor() < noise.value_target_spread()
    # Episodes that all end alike by failing (none at the time limit): no floor, the cap binds (Hopper-v5's stall).
    failing = agents.ACKTR("MlpPolicy", env, n_steps=8, seed=0).policy
    failing.observe_value_targets(targets)
    failing.observe_advantages(np.array([0.1, -0.1]))
    failing.observe_episode_ends(0, 3)
    assert failing.time_limit_fraction() == 0.0
    assert failing.capped_divisor() == pytest.approx(CAPPED_SPREAD_FACTOR * 0.1)


@pytest.mark.parametrize(("mode", "divisor"), [("returns", "value_target_spread"), ("capped", "capped_divisor")])
def test_acktr_divides_the_advantages_by_its_modes_divisor(
    mode: str, divisor: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The same step as raw advantages divided by the policy's divisor for the mode beforehand.
    env = make_vec_env("Pendulum-v1", n_envs=2, seed=0)
    steps = []
    for setting in (mode, False):
        model = agents.ACKTR("MlpPolicy", env, n_steps=8, seed=0, normalize_advantage=setting)
        monkeypatch.setattr(type(model.policy), divisor, lambda self: 7.5)
        _collect_rollout(model)
        if setting is False:
            model.rollout_buffer.advantages /= 7.5
        before = [p.detach().clone() for p in model.policy.parameters()]
        set_random_seed(1)
        model.train()
        steps.append([p.detach() - b for p, b in zip(model.policy.parameters(), before)])
    for divided, raw in zip(*steps):
        torch.testing.assert_close(divided, raw, rtol=1e-5, atol=1e-8)


def test_time_limit_fraction_is_the_decayed_share_of_episodes_cut_by_their_time_limit_and_scales_the_floor() -> None:
    from agents.policies import WHOLE_RUN_SPREAD_FLOOR

    env = make_vec_env("CartPole-v1", n_envs=2, seed=0)
    policy = agents.ACKTR("MlpPolicy", env, n_steps=8, seed=0).policy
    assert policy.time_limit_fraction() == 1.0, "no episode ended yet"
    policy.observe_episode_ends(0, 0)
    assert policy.time_limit_fraction() == 1.0, "still none"
    counts = [(2, 2), (0, 3), (1, 1)]
    for n, (time_limit, ended) in enumerate(counts, start=1):
        policy.observe_episode_ends(time_limit, ended)
        weights = [0.9 ** (n - 1 - i) for i in range(n)]
        expected = sum(w * c[0] for w, c in zip(weights, counts)) / sum(w * c[1] for w, c in zip(weights, counts))
        assert policy.time_limit_fraction() == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="Invalid episode ends: 3 at the time limit of 2 ended"):
        policy.observe_episode_ends(3, 2)
    # The whole run's floor under the capped divisor is scaled by the fraction (advantages large: no cap).
    targets = [torch.tensor([-10.0, 10.0], dtype=torch.float64)] + [torch.tensor([0.0, 0.1], dtype=torch.float64)] * 100
    for rollout in targets:
        policy.observe_value_targets(rollout)
    whole_run = float(torch.cat(targets).std(unbiased=False))
    floor = WHOLE_RUN_SPREAD_FLOOR * whole_run
    assert floor * policy.time_limit_fraction() > _running_spread(targets)
    assert policy.value_target_spread() == pytest.approx(floor, rel=1e-9), "returns: the floor unscaled"
    policy.observe_advantages(np.array([100.0, -100.0]))
    assert policy.capped_divisor() == pytest.approx(floor * policy.time_limit_fraction(), rel=1e-9)


@pytest.mark.parametrize(("max_episode_steps", "expected"), [(5, 1.0), (500, 0.0)])
def test_acktr_counts_episodes_cut_by_their_time_limit(max_episode_steps: int, expected: float) -> None:
    # CartPole-v1 never fails within 5 steps (every episode is cut); an untrained policy fails well before 500.
    env = make_vec_env("CartPole-v1", n_envs=2, seed=0, env_kwargs={"max_episode_steps": max_episode_steps})
    model = agents.ACKTR("MlpPolicy", env, n_steps=8, seed=0)
    model.learn(160)
    assert float(model.policy.episode_end_moments[1]) > 0
    assert model.policy.time_limit_fraction() == expected
    assert model.logger.name_to_value["train/time_limit_fraction"] == expected


def test_acktr_folds_the_rollouts_episode_ends_before_dividing_its_advantages(monkeypatch: pytest.MonkeyPatch) -> None:
    env = make_vec_env("CartPole-v1", n_envs=2, seed=0)
    model = agents.ACKTR("MlpPolicy", env, n_steps=64, seed=0, normalize_advantage="capped")
    policy_class = type(model.policy)
    seen = []
    divisor = policy_class.capped_divisor

    def recording(self: agents.KroneckerActorCriticPolicy) -> float:
        seen.append(self.time_limit_fraction())
        return divisor(self)

    monkeypatch.setattr(policy_class, "capped_divisor", recording)
    _collect_rollout(model)  # an untrained policy fails within 64 steps: episodes ended, none at the time limit
    assert model.policy.time_limit_fraction() == 1.0, "not folded before the update"
    model.train()
    assert seen and seen[0] == 0.0


def test_acktr_leaves_the_floor_whole_where_the_env_does_not_say_how_episodes_ended() -> None:
    from stable_baselines3.common.vec_env import VecEnvWrapper

    class WithoutTruncationInfo(VecEnvWrapper):
        def reset(self) -> np.ndarray:
            return self.venv.reset()

        def step_wait(self) -> tuple:
            observations, rewards, dones, infos = self.venv.step_wait()
            for info in infos:
                info.pop("TimeLimit.truncated", None)
            return observations, rewards, dones, infos

    env = WithoutTruncationInfo(make_vec_env("CartPole-v1", n_envs=2, seed=0))
    model = agents.ACKTR("MlpPolicy", env, n_steps=8, seed=0)
    model.learn(160)
    assert model.ep_info_buffer, "episodes ended"
    assert model.policy.episode_end_moments.tolist() == [0.0, 0.0] and model.policy.time_limit_fraction() == 1.0


def test_advantage_scale_is_the_running_root_mean_square_of_the_advantages_over_rollouts() -> None:
    env = make_vec_env("CartPole-v1", n_envs=2, seed=0)
    policy = agents.ACKTR("MlpPolicy", env, n_steps=8, seed=0).policy
    assert policy.advantage_scale() == 1.0, "no rollout observed yet"
    rng = np.random.default_rng(0)
    rollouts = [
        torch.as_tensor(rng.normal(mean, scale, size=16)) for mean, scale in ((3.0, 1.0), (0.0, 10.0), (-1, 0.1))
    ]
    for count, rollout in enumerate(rollouts, start=1):
        policy.observe_advantages(rollout.numpy())
        # Exact reference: weights 0.9^(age) normalized by their sum; squares not centred.
        weights = torch.tensor([0.9 ** (count - 1 - i) for i in range(count)], dtype=torch.float64)
        squares = torch.stack([r.square().mean() for r in rollouts[:count]])
        assert policy.advantage_scale() == pytest.approx(float((weights @ squares / weights.sum()).sqrt()), rel=1e-12)
    with pytest.raises(ValueError, match="non-finite advantages"):
        policy.observe_advantages(np.array([1.0, np.nan]))


def test_policy_saved_before_the_advantage_scale_existed_loads_with_it_unset() -> None:
    env = make_vec_env("CartPole-v1", n_envs=2, seed=0)
    model = agents.ACKTR("MlpPolicy", env, n_steps=8, seed=0, normalize_advantage="running")
    model.learn(32)
    state = model.policy.state_dict()
    assert float(state["advantage_moments"][1]) > 0
    del state["advantage_moments"]
    fresh = agents.ACKTR("MlpPolicy", env, n_steps=8, seed=1, normalize_advantage="running").policy
    fresh.observe_advantages(np.array([5.0, -5.0]))
    fresh.load_state_dict(state, strict=True)
    assert fresh.advantage_moments.tolist() == [0.0, 0.0] and fresh.advantage_scale() == 1.0
    fresh.observe_advantages(np.array([3.0, -4.0]))  # the first rollout after the load sets the scale
    assert fresh.advantage_scale() == pytest.approx(np.sqrt(12.5))


def test_policy_saved_before_the_episode_end_counts_existed_loads_with_the_whole_floor() -> None:
    env = make_vec_env("CartPole-v1", n_envs=2, seed=0)
    model = agents.ACKTR("MlpPolicy", env, n_steps=8, seed=0)
    model.learn(160)
    state = model.policy.state_dict()
    assert float(state["episode_end_moments"][1]) > 0
    del state["episode_end_moments"]
    fresh = agents.ACKTR("MlpPolicy", env, n_steps=8, seed=1).policy
    fresh.observe_episode_ends(0, 4)
    fresh.load_state_dict(state, strict=True)
    # As before the counts existed: the whole run's floor, unscaled, until an episode ends.
    assert fresh.episode_end_moments.tolist() == [0.0, 0.0] and fresh.time_limit_fraction() == 1.0


def test_running_advantage_normalization_divides_the_policy_gradient_by_the_advantage_scale() -> None:
    # Advantages multiplied by a constant change neither the running-normalized step nor the scale-free KLs.
    env = make_vec_env("Pendulum-v1", n_envs=2, seed=0)
    steps = []
    for factor in (1.0, 1000.0):
        model = agents.ACKTR("MlpPolicy", env, n_steps=8, seed=0, normalize_advantage="running")
        _collect_rollout(model)
        model.rollout_buffer.advantages *= factor
        before = [p.detach().clone() for p in model.policy.parameters()]
        set_random_seed(1)
        model.train()
        assert model.policy.advantage_scale() == pytest.approx(
            float(np.sqrt(np.mean(np.square(model.rollout_buffer.advantages)))), rel=1e-6
        )
        steps.append([p.detach() - b for p, b in zip(model.policy.parameters(), before)])
    for small, large in zip(*steps):
        torch.testing.assert_close(large, small, rtol=1e-4, atol=1e-7)


def test_value_scale_change_rescales_the_heads_momentum_and_adam_moments_with_its_gradient() -> None:
    from agents.policies import ValueTargetScale

    env = make_vec_env("CartPole-v1", n_envs=2, seed=0)
    model = A2C(agents.KroneckerActorCriticPolicy, env, n_steps=8, seed=0)
    model.learn(64, callback=ValueTargetScale())
    policy = model.policy
    head = list(policy.value_net.parameters())
    before = {key: [policy.optimizer.state[p][key].clone() for p in head] for key in _HEAD_STATE_KEYS}
    weights = [p.detach().clone() for p in head]
    obs = torch.as_tensor(env.reset(), dtype=torch.float32)
    returns = torch.tensor([10.0, -5.0])

    def head_gradients() -> list[torch.Tensor]:
        values, _, _ = policy.evaluate_actions(obs, torch.zeros(2, dtype=torch.long))
        policy._pending = None  # no optimizer step follows this pass
        return [g.detach() for g in torch.autograd.grad((values.flatten() - returns).square().mean(), head)]

    gradients = head_gradients()
    with torch.no_grad():
        values = policy.predict_values(obs)
    old_scale = float(policy.value_scale)
    new_scale = policy.observe_value_targets(torch.full((16,), 1000.0 * old_scale, dtype=torch.float64))
    ratio = old_scale / new_scale
    assert ratio < 0.5
    with torch.no_grad():
        torch.testing.assert_close(policy.predict_values(obs), values, rtol=1e-5, atol=1e-5)
    for p, w in zip(head, weights):
        torch.testing.assert_close(p.detach(), w * ratio)
    # The head's gradients scale with its weights (its loss is taken in units of the value scale) ...
    for new, old in zip(head_gradients(), gradients):
        torch.testing.assert_close(new, old * ratio, rtol=1e-4, atol=1e-7)
    # ... and so its optimizer state does: as if it had been gathered in the new units.
    for key, power in _HEAD_STATE_KEYS.items():
        for p, old in zip(head, before[key]):
            torch.testing.assert_close(policy.optimizer.state[p][key], old * ratio**power)


_HEAD_STATE_KEYS = {"momentum_buffer": 1, "adam_exp_avg": 1, "adam_exp_avg_sq": 2}


def test_value_scale_falling_a_thousandfold_rescales_the_head_without_a_divergence_warning() -> None:
    """The head grows a thousandfold with its targets' scale falling (its values stay): not a divergence."""
    import warnings

    from agents.policies import ValueTargetScale

    env = make_vec_env("CartPole-v1", n_envs=2, seed=0)
    model = A2C(agents.KroneckerActorCriticPolicy, env, n_steps=8, seed=0)
    model.learn(32, callback=ValueTargetScale())
    policy = model.policy
    for _ in range(200):  # the running scale forgets the rollouts' returns
        policy.observe_value_targets(torch.full((16,), 1e-3 * float(policy.value_scale), dtype=torch.float64))
    assert float(policy.value_net.weight.detach().norm()) > 100.0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.train()
    assert not [w for w in caught if "parameter norm grew" in str(w.message)]


def test_policy_saved_before_the_whole_run_spread_was_kept_loads_with_its_running_spread() -> None:
    env = make_vec_env("CartPole-v1", n_envs=2, seed=0)
    saved = agents.ACKTR("MlpPolicy", env, n_steps=8, seed=0).policy
    saved.observe_value_targets(torch.tensor([1.0, 3.0, 5.0, 7.0], dtype=torch.float64))
    saved.observe_value_targets(torch.tensor([2.0, 9.0], dtype=torch.float64))
    spread = saved.value_target_spread()
    state = {k: v for k, v in saved.state_dict().items() if k != "value_target_stats"}
    policy = agents.ACKTR("MlpPolicy", env, n_steps=8, seed=1).policy
    policy.load_state_dict(state)
    assert policy.value_target_spread() == pytest.approx(spread)
    assert float(policy.value_scale) == pytest.approx(float(saved.value_scale))


def test_normalize_advantage_refuses_unknown_modes() -> None:
    env = make_vec_env("CartPole-v1", n_envs=2, seed=0)
    with pytest.raises(ValueError, match="Invalid normalize_advantage: 'batch'"):
        agents.ACKTR("MlpPolicy", env, normalize_advantage="batch")
