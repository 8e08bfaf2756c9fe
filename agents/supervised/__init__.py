"""Supervised benchmarks of the EKFAC paper: models and readers for the canonical dataset files."""

from .data import DatasetFilesMissingError, augment_cifar, load_cifar10, load_mnist, read_cifar_batch, read_idx
from .models import VGG11, MNISTAutoencoder, ResNet34, autoencoder_loss
from .training import (
    OPTIMIZER_NAMES,
    build_optimizer,
    load_autoencoder_images,
    minibatches,
    task_config,
    training_step,
)

__all__ = [
    "OPTIMIZER_NAMES",
    "VGG11",
    "DatasetFilesMissingError",
    "MNISTAutoencoder",
    "ResNet34",
    "augment_cifar",
    "autoencoder_loss",
    "build_optimizer",
    "load_autoencoder_images",
    "load_cifar10",
    "load_mnist",
    "minibatches",
    "read_cifar_batch",
    "read_idx",
    "task_config",
    "training_step",
]
