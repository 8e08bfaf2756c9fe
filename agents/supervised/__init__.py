"""Supervised benchmarks of the EKFAC paper: models and readers for the canonical dataset files."""

from .data import DatasetFilesMissing, load_mnist, read_idx
from .models import MNISTAutoencoder, autoencoder_loss

__all__ = ["DatasetFilesMissing", "MNISTAutoencoder", "autoencoder_loss", "load_mnist", "read_idx"]
