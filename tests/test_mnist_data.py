"""The MNIST IDX reader on files written here in the canonical format, and on the shared data when present."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from agents.supervised import DatasetFilesMissingError, load_mnist, read_idx

SHARED_MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "mnist"


def write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as handle:
            handle.write(payload)
    else:
        path.write_bytes(payload)


def write_mnist(directory: Path, count: int, compress: bool, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=(count,), dtype=np.uint8)
    prefix = "train" if split == "train" else "t10k"
    write_idx(directory / f"{prefix}-images-idx3-ubyte", images, compress)
    write_idx(directory / f"{prefix}-labels-idx1-ubyte", labels, compress)
    return images, labels


@pytest.mark.parametrize("compress", [True, False], ids=["gzip", "raw"])
def test_load_mnist_reads_canonical_idx_files(tmp_path: Path, compress: bool) -> None:
    images, labels = write_mnist(tmp_path, 7, compress)
    pixels, targets = load_mnist(tmp_path, "train")
    assert pixels.shape == (7, 784) and targets.shape == (7,)
    np.testing.assert_allclose(pixels.numpy(), images.reshape(7, -1) / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(targets.numpy(), labels)


def test_missing_files_error_names_them_and_the_download_command(tmp_path: Path) -> None:
    write_mnist(tmp_path, 3, compress=True, split="train")
    with pytest.raises(
        DatasetFilesMissingError, match=r"t10k-images-idx3-ubyte\[\.gz\], t10k-labels-idx1-ubyte\[\.gz\]"
    ) as raised:
        load_mnist(tmp_path, "test")
    assert f"python scripts/download_data.py mnist --data-dir {tmp_path}" in str(raised.value)


def test_truncated_or_foreign_file_is_rejected_with_its_path(tmp_path: Path) -> None:
    _images, _ = write_mnist(tmp_path, 4, compress=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="header declares shape"):
        read_idx(path)
    path.write_bytes(b"PK\x03\x04 not an idx file")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(path)
    with pytest.raises(ValueError, match="Invalid split"):
        load_mnist(tmp_path, "validation")


def test_shared_mnist_files_load_when_present() -> None:
    if not (SHARED_MNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"shared MNIST files not found at {SHARED_MNIST}")
    train_x, train_y = load_mnist(SHARED_MNIST, "train")
    test_x, test_y = load_mnist(SHARED_MNIST, "test")
    assert train_x.shape == (3678, 784) and test_x.shape == (10000, 784)
    assert float(train_x.min()) >= 0.0 and float(train_x.max()) == 1.0
    assert set(train_y.tolist()) == set(range(10)) and test_y.shape == (10000,)
