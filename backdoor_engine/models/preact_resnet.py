"""Pre-activation ResNet-18 (He et al. 2016, "Identity Mappings"), CIFAR stem; the BackdoorBench default."""

import torch
from torch import nn
from torch.nn import functional as F

from .base import ImageClassifier


class PreActBlock(nn.Module):
    """BN-ReLU-conv twice; the projection shortcut (1x1 conv) reads the pre-activated input."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = F.relu(self.bn1(x))
        residual = x if self.shortcut is None else self.shortcut(activated)
        out = self.conv1(activated)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + residual


class PreActResNet18(ImageClassifier):
    """Blocks [2, 2, 2, 2], widths 64..512, then a final BN-ReLU before pooling, 512-d features."""

    def __init__(self, *, num_classes: int, in_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        in_planes = 64
        stages = []
        for index, planes in enumerate((64, 128, 256, 512)):
            stride = 1 if index == 0 else 2
            stages.append(nn.Sequential(PreActBlock(in_planes, planes, stride), PreActBlock(planes, planes, 1)))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        # The paper's final activation; BackdoorBench's copy omits it and pools un-normalised sums.
        self.bn = nn.BatchNorm2d(512)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(512, num_classes)

    def penultimate(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.bn(out))
        return torch.flatten(self.pool(out), 1)


def preact_resnet18(*, num_classes: int, in_channels: int) -> PreActResNet18:
    return PreActResNet18(num_classes=num_classes, in_channels=in_channels)
