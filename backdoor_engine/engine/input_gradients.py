"""Input gradients of the classification margin for whole batches, one backward pass per batch.

The margin of class c is logit_c - max_{j != c} logit_j (VBD, Eq. 6 on logits). In eval mode every
sample's output depends on its own input only, so the gradient of the batch's summed margin w.r.t. the
batch is exactly the stack of per-sample gradients: no loop over samples is needed.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InputError


def class_margin(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """logit_c - max over the other classes, per row; `classes` is one class id per row."""
    own = logits.gather(1, classes[:, None]).squeeze(1)
    others = logits.scatter(1, classes[:, None], float("-inf"))
    return own - others.amax(dim=1)


def _checked_classes(model: nn.Module, inputs: torch.Tensor, classes: torch.Tensor | int) -> torch.Tensor:
    """One class id per sample (an int applies to all); refuses a model in training mode."""
    if model.training:
        # Train-mode BatchNorm mixes samples: the summed-margin trick would no longer be per sample.
        raise InputError("margin_gradients needs the model in eval mode (model.eval())")
    if isinstance(classes, int):
        return torch.full((len(inputs),), classes, dtype=torch.long, device=inputs.device)
    return classes


def margin_gradients(model: nn.Module, inputs: torch.Tensor, classes: torch.Tensor | int) -> torch.Tensor:
    """d margin_c / d input for every sample of `inputs` (N x C x H x W), returned with the input's shape.
    `classes`: one class for all samples, or one per sample. Model parameters get no gradient."""
    classes = _checked_classes(model, inputs, classes)
    x = inputs.detach().requires_grad_(True)
    with torch.enable_grad():
        margin = class_margin(model(x), classes)
        (gradient,) = torch.autograd.grad(margin.sum(), x)
    return gradient


def margin_gradients_per_sample(model: nn.Module, inputs: torch.Tensor, classes: torch.Tensor | int) -> torch.Tensor:
    """The straightforward reference: one forward and backward per sample (benchmarks and tests only)."""
    classes = _checked_classes(model, inputs, classes)
    out = torch.empty_like(inputs)
    for i in range(len(inputs)):
        x = inputs[i : i + 1].detach().requires_grad_(True)
        with torch.enable_grad():
            margin = class_margin(model(x), classes[i : i + 1])
            (out[i : i + 1],) = torch.autograd.grad(margin.sum(), x)
    return out
