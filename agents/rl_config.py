"""rl-zoo-style hyperparameter files: ``default``, then the env family, then the env's own entry."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import yaml
from stable_baselines3 import A2C, PPO
from stable_baselines3.common.utils import LinearSchedule
from torch import nn

from envs import env_kind

from .acktr import ACKTR
from .policies import KroneckerActorCriticPolicy

ALGORITHMS: dict[str, type] = {"acktr": ACKTR, "a2c": A2C, "ppo": PPO}
# Keys of the environment factory (``envs.make_env``) that a config may set.
ENV_KEYS = ("normalize", "frame_stack")
# Keys of a run that are not constructor arguments of the algorithm.
RUN_KEYS = {"policy", "n_envs", "total_timesteps", "eval_episodes", *ENV_KEYS}
# Arguments the training script sets itself, not a config file.
_SCRIPT_OWNED = {"self", "policy", "env", "seed", "device", "tensorboard_log", "verbose", "_init_setup_model"}
FAMILIES = ("atari", "mujoco", "classic")
# Activation names a config's ``policy_kwargs.activation_fn`` may use.
ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU, "elu": nn.ELU}
# Policy names a config may use besides SB3's aliases ("MlpPolicy", "CnnPolicy", ...).
POLICIES: dict[str, type] = {"KroneckerActorCriticPolicy": KroneckerActorCriticPolicy}
# Constructor arguments a config may give as a schedule string ("lin_X": linear from X to 0 over training).
SCHEDULE_KEYS = ("learning_rate", "clip_range")


def algorithm_keys(algorithm: type) -> set[str]:
    """Constructor arguments of an SB3 algorithm class that a config may set."""
    return set(inspect.signature(algorithm.__init__).parameters) - _SCRIPT_OWNED


def env_options(config: dict[str, Any]) -> dict[str, Any]:
    """The config's keyword arguments for ``envs.make_env``."""
    return {key: config[key] for key in ENV_KEYS if key in config}


def resolve_config(path: str | Path, env_id: str, algorithm: type) -> dict[str, Any]:
    """Merge ``default``, the env's family and the env's own entry of a YAML file, and validate the keys.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: for a malformed file or an unknown key (listing the valid ones).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    with path.open() as handle:
        data = yaml.safe_load(handle) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    valid = algorithm_keys(algorithm) | RUN_KEYS
    resolved: dict[str, Any] = {}
    for section in ("default", env_kind(env_id), env_id):
        entries = data.get(section) or {}
        if not isinstance(entries, dict):
            raise ValueError(f"{path}: section {section!r} must be a mapping")
        unknown = sorted(set(entries) - valid)
        if unknown:
            raise ValueError(
                f"{path}: unknown key(s) {unknown} in section {section!r}. Valid keys: {', '.join(sorted(valid))}"
            )
        resolved.update(entries)
    return resolved


def _schedule(key: str, value: Any) -> Any:
    """A number as is; ``"lin_X"`` as SB3's linear schedule from X to 0."""
    if not isinstance(value, str):
        return value
    try:
        if not value.startswith("lin_"):
            raise ValueError
        start = float(value[4:])
    except ValueError:
        raise ValueError(f"Invalid {key}: {value!r} (a number, or 'lin_<start>' for a linear decay to 0)") from None
    return LinearSchedule(start, 0.0, 1.0)


def model_arguments(config: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The policy and constructor keyword arguments of a resolved config.

    Drops the run keys, turns ``"lin_X"`` schedules into SB3 schedules, activation names into ``torch.nn``
    classes and ``"KroneckerActorCriticPolicy"`` into the class.

    Raises:
        ValueError: for a malformed schedule or an unknown activation name.
    """
    kwargs = {key: value for key, value in config.items() if key not in RUN_KEYS}
    for key in SCHEDULE_KEYS:
        if key in kwargs:
            kwargs[key] = _schedule(key, kwargs[key])
    policy_kwargs = dict(kwargs.get("policy_kwargs") or {})
    activation = policy_kwargs.get("activation_fn")
    if isinstance(activation, str):
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"Invalid policy_kwargs.activation_fn: {activation!r}. Valid values: {', '.join(ACTIVATIONS)}"
            )
        policy_kwargs["activation_fn"] = ACTIVATIONS[activation]
    if policy_kwargs:
        kwargs["policy_kwargs"] = policy_kwargs
    policy = config.get("policy", "MlpPolicy")
    return POLICIES.get(policy, policy), kwargs
