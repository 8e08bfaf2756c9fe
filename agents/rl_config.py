"""rl-zoo-style hyperparameter files: ``default``, then the env family, then the env's own entry."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from stable_baselines3 import A2C, PPO
from stable_baselines3.common.utils import LinearSchedule
from torch import nn

import envs
from envs import env_kind

from .acktr import ACKTR, AUTO, advantage_normalization_choices, is_advantage_normalization
from .policies import POLICY_CURVATURES, KroneckerActorCriticPolicy, preconditioner_names

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
    """The config's keyword arguments for ``envs.make_env``: its env keys, and the algorithm's ``gamma``, which
    ``VecNormalize`` takes as the discount of the returns it scales the rewards by (as rl-zoo does)."""
    options = {key: config[key] for key in ENV_KEYS if key in config}
    if "gamma" in config:
        options["gamma"] = config["gamma"]
    return options


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last silently)."""

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        # Each mapping is checked once, as written: a merge ("<<: *anchor") rewrites the merged node in place, and
        # an explicit key may override a merged one.
        checked: set[int] = self.__dict__.setdefault("_checked_mappings", set())
        if id(node) not in checked:
            checked.add(id(node))
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=False)
                try:
                    repeated = key in seen
                except TypeError:  # an unhashable key: SafeLoader's own error follows
                    continue
                if repeated:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"the key {key!r} is given twice in one mapping", key_node.start_mark
                    )
                seen.add(key)
        super().flatten_mapping(node)


def load_settings(stream: Any) -> Any:
    """``yaml.safe_load`` of a settings file, raising ``yaml.YAMLError`` for a key given twice in one mapping."""
    return yaml.load(stream, Loader=_UniqueKeyLoader)  # a SafeLoader subclass: no arbitrary objects


def read_settings(path: Path) -> Any:
    """The settings in the YAML file at ``path`` (:func:`load_settings`; ``{}`` for an empty file).

    Raises:
        ValueError: for a file that is not valid YAML or gives a key twice in one mapping, naming the file.
    """
    try:
        with path.open() as handle:
            return load_settings(handle) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML: {error}") from None


def resolve_config(path: str | Path, env_id: str, algorithm: type) -> dict[str, Any]:
    """Merge ``default``, the env's family and the env's own entry of a YAML file, and validate the keys.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: for a file that is not YAML, a malformed one or an unknown key (listing the valid ones).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    data = read_settings(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    data = _algorithm_sections(path, data, algorithm)
    _check_sections(path, data)
    resolved: dict[str, Any] = {}
    for section in ("default", env_kind(env_id), env_id):
        entries = data.get(section) or {}
        if not isinstance(entries, dict):
            raise ValueError(f"{path}: section {section!r} must be a mapping")
        check_keys(path, entries, algorithm, f" in section {section!r}")
        resolved.update(entries)
    return resolved


def check_keys(path: str | Path, settings: dict[str, Any], algorithm: type, where: str = "") -> None:
    """Refuse keys that are neither ``algorithm``'s arguments nor the run's settings (a typo would be ignored).

    Raises:
        ValueError: naming the unknown keys, ``where`` they are in ``path``, and the valid keys.
    """
    valid = algorithm_keys(algorithm) | RUN_KEYS
    unknown = sorted(set(settings) - valid)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}{where}. Valid keys: {', '.join(sorted(valid))}")


# Algorithm names a file may be keyed by at its top level (configs/baselines.yml), TRPO's included.
ALGORITHM_SECTIONS = (*ALGORITHMS, "trpo")


def _algorithm_sections(path: Path, data: dict[str, Any], algorithm: type) -> dict[str, Any]:
    """A file keyed by algorithm names (``a2c:``, ``ppo:``, ... each holding sections): the running algorithm's."""
    if not data or not set(data) <= set(ALGORITHM_SECTIONS):
        return data
    name = next((key for key, cls in ALGORITHMS.items() if issubclass(algorithm, cls)), algorithm.__name__.lower())
    if name not in data:
        raise ValueError(f"{path}: it holds settings for {', '.join(sorted(data))}, none for {name}")
    sections = data[name] or {}
    if not isinstance(sections, dict):
        raise ValueError(f"{path}: section {name!r} must be a mapping of sections")
    return sections


def _check_sections(path: Path, data: dict[str, Any]) -> None:
    """Every top-level section is ``default``, a family or a registered environment id: a misspelt id would
    otherwise be skipped without a word."""
    for section in data:
        if section == "default" or section in FAMILIES:
            continue
        try:
            env_kind(str(section))
        except ValueError as error:
            if not str(error).startswith("Unknown environment id") or envs.ale_import_error() is not None:
                # ale_py failed to import: its ids (ALE/..., the older NoFrameskip ones) are unknown for now, and
                # the failure is reported when an Atari env is made, not for every file that has Atari sections.
                continue
            raise ValueError(
                f"{path}: section {section!r} is neither 'default', a family ({', '.join(FAMILIES)}) nor a "
                f"registered environment id. {error}"
            ) from None


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


# --- value checks -------------------------------------------------------------------------------------------
# Each rule: (kind, low, high, low_open, high_open) for numbers; the kinds "int", "float", "bool", "str",
# "dict", "schedule" (a float or "lin_X"), "optional_float" (None disables).
_UNBOUNDED = math.inf
VALUE_RULES: dict[str, tuple[str, float, float, bool, bool]] = {
    "n_envs": ("int", 1, _UNBOUNDED, False, True),
    "total_timesteps": ("int", 1, _UNBOUNDED, False, True),
    "eval_episodes": ("int", 1, _UNBOUNDED, False, True),
    "frame_stack": ("int", 1, _UNBOUNDED, False, True),
    "n_steps": ("int", 1, _UNBOUNDED, False, True),
    "batch_size": ("int", 1, _UNBOUNDED, False, True),
    "n_epochs": ("int", 1, _UNBOUNDED, False, True),
    "n_critic_updates": ("int", 1, _UNBOUNDED, False, True),
    "stats_window_size": ("int", 1, _UNBOUNDED, False, True),
    "factor_update_interval": ("int", 1, _UNBOUNDED, False, True),
    "eigen_update_interval": ("int", 1, _UNBOUNDED, False, True),
    "scale_update_interval": ("int", 1, _UNBOUNDED, False, True),
    "sde_sample_freq": ("int", -1, _UNBOUNDED, False, True),
    "learning_rate": ("schedule", 0, _UNBOUNDED, True, True),
    "clip_range": ("schedule", 0, _UNBOUNDED, True, True),
    "clip_range_vf": ("optional_float", 0, _UNBOUNDED, True, True),
    "gamma": ("float", 0, 1, False, False),
    "gae_lambda": ("float", 0, 1, False, False),
    "momentum": ("float", 0, 1, False, True),
    "factor_decay": ("float", 0, 1, False, True),
    "ent_coef": ("float", 0, _UNBOUNDED, False, True),
    "vf_coef": ("float", 0, _UNBOUNDED, False, True),
    "vf_fisher_coef": ("float", 0, _UNBOUNDED, False, True),
    "damping": ("float", 0, _UNBOUNDED, True, True),
    "rms_prop_eps": ("float", 0, _UNBOUNDED, True, True),
    "max_kl": ("optional_float", 0, _UNBOUNDED, True, True),
    "vf_max_kl": ("optional_float", 0, _UNBOUNDED, True, True),
    "kl_backtrack": ("optional_float", 1, _UNBOUNDED, False, True),
    "state_kl_bound": ("optional_float", 1, _UNBOUNDED, False, True),
    "max_grad_norm": ("optional_float", 0, _UNBOUNDED, True, True),
    "target_kl": ("optional_float", 0, _UNBOUNDED, True, True),
    "calibrate_kl": ("bool", 0, 0, False, False),
    "normalize_advantage": ("advantage_normalization", 0, 0, False, False),
    "use_sde": ("bool", 0, 0, False, False),
    "use_rms_prop": ("bool", 0, 0, False, False),
    "policy": ("str", 0, 0, False, False),
    "preconditioner": ("str", 0, 0, False, False),
    "curvature": ("str", 0, 0, False, False),
    "policy_kwargs": ("dict", 0, 0, False, False),
    "rollout_buffer_kwargs": ("dict", 0, 0, False, False),
}
# ACKTR's arguments whose default depends on the action space: a config may write "auto" for them.
AUTO_KEYS = ("n_steps", "gae_lambda", "max_kl", "n_critic_updates")
# Keys whose values come from a list, read when a config is checked (a preconditioner registered later counts).
CHOICES: dict[str, Callable[[], tuple[str, ...]]] = {
    "policy": lambda: ("MlpPolicy", "CnnPolicy", "MultiInputPolicy", *POLICIES),  # SB3's aliases, the plug-in
    "preconditioner": preconditioner_names,
    "curvature": lambda: POLICY_CURVATURES,
}


def _range_text(low: float, high: float, low_open: bool, high_open: bool) -> str:
    if high == _UNBOUNDED:
        return f"{'>' if low_open else '>='} {low:g}"
    return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def _check_number(value: Any, kind: str, rule: tuple[str, float, float, bool, bool]) -> Any:
    """The value as a number of ``kind`` if it is one in range, else raise ``ValueError`` with the reason."""
    _, low, high, low_open, high_open = rule
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be an integer {_range_text(low, high, low_open, high_open)}")
    else:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"must be a number {_range_text(low, high, low_open, high_open)}") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"must be a number {_range_text(low, high, low_open, high_open)}")
        value = float(value)
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if not math.isfinite(value) or too_low or too_high:
        raise ValueError(
            f"must be {'an integer' if kind == 'int' else 'a finite number'} "
            f"{_range_text(low, high, low_open, high_open)}"
        )
    return value


def validate_config(config: dict[str, Any], source: str | Path, algorithm: type | None = None) -> dict[str, Any]:
    """Check the type and range of every known value of a resolved config; numbers given as strings
    (``"1e-3"``) become floats.

    Args:
        config: the resolved settings.
        source: the file they come from, named in the message.
        algorithm: the algorithm class they are for, when known: ``normalize_advantage: returns``, ``running`` or
            ``capped`` is ACKTR's only (SB3's A2C and PPO would read the string as true).

    Returns:
        the config with numeric strings converted.

    Raises:
        ValueError: ``"<source>: invalid <key>: <value> (<what it must be>)"`` for the first bad value.

    ``n_steps``, ``gae_lambda``, ``max_kl`` and ``n_critic_updates`` may be ``"auto"`` for ACKTR (its defaults by
    action space).
    """
    checked = dict(config)
    for key, value in config.items():
        rule = VALUE_RULES.get(key)
        if rule is None:
            continue
        kind = rule[0]
        if key in AUTO_KEYS and value == AUTO:
            if algorithm is not None and algorithm is not ACKTR:
                raise ValueError(
                    f"{source}: invalid {key}: 'auto' (ACKTR's option, resolved from the action space; "
                    f"{algorithm.__name__} takes a number)"
                )
            continue
        try:
            if kind in ("int", "float"):
                checked[key] = _check_number(value, kind, rule)
            elif kind == "optional_float":
                checked[key] = None if value is None else _check_number(value, "float", rule)
            elif kind == "schedule":
                if isinstance(value, str) and value.startswith("lin_"):
                    _check_number(value[4:], "float", rule)
                else:
                    checked[key] = _check_number(value, "float", rule)
            elif kind == "bool" and not isinstance(value, bool):
                raise ValueError("must be true or false")
            elif kind == "advantage_normalization" and not is_advantage_normalization(value):
                raise ValueError(f"must be {advantage_normalization_choices('true', 'false')}")
            elif kind == "str" and not isinstance(value, str):
                raise ValueError("must be a string")
            elif kind == "dict" and not isinstance(value, dict):
                raise ValueError("must be a mapping")
            if key in CHOICES and value not in CHOICES[key]():
                raise ValueError(f"valid values: {', '.join(sorted(CHOICES[key]()))}")
        except ValueError as error:
            extra = " (or 'lin_<start>' for a linear decay to 0)" if kind == "schedule" else ""
            raise ValueError(f"{source}: invalid {key}: {value!r} ({error}{extra})") from None
    if algorithm is not None and algorithm is not ACKTR and isinstance(mode := config.get("normalize_advantage"), str):
        raise ValueError(
            f"{source}: invalid normalize_advantage: {mode!r} (ACKTR's option; {algorithm.__name__} takes true "
            "or false)"
        )
    normalize = config.get("normalize")
    if not (
        normalize is None
        or isinstance(normalize, bool)
        or (isinstance(normalize, dict) and all(isinstance(v, bool) for v in normalize.values()))
    ):
        raise ValueError(
            f"{source}: invalid normalize: {normalize!r} (true, false, or a mapping of norm_obs / norm_reward "
            "to true or false)"
        )
    return checked
