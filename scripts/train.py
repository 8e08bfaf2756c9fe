"""Train ACKTR (or SB3's A2C / PPO) on a gymnasium environment, then evaluate it.

With no arguments: ACKTR on CartPole-v1 with configs/acktr.yml, a few seconds to a minute on a laptop CPU.

    python scripts/train.py
    python scripts/train.py --env ALE/Pong-v5 --total-timesteps 200000 --device cuda
    python scripts/train.py --env CartPole-v1 --algo a2c --preconditioner ekfac     # SB3's A2C with EKFAC
    python scripts/train.py --log-dir runs/my_run --resume --total-timesteps 200000  # continue a run

Writes to the run folder: TensorBoard logs (tb/), the resolved config (config.yml), the commands (command.txt),
checkpoints between updates (checkpoint-<steps>/: model, VecNormalize statistics, RNG and environment state,
written as one folder renamed into place), the final model (model.zip, and vecnormalize.pkl for normalized
environments) and the evaluation (results.json). A new run never writes into a folder that holds files, and one
folder is used by one process at a time (docs/FAILURE_BEHAVIOUR.md).

Data parallel: ``torchrun --nproc_per_node N scripts/train.py ...`` trains one model on N processes (gloo on CPU,
NCCL with --device cuda, one GPU per process). Every count of the config is per process: each rank steps its own
``n_envs`` environments for ``total_timesteps`` steps, rank r with environment seed ``seed + 1000 r`` (rank 0's are
those of a single-process run); the gradients and the preconditioner's statistics are averaged across ranks every
update, so the ranks keep identical parameters. Only rank 0 writes the run folder (config.yml records
``world_size``), checkpoints and evaluates. --resume continues single-process runs only.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stable_baselines3.common.callbacks import BaseCallback, CallbackList, ProgressBarCallback  # noqa: E402
from stable_baselines3.common.evaluation import evaluate_policy  # noqa: E402
from stable_baselines3.common.utils import set_random_seed  # noqa: E402

from acktr_kfe import distributed  # noqa: E402
from agents import ACKTR, KroneckerActorCriticPolicy, ValueTargetScale  # noqa: E402
from agents.data_parallel import SynchronizedNormalization, rank_seed, start_alike  # noqa: E402
from agents.rl_checkpoint import (  # noqa: E402
    CorruptedFileError,
    latest_checkpoint,
    load_checkpoint,
    prune_tensorboard,
    read_meta,
    save_checkpoint,
)
from agents.rl_config import (  # noqa: E402
    ALGORITHMS,
    CHOICES,
    check_keys,
    env_options,
    model_arguments,
    resolve_config,
    validate_config,
)
from agents.run_folder import (  # noqa: E402
    RunFolderError,
    RunLock,
    atomic_write_text,
    refuse_existing_run,
    remove_stale_temporaries,
    temporary_path,
    write_error,
)
from envs import EVAL_SEED_OFFSET, env_kind, evaluation_env, make_env  # noqa: E402

DEFAULTS = {"env": "CartPole-v1", "algo": "acktr", "seed": 0}
# rl-zoo's settings of the algorithms without a file of their own (A2C, PPO).
BASELINES = ROOT / "configs" / "baselines.yml"
# What makes a run the run it is: resuming with another value refuses.
IDENTITY = ("env", "algo", "preconditioner", "seed")


class UpdateBoundaryCheckpoint(BaseCallback):
    """Checkpoint between updates: at the start of a rollout, once ``every`` environment steps have passed.

    At that point the previous update is complete and no transition of the next rollout has been collected, so a
    run resumed from it performs the same updates at the same step counts.
    """

    def __init__(self, run_dir: Path, every: int, identity: dict[str, Any]) -> None:
        super().__init__()
        self.run_dir, self.every, self.identity, self.last = run_dir, every, identity, 0

    def _on_training_start(self) -> None:
        self.last = self.num_timesteps

    def _on_rollout_start(self) -> None:
        if self.num_timesteps - self.last >= self.every:
            self.last = self.num_timesteps
            checkpoint(self.model, self.run_dir, self.identity)

    def _on_step(self) -> bool:
        return True


def checkpoint(model: Any, run_dir: Path, identity: dict[str, Any]) -> Path:
    """``save_checkpoint``, with a failed write reported as a ``RunFolderError`` naming the intact checkpoint."""
    try:
        return save_checkpoint(model, run_dir, identity)
    except OSError as error:
        raise write_error(run_dir, error, intact_note(run_dir)) from error


def intact_note(run_dir: Path, remedy: str = "make the folder writable and ") -> str:
    """What is still usable in a run folder after a failed write (or an interruption, with ``remedy=""``)."""
    latest = latest_checkpoint(run_dir)
    if latest is None:
        return "No checkpoint was written yet."
    return (
        f"The last complete checkpoint, {latest.name} (step {read_meta(latest)['steps']}), is intact: "
        f"{remedy}continue with --log-dir {run_dir} --resume."
    )


def save_final(model: Any, run_dir: Path) -> None:
    """``vecnormalize.pkl`` (if normalized) then ``model.zip``, each through a unique temporary file."""
    normalize = model.get_vec_normalize_env()
    if normalize is not None:
        temporary = temporary_path(run_dir / "vecnormalize.pkl")
        normalize.save(str(temporary))
        os.replace(temporary, run_dir / "vecnormalize.pkl")
    temporary = temporary_path(run_dir / "model.zip", ".zip")
    model.save(temporary)
    os.replace(temporary, run_dir / "model.zip")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--env", default=None, help="gymnasium id (default: CartPole-v1, or the resumed run's)")
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="YAML file (default: configs/acktr.yml; A2C and PPO: configs/baselines.yml)",
    )
    parser.add_argument("--algo", choices=sorted(ALGORITHMS), default=None, help="(default: acktr, or the run's)")
    parser.add_argument("--preconditioner", choices=list(CHOICES["preconditioner"]()), default=None)
    parser.add_argument("--seed", type=int, default=None, help="(default: 0, or the resumed run's)")
    parser.add_argument("--total-timesteps", type=int, default=None)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--log-dir", type=Path, default=None, help="run folder (default: runs/<env>_<algo>_seed<seed>)")
    parser.add_argument("--resume", action="store_true", help="continue the run folder from its last checkpoint")
    parser.add_argument(
        "--checkpoint-every", type=int, default=10_000, help="environment steps between saves (default: 10000)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: 1 for MLP policies, torch's default for CNN policies)",
    )
    parser.add_argument(
        "--dist-timeout", type=float, default=600.0, help="under torchrun: seconds a rank waits for a hung peer"
    )
    args = parser.parse_args(argv)
    if args.seed is not None and args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    if args.total_timesteps is not None and args.total_timesteps < 1:
        parser.error(f"--total-timesteps must be >= 1, got {args.total_timesteps}")
    if args.checkpoint_every < 1:
        parser.error(f"--checkpoint-every must be >= 1, got {args.checkpoint_every}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.resume and args.config is not None:
        parser.error("--resume continues with the run's saved settings (its config.yml); --config does not apply")
    return args


def default_run_dir(args: argparse.Namespace) -> Path:
    """runs/<env>_<algo>_seed<seed> (an ``ALE/`` id's slash as ``_``), with the defaults for what was not given."""
    env, algo, seed = (getattr(args, key) if getattr(args, key) is not None else DEFAULTS[key] for key in DEFAULTS)
    return ROOT / "runs" / f"{env.replace('/', '_')}_{algo}_seed{seed}"


def rollout_observers(model: Any) -> list[BaseCallback]:
    """``[ValueTargetScale()]`` for SB3's A2C / PPO with the Kronecker policy (each rollout's value targets and
    observations reach the policy, as ACKTR does itself), else ``[]``."""
    if isinstance(model.policy, KroneckerActorCriticPolicy) and not isinstance(model, ACKTR):
        return [ValueTargetScale()]
    return []


def preconditioner_of(config: dict[str, Any], algo: str) -> str | None:
    """The preconditioner a config trains with: ACKTR's, or the Kronecker policy's of A2C / PPO."""
    if algo == "acktr":
        return config.get("preconditioner", "ekfac")
    return (config.get("policy_kwargs") or {}).get("preconditioner")


def config_source(args: argparse.Namespace) -> Path:
    """The file a run's settings come from: --config, configs/<algo>.yml, else configs/baselines.yml (A2C, PPO)."""
    if args.config is not None:
        return args.config
    own = ROOT / "configs" / f"{args.algo}.yml"
    return own if own.is_file() else BASELINES


def build_config(args: argparse.Namespace, algorithm: type) -> dict[str, Any]:
    """The run's settings from its YAML file (or SB3's defaults) and the flags, validated."""
    path = config_source(args)
    if args.config is None and path == BASELINES:
        # A2C and PPO: rl-zoo's settings from configs/baselines.yml where it has the env, SB3's defaults elsewhere.
        kind = env_kind(args.env)
        config = {"policy": "CnnPolicy" if kind == "atari" else "MlpPolicy", "n_envs": 8, "total_timesteps": 100_000}
        entry = resolve_config(path, args.env, algorithm) if path.is_file() else {}
        if entry:
            config.update(entry)
            print(f"({args.algo.upper()} on {args.env} with rl-zoo's hyperparameters from configs/baselines.yml)")
        else:
            print(f"(no {args.algo} entry for {args.env}: {args.algo.upper()} runs with SB3's default hyperparameters)")
    else:
        config = resolve_config(path, args.env, algorithm)
        if not config:
            print(f"({path} sets nothing for {args.env}: {algorithm.__name__} runs with its constructor's defaults)")
    config = validate_config(config, path, algorithm)
    config.setdefault("policy", "MlpPolicy")
    # A file that leaves n_envs out: one env for ACKTR (as configs/acktr.yml's default), 8 for A2C and PPO.
    config.setdefault("n_envs", 1 if issubclass(algorithm, ACKTR) else 8)
    config.setdefault("total_timesteps", 100_000)
    config.setdefault("eval_episodes", 10)
    if args.total_timesteps is not None:
        config["total_timesteps"] = args.total_timesteps
    if args.preconditioner is not None:
        if args.algo == "acktr":
            config["preconditioner"] = args.preconditioner
        else:
            config["policy"] = "KroneckerActorCriticPolicy"
            config["policy_kwargs"] = {**config.get("policy_kwargs", {}), "preconditioner": args.preconditioner}
    return config


def resumed_config(args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    """The saved settings of the run in ``run_dir``, checked against the flags; fills the flags left out.

    Reads files only: a mismatch raises ``RunFolderError`` before anything in the folder changes.
    """
    path = run_dir / "config.yml"
    if not path.is_file():
        raise FileNotFoundError(
            f"--resume: no checkpoint in {run_dir} (no run of scripts/train.py: no config.yml); run without "
            "--resume to start training"
        )
    try:
        saved = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise CorruptedFileError(f"{path} is corrupted: {error}") from None
    if not isinstance(saved, dict) or not all(key in saved for key in ("env", "algo", "seed")):
        raise CorruptedFileError(f"{path} is corrupted: it lacks env, algo or seed")
    saved_identity = {key: saved.get(key) for key in ("env", "algo", "seed")}
    saved_identity["preconditioner"] = preconditioner_of(saved, saved["algo"])
    conflicts = [
        f"{key} {getattr(args, key)!r} (the run has {saved_identity[key]!r})"
        for key in IDENTITY
        if getattr(args, key) is not None and getattr(args, key) != saved_identity[key]
    ]
    if conflicts:
        raise RunFolderError(
            f"--resume: the run in {run_dir} cannot continue with another {', '.join(conflicts)}. Resume without "
            "these flags to continue it as it was, or start a new run with a fresh --log-dir."
        )
    for key in ("env", "algo", "seed"):
        setattr(args, key, saved[key])
    config = {key: value for key, value in saved.items() if key not in ("env", "algo", "seed", "world_size")}
    if saved["algo"] not in ALGORITHMS:
        raise CorruptedFileError(f"{path} is corrupted: algo {saved['algo']!r} is none of {', '.join(ALGORITHMS)}")
    check_keys(path, config, ALGORITHMS[saved["algo"]])
    config = validate_config(config, path)
    if args.total_timesteps is not None:
        config["total_timesteps"] = args.total_timesteps
    return config


# torch's own default, read before any run of this process changes it.
TORCH_DEFAULT_THREADS = torch.get_num_threads()


def default_threads(config: dict[str, Any]) -> int:
    """Torch threads when --threads is not given: one for MLP policies, whose small products lose more to
    threading overhead than they gain (and leave a core to the environments), torch's default for CNN policies,
    whose convolutions and large preconditioner products gain (ACKTR on ALE/Pong-v5, 2-core CPU: 360 env steps/s
    with two threads against 276 with one; docs/BENCHMARKS.md)."""
    policy = str(config.get("policy", "MlpPolicy"))
    return TORCH_DEFAULT_THREADS if "Cnn" in policy else 1


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train (or resume) a run and evaluate it; returns the contents of results.json.

    Raises:
        RunFolderError: the folder holds another run, is in use, does not match ``--resume``'s flags, or a write
            failed (the message names what is intact).
        CorruptedFileError: a checkpoint file does not read.
        FileNotFoundError, ValueError: a missing checkpoint or config, an unknown env id, an invalid value.
    """
    args = parse_args(argv)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    rank, ranks = distributed.init_from_environment(device, timeout=args.dist_timeout)
    finished = False
    try:
        result = _main(args, rank, ranks)
        finished = True
        return result
    finally:
        distributed.shutdown(synchronize=finished)


def _main(args: argparse.Namespace, rank: int, ranks: int) -> dict[str, Any]:
    """``main`` once the process group (under torchrun) is up."""
    if args.resume and ranks > 1:
        raise ValueError("--resume continues a run in one process; run it without torchrun")
    if ranks > 1 and args.device != "cpu" and torch.cuda.is_available():
        args.device = f"cuda:{torch.cuda.current_device()}"  # this rank's GPU (LOCAL_RANK)
    run_dir = args.log_dir or default_run_dir(args)
    if args.resume:
        config = resumed_config(args, run_dir)
    else:
        for key, value in DEFAULTS.items():
            if getattr(args, key) is None:
                setattr(args, key, value)
        config = None
    algorithm = ALGORITHMS[args.algo]
    if config is None:
        config = build_config(args, algorithm)
        refused = None
        try:
            if rank == 0:
                hint = f"To continue it: --log-dir {run_dir} --resume."
                refuse_existing_run(run_dir, flag="--log-dir", resume_hint=hint)
        except RunFolderError as error:
            refused = error
        if distributed.agree_any(refused is not None, what="the run folder's check"):  # every rank stops
            raise refused or RunFolderError(f"rank 0 could not use the run folder {run_dir} (its message says why)")
    torch.set_num_threads(args.threads or default_threads(config))
    policy, kwargs = model_arguments(config)
    identity = {"env": args.env, "algo": args.algo, "preconditioner": preconditioner_of(config, args.algo)}
    if ranks > 1 and args.algo != "acktr" and config.get("policy") != "KroneckerActorCriticPolicy":
        # SB3's own optimizers would step each rank on its own gradients: the ranks would drift apart.
        raise ValueError(
            f"torchrun with {args.algo.upper()} needs a Kronecker policy, whose optimizer averages the gradients "
            "across ranks: add --preconditioner ekfac (or kfac), or use --algo acktr"
        )
    if rank > 0:
        return _run_follower(args, rank, config, algorithm, policy, kwargs)

    with RunLock(run_dir) as lock:
        if lock.took_over_from is not None:
            print(f"(took over the lock of {run_dir} left by PID {lock.took_over_from}, which is no longer running)")
        try:
            return _run(args, run_dir, config, algorithm, policy, kwargs, identity)
        except KeyboardInterrupt:
            print(f"\nInterrupted. {intact_note(run_dir, remedy='')}", file=sys.stderr)
            raise


def _run(
    args: argparse.Namespace,
    run_dir: Path,
    config: dict[str, Any],
    algorithm: type,
    policy: Any,
    kwargs: dict[str, Any],
    identity: dict[str, Any],
) -> dict[str, Any]:
    """Train, checkpoint, save and evaluate with the folder locked."""
    latest = None
    if args.resume:
        stale = remove_stale_temporaries(run_dir)
        if stale:
            print(f"(removed {len(stale)} unfinished temporary file(s) of a run that died: {', '.join(stale)})")
        latest = latest_checkpoint(run_dir)
        if latest is None:
            why = (
                "its checkpoint.zip is of an earlier version of train.py, which --resume does not read"
                if (run_dir / "checkpoint.zip").is_file()
                else "the run stopped before its first checkpoint (--checkpoint-every)"
            )
            raise FileNotFoundError(
                f"--resume: no checkpoint in {run_dir}: {why}. Start the run again with a fresh --log-dir."
            )
        meta = read_meta(latest)
        for key in ("env", "algo"):
            if meta.get(key) != identity[key]:
                raise CorruptedFileError(
                    f"{latest / 'meta.json'}: {key} {meta.get(key)!r} but config.yml says {identity[key]!r}"
                )
    else:
        refuse_existing_run(run_dir, flag="--log-dir")  # again, now that the folder is ours
    tb_dir = run_dir / "tb"
    env_seed = args.seed
    if latest is not None and not read_meta(latest).get("env_state"):
        env_seed = args.seed + int(read_meta(latest)["steps"])  # new episodes, not a replay of the first ones
    # A registered id whose package is missing (mujoco-py, Box2D, ...) is a ValueError naming it (envs.make_env).
    env = make_env(args.env, n_envs=config["n_envs"], seed=env_seed, **env_options(config))
    if latest is not None:
        model, env, exact = load_checkpoint(latest, algorithm, env, device=args.device, tensorboard_log=str(tb_dir))
    else:
        set_random_seed(args.seed)
        try:
            model = algorithm(policy, env, seed=args.seed, device=args.device, tensorboard_log=str(tb_dir), **kwargs)
        except (TypeError, ValueError, AssertionError) as error:
            env.close()
            source = config_source(args)
            raise ValueError(
                f"{source}: these settings do not build {args.algo.upper()} on {args.env}: "
                f"{type(error).__name__}: {error}"
            ) from None

    start_alike(model)
    # Only now, with the model built or loaded, does the folder change.
    saved = {"env": args.env, "algo": args.algo, "seed": args.seed, **config, "world_size": distributed.world_size()}
    command = shlex.join([sys.executable, *sys.argv]) + "\n"
    try:
        atomic_write_text(run_dir / "config.yml", yaml.safe_dump(saved))
        previous = (run_dir / "command.txt").read_text() if args.resume and (run_dir / "command.txt").is_file() else ""
        atomic_write_text(run_dir / "command.txt", previous + command)
    except OSError as error:
        env.close()
        raise write_error(run_dir, error, intact_note(run_dir)) from error
    if latest is not None:
        dropped = prune_tensorboard(tb_dir, model.num_timesteps) if tb_dir.is_dir() else 0
        print(
            f"Resuming from {latest} at {model.num_timesteps} environment steps"
            + ("" if exact else " (the environments start new episodes: their state cannot be saved)")
            + (f"; dropped {dropped} TensorBoard values logged after it" if dropped else "")
        )
    else:
        checkpoint(model, run_dir, identity)  # step 0: a run that dies early can still be resumed
    remaining = max(0, config["total_timesteps"] - model.num_timesteps)
    if not remaining:
        print(
            f"(the run is at {model.num_timesteps} steps, --total-timesteps {config['total_timesteps']}: no training)"
        )
    rollout = int(model.n_steps) * int(model.n_envs)
    if remaining % rollout:
        # SB3 collects whole rollouts: the run ends at the next multiple of the rollout.
        end = model.num_timesteps + -(-remaining // rollout) * rollout
        print(f"(a rollout is {model.n_steps} steps x {model.n_envs} envs: the run ends at {end} steps)")
    progress = ProgressBarCallback()
    try:
        if remaining:
            model.learn(
                remaining,
                callback=CallbackList(
                    [
                        SynchronizedNormalization(),
                        *rollout_observers(model),
                        UpdateBoundaryCheckpoint(run_dir, args.checkpoint_every, identity),
                        progress,
                    ]
                ),
                log_interval=1,  # every update reaches TensorBoard: the learning curves of scripts/plot.py
                reset_num_timesteps=not args.resume,  # a resume continues the same TensorBoard folder and steps
                tb_log_name=args.algo,
            )
        checkpoint(model, run_dir, identity)
        try:
            save_final(model, run_dir)
        except OSError as error:
            raise write_error(run_dir, error, intact_note(run_dir)) from error
    finally:
        if getattr(progress, "pbar", None) is not None:
            progress.pbar.close()
        if getattr(model, "_logger", None) is not None:  # flush and close TensorBoard's files
            model.logger.close()
        env.close()

    eval_env = evaluation_env(args.env, args.seed + EVAL_SEED_OFFSET, model.get_env(), **env_options(config))
    mean, std = evaluate_policy(model, eval_env, n_eval_episodes=config["eval_episodes"])
    eval_env.close()
    results = {
        "env": args.env,
        "algo": args.algo,
        "seed": args.seed,
        "timesteps": int(model.num_timesteps),
        "world_size": distributed.world_size(),
        "eval_episodes": config["eval_episodes"],
        "mean_return": float(mean),
        "std_return": float(std),
    }
    try:
        atomic_write_text(run_dir / "results.json", json.dumps(results, indent=2) + "\n")
    except OSError as error:
        raise write_error(run_dir, error, intact_note(run_dir)) from error
    print(
        f"{args.algo.upper()} on {args.env} after {model.num_timesteps} steps: mean return {mean:.1f} +/- "
        f"{std:.1f} over {config['eval_episodes']} evaluation episodes. Run folder: {run_dir}"
    )
    return results


def _run_follower(
    args: argparse.Namespace, rank: int, config: dict[str, Any], algorithm: type, policy: Any, kwargs: dict[str, Any]
) -> dict[str, Any]:
    """A rank other than 0 under torchrun: its own environments (seed + 1000 rank), the same updates, no files."""
    seed = rank_seed(args.seed, rank)
    env = make_env(args.env, n_envs=config["n_envs"], seed=seed, **env_options(config))
    set_random_seed(args.seed)
    try:
        # Built with rank 0's seed (the same initial parameters), then reseeded for its own environments.
        model = algorithm(policy, env, seed=args.seed, device=args.device, **kwargs)
        model.set_random_seed(seed)
        start_alike(model)
        callbacks = CallbackList([SynchronizedNormalization(), *rollout_observers(model)])
        model.learn(config["total_timesteps"], callback=callbacks, log_interval=1_000_000)
    finally:
        env.close()
    return {"rank": rank, "timesteps": int(model.num_timesteps)}


if __name__ == "__main__":
    try:
        main()
    except (RunFolderError, CorruptedFileError, FileNotFoundError, ValueError) as failure:
        sys.exit(f"error: {failure}")
    except KeyboardInterrupt:
        sys.exit(130)  # the resume command is printed already; no traceback after it
