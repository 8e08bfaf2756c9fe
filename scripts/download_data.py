"""Download MNIST or CIFAR-10 in the canonical formats and verify their checksums (needs internet).

    python scripts/download_data.py mnist --data-dir data/mnist
    python scripts/download_data.py cifar10 --data-dir data          # data/cifar-10-batches-py/
    python scripts/download_data.py mnist --data-dir data/mnist --mirror https://my.mirror/mnist/

Files are fetched to temporary names and kept only if their MD5 matches the published one.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agents.supervised.download import (  # noqa: E402
    CIFAR10_URL,
    DATASETS,
    MNIST_URL,
    ChecksumError,
    download_cifar10,
    download_mnist,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=DATASETS)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--mirror", default=None, help=f"base URL (default {MNIST_URL} or {CIFAR10_URL})")
    args = parser.parse_args(argv)
    try:
        if args.dataset == "mnist":
            paths = download_mnist(args.data_dir, args.mirror or MNIST_URL)
            print("\n".join(f"verified {p}" for p in paths))
        else:
            folder = download_cifar10(args.data_dir, args.mirror or CIFAR10_URL)
            print(f"verified and extracted {folder}")
    except (ChecksumError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
