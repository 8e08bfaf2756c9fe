"""Throughput benchmark: env steps per second of ACKTR (EKFAC, K-FAC), SB3's A2C and PPO and sb3-contrib's TRPO,
one run after another.

    python scripts/bench_throughput.py                                # the RL benchmark's envs and ALE/Pong-v5
    python scripts/bench_throughput.py --envs ALE/Pong-v5 --steps 25600       # 6,400 Atari steps per run
    python scripts/bench_throughput.py --envs HalfCheetah-v5 --algos a2c acktr_ekfac --defaults 1
                                            # ACKTR("MlpPolicy", env) against A2C("MlpPolicy", env), one raw env

scripts/bench_rl.py runs several trainings at once and long ones, so its steps-per-second column depends on what
else the machine was doing. This script trains each algorithm for a short, fixed number of env steps (whole
updates, with ACKTR's eigendecompositions at their usual interval) one at a time, with the same hyperparameters as
bench_rl.py (configs/acktr.yml, configs/baselines.yml), and reports env steps per second and the ratio to A2C on
the same env. A baseline without an entry for the env in configs/baselines.yml (TRPO on Atari) is left out. Atari
learning runs need a GPU; on a CPU this is the Atari number there is. The markdown table is printed and written to
OUT/throughput.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from bench_rl import ALGOS, PLUGIN_BASES, add_defaults_argument, baseline_config, run_one  # noqa: E402

ENVS = ("CartPole-v1", "Pendulum-v1", "HalfCheetah-v5", "Hopper-v5", "ALE/Pong-v5")


def table(rows: list[tuple[str, str, int, float]]) -> str:
    """Markdown table of ``(env, algorithm, steps, seconds)`` rows, with the ratio to A2C on the same env (a plug-in
    run's to the algorithm whose policy it replaces)."""
    lines = [
        "| env | algorithm | env steps | seconds | env steps/s | ratio to A2C (plug-in: to its algorithm) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    fps_of = {(env, algo): steps / seconds for env, algo, steps, seconds in rows}
    for env, algo, steps, seconds in rows:
        fps = steps / seconds
        reference = fps_of.get((env, PLUGIN_BASES.get(algo, "a2c")))
        ratio = f"{fps / reference:.2f}" if reference else ""
        lines.append(f"| {env} | {algo} | {steps:,} | {seconds:.1f} | {fps:,.0f} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", nargs="+", default=list(ENVS))
    parser.add_argument("--algos", nargs="+", default=list(ALGOS), choices=list(ALGOS))
    parser.add_argument("--steps", type=int, default=20_000, help="env steps per run (Atari: a quarter of it)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--seed", type=int, default=0)
    add_defaults_argument(parser)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_throughput")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.threads < 1:
        parser.error(f"--steps and --threads must be >= 1, got {args.steps} and {args.threads}")
    from envs import env_kind

    rows = []
    for env_id in args.envs:
        steps = args.steps // 4 if env_kind(env_id) == "atari" else args.steps
        for algo in args.algos:
            base = PLUGIN_BASES.get(algo, algo)
            if args.defaults is None and not algo.startswith("acktr") and baseline_config(base, env_id) is None:
                print(f"{env_id} {algo}: no entry in configs/baselines.yml, left out", flush=True)
                continue
            record = run_one(algo, env_id, args.seed, steps, args.threads, defaults_n_envs=args.defaults)
            rows.append((env_id, algo, record["timesteps"], record["seconds"]))
            print(f"{env_id} {algo}: {record['timesteps'] / record['seconds']:,.0f} env steps/s", flush=True)
    report = table(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "throughput.md").write_text(report + "\n")
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
