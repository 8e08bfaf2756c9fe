"""Models of the EKFAC paper's supervised benchmarks, written here (torchvision is not a dependency)."""

from __future__ import annotations

import itertools

import torch.nn.functional as F
from torch import Tensor, nn

AUTOENCODER_SIZES = (784, 1000, 500, 250, 30)


class MNISTAutoencoder(nn.Sequential):
    """The deep autoencoder of Hinton & Salakhutdinov (2006), the K-FAC and EKFAC papers' MNIST benchmark.

    Layers 784-1000-500-250-30 and the mirror 30-250-500-1000-784, logistic units except for the linear 30-unit
    code layer and the output, which gives logits for :func:`autoencoder_loss`.

    Args:
        activation: hidden nonlinearity (default ``nn.Sigmoid``, as in the papers).
    """

    def __init__(self, activation: type[nn.Module] = nn.Sigmoid) -> None:
        sizes = AUTOENCODER_SIZES + AUTOENCODER_SIZES[-2::-1]
        layers: list[nn.Module] = []
        code = len(AUTOENCODER_SIZES) - 2
        for index, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
            layers.append(nn.Linear(fan_in, fan_out))
            if index != code and index != len(sizes) - 2:
                layers.append(activation())
        super().__init__(*layers)


def autoencoder_loss(logits: Tensor, images: Tensor) -> Tensor:
    """Binary cross-entropy on pixels, summed over the 784 pixels and averaged over images."""
    return F.binary_cross_entropy_with_logits(logits, images, reduction="sum") / images.shape[0]
