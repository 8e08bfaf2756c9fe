"""rl-zoo-style hyperparameter files: ``default``, then the env family, then the env's own entry."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import yaml
from stable_baselines3 import A2C, PPO

from envs import env_kind

from .acktr import ACKTR

ALGORITHMS: dict[str, type] = {"acktr": ACKTR, "a2c": A2C, "ppo": PPO}
# Keys of the environment factory (``envs.make_env``) that a config may set.
ENV_KEYS = ("normalize", "frame_stack")
# Keys of a run that are not constructor arguments of the algorithm.
RUN_KEYS = {"policy", "n_envs", "total_timesteps", "eval_episodes", *ENV_KEYS}
# Arguments the training script sets itself, not a config file.
_SCRIPT_OWNED = {"self", "policy", "env", "seed", "device", "tensorboard_log", "verbose", "_init_setup_model"}
FAMILIES = ("atari", "mujoco", "classic")


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
