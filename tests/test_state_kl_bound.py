"""The bound on the policy's KL at states kept from earlier rollouts (``state_kl_bound``): the reservoir that keeps
them, the shrunk step, saving and loading, and bad values."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from stable_baselines3 import A2C
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.envs import SimpleMultiObsEnv

import agents
from agents.kl_calibration import state_kls

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _policy(size: int, bound: float | None = 10.0) -> agents.KroneckerActorCriticPolicy:
    kwargs = {"state_reservoir_size": size}
    return agents.ACKTR("MlpPolicy", "Pendulum-v1", seed=0, state_kl_bound=bound, policy_kwargs=kwargs).policy


def test_reservoir_fills_in_order_then_keeps_every_offered_state_with_equal_probability() -> None:
    policy = _policy(size=100)
    states = torch.arange(1000, dtype=torch.float32)[:, None].expand(1000, 3)
    policy.observe_states(states[:60])
    policy.observe_states(states[60:100])
    assert torch.equal(policy.state_reservoir, states[:100]) and int(policy.state_reservoir_seen) == 100
    # After 1000 offers each state is kept with probability 100 / 1000, early or late.
    kept = torch.zeros(1000)
    trials = 300
    for trial in range(trials):
        policy.state_reservoir_seen.zero_()
        policy.state_reservoir_seed.fill_(trial)
        for start in range(0, 1000, 128):
            policy.observe_states(states[start : start + 128])
        slots = policy.state_reservoir[:, 0].long()
        assert len(set(slots.tolist())) == 100  # no state twice, no slot left empty
        kept[slots] += 1
    by_decile = kept.reshape(10, 100).sum(1) / (trials * 100)
    torch.testing.assert_close(by_decile, torch.full((10,), 0.1), rtol=0.08, atol=0)


def _bounded_updates(bound: float | None, algorithm: str = "acktr", steps: int = 1024) -> list[dict[str, Any]]:
    """Learn Pendulum-v1 with 64-step rollouts; per update, the parameters at its start, as proposed and as kept,
    and the largest KL at the reservoir's states from the start to the proposed and to the kept parameters."""
    env = make_vec_env("Pendulum-v1", n_envs=1, seed=0)
    if algorithm == "acktr":
        # One optimizer step per update: the critic's own steps (the Box default adds four) leave the policy alone.
        model = agents.ACKTR("MlpPolicy", env, n_steps=64, seed=0, state_kl_bound=bound, n_critic_updates=1)
    else:  # A2C at 10 times its learning rate (the plug-in's step has Adam's length at that rate)
        policy_kwargs = {"state_kl_bound": bound, "max_kl": 0.001}
        model = A2C(
            agents.KroneckerActorCriticPolicy, env, n_steps=64, seed=0, learning_rate=7e-3, policy_kwargs=policy_kwargs
        )
    policy = model.policy
    params = list(policy.parameters())
    records: list[dict[str, Any]] = []
    after_step = policy._after_step

    def largest_kl(old: Any) -> float:
        return float(state_kls(old, policy._reservoir_distribution()).max())

    def recording(optimizer: Any, args: Any, kwargs: Any) -> None:
        record: dict[str, Any] = {"proposed": [p.detach().clone() for p in params], "kls": None}
        if policy._keeps_state_reservoir:
            record["count"] = min(int(policy.state_reservoir_seen), len(policy.state_reservoir))
        start, old = policy._step_start, policy._reservoir_before
        if start is not None and old is not None:
            region_params = [p for region, _ in policy.trust_regions.regions for p in region]
            starts = dict(zip(region_params, [t for region in start for t in region]))
            record["start"] = [starts[p] for p in params]
            record["kls"] = [largest_kl(old)]
        after_step(optimizer, args, kwargs)
        record.update(kept=[p.detach().clone() for p in params], factor=policy.last_state_kl_factor)
        if record["kls"] is not None:
            record["kls"].append(largest_kl(old))
        records.append(record)

    policy._after_step = recording
    policy.optimizer._optimizer_step_post_hooks.clear()
    policy.optimizer.register_step_post_hook(lambda *args: policy._after_step(*args))
    model.learn(steps, callback=None if algorithm == "acktr" else agents.ValueTargetScale())
    records[0]["policy"] = policy
    return records


@pytest.mark.parametrize("algorithm", ["acktr", "a2c_plugin"])
def test_a_step_that_moves_a_kept_state_too_far_is_shrunk_along_its_direction_to_the_bound(algorithm: str) -> None:
    records = _bounded_updates(bound=1.0, algorithm=algorithm)
    policy = records[0]["policy"]
    shrunk = [r for r in records if r["factor"] < 1.0]
    assert shrunk, "a bound of 1 x max_kl at the states of earlier rollouts binds on some steps"
    assert all(r["factor"] == 1.0 for r in records if r["count"] == 0)  # nothing kept yet: nothing bounded
    actor = {id(p) for p in policy.trust_regions.regions[0][0]}
    radius = policy.trust_regions.targets[0]
    for record in shrunk:
        for p, before, proposed, kept in zip(policy.parameters(), record["start"], record["proposed"], record["kept"]):
            factor = record["factor"] if id(p) in actor else 1.0
            torch.testing.assert_close(kept - before, factor * (proposed - before), rtol=1e-5, atol=1e-7)
        proposed_kl, kept_kl = record["kls"]
        assert proposed_kl > radius
        # Shrunk once by sqrt(bound / largest KL) (the KL's quadratic model): near the bound, not exactly on it.
        assert kept_kl <= 2 * radius and kept_kl < record["factor"] * proposed_kl


def test_without_the_bound_no_reservoir_is_kept_and_no_step_is_shrunk() -> None:
    records = _bounded_updates(bound=None, steps=256)
    policy = records[0]["policy"]
    assert not [name for name in policy.state_dict() if name.startswith("state_reservoir")]
    assert all(r["factor"] == 1.0 for r in records)


def test_reservoir_and_bound_survive_saving_and_loading_and_resume_the_same_steps(tmp_path: Path) -> None:
    env = make_vec_env("Pendulum-v1", n_envs=1, seed=0)
    model = agents.ACKTR("MlpPolicy", env, n_steps=64, seed=0, state_kl_bound=1.0)
    model.learn(640)
    model.save(tmp_path / "agent")
    loaded = agents.ACKTR.load(tmp_path / "agent", env=env)
    for name in ("state_reservoir", "state_reservoir_seen", "state_reservoir_pending", "state_reservoir_seed"):
        assert torch.equal(getattr(loaded.policy, name), getattr(model.policy, name)), name
    assert loaded.state_kl_bound == 1.0 and loaded.policy.state_kl_bound == 1.0
    # Both go on from the same rollout: the pending states join both reservoirs alike, and the steps agree.
    model.policy.observe_rollout(model.rollout_buffer)
    loaded.policy.observe_rollout(model.rollout_buffer)
    assert torch.equal(loaded.policy.state_reservoir, model.policy.state_reservoir)
    model.policy.save(tmp_path / "policy.pth")
    policy = type(model.policy).load(tmp_path / "policy.pth")
    assert policy.state_kl_bound == 1.0 and torch.equal(policy.state_reservoir, model.policy.state_reservoir)


def test_policy_saved_without_a_reservoir_loads_with_an_empty_one() -> None:
    policy = _policy(size=16)
    policy.observe_states(np.ones((4, 3), dtype=np.float32))
    state = {k: v for k, v in policy.state_dict().items() if not k.startswith("state_reservoir")}
    policy.load_state_dict(state)
    assert int(policy.state_reservoir_seen) == 0 and not policy.state_reservoir.any()
    assert len(policy.state_reservoir_pending) == 0


def test_dict_observations_keep_no_reservoir() -> None:
    env = make_vec_env(lambda: SimpleMultiObsEnv(random_start=False), n_envs=1, seed=0)
    model = agents.ACKTR("MultiInputPolicy", env, n_steps=4, seed=0, state_kl_bound=10.0)
    model.learn(16)
    assert not [name for name in model.policy.state_dict() if name.startswith("state_reservoir")]
    assert model.policy.last_state_kl_factor == 1.0


def test_policy_state_without_the_bound_holds_only_floating_point_tensors_that_sb3_can_perturb() -> None:
    # SB3's own save/load tests replace every entry of a policy's state by th.rand_like of it, load that, and check
    # that every entry changed: no integer tensors, no empty ones.
    for policy in (
        agents.ACKTR("MlpPolicy", "Pendulum-v1", n_steps=16).policy,
        A2C(agents.KroneckerActorCriticPolicy, "CartPole-v1").policy,
    ):
        state = {name: value.clone() for name, value in policy.state_dict().items()}
        odd = [name for name, value in state.items() if not value.is_floating_point() or value.numel() == 0]
        assert odd == []
        perturbed = {name: torch.rand_like(value) for name, value in state.items()}
        policy.load_state_dict(perturbed)
        for name, value in policy.state_dict().items():
            assert not torch.allclose(value, state[name]), name


def test_a_policy_without_the_bound_refuses_states_for_a_reservoir_and_a_saved_reservoir_with_states() -> None:
    policy = agents.ACKTR("MlpPolicy", "Pendulum-v1", n_steps=16).policy
    with pytest.raises(ValueError, match="keeps no state reservoir"):
        policy.observe_states(np.ones((4, 3), dtype=np.float32))
    bounded = agents.ACKTR("MlpPolicy", "Pendulum-v1", n_steps=16, state_kl_bound=2.0).policy
    bounded.observe_states(np.ones((4, 3), dtype=np.float32))
    with pytest.raises(RuntimeError, match="state_reservoir"):
        policy.load_state_dict(bounded.state_dict())  # strict: the reservoir's states have nowhere to go


def test_state_saved_with_the_empty_reservoir_buffers_of_earlier_versions_loads_without_the_bound() -> None:
    policy = agents.ACKTR("MlpPolicy", "Pendulum-v1", n_steps=16).policy
    state = dict(policy.state_dict())
    # Sessions 15-25 kept these four buffers, empty or zero, in every policy's state.
    state["state_reservoir"] = torch.zeros(0)
    state["state_reservoir_seen"] = torch.zeros((), dtype=torch.int64)
    state["state_reservoir_pending"] = torch.zeros(0)
    state["state_reservoir_seed"] = torch.tensor(7, dtype=torch.int64)
    policy.load_state_dict(state)  # strict
    assert not [name for name in policy.state_dict() if name.startswith("state_reservoir")]


@pytest.mark.parametrize("value", [0.5, True, float("inf"), "10"])
def test_state_kl_bound_rejects_values_below_one_and_non_numbers(value: object) -> None:
    with pytest.raises(ValueError, match=r"Invalid state_kl_bound: .*a finite number >= 1"):
        agents.ACKTR("MlpPolicy", "Pendulum-v1", state_kl_bound=value)
    with pytest.raises(ValueError, match=r"Invalid state_kl_bound"):
        A2C(agents.KroneckerActorCriticPolicy, "Pendulum-v1", policy_kwargs={"state_kl_bound": value})


@pytest.mark.parametrize("size", [0, 2.5, True])
def test_state_reservoir_size_must_be_a_positive_integer(size: object) -> None:
    with pytest.raises(ValueError, match=r"Invalid state_reservoir_size: .*an integer >= 1"):
        A2C(agents.KroneckerActorCriticPolicy, "Pendulum-v1", policy_kwargs={"state_reservoir_size": size})


@pytest.mark.parametrize("with_env", [False, True])
def test_agent_saved_before_the_bound_existed_loads_and_learns_without_it(tmp_path: Path, with_env: bool) -> None:
    model = agents.ACKTR("MlpPolicy", "Pendulum-v1", seed=0, n_steps=16)
    model.learn(32)
    model.save(tmp_path / "agent.zip")
    # An older save: no state_kl_bound in the agent's data, no reservoir in the policy's state.
    with zipfile.ZipFile(tmp_path / "agent.zip") as new, zipfile.ZipFile(tmp_path / "old.zip", "w") as old:
        for name in new.namelist():
            content = new.read(name)
            if name == "data":
                data = json.loads(content)
                del data["state_kl_bound"]
                content = json.dumps(data).encode()
            elif name == "policy.pth":
                state = torch.load(io.BytesIO(content))
                buffer = io.BytesIO()
                torch.save({k: v for k, v in state.items() if not k.startswith("state_reservoir")}, buffer)
                content = buffer.getvalue()
            old.writestr(name, content)
    env = make_vec_env("Pendulum-v1", n_envs=1, seed=0) if with_env else None
    loaded = agents.ACKTR.load(tmp_path / "old.zip", env=env)
    assert loaded.state_kl_bound is None and loaded.policy.state_kl_bound is None
    if env is not None:
        loaded.learn(48)
        assert loaded.policy.optimizer.steps == model.policy.optimizer.steps + 3 * loaded.n_critic_updates
