"""How far ACKTR's quadratic model of the KL is from the KL its steps make, on the batch and on held-out states.

    python scripts/kl_model_check.py --env Hopper-v5 --steps 40000 --seed 0
    python scripts/kl_model_check.py --env Reacher-v5 HalfCheetah-v5 Pendulum-v1 --steps 40000

Trains ``ACKTR("MlpPolicy", make_vec_env(ENV, n_envs=1, seed=SEED), seed=SEED)`` (the constructor's defaults, plus
``--kl-backtrack`` if given) and logs per update:
- the policy's KL predicted by the quadratic model (``optimizer.last_predicted_kls[0]``);
- the KL measured on the update's own batch (``policy.last_measured_kl``);
- the KL measured on held-out states: the previous rollout's observations, which the step never saw (one forward
  pass before and one after the step).
It prints, per third of the run, the medians of those KLs and of their ratios, with the calibration's running bias
and the policy step's clip factor, as a markdown table (docs/BENCHMARKS.md, "ACKTR transfer, session 13").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch as th

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stable_baselines3.common.env_util import make_vec_env

from agents import ACKTR
from agents.kl_calibration import actor_critic_forward, detached, mean_kl


class HeldOutKL:
    """Optimizer hooks that measure each step's policy KL on the previous step's batch (registered after the
    policy's own hooks, so the batch of the coming step is known and the step's own measurement is done)."""

    def __init__(self, model: ACKTR) -> None:
        self.policy = model.policy
        self.rows: list[tuple[float, float, float, float, float]] = []
        self._previous: th.Tensor | None = None
        self._current: th.Tensor | None = None
        self._before: Any = None
        model.policy.optimizer.register_step_pre_hook(self.before)
        model.policy.optimizer.register_step_post_hook(self.after)

    def before(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        pending = self.policy._pending
        self._current = None if pending is None else pending[0]
        self._before = None
        if self._previous is not None:
            with th.no_grad():
                distribution, _ = actor_critic_forward(self.policy, self._previous)
            self._before = detached(distribution.distribution)

    def after(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        held_out = float("nan")
        if self._before is not None:
            with th.no_grad():
                distribution, _ = actor_critic_forward(self.policy, self._previous)
            held_out = float(mean_kl(self._before, distribution.distribution))
        predicted = float(optimizer.last_predicted_kls[0])
        clip = float(optimizer.last_kl_clip_scales[0])
        bias = self.policy.trust_regions.kl_bias
        self.rows.append((predicted, self.policy.last_measured_kl, held_out, clip, bias))
        self._previous = self._current


def summarize(env_id: str, rows: list[tuple[float, float, float, float, float]]) -> list[str]:
    """Markdown rows: per third of the run (the first five updates left out), medians of the KLs and ratios."""
    data = np.array(rows[5:], dtype=np.float64)
    lines = []
    for index, part in enumerate(np.array_split(data, 3)):
        predicted, batch, held_out, clip, bias = part.T
        lines.append(
            f"| {env_id} | {index + 1} | {np.median(predicted):.5f} | {np.median(batch):.5f} | "
            f"{np.nanmedian(held_out):.5f} | {np.median(batch / predicted):.1f} | "
            f"{np.nanmedian(held_out / predicted):.1f} | {np.nanmedian(held_out / batch):.2f} | "
            f"{np.median(bias):.1f} | {np.median(clip):.2f} |"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", nargs="+", default=["Hopper-v5"], help="env ids (gymnasium)")
    parser.add_argument("--steps", type=int, default=40_000, help="env steps per run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kl-backtrack", type=float, default=None, help="ACKTR's kl_backtrack (default: off)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    th.set_num_threads(1)
    models = []
    for env_id in args.env:
        env = make_vec_env(env_id, n_envs=1, seed=args.seed)
        models.append((env_id, ACKTR("MlpPolicy", env, seed=args.seed, kl_backtrack=args.kl_backtrack)))
    for env_id, model in models:  # every env is checked before any run, not after the earlier ones
        updates = -(-args.steps // (model.n_steps * model.n_envs))  # SB3 finishes the last rollout
        if updates < 8:
            parser.error(f"--steps {args.steps} gives {updates} updates on {env_id}; at least 8 are needed")
    print(
        "| env | third | predicted KL | batch KL | held-out KL | batch / predicted | held-out / predicted | "
        "held-out / batch | calibration bias | clip factor |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for env_id, model in models:
        hooks = HeldOutKL(model)
        model.learn(args.steps)
        for line in summarize(env_id, hooks.rows):
            print(line, flush=True)


if __name__ == "__main__":
    main()
