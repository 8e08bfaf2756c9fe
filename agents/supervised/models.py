"""Models of the EKFAC paper's supervised benchmarks, written here (torchvision is not a dependency)."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

AUTOENCODER_SIZES = (784, 1000, 500, 250, 30)
AUTOENCODER_INITS = ("sparse", "default")
# Sparse initialization (Martens 2010): nonzero incoming weights per unit.
SPARSE_INIT_CONNECTIONS = 15


def sparse_init_(layer: nn.Linear, connections: int = SPARSE_INIT_CONNECTIONS) -> None:
    """Martens' (2010) sparse initialization: each unit gets ``connections`` incoming weights drawn from a unit
    Gaussian at random positions, all other weights and the bias zero (uses torch's global generator)."""
    out_features, in_features = layer.weight.shape
    count = min(connections, in_features)
    positions = torch.rand(out_features, in_features).argsort(dim=1)[:, :count]
    with torch.no_grad():
        layer.weight.zero_().scatter_(1, positions, torch.randn(out_features, count))
        if layer.bias is not None:
            layer.bias.zero_()


class MNISTAutoencoder(nn.Sequential):
    """The deep autoencoder of Hinton & Salakhutdinov (2006), the K-FAC and EKFAC papers' MNIST benchmark.

    Layers 784-1000-500-250-30 and the mirror 30-250-500-1000-784, logistic units except for the linear 30-unit
    code layer and the output, which gives logits for :func:`autoencoder_loss`.

    Args:
        activation: hidden nonlinearity (default ``nn.Sigmoid``, as in the papers).
        init: ``"sparse"`` (default): the sparse initialization Martens (2010) introduced for these autoencoders
            (15 unit-Gaussian incoming weights per unit, zero biases); ``"default"``: PyTorch's
            ``nn.Linear`` initialization, whose small weights start every optimizer on the 205.5 plateau of the
            mean image (docs/BENCHMARKS.md).
    """

    def __init__(self, activation: type[nn.Module] = nn.Sigmoid, init: str = "sparse") -> None:
        if init not in AUTOENCODER_INITS:
            raise ValueError(f"Invalid init: {init!r}. Valid values: {', '.join(AUTOENCODER_INITS)}")
        sizes = AUTOENCODER_SIZES + AUTOENCODER_SIZES[-2::-1]
        layers: list[nn.Module] = []
        code = len(AUTOENCODER_SIZES) - 2
        for index, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
            layers.append(nn.Linear(fan_in, fan_out))
            if index != code and index != len(sizes) - 2:
                layers.append(activation())
        super().__init__(*layers)
        if init == "sparse":
            for layer in layers:
                if isinstance(layer, nn.Linear):
                    sparse_init_(layer)


def autoencoder_loss(logits: Tensor, images: Tensor) -> Tensor:
    """Binary cross-entropy on pixels, summed over the 784 pixels and averaged over images."""
    return F.binary_cross_entropy_with_logits(logits, images, reduction="sum") / images.shape[0]


def _init_convolutions(model: nn.Module) -> None:
    """He initialization (fan-out, ReLU) of every convolution, zero biases."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)


# VGG11 (Simonyan & Zisserman 2015, configuration "A"): channels of the 3x3 convolutions, "M" a 2x2 max-pool.
VGG11_LAYOUT: tuple[int | str, ...] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG11(nn.Module):
    """VGG11 for 32x32 CIFAR-10 images: eight 3x3 convolutions with ReLU and five max-pools (32 -> 1), then a
    linear classifier on the 512 features, as CIFAR versions of VGG do.

    Args:
        num_classes: number of classes.
        batch_norm: a ``BatchNorm2d`` after each convolution (the EKFAC paper trains without).
        width: channels of the first convolution (64 in VGG11; the others scale with it). Smaller widths make
            quick tests.
    """

    def __init__(self, num_classes: int = 10, batch_norm: bool = False, width: int = 64) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for item in VGG11_LAYOUT:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            assert isinstance(item, int)
            out = item * width // 64
            layers.append(nn.Conv2d(channels, out, 3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out))
            layers.append(nn.ReLU(inplace=True))
            channels = out
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, num_classes)
        _init_convolutions(self)

    def forward(self, images: Tensor) -> Tensor:
        """Logits ``(N, num_classes)`` of images ``(N, 3, 32, 32)``."""
        return self.classifier(self.features(images).flatten(1))


class BasicBlock(nn.Module):
    """ResNet's two 3x3 convolutions with batch norm and an identity (or 1x1 projection) shortcut."""

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet34(nn.Module):
    """ResNet34 (He et al. 2016) for CIFAR-10: a 3x3 stem without max-pool, stages of 3, 4, 6 and 3 basic blocks
    with 64, 128, 256 and 512 channels (stride 2 from the second stage on), global average pooling and a linear
    classifier. ``width`` scales the channels (64 in ResNet34), ``blocks`` sets the stages (quick tests)."""

    def __init__(self, num_classes: int = 10, blocks: tuple[int, ...] = (3, 4, 6, 3), width: int = 64) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )
        stages: list[nn.Module] = []
        in_channels = width
        for index, (count, channels) in enumerate(zip(blocks, (width, 2 * width, 4 * width, 8 * width))):
            for block in range(count):
                stride = 2 if index > 0 and block == 0 else 1
                stages.append(BasicBlock(in_channels, channels, stride))
                in_channels = channels
        self.stages = nn.Sequential(*stages)
        self.classifier = nn.Linear(in_channels, num_classes)
        _init_convolutions(self)

    def forward(self, images: Tensor) -> Tensor:
        """Logits ``(N, num_classes)`` of images ``(N, 3, 32, 32)``."""
        features = self.stages(self.stem(images))
        return self.classifier(F.adaptive_avg_pool2d(features, 1).flatten(1))
