"""VGG with BatchNorm (Simonyan & Zisserman 2015), CIFAR form: conv features, global pooling, one linear head.

The head is a single Linear(512, K) over globally pooled features, as in the common CIFAR ports
(kuangliu/pytorch-cifar), not ImageNet's 4096-wide MLP: 512-d penultimate features for every depth.
Max-pools use ceil_mode so a 28x28 input survives all five (28 -> 14 -> 7 -> 4 -> 2 -> 1).
"""

import torch
from torch import nn

from .base import ImageClassifier

POOL = "M"
# Conv widths per depth; POOL marks a 2x2 max-pool.
VGG_LAYOUTS = {
    "vgg11_bn": (64, POOL, 128, POOL, 256, 256, POOL, 512, 512, POOL, 512, 512, POOL),
    "vgg16_bn": (64, 64, POOL, 128, 128, POOL, 256, 256, 256, POOL, 512, 512, 512, POOL, 512, 512, 512, POOL),
    "vgg19_bn": (64, 64, POOL, 128, 128, POOL, 256, 256, 256, 256, POOL, 512, 512, 512, 512, POOL,
                 512, 512, 512, 512, POOL),
}


class VGG(ImageClassifier):
    def __init__(self, layout: tuple, *, num_classes: int, in_channels: int):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in layout:
            if item == POOL:
                layers.append(nn.MaxPool2d(2, stride=2, ceil_mode=True))
            else:
                layers += [nn.Conv2d(channels, item, 3, padding=1, bias=False), nn.BatchNorm2d(item),
                           nn.ReLU(inplace=True)]
                channels = item
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(channels, num_classes)

    def penultimate(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.features(x)), 1)


def vgg11_bn(*, num_classes: int, in_channels: int) -> VGG:
    """The cheapest VGG: for CPU runs."""
    return VGG(VGG_LAYOUTS["vgg11_bn"], num_classes=num_classes, in_channels=in_channels)


def vgg16_bn(*, num_classes: int, in_channels: int) -> VGG:
    return VGG(VGG_LAYOUTS["vgg16_bn"], num_classes=num_classes, in_channels=in_channels)


def vgg19_bn(*, num_classes: int, in_channels: int) -> VGG:
    """The VGG of the FLARE paper's architecture study (Table VII)."""
    return VGG(VGG_LAYOUTS["vgg19_bn"], num_classes=num_classes, in_channels=in_channels)
