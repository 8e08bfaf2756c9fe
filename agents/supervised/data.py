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


def _check_split(split: str, files: dict[str, object]) -> None:
    """Raise a ValueError naming ``split`` and the valid ones unless ``files`` has it."""
    if split not in files:
        raise ValueError(f"Invalid split: {split!r}. Valid values: {sorted(files)}")


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
    _check_split(split, MNIST_FILES)
    directory = Path(data_dir)
    paths = [_find(directory, stem) for stem in MNIST_FILES[split]]
    missing = [f"{stem}[.gz]" for stem, path in zip(MNIST_FILES[split], paths) if path is None]
    if missing:
        raise DatasetFilesMissingError(
            f"MNIST {split} files missing in {directory}: {', '.join(missing)}. Get them with "
            f"`python scripts/download_data.py mnist --data-dir {directory}`, put the IDX files from the MNIST "
            "distribution there (gzip or raw), or pass the folder that holds them."
        )
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"MNIST {split}: images {images.shape} and labels {labels.shape} do not match")
    pixels = torch.from_numpy(images.reshape(images.shape[0], -1).astype(np.float32) / 255.0)
    return pixels, torch.from_numpy(labels.astype(np.int64))


CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
# Per-channel mean and standard deviation of the CIFAR-10 training images (for inputs of unit scale).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def read_cifar_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch: images ``(N, 3, 32, 32)`` uint8 and labels ``(N,)`` int64.

    Raises:
        ValueError: if the file is not a CIFAR python batch (unreadable pickle, missing keys, wrong sizes).
    """
    import pickle

    path = Path(path)
    try:
        with path.open("rb") as handle:
            batch = pickle.load(handle, encoding="bytes")
    except (OSError, EOFError, pickle.UnpicklingError, ValueError) as error:
        raise ValueError(f"{path}: cannot read CIFAR python batch ({error})") from error
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise ValueError(f"{path}: not a CIFAR-10 python batch (expected keys b'data' and b'labels')")
    data, labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8 or len(labels) != len(data):
        raise ValueError(f"{path}: data {data.shape} {data.dtype} and {len(labels)} labels; expected (N, 3072) uint8")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(data_dir: str | Path, split: str = "train", normalize: bool = True) -> tuple[Tensor, Tensor]:
    """CIFAR-10 images ``(N, 3, 32, 32)`` float32 and labels ``(N,)`` from the python batches.

    ``data_dir`` is the ``cifar-10-batches-py`` folder or its parent. The training split is every
    ``data_batch_*`` present (at least one): a subset such as the shared ``data_batch_1`` works.

    Args:
        normalize: standardize each channel with the CIFAR-10 training mean and std (else scale to ``[0, 1]``).

    Raises:
        DatasetFilesMissingError: naming the missing files and how to get them.
        ValueError: for an unknown split or corrupted files.
    """
    _check_split(split, CIFAR10_FILES)
    directory = Path(data_dir)
    if not (directory / CIFAR10_FILES["test"][0]).is_file() and (directory / CIFAR10_FOLDER).is_dir():
        directory = directory / CIFAR10_FOLDER
    paths = [directory / name for name in CIFAR10_FILES[split] if (directory / name).is_file()]
    if not paths:
        raise DatasetFilesMissingError(
            f"CIFAR-10 {split} files missing in {directory}: {' or '.join(CIFAR10_FILES[split])}. Get them with "
            f"`python scripts/download_data.py cifar10 --data-dir DIR` (the python version of CIFAR-10), or pass "
            "the folder that holds them."
        )
    batches = [read_cifar_batch(path) for path in paths]
    images = torch.from_numpy(np.concatenate([b[0] for b in batches])).float().div_(255.0)
    labels = torch.from_numpy(np.concatenate([b[1] for b in batches]))
    if normalize:
        mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
        images = (images - mean) / std
    return images, labels


def augment_cifar(images: Tensor, generator: torch.Generator | None = None, padding: int = 4) -> Tensor:
    """The usual CIFAR augmentation on a batch ``(N, C, H, W)``: a random crop after zero padding by ``padding``
    pixels, and a random horizontal flip, drawn per image."""
    n, _, height, width = images.shape
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    offsets = torch.randint(0, 2 * padding + 1, (2, n), generator=generator)
    rows = (offsets[0].view(n, 1) + torch.arange(height)).view(n, 1, height, 1)
    cols = (offsets[1].view(n, 1) + torch.arange(width)).view(n, 1, 1, width)
    batch = torch.arange(n).view(n, 1, 1, 1)
    channels = torch.arange(images.shape[1]).view(1, -1, 1, 1)
    cropped = padded[batch, channels, rows, cols]
    flip = torch.rand(n, generator=generator) < 0.5
    cropped[flip] = cropped[flip].flip(-1)
    return cropped
