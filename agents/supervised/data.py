"""Readers for the canonical MNIST IDX files (gzip or raw), without torchvision."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DatasetFilesMissingError(FileNotFoundError):
    """A dataset file is missing; the message names the files and how to get them."""


def _find(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (gzip-compressed if its name ends in ``.gz``) into an array of its declared shape.

    Raises:
        ValueError: if the header or the size does not match the IDX format.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as error:
        raise ValueError(f"{path}: cannot read IDX file ({error})") from error
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic number {raw[:4].hex()})")
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"{path}: header declares shape {shape} ({expected} bytes) but holds {len(raw) - header}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def load_mnist(data_dir: str | Path, split: str = "train") -> tuple[Tensor, Tensor]:
    """MNIST images as float32 in ``[0, 1]`` of shape ``(N, 784)`` and labels ``(N,)`` (int64).

    Args:
        data_dir: folder holding the IDX files (``train-images-idx3-ubyte[.gz]`` and so on).
        split: ``"train"`` or ``"test"``.

    Raises:
        DatasetFilesMissingError: naming the missing files and where to get them.
        ValueError: for an unknown split or corrupted files.
    """
    if split not in MNIST_FILES:
        raise ValueError(f"Invalid split: {split!r}. Valid values: {sorted(MNIST_FILES)}")
    directory = Path(data_dir)
    paths = [_find(directory, stem) for stem in MNIST_FILES[split]]
    missing = [f"{stem}[.gz]" for stem, path in zip(MNIST_FILES[split], paths) if path is None]
    if missing:
        raise DatasetFilesMissingError(
            f"MNIST {split} files missing in {directory}: {', '.join(missing)}. Put the IDX files from the "
            "MNIST distribution there (gzip or raw), or pass the folder that holds them."
        )
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"MNIST {split}: images {images.shape} and labels {labels.shape} do not match")
    pixels = torch.from_numpy(images.reshape(images.shape[0], -1).astype(np.float32) / 255.0)
    return pixels, torch.from_numpy(labels.astype(np.int64))
