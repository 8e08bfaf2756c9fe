"""Evaluate a trained agent: mean and standard deviation of the return over N episodes, optionally a video.

    python scripts/evaluate.py --run runs/CartPole-v1_acktr_seed0            # a run folder of scripts/train.py
    python scripts/evaluate.py --model agent.zip --env CartPole-v1 --algo acktr --episodes 20
    python scripts/evaluate.py --run runs/CartPole-v1_acktr_seed0 --video videos/   # needs: pip install moviepy

Evaluation uses the game's true scores: no reward clipping or episodic life for Atari, frozen observation
statistics and raw rewards for environments trained behind VecNormalize (a run folder's or a model's
``vecnormalize.pkl``).
"""

from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stable_baselines3.common.evaluation import evaluate_policy  # noqa: E402
from stable_baselines3.common.vec_env import VecNormalize, VecVideoRecorder  # noqa: E402

from agents.rl_checkpoint import CorruptedFileError, latest_checkpoint  # noqa: E402
from agents.rl_checkpoint import load_agent as load_saved_agent  # noqa: E402
from agents.rl_config import ALGORITHMS, env_options  # noqa: E402
from envs import make_env  # noqa: E402


def load_agent(path: Path, algo: str, device: str) -> Any:
    """Load a saved agent; a missing file raises ``FileNotFoundError``, a damaged one ``CorruptedFileError``
    (a ``ValueError``) naming the file and, for a damaged member of the zip, the member."""
    return load_saved_agent(ALGORITHMS[algo], path, device=device)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=None, help="run folder written by scripts/train.py")
    parser.add_argument("--model", type=Path, default=None, help="saved agent (.zip), instead of --run")
    parser.add_argument("--env", default=None, help="env id (default: the run's)")
    parser.add_argument("--algo", choices=sorted(ALGORITHMS), default=None, help="(default: the run's, else acktr)")
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--seed", type=int, default=12_345)
    parser.add_argument("--stochastic", action="store_true", help="sample actions instead of the mode")
    parser.add_argument("--video", type=Path, default=None, help="folder to record the first episode(s) into")
    parser.add_argument("--video-length", type=int, default=1000, help="frames to record")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    args = parser.parse_args(argv)
    if (args.run is None) == (args.model is None):
        parser.error("give exactly one of --run and --model")
    if args.episodes < 1:
        parser.error(f"--episodes must be >= 1, got {args.episodes}")

    config: dict[str, Any] = {}
    if args.run is not None:
        if not (args.run / "config.yml").is_file():
            raise FileNotFoundError(f"{args.run} is not a run folder of scripts/train.py (no config.yml)")
        try:
            config = yaml.safe_load((args.run / "config.yml").read_text())
        except yaml.YAMLError as error:
            raise CorruptedFileError(f"{args.run / 'config.yml'} is corrupted: {error}") from None
        if not isinstance(config, dict):
            raise CorruptedFileError(f"{args.run / 'config.yml'} is corrupted: not a mapping of settings")
    env_id = args.env or config.get("env")
    if env_id is None:
        parser.error("--env is required with --model")
    if args.algo is not None and config.get("algo", args.algo) != args.algo:
        parser.error(f"{args.run} is a run of {config['algo']}, not {args.algo}: leave --algo out to use the run's")
    algo = args.algo or config.get("algo", "acktr")
    model_path = args.model or args.run / "model.zip"
    stats = model_path.with_name("vecnormalize.pkl")
    if args.run is not None and not model_path.is_file() and latest_checkpoint(args.run) is not None:
        checkpoint = latest_checkpoint(args.run)  # a run that stopped before its end: its last checkpoint
        print(f"(no model.zip in {args.run}: evaluating its last checkpoint, {checkpoint.name})")
        model_path, stats = checkpoint / "model.zip", checkpoint / "vecnormalize.pkl"
    model = load_agent(model_path, algo, args.device)

    env_kwargs = {"render_mode": "rgb_array"} if args.video else None
    options = env_options(config)
    # Without a recorded choice (a bare --model), the env is normalized exactly when saved statistics come with the
    # model: a MuJoCo agent trained on the raw env (the mujoco family's default) must not see VecNormalize's clipping.
    options.setdefault("normalize", stats.is_file())
    env = make_env(env_id, n_envs=1, seed=args.seed, training=False, env_kwargs=env_kwargs, **options)
    if model.observation_space != env.observation_space or model.action_space != env.action_space:
        env.close()
        raise ValueError(
            f"{model_path} does not fit {env_id}: it acts on observations {model.observation_space} and actions "
            f"{model.action_space}, the env has {env.observation_space} and {env.action_space}; give the --env it "
            "was trained on"
        )
    if stats.is_file():
        try:
            env = VecNormalize.load(str(stats), env.venv if isinstance(env, VecNormalize) else env)
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as error:
            raise CorruptedFileError(f"{stats} is corrupted ({type(error).__name__}: {error})") from None
        env.training, env.norm_reward = False, False
    if args.video:
        try:
            import moviepy  # noqa: F401
        except ImportError:
            raise SystemExit("--video needs moviepy: pip install moviepy") from None
        env = VecVideoRecorder(
            env, str(args.video), record_video_trigger=lambda step: step == 0, video_length=args.video_length
        )
    torch.set_num_threads(1)
    mean, std = evaluate_policy(model, env, n_eval_episodes=args.episodes, deterministic=not args.stochastic)
    env.close()
    print(f"{algo.upper()} on {env_id}: mean return {mean:.1f} +/- {std:.1f} over {args.episodes} episodes")
    return {"mean_return": float(mean), "std_return": float(std)}


if __name__ == "__main__":
    try:
        main()
    except (CorruptedFileError, FileNotFoundError, ValueError) as failure:
        sys.exit(f"error: {failure}")
