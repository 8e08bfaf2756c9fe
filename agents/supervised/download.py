"""Download MNIST and CIFAR-10 in their canonical formats, verifying checksums (for users with internet).

    python scripts/download_data.py mnist --data-dir data/mnist
    python scripts/download_data.py cifar10 --data-dir data            # writes data/cifar-10-batches-py/

Every file is fetched to a temporary name, its MD5 compared with the published one, and only then renamed into
place; a mismatch deletes the download and raises :class:`ChecksumError`. ``mirror`` replaces the base URL
(``file://`` URLs work, which is how the tests run without the network).
"""

from __future__ import annotations

import hashlib
import shutil
import tarfile
import urllib.request
from pathlib import Path

MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
# MD5 of the four gzip files of the MNIST distribution.
MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_MD5 = {CIFAR10_ARCHIVE: "c58f30108f718f92721af3b95e74349a"}
DATASETS = ("mnist", "cifar10")


class ChecksumError(ValueError):
    """A downloaded file does not have its published checksum."""


def md5sum(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex MD5 of a file."""
    digest = hashlib.md5(usedforsecurity=False)
    with Path(path).open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fetch_verified(url: str, destination: Path, expected_md5: str, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``destination`` through a temporary file, keeping it only if its MD5 matches.

    An existing ``destination`` with the right checksum is kept without downloading.

    Raises:
        ChecksumError: if the download's MD5 differs (the download is deleted).
        OSError: if the URL cannot be read.
    """
    if destination.is_file() and md5sum(destination) == expected_md5:
        return destination
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(destination.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, partial.open("wb") as handle:
            shutil.copyfileobj(response, handle)
        actual = md5sum(partial)
        if actual != expected_md5:
            raise ChecksumError(
                f"{url}: MD5 {actual} does not match the published {expected_md5}; the download was deleted. "
                "Retry, or use another mirror (--mirror)."
            )
        partial.replace(destination)
    finally:
        partial.unlink(missing_ok=True)
    return destination


def download_mnist(data_dir: str | Path, mirror: str = MNIST_URL, files: list[str] | None = None) -> list[Path]:
    """The four MNIST IDX gzip files (or ``files`` among them) into ``data_dir``, verified."""
    names = list(MNIST_MD5) if files is None else files
    unknown = sorted(set(names) - set(MNIST_MD5))
    if unknown:
        raise ValueError(f"unknown MNIST files {unknown}; valid: {', '.join(MNIST_MD5)}")
    base = mirror if mirror.endswith("/") else mirror + "/"
    return [fetch_verified(base + name, Path(data_dir) / name, MNIST_MD5[name]) for name in names]


def download_cifar10(data_dir: str | Path, mirror: str = CIFAR10_URL, expected_md5: str | None = None) -> Path:
    """The CIFAR-10 python archive, verified, extracted to ``data_dir/cifar-10-batches-py``; returns that folder.

    Args:
        expected_md5: override of the published checksum (a private mirror with its own archive).
    """
    base = mirror if mirror.endswith("/") else mirror + "/"
    root = Path(data_dir)
    archive = fetch_verified(
        base + CIFAR10_ARCHIVE, root / CIFAR10_ARCHIVE, expected_md5 or CIFAR10_MD5[CIFAR10_ARCHIVE]
    )
    with tarfile.open(archive, "r:gz") as tar:
        members = [m for m in tar.getmembers() if m.name.startswith("cifar-10-batches-py/") and m.isfile()]
        if not members:
            raise ValueError(f"{archive}: no cifar-10-batches-py/ folder in the archive")
        tar.extractall(root, members=members, filter="data")
    return root / "cifar-10-batches-py"
