"""Train one optimizer on one of the EKFAC paper's supervised benchmarks.

    python scripts/supervised.py --task mnist_autoencoder --optimizer ekfac
    python scripts/supervised.py --task cifar10_vgg11 --optimizer kfac --epochs 3 --device cuda
    python scripts/supervised.py --task cifar10_resnet34 --optimizer sgd --augment --data-dir ~/data

Settings per task and optimizer come from configs/supervised.yml; flags override them. Writes to --log-dir
(default runs/supervised/TASK/OPTIMIZER_seedN): steps.csv (per-step training loss and wall-clock), epochs.csv
(per-epoch evaluation loss and accuracy), TensorBoard logs (tb/) and the resolved settings (config.yml); a run
whose loss turns NaN keeps its logs up to that step and adds diverged.json. A run never writes into a folder
that already holds files: give a fresh --log-dir for each run.
Data parallel: torchrun --nproc_per_node N scripts/supervised.py ... trains on N processes (gloo on CPU, NCCL with
--device cuda, one GPU per process) with the model in DistributedDataParallel; --batch-size is per process, each
step uses N * batch-size examples, and only rank 0 writes the run folder (config.yml records world_size).
Data: --data-dir holds the MNIST IDX files (mnist/ below it is found too) or the CIFAR-10 python batches
(cifar-10-batches-py/); get them with scripts/download_data.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from acktr_kfe import distributed  # noqa: E402
from agents.run_folder import RunFolderError  # noqa: E402
from agents.supervised.data import DatasetFilesMissingError  # noqa: E402
from agents.supervised.runner import TASKS, TrainingDivergedError, train_run  # noqa: E402
from agents.supervised.training import OPTIMIZER_NAMES  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "datasets"


def data_folder(task: str, data_dir: Path) -> Path:
    """``data_dir``, or its ``mnist`` subfolder for the autoencoder when the IDX files live there."""
    if TASKS[task].dataset == "mnist" and (data_dir / "mnist").is_dir():
        return data_dir / "mnist"
    return data_dir


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags a training run shares with scripts/compare_optimizers.py."""
    parser.add_argument("--task", default="mnist_autoencoder", choices=list(TASKS))
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--width", type=int, default=None, help="CIFAR models: first-layer channels (64: paper)")
    parser.add_argument("--augment", action="store_true", help="CIFAR: random crop (pad 4) and horizontal flip")
    parser.add_argument("--max-seconds", type=float, default=None, help="stop once training took this long")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--dist-timeout", type=float, default=600.0, help="under torchrun: seconds a rank waits for a hung peer"
    )


def run_options(args: argparse.Namespace) -> dict:
    """Set torch's threads from ``--threads``; the keyword arguments of ``train_run`` from the shared flags."""
    import torch

    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"error: --threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    return {
        "data_dir": data_folder(args.task, args.data_dir),
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "device": args.device,
        "seed": args.seed,
        "augment": args.augment,
        "max_seconds": args.max_seconds,
        "width": args.width,
        "progress": not args.no_progress,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser)
    parser.add_argument("--optimizer", default="ekfac", choices=list(OPTIMIZER_NAMES))
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--damping", type=float, default=None, help="K-FAC / EKFAC damping")
    parser.add_argument("--log-dir", type=Path, default=None)
    parser.add_argument("--config", type=Path, default=None, help="settings file (default configs/supervised.yml)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = run_options(args)
    code = 1
    try:
        code = _main(args, options)
        return code
    finally:
        distributed.shutdown(synchronize=code == 0)


def _main(args: argparse.Namespace, options: dict) -> int:
    try:
        device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        rank, _ = distributed.init_from_environment(device, timeout=args.dist_timeout)
    except (ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    log_dir = args.log_dir or ROOT / "runs" / "supervised" / args.task / f"{args.optimizer}_seed{args.seed}"
    try:
        summary = train_run(
            args.task,
            args.optimizer,
            log_dir=log_dir,
            lr=args.lr,
            damping=args.damping,
            config_path=args.config,
            **options,
        )
    except TrainingDivergedError as diverged:
        flags = "a lower --lr" + (", or a higher --damping" if diverged.optimizer not in ("sgd", "adam") else "")
        print(f"error: {diverged}. Its logs up to step {diverged.step - 1} are in {diverged.log_dir}; try {flags} "
              "with a fresh --log-dir", file=sys.stderr)  # fmt: skip
        return 1
    except (DatasetFilesMissingError, ValueError, FileNotFoundError, RunFolderError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except RuntimeError as error:  # a collective failed: a peer died or hung (DDP's own all-reduces included)
        if not distributed.is_active():
            raise
        prefix = "" if isinstance(error, distributed.DistributedError) else f"rank {rank}: "
        print(f"error: {prefix}{error}", file=sys.stderr)
        return 3
    if rank == 0:
        print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
