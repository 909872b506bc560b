"""MobileNetV2 (Sandler et al. 2018), CIFAR variant: stride-1 stem and stride-1 second stage.

The CIFAR changes follow the common port (kuangliu/pytorch-cifar); unlike that port, blocks keep the
paper's ReLU6 and its rule that only shape-preserving blocks have a residual (no projection shortcuts).
"""

import torch
from torch import nn

from .base import ImageClassifier

# (expansion t, output channels c, repeats n, first stride s) per stage, as in the paper's Table 2,
# except the second stage's stride 2 -> 1 (CIFAR variant: small inputs keep more resolution).
STAGES = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
STEM_WIDTH = 32
FEATURE_WIDTH = 1280


def conv_bn(in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1,
            activation: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2, groups=groups,
                        bias=False), nn.BatchNorm2d(out_channels)]
    if activation:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """1x1 expand -> 3x3 depthwise -> 1x1 linear projection; residual when shape is preserved."""

    def __init__(self, in_channels: int, out_channels: int, expansion: int, stride: int):
        super().__init__()
        hidden = in_channels * expansion
        layers = [] if expansion == 1 else [conv_bn(in_channels, hidden, 1)]
        layers += [conv_bn(hidden, hidden, 3, stride=stride, groups=hidden),
                   conv_bn(hidden, out_channels, 1, activation=False)]
        self.layers = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(x)
        return x + out if self.use_residual else out


class MobileNetV2(ImageClassifier):
    def __init__(self, *, num_classes: int, in_channels: int):
        super().__init__()
        self.stem = conv_bn(in_channels, STEM_WIDTH, 3)
        blocks = []
        channels = STEM_WIDTH
        for expansion, out_channels, repeats, first_stride in STAGES:
            for index in range(repeats):
                blocks.append(InvertedResidual(channels, out_channels, expansion, first_stride if index == 0 else 1))
                channels = out_channels
        self.blocks = nn.Sequential(*blocks)
        self.final_conv = conv_bn(channels, FEATURE_WIDTH, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(FEATURE_WIDTH, num_classes)

    def penultimate(self, x: torch.Tensor) -> torch.Tensor:
        out = self.final_conv(self.blocks(self.stem(x)))
        return torch.flatten(self.pool(out), 1)


def mobilenetv2(*, num_classes: int, in_channels: int) -> MobileNetV2:
    return MobileNetV2(num_classes=num_classes, in_channels=in_channels)
