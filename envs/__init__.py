"""Environment factories: Atari (ALE v5, DeepMind preprocessing), MuJoCo v5 (normalized), classic control.

Everything here reuses SB3's and gymnasium's wrappers; this module only chooses and composes them.
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Iterator
from typing import Any

import gymnasium as gym
from stable_baselines3.common.env_util import make_atari_env, make_vec_env
from stable_baselines3.common.vec_env import VecEnv, VecFrameStack, VecNormalize

from acktr_kfe.trust_region import is_positive_int, is_real_number

__all__ = ["EVAL_SEED_OFFSET", "EnvKind", "env_kind", "evaluation_env", "make_env"]

EnvKind = str  # "atari" | "mujoco" | "classic"


# Why the Atari package did not import, when it did not (its ids are then unknown to gymnasium).
_ale_import_error: str | None = None


def _registered_ids() -> list[str]:
    global _ale_import_error
    try:
        import ale_py

        gym.register_envs(ale_py)
        _ale_import_error = None
    except ImportError as error:  # Atari is optional at run time; say why when an Atari id is asked for
        _ale_import_error = f"{type(error).__name__}: {error}"
    return list(gym.registry.keys())


# Frames stacked for Atari unless a config says otherwise (DeepMind's preprocessing).
ATARI_FRAME_STACK = 4


def ale_import_error() -> str | None:
    """Why ``ale_py`` (the Atari environments) failed to import, or ``None`` when it imported."""
    _registered_ids()
    return _ale_import_error


def env_kind(env_id: str) -> EnvKind:
    """``"atari"``, ``"mujoco"`` or ``"classic"`` for a registered id.

    Raises:
        ValueError: for an id gymnasium does not know, naming the closest registered ids; for an ``ALE/`` id
            while ``ale_py`` fails to import, the import error.
    """
    ids = _registered_ids()
    if env_id not in ids and env_id.startswith("ALE/") and _ale_import_error is not None:
        raise ValueError(
            f"Cannot make {env_id!r}: the Atari environments come from the ale_py package, which failed to import "
            f"({_ale_import_error}). Install or repair it: pip install 'ale-py>=0.9'"
        )
    if env_id not in ids:
        close = difflib.get_close_matches(env_id, ids, n=5, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ValueError(f"Unknown environment id: {env_id!r}.{hint}")
    entry_point = str(gym.registry[env_id].entry_point)
    if env_id.startswith("ALE/") or "ale_py" in entry_point:
        return "atari"
    if "mujoco" in entry_point:
        return "mujoco"
    return "classic"


@contextlib.contextmanager
def _buildable(env_id: str) -> Iterator[None]:
    """Turn the failure to build a registered id (a package it needs is missing, such as mujoco-py for the MuJoCo
    v2 / v3 ids or Box2D) into a ``ValueError`` naming the id, instead of a traceback from deep inside gymnasium."""
    try:
        yield
    except (ImportError, gym.error.Error) as error:
        raise ValueError(f"Cannot make {env_id!r}: {error}") from error


def make_env(
    env_id: str,
    n_envs: int = 1,
    seed: int = 0,
    *,
    training: bool = True,
    frame_stack: int | None = None,
    normalize: bool | dict[str, bool] | None = None,
    monitor_dir: str | None = None,
    env_kwargs: dict[str, Any] | None = None,
    gamma: float = 0.99,
) -> VecEnv:
    """A vectorized, monitored environment ready for SB3.

    - Atari (``ALE/*-v5``): DeepMind preprocessing by SB3's ``AtariWrapper``: no-op reset, frame skip 4 with
      max-pooling over the last two frames (the ALE's own frame skip is set to 1 for this), 84x84 grayscale,
      ``frame_stack`` frames stacked. ``training=True`` adds episodic life and reward clipping; the ``Monitor``
      sits beneath them, so the logged episode returns are true game scores either way.
    - MuJoCo (``*-v5``): ``VecNormalize`` of observations and rewards (``normalize=True`` by default, as SB3's
      and rl-zoo's MuJoCo entries train A2C, PPO and TRPO); its statistics are saved and restored with the agent
      (``VecNormalize.save``/``load``). With ``training=False`` the statistics are frozen and rewards are left raw.
      ACKTR needs no VecNormalize (its policy normalizes observations, its critic's region is free of the rewards'
      scale): configs/acktr.yml's mujoco family passes ``normalize=False``.
    - Classic control: SB3's ``make_vec_env``.

    Args:
        env_id: a registered gymnasium id.
        n_envs: number of parallel environments.
        seed: seed of the first environment (the others get ``seed + i``).
        training: training (``True``) or evaluation wrappers.
        frame_stack: frames stacked, Atari only (default 4); given for another env it raises, as it would be
            ignored there.
        normalize: wrap in ``VecNormalize`` (default: for MuJoCo only); a dict with ``norm_obs`` and/or
            ``norm_reward`` (both true when left out) normalizes only what it asks for.
        monitor_dir: where ``Monitor`` writes its CSV files (none by default).
        env_kwargs: extra keyword arguments of ``gym.make``.
        gamma: the discount of the returns whose running spread ``VecNormalize`` divides the rewards by: the
            algorithm's own ``gamma``, as rl-zoo passes it (a reward scale measured over another horizon than the
            one the agent learns).

    Raises:
        ValueError: for an unknown id (naming close matches), a registered id that cannot be built here (a
            package it needs is missing, e.g. mujoco-py for the MuJoCo v2 / v3 ids) or invalid counts.
    """
    if not is_positive_int(n_envs):
        raise ValueError(f"Invalid n_envs: {n_envs!r} (must be an integer >= 1)")
    if not (is_real_number(gamma) and 0.0 <= gamma <= 1.0):
        raise ValueError(f"Invalid gamma: {gamma!r} (must be a float in [0, 1])")
    kind = env_kind(env_id)
    env_kwargs = dict(env_kwargs or {})
    if frame_stack is not None and kind != "atari":
        raise ValueError(
            f"frame_stack={frame_stack!r} applies to Atari envs (ALE/...) only; {env_id} is {kind}: leave it out"
        )
    if kind == "atari":
        frame_stack = ATARI_FRAME_STACK if frame_stack is None else frame_stack
        if not is_positive_int(frame_stack):
            raise ValueError(f"Invalid frame_stack: {frame_stack!r} (must be an integer >= 1)")
        env_kwargs.setdefault("frameskip", 1)
        wrapper_kwargs = {"terminal_on_life_loss": training, "clip_reward": training}
        with _buildable(env_id):
            env = make_atari_env(
                env_id,
                n_envs=n_envs,
                seed=seed,
                monitor_dir=monitor_dir,
                wrapper_kwargs=wrapper_kwargs,
                env_kwargs=env_kwargs,
            )
        return VecFrameStack(env, n_stack=frame_stack)
    if normalize is None:
        normalize = kind == "mujoco"
    if isinstance(normalize, dict):
        unknown = sorted(set(normalize) - {"norm_obs", "norm_reward"})
        if unknown:
            raise ValueError(f"Invalid normalize keys {unknown}: allowed are norm_obs and norm_reward")
        options = {"norm_obs": True, "norm_reward": True, **normalize}
    elif isinstance(normalize, bool):
        options = {"norm_obs": normalize, "norm_reward": normalize}
    else:
        raise ValueError(f"Invalid normalize: {normalize!r} (a bool, or a dict of norm_obs / norm_reward)")
    with _buildable(env_id):
        env = make_vec_env(env_id, n_envs=n_envs, seed=seed, monitor_dir=monitor_dir, env_kwargs=env_kwargs)
    if options["norm_obs"] or options["norm_reward"]:
        env = VecNormalize(
            env,
            training=training,
            norm_obs=options["norm_obs"],
            norm_reward=options["norm_reward"] and training,
            gamma=float(gamma),
        )
    return env


# An evaluation env's seed is the training run's plus this, so it never replays the training envs' episodes.
EVAL_SEED_OFFSET = 10_000


def evaluation_env(env_id: str, seed: int, training_env: VecEnv | None = None, **options: Any) -> VecEnv:
    """One env to evaluate a trained agent on: :func:`make_env` with ``training=False`` (``options`` as the
    training run's), and, where both are behind ``VecNormalize``, the training env's observation statistics
    (frozen; rewards raw)."""
    env = make_env(env_id, n_envs=1, seed=seed, training=False, **options)
    if isinstance(training_env, VecNormalize) and isinstance(env, VecNormalize):
        env.obs_rms = training_env.obs_rms
    return env
