"""NPD's neural polarizer as a part of a model: a 1x1 convolution (initialised to the identity, no bias) and a
BatchNorm2d, applied to the input of one layer by a forward pre-hook. The polarizer is a child module of the
model (`npd_polarizer`), so its weights are in the state dict; checkpoints record {"layer", "channels"} under
meta["polarizer"] and re-attach it on load (models/checkpoint.py). The hook is the polarizer's bound method, so a
deep copy of the model calls its own copy of the polarizer.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InputError

ATTRIBUTE = "npd_polarizer"


class Polarizer(nn.Module):
    def __init__(self, channels: int, layer: str):
        super().__init__()
        self.layer = layer
        self.conv = nn.Conv2d(channels, channels, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(channels).view(channels, channels, 1, 1))
        self.norm = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))

    def pre_hook(self, module, inputs):
        return (self(inputs[0]), *inputs[1:])


def default_layer(model: nn.Module) -> str:
    """The input of the second-to-last convolution: in a ResNet the first convolution of the last block
    (PreActResNet-18's layer4.1.conv1, where the official code puts it)."""
    convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and not name.startswith(ATTRIBUTE)]
    if len(convs) < 2:
        raise InputError("npd: the model needs at least two Conv2d layers to place the polarizer by default; name "
                         "one with layer=")
    return convs[-2]


def attach_polarizer(model: nn.Module, layer: str, channels: int | None = None) -> Polarizer:
    """Insert a polarizer before `layer` (a Conv2d of `model`); returns it."""
    if hasattr(model, ATTRIBUTE):
        raise InputError("the model already has a polarizer")
    modules = dict(model.named_modules())
    target = modules.get(layer)
    if not isinstance(target, nn.Conv2d):
        convs = [name for name, m in modules.items() if isinstance(m, nn.Conv2d)]
        raise InputError(f"npd: layer {layer!r} is not a Conv2d of this model; its Conv2d layers: "
                         f"{', '.join(convs[-6:])} (last six)")
    channels = target.in_channels if channels is None else channels
    if channels != target.in_channels:
        raise InputError(f"polarizer of {channels} channels before {layer!r}, which takes {target.in_channels}")
    polarizer = Polarizer(channels, layer)
    model.add_module(ATTRIBUTE, polarizer)
    target.register_forward_pre_hook(polarizer.pre_hook)
    return polarizer


def polarizer_meta(model: nn.Module) -> dict | None:
    polarizer = getattr(model, ATTRIBUTE, None)
    return None if polarizer is None else {"layer": polarizer.layer, "channels": polarizer.conv.in_channels}
