"""Checkpoints of an SB3 run that resume as closely as the environment allows, and agent files read safely.

A checkpoint is one folder, ``checkpoint-<steps>/`` in the run folder, filled under a temporary name and renamed
into place, so the model and the VecNormalize statistics in it always belong to the same step:

- ``model.zip``: the SB3 save (parameters, optimizer state, step counter, last observation);
- ``vecnormalize.pkl``: the normalization statistics, for a ``VecNormalize`` environment;
- ``state.pkl``: the random number generator states (python, numpy, torch CPU and CUDA) and, where it can be
  restored exactly (environments that pickle their full state, as gymnasium's classic control), the environments
  with VecNormalize's running discounted returns;
- ``meta.json``: the step count and the run's identity (env, algo, preconditioner), written last.

Checkpoints are taken between updates (after a ``train()`` and before the next rollout), so a resumed run
performs the same updates at the same step counts. Older checkpoint folders are removed once a newer one is in
place; if a run dies between the two, ``latest_checkpoint`` picks the newest.
"""

from __future__ import annotations

import io
import json
import pickle
import random
import shutil
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv, VecNormalize

from .run_folder import atomic_folder, temporary_path

PREFIX = "checkpoint-"
# What reading a damaged file raises (json.JSONDecodeError and UnicodeDecodeError are ValueErrors, listed to keep
# other ValueErrors, as SB3's "spaces do not match", as they are).
READ_ERRORS: tuple[type[BaseException], ...] = (
    zipfile.BadZipFile,
    KeyError,
    EOFError,
    pickle.UnpicklingError,
    struct.error,
    json.JSONDecodeError,
    UnicodeDecodeError,
)


class CorruptedFileError(ValueError):
    """A saved agent or checkpoint file cannot be read: damaged, truncated or not what its name says."""


# --- random number generators and environment state ---------------------------------------------------------
def capture_rng() -> dict[str, Any]:
    """The states of python's, numpy's and torch's global generators (CUDA included when present)."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Put back the generator states of ``capture_rng``."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "torch_cuda" in state and torch.cuda.is_available() and len(state["torch_cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["torch_cuda"])


def _base_vec_env(env: VecEnv) -> VecEnv:
    while isinstance(env, VecNormalize) or hasattr(env, "venv"):
        env = env.venv
    return env


def capture_env_state(env: VecEnv) -> bytes | None:
    """The pickled environments of a ``DummyVecEnv`` when pickling restores their full state, else ``None``.

    Environments built through ``gymnasium.utils.EzPickle`` (MuJoCo, Atari) pickle as their constructor
    arguments, which would restart them rather than continue them: those are not captured.
    """
    import cloudpickle
    from gymnasium.utils import EzPickle

    base = _base_vec_env(env)
    if not isinstance(base, DummyVecEnv) or any(isinstance(e.unwrapped, EzPickle) for e in base.envs):
        return None
    try:
        return cloudpickle.dumps({"envs": base.envs, "buf_obs": base.buf_obs, "buf_dones": base.buf_dones})
    except Exception:  # an environment that does not pickle is simply not captured
        return None


def restore_env_state(env: VecEnv, blob: bytes) -> None:
    """Replace the environments of ``env``'s ``DummyVecEnv`` by the ones of ``capture_env_state``."""
    base = _base_vec_env(env)
    saved = pickle.loads(blob)
    if not isinstance(base, DummyVecEnv) or len(saved["envs"]) != base.num_envs:
        raise ValueError(f"the checkpoint holds {len(saved['envs'])} environments, the run has {base.num_envs}")
    base.envs = saved["envs"]
    base.buf_obs, base.buf_dones = saved["buf_obs"], saved["buf_dones"]


# --- reading saved agents -----------------------------------------------------------------------------------
def _damaged_member(path: Path) -> str | None:
    """The first member of an SB3 zip that does not read, or ``None``."""
    with zipfile.ZipFile(path) as archive:
        bad = archive.testzip()
        if bad is not None:
            return f"{bad} (checksum mismatch)"
        for name in archive.namelist():
            payload = archive.read(name)
            try:
                if name.endswith(".pth"):
                    torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
                elif name == "data":
                    json.loads(payload)
            except Exception as error:  # any failure to read the member is the diagnosis
                return f"{name} ({type(error).__name__})"
    return None


# Settings that only one of these on-policy algorithms saves (checked in this order: ACKTR's data has A2C's too).
_SAVED_BY = (
    ("ACKTR", ("preconditioner", "max_kl")),
    ("PPO", ("n_epochs", "clip_range")),
    ("TRPO", ("cg_max_steps",)),
    ("A2C", ("ent_coef", "vf_coef")),
)


def check_saved_algorithm(path: Path, algorithm: type) -> None:
    """Refuse, before SB3 reads it, an intact zip at ``path`` whose settings (its ``data`` member) show it was saved
    by another of ACKTR, PPO, TRPO and A2C than the one ``algorithm`` is (or derives from), or that has no ``data``
    member. An algorithm that is none of them (sb3-contrib's RecurrentPPO, a user's own), a file that does not read
    as a zip, or settings that name none of them are left to the loader.

    Raises:
        CorruptedFileError: the archive has no ``data`` member.
        ValueError: the saved agent is another algorithm's (the message names it).
    """
    known = {name for name, _ in _SAVED_BY}
    family = next((cls.__name__ for cls in algorithm.__mro__ if cls.__name__ in known), None)
    try:
        with zipfile.ZipFile(path) as archive:
            if "data" not in archive.namelist():
                raise CorruptedFileError(
                    f"{path} is corrupted: it has no data member (the saved agent's settings); restore it from a "
                    "backup or train again"
                )
            data = json.loads(archive.read("data"))
    except CorruptedFileError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return
    if family is None or not isinstance(data, dict):
        return
    saved_by = next((name for name, settings in _SAVED_BY if all(key in data for key in settings)), None)
    if saved_by is not None and saved_by != family:
        raise ValueError(
            f"{path} holds an agent saved by {saved_by}, not {algorithm.__name__}: load it with {saved_by}.load"
        )


def saved_agent_file(path: str | Path) -> Path:
    """The file of an agent saved at ``path``: ``path`` itself, or ``path`` + ``.zip`` (the name as given to
    ``save()``, which adds it), as SB3's ``load`` reads it.

    Raises:
        FileNotFoundError: neither exists.
    """
    file = next((f for f in (Path(path), Path(f"{path}.zip")) if f.is_file()), None)
    if file is None:
        raise FileNotFoundError(f"no saved agent at {path} (nor at {path}.zip)")
    return file


def load_agent(algorithm: type, path: Path, **kwargs: Any) -> Any:
    """``algorithm.load(path, **kwargs)``; a damaged file raises ``CorruptedFileError`` naming it.

    Raises:
        FileNotFoundError: no file at ``path`` (nor at ``path`` + ``.zip``).
        CorruptedFileError: not a zip archive, or a member (``policy.pth``, ``data``, ...) missing or unreadable.
        ValueError: the file holds another algorithm's agent (named in the message).
    """
    path = saved_agent_file(path)
    check_saved_algorithm(path, algorithm)
    return diagnosed_load(lambda: algorithm.load(path, **kwargs), path, algorithm.__name__)


def diagnosed_load(load: Callable[[], Any], path: Path, name: str, reraise_intact: bool = False) -> Any:
    """``load()`` of the agent saved at ``path``; a failure that a damaged file explains raises
    ``CorruptedFileError`` naming the file and the member that does not read (``name``: the algorithm's). With
    ``reraise_intact``, a failure of a file whose members all read is raised as it came (an ``env`` that does not
    fit, a file of another algorithm), not reported as a corrupted file."""
    try:
        return load()
    except (*READ_ERRORS, RuntimeError, AssertionError, ValueError) as error:
        failure = error  # diagnosed below, without the loader's advice (such as weights_only=False)
    try:
        member = _damaged_member(path)
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise CorruptedFileError(
            f"{path} is corrupted: it is not a readable zip archive ({error}); restore it from a backup or train again"
        ) from None
    if member is not None:
        raise CorruptedFileError(
            f"{path} is corrupted: its member {member} cannot be read; restore the file from a backup or train again"
        )
    if reraise_intact or (isinstance(failure, ValueError) and not isinstance(failure, READ_ERRORS)):
        raise failure  # an intact file that does not fit the request, as SB3's "spaces do not match"
    summary = str(failure).splitlines()[0][:200] if str(failure) else ""
    raise CorruptedFileError(
        f"{path} is not a readable {name} agent (corrupted, or saved by another algorithm or "
        f"version): {type(failure).__name__}: {summary}"
    )


# --- checkpoint folders -------------------------------------------------------------------------------------
def checkpoint_folders(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoint folders of a run, oldest first, as ``(steps, folder)``."""
    found = []
    for folder in run_dir.glob(f"{PREFIX}*"):
        suffix = folder.name[len(PREFIX) :]
        if folder.is_dir() and suffix.isdigit() and (folder / "meta.json").is_file():
            found.append((int(suffix), folder))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder of a run, or ``None``."""
    folders = checkpoint_folders(run_dir)
    return folders[-1][1] if folders else None


def save_checkpoint(model: Any, run_dir: Path, identity: dict[str, Any]) -> Path:
    """Write ``checkpoint-<steps>/`` atomically, then remove older checkpoint folders; returns the folder.

    A checkpoint of the same step that already exists is kept as it is.
    """
    steps = int(model.num_timesteps)
    final = run_dir / f"{PREFIX}{steps:012d}"
    if not final.is_dir():
        with atomic_folder(final) as folder:
            model.save(folder / "model.zip")
            env = model.get_env()
            normalize = model.get_vec_normalize_env()
            if normalize is not None:
                normalize.save(str(folder / "vecnormalize.pkl"))
            state = {"rng": capture_rng(), "env": capture_env_state(env) if env is not None else None}
            if normalize is not None:  # VecNormalize does not pickle its running discounted returns
                state["vecnormalize_returns"] = normalize.returns.copy()
            with (folder / "state.pkl").open("wb") as handle:
                pickle.dump(state, handle)
            meta = {"steps": steps, "vecnormalize": normalize is not None, "env_state": state["env"] is not None}
            (folder / "meta.json").write_text(json.dumps({**meta, **identity}, indent=2) + "\n")
    for older_steps, folder in checkpoint_folders(run_dir):
        if older_steps < steps:
            shutil.rmtree(folder, ignore_errors=True)
    return final


def read_meta(folder: Path) -> dict[str, Any]:
    """``meta.json`` of a checkpoint folder; a damaged one raises ``CorruptedFileError``."""
    path = folder / "meta.json"
    try:
        meta = json.loads(path.read_text())
        int(meta["steps"])
    except (ValueError, KeyError, TypeError) as error:
        raise CorruptedFileError(f"{path} is corrupted ({type(error).__name__}: {error})") from None
    return meta


def load_checkpoint(
    folder: Path, algorithm: type, env: VecEnv, *, device: str, tensorboard_log: str
) -> tuple[Any, VecEnv, bool]:
    """The model of a checkpoint folder on ``env`` (with its VecNormalize statistics), and the RNG states.

    Returns:
        ``(model, env, exact)``: ``exact`` when the environments' state was restored too; otherwise the
        environments start new episodes.

    Raises:
        CorruptedFileError: a file of the checkpoint does not read, or the files disagree on the step count.
    """
    meta = read_meta(folder)
    try:
        with (folder / "state.pkl").open("rb") as handle:
            state = pickle.load(handle)
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ValueError) as error:
        raise CorruptedFileError(f"{folder / 'state.pkl'} is corrupted ({type(error).__name__}: {error})") from None
    stats = folder / "vecnormalize.pkl"
    if meta["vecnormalize"]:
        if not isinstance(env, VecNormalize):
            raise CorruptedFileError(f"{folder} holds VecNormalize statistics, but the run's env is not normalized")
        try:
            env = VecNormalize.load(str(stats), env.venv)
        except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ValueError) as error:
            raise CorruptedFileError(f"{stats} is corrupted ({type(error).__name__}: {error})") from None
    exact = state.get("env") is not None
    if exact:
        restore_env_state(env, state["env"])
        if isinstance(env, VecNormalize) and "vecnormalize_returns" in state:
            env.returns = state["vecnormalize_returns"]
    model = load_agent(
        algorithm, folder / "model.zip", env=env, device=device, tensorboard_log=tensorboard_log, force_reset=not exact
    )
    if int(model.num_timesteps) != int(meta["steps"]):
        raise CorruptedFileError(
            f"{folder}: model.zip is at step {model.num_timesteps} but meta.json says {meta['steps']}"
        )
    restore_rng(state["rng"])
    return model, env, exact


# --- TensorBoard ----------------------------------------------------------------------------------------------
def prune_tensorboard(tb_dir: Path, max_step: int) -> int:
    """Drop the events logged after ``max_step`` from every event file under ``tb_dir``; returns how many.

    A run resumed from an earlier checkpoint logs those steps again; pruning first keeps one value per step.
    Each file is rewritten through a temporary file renamed into place.
    """
    from tensorboard.compat.proto import event_pb2

    dropped = 0
    for path in sorted(tb_dir.rglob("events.out.tfevents.*")):
        data = path.read_bytes()
        kept, offset, removed = bytearray(), 0, 0
        while offset + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            end = offset + 12 + length + 4
            if end > len(data):  # a record cut short by a crash: dropped
                break
            event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
            if event.step <= max_step or event.HasField("file_version"):
                kept += data[offset:end]
            else:
                removed += 1
            offset = end
        if removed or offset != len(data):
            temporary = temporary_path(path)
            temporary.write_bytes(bytes(kept))
            temporary.replace(path)
            dropped += removed
    return dropped
