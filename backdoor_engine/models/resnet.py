"""CIFAR-style ResNets (He et al. 2016): ResNet-18 and the small ResNet-20.

The stem is a 3x3 stride-1 convolution without max-pooling, so 28x28 and 32x32 inputs keep their
resolution in the first stage. Modules are registered in execution order (conv1, bn1, conv2, bn2,
shortcut), so `named_modules()` lists BatchNorm layers in the order the data meets them.
"""

import torch
from torch import nn
from torch.nn import functional as F

from .base import ImageClassifier


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus a shortcut; a 1x1 conv-BN projection where the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(ImageClassifier):
    """Stages `layer1..layerK` of BasicBlocks; the first keeps resolution, each later one halves it."""

    def __init__(self, widths: tuple[int, ...], blocks_per_stage: tuple[int, ...], *, num_classes: int,
                 in_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        in_planes = widths[0]
        self.stage_names = []
        for index, (planes, blocks) in enumerate(zip(widths, blocks_per_stage)):
            first_stride = 1 if index == 0 else 2
            strides = [first_stride] + [1] * (blocks - 1)
            stage = []
            for stride in strides:
                stage.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
            name = f"layer{index + 1}"
            self.add_module(name, nn.Sequential(*stage))
            self.stage_names.append(name)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(in_planes, num_classes)

    def penultimate(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        for name in self.stage_names:
            out = getattr(self, name)(out)
        return torch.flatten(self.pool(out), 1)


def resnet18(*, num_classes: int, in_channels: int) -> ResNet:
    """ResNet-18, CIFAR stem (as BackdoorBox / the FLARE paper's reference model), 512-d features."""
    return ResNet((64, 128, 256, 512), (2, 2, 2, 2), num_classes=num_classes, in_channels=in_channels)


def small_resnet(*, num_classes: int, in_channels: int) -> ResNet:
    """ResNet-20 (3 stages x 3 blocks, widths 16/32/64), 64-d features; trains in minutes on a CPU.

    Projection (1x1 conv-BN) shortcuts, as in our ResNet-18, rather than the paper's zero-padding
    option A: every shortcut then has a BatchNorm, which FLARE reads (~0.27M parameters either way).
    """
    return ResNet((16, 32, 64), (3, 3, 3), num_classes=num_classes, in_channels=in_channels)
