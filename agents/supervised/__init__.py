"""Supervised benchmarks of the EKFAC paper: models and readers for the canonical dataset files."""

from .data import DatasetFilesMissingError, load_mnist, read_idx
from .models import MNISTAutoencoder, autoencoder_loss
from .training import OPTIMIZER_NAMES, build_optimizer, load_autoencoder_images, minibatches, training_step

__all__ = [
    "OPTIMIZER_NAMES",
    "DatasetFilesMissingError",
    "MNISTAutoencoder",
    "autoencoder_loss",
    "build_optimizer",
    "load_autoencoder_images",
    "load_mnist",
    "minibatches",
    "read_idx",
    "training_step",
]
