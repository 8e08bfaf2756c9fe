"""Supervised benchmarks of the EKFAC paper: models and readers for the canonical dataset files."""

from .data import DatasetFilesMissingError, load_mnist, read_idx
from .models import MNISTAutoencoder, autoencoder_loss

__all__ = ["DatasetFilesMissingError", "MNISTAutoencoder", "autoencoder_loss", "load_mnist", "read_idx"]
