"""VBD's simple convolutional models (Figure 2 of the paper; SEED_NOTES.md section 3.1).

An architecture string such as ``"10-10P"`` lists conv blocks separated by '-': the number is the
filter count, a trailing 'P' adds a 2x2 max-pool. A block is a 3x3 convolution without padding or
bias, then BatchNorm (poison models only), ReLU and the optional pool; one linear layer follows.
"""

from __future__ import annotations

import copy
import re

import torch
from torch import nn

from ..errors import InputError

# The official ensemble of simple poison models (config/defense/vbd/*.yaml, pois_model_arch).
DEFAULT_POISON_ARCHS = ("64P", "10-10P", "16-16P")
_BLOCK = re.compile(r"^([1-9][0-9]*)(P?)$")


def parse_arch(arch: str) -> list[tuple[int, bool]]:
    """``"10-10P"`` -> [(10, False), (10, True)]; anything else is an InputError naming the arch."""
    blocks = []
    for part in str(arch).split("-"):
        match = _BLOCK.match(part.strip())
        if match is None:
            raise InputError(f"simple model arch {arch!r}: expected blocks like '64P' or '10-10P' "
                             "(filters, optional P for a 2x2 max-pool) separated by '-'")
        blocks.append((int(match.group(1)), match.group(2) == "P"))
    return blocks


class SimpleConvNet(nn.Module):
    """Conv blocks + one linear layer; ``outputs=1`` with ``sigmoid`` gives VBD's pattern detector."""

    def __init__(self, arch: str, *, in_channels: int, input_size: tuple[int, int], outputs: int,
                 batch_norm: bool = True, dropout: float = 0.0):
        super().__init__()
        self.arch = arch
        layers: list[nn.Module] = []
        channels, (height, width) = in_channels, input_size
        for filters, pool in parse_arch(arch):
            height, width = height - 2, width - 2
            if pool:
                height, width = height // 2, width // 2
            if height < 1 or width < 1:
                raise InputError(f"simple model arch {arch!r} shrinks a {input_size} image to nothing")
            layers.append(nn.Conv2d(channels, filters, 3, bias=False))
            if batch_norm:
                layers.append(nn.BatchNorm2d(filters))
            if pool:
                # Pooling before the ReLU gives the same values and gradients (max commutes with the
                # monotone ReLU) and runs the ReLU on a quarter of the activations: measured faster here.
                layers.append(nn.MaxPool2d(2, 2))
            layers.append(nn.ReLU(inplace=True))
            channels = filters
        if dropout:
            layers.append(nn.Dropout(dropout))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels * height * width, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))

    def folded(self) -> "SimpleConvNet":
        """An inference-only copy with each eval-mode BatchNorm folded into the convolution before it
        (w' = w * g / sqrt(var + eps), b' = beta - mean * g / sqrt(var + eps)): the same outputs and input
        gradients up to rounding, and input gradients measured ~1.4x faster here (BN's pass over the
        largest activation is gone)."""
        folded = copy.deepcopy(self).eval()
        layers, merged = list(folded.features), []
        for layer in layers:
            if isinstance(layer, nn.BatchNorm2d) and merged and isinstance(merged[-1], nn.Conv2d):
                conv = merged[-1]
                scale = layer.weight.detach() / torch.sqrt(layer.running_var + layer.eps)
                fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, bias=True)
                with torch.no_grad():
                    fused.weight.copy_(conv.weight * scale[:, None, None, None])
                    fused.bias.copy_(layer.bias - layer.running_mean * scale)
                merged[-1] = fused
            else:
                merged.append(layer)
        folded.features = nn.Sequential(*merged)
        return folded.requires_grad_(False)


def poison_model(arch: str, *, in_channels: int, input_size: tuple[int, int], num_classes: int) -> SimpleConvNet:
    """A simple poison model: BN on, no dropout (official defaults)."""
    return SimpleConvNet(arch, in_channels=in_channels, input_size=input_size, outputs=num_classes)


def pattern_detector(*, in_channels: int, input_size: tuple[int, int]) -> SimpleConvNet:
    """VBD's binary pattern detector: one 32-filter block, no BN, pool, dropout 0.5, one logit
    (the paper's sigmoid output is applied by the loss, BCE-with-logits, for numerical safety)."""
    return SimpleConvNet("32P", in_channels=in_channels, input_size=input_size, outputs=1,
                         batch_norm=False, dropout=0.5)
