"""Train ACKTR (or SB3's A2C / PPO) on a gymnasium environment, then evaluate it.

With no arguments: ACKTR on CartPole-v1 with configs/acktr.yml, a few seconds to a minute on a laptop CPU.

    python scripts/train.py
    python scripts/train.py --env ALE/Pong-v5 --total-timesteps 200000 --device cuda
    python scripts/train.py --env CartPole-v1 --algo a2c --preconditioner ekfac     # SB3's A2C with EKFAC
    python scripts/train.py --log-dir runs/my_run --resume                          # continue from a checkpoint

Writes to the run folder: TensorBoard logs (tb/), the resolved config (config.yml) and the command
(command.txt), periodic checkpoints written atomically (checkpoint.zip, and vecnormalize.pkl for normalized
environments), the final model (model.zip) and the evaluation (results.json).
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

from stable_baselines3.common.callbacks import BaseCallback  # noqa: E402
from stable_baselines3.common.evaluation import evaluate_policy  # noqa: E402
from stable_baselines3.common.utils import set_random_seed  # noqa: E402
from stable_baselines3.common.vec_env import VecNormalize  # noqa: E402

from agents.rl_config import ALGORITHMS, env_options, model_arguments, resolve_config  # noqa: E402
from envs import env_kind, make_env  # noqa: E402


class AtomicCheckpoint(BaseCallback):
    """Every ``every`` environment steps, save the model (and VecNormalize statistics) atomically."""

    def __init__(self, run_dir: Path, every: int) -> None:
        super().__init__()
        self.run_dir, self.every, self.last = run_dir, every, 0

    def _on_training_start(self) -> None:
        self.last = self.num_timesteps

    def _on_step(self) -> bool:
        if self.num_timesteps - self.last >= self.every:
            self.last = self.num_timesteps
            save_atomically(self.model, self.run_dir, "checkpoint")
        return True


def save_atomically(model: Any, run_dir: Path, name: str) -> None:
    """Write ``name.zip`` (and ``vecnormalize.pkl``) through temporary files renamed into place."""
    temporary = run_dir / f".{name}.tmp.zip"
    model.save(temporary)
    os.replace(temporary, run_dir / f"{name}.zip")
    env = model.get_env()
    if isinstance(env, VecNormalize):
        temporary_stats = run_dir / ".vecnormalize.tmp.pkl"
        env.save(str(temporary_stats))
        os.replace(temporary_stats, run_dir / "vecnormalize.pkl")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--env", default="CartPole-v1", help="gymnasium id (default: CartPole-v1)")
    parser.add_argument("--config", type=Path, default=None, help="YAML file (default: configs/<algo>.yml)")
    parser.add_argument("--algo", choices=sorted(ALGORITHMS), default="acktr")
    parser.add_argument("--preconditioner", choices=["ekfac", "kfac"], default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--total-timesteps", type=int, default=None)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--log-dir", type=Path, default=None, help="run folder (default: runs/<algo>_<env>_<seed>)")
    parser.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoint")
    parser.add_argument("--checkpoint-every", type=int, default=10_000, help="environment steps between saves")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is fastest for MLPs)")
    args = parser.parse_args(argv)
    if args.total_timesteps is not None and args.total_timesteps < 1:
        parser.error(f"--total-timesteps must be >= 1, got {args.total_timesteps}")
    if args.checkpoint_every < 1 or args.threads < 1:
        parser.error("--checkpoint-every and --threads must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    return args


def build_config(args: argparse.Namespace, algorithm: type) -> dict[str, Any]:
    path = args.config or ROOT / "configs" / f"{args.algo}.yml"
    if args.config is None and not path.is_file():
        print(f"(no {path.name}: {args.algo.upper()} runs with SB3's default hyperparameters)")
        kind = env_kind(args.env)
        config = {"policy": "CnnPolicy" if kind == "atari" else "MlpPolicy", "n_envs": 8, "total_timesteps": 100_000}
    else:
        config = resolve_config(path, args.env, algorithm)
    config.setdefault("policy", "MlpPolicy")
    config.setdefault("n_envs", 8)
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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    algorithm = ALGORITHMS[args.algo]
    config = build_config(args, algorithm)
    run_dir = args.log_dir or ROOT / "runs" / f"{args.algo}_{args.env.replace('/', '_')}_seed{args.seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = run_dir / "checkpoint.zip"
    if args.resume and not checkpoint.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint in {run_dir}; run without --resume to start training")
    (run_dir / "config.yml").write_text(
        yaml.safe_dump({"env": args.env, "algo": args.algo, "seed": args.seed, **config})
    )
    (run_dir / "command.txt").write_text(shlex.join([sys.executable, *sys.argv]) + "\n")

    policy, kwargs = model_arguments(config)
    set_random_seed(args.seed)
    env = make_env(args.env, n_envs=config["n_envs"], seed=args.seed, **env_options(config))
    if args.resume:
        if isinstance(env, VecNormalize) and (run_dir / "vecnormalize.pkl").is_file():
            env = VecNormalize.load(str(run_dir / "vecnormalize.pkl"), env.venv)
        model = algorithm.load(checkpoint, env=env, device=args.device, tensorboard_log=str(run_dir / "tb"))
        print(f"Resuming from {checkpoint} at {model.num_timesteps} environment steps")
    else:
        model = algorithm(
            policy, env, seed=args.seed, device=args.device, tensorboard_log=str(run_dir / "tb"), **kwargs
        )
    remaining = max(0, config["total_timesteps"] - model.num_timesteps)
    if remaining:
        model.learn(
            remaining,
            callback=AtomicCheckpoint(run_dir, args.checkpoint_every),
            progress_bar=True,
            log_interval=1,  # every update reaches TensorBoard: the learning curves of scripts/plot.py
            reset_num_timesteps=not args.resume,
            tb_log_name=args.algo,
        )
    save_atomically(model, run_dir, "checkpoint")
    save_atomically(model, run_dir, "model")

    eval_env = make_env(args.env, n_envs=1, seed=args.seed + 10_000, training=False, **env_options(config))
    if isinstance(env, VecNormalize) and isinstance(eval_env, VecNormalize):
        eval_env.obs_rms = env.obs_rms
    mean, std = evaluate_policy(model, eval_env, n_eval_episodes=config["eval_episodes"])
    results = {
        "env": args.env,
        "algo": args.algo,
        "seed": args.seed,
        "timesteps": int(model.num_timesteps),
        "eval_episodes": config["eval_episodes"],
        "mean_return": float(mean),
        "std_return": float(std),
    }
    (run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(
        f"{args.algo.upper()} on {args.env} after {model.num_timesteps} steps: mean return {mean:.1f} +/- "
        f"{std:.1f} over {config['eval_episodes']} evaluation episodes. Run folder: {run_dir}"
    )
    return results


if __name__ == "__main__":
    main()
