"""Label-consistent attack (Turner et al. 2019), as BackdoorBox builds it: PGD on target-class
images against a clean model, then a corner trigger; labels stay unchanged."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from backdoor_engine.errors import InputError

from .base import Attack, check_int, frozen_array
from .labels import check_labels

CORNER = 3
# BackdoorBox LC tests: four 3x3 corner marks. Offsets (row, col) from each corner's first pixel;
# the left-hand marks mirror the right-hand ones.
RIGHT_MARK = ((0, 2), (1, 1), (2, 0), (2, 2))
LEFT_MARK = ((0, 0), (1, 1), (2, 2), (2, 0))


def corner_trigger(height: int, width: int, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """(H x W x C uint8 pattern, H x W bool weight): the four 3x3 corner marks of BackdoorBox LC."""
    pattern = np.zeros((height, width), dtype=np.uint8)
    weight = np.zeros((height, width), dtype=bool)
    for top in (0, height - CORNER):
        for left, mark in ((0, LEFT_MARK), (width - CORNER, RIGHT_MARK)):
            weight[top : top + CORNER, left : left + CORNER] = True
            for row, col in mark:
                pattern[top + row, left + col] = 255
    return np.repeat(pattern[:, :, None], channels, axis=2), weight


def check_normalisation(normalisation: Any, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std (pixel scale [0, 1]) of length C or 1; std positive (NaN refused). `normalisation` is
    {'mean': [...], 'std': [...]} or a models.preprocess.Normalisation."""
    if hasattr(normalisation, "to_dict"):
        normalisation = normalisation.to_dict()
    try:
        mean = tuple(float(value) for value in normalisation["mean"])
        std = tuple(float(value) for value in normalisation["std"])
    except (TypeError, KeyError, ValueError):
        raise InputError(
            f"normalisation: expected {{'mean': [...], 'std': [...]}}, got {normalisation!r}"
        ) from None
    if len(mean) not in (1, channels) or len(std) not in (1, channels) or not min(std) > 0:
        raise InputError(
            f"normalisation: expected mean and std of length 1 or {channels}, std > 0, got {normalisation!r}"
        )
    return mean, std


def pgd_untargeted(
    model: torch.nn.Module,
    x: np.ndarray,
    labels: np.ndarray,
    *,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    eps: float,
    step: float,
    steps: int,
    batch_size: int,
) -> np.ndarray:
    """L-inf PGD on the 0-255 scale, no random start, ascending cross-entropy on the true labels
    (torchattacks.PGD as BackdoorBox calls it). Rounded to uint8 within eps of the input."""
    device = next(model.parameters(), torch.empty(0)).device
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    out = np.empty_like(x)
    for start in range(0, len(x), batch_size):
        images = torch.tensor(x[start : start + batch_size], device=device).permute(0, 3, 1, 2).float()
        target = torch.tensor(labels[start : start + batch_size], device=device)
        adv = images.clone()
        with torch.enable_grad():
            for _ in range(steps):
                adv.requires_grad_(True)
                logits = model((adv / 255 - mean_t) / std_t)
                if logits.ndim != 2 or int(target.max()) >= logits.shape[1]:
                    raise InputError(
                        f"model: expected N x K logits with K > {int(target.max())}, "
                        f"got shape {tuple(logits.shape)}"
                    )
                (grad,) = torch.autograd.grad(F.cross_entropy(logits, target), adv)
                adv = adv.detach() + step * grad.sign()
                adv = torch.minimum(torch.maximum(adv, images - eps), images + eps).clamp(0, 255)
        # Rounding could step past eps when eps is not an integer: clip to the integer bounds.
        low = torch.ceil(images - eps).clamp(min=0)
        high = torch.floor(images + eps).clamp(max=255)
        rounded = torch.minimum(torch.maximum(adv.round(), low), high)
        out[start : start + batch_size] = rounded.permute(0, 2, 3, 1).to(torch.uint8).cpu().numpy()
    return out


@dataclass(frozen=True, eq=False, kw_only=True)
class LabelConsistent(Attack):
    """``model`` is a clean classifier in eval mode taking ``(x / 255 - mean) / std`` as NCHW float32.

    Training samples get PGD then the trigger; the test-time trigger is the corner marks alone,
    so an attack built without a model still gives the triggered test set.
    The PGD runs only on the samples passed in (the chosen target-class ones), not on the whole
    training set as BackdoorBox does: the other perturbed images are never used.
    """

    name = "label_consistent"
    clean_label = True
    needs_clean_model = True

    model: torch.nn.Module | None = None
    normalisation: dict | None = None
    # BackdoorBox LabelConsistent defaults, 0-255 scale.
    eps: float = 8.0
    step: float = 1.5
    steps: int = 100
    batch_size: int = 128  # BackdoorBox's schedule default
    trigger: np.ndarray = field(init=False, repr=False)
    trigger_weight: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        height, width, channels = self.image_shape
        if self.model is not None:
            if not isinstance(self.model, torch.nn.Module):
                raise InputError(f"model: expected a torch.nn.Module, got {type(self.model).__name__}")
            if self.model.training:
                raise InputError("model: expected a model in eval mode (call model.eval() first)")
        if self.model is not None or self.normalisation is not None:
            mean, std = check_normalisation(self.normalisation, channels)
            object.__setattr__(self, "normalisation", {"mean": list(mean), "std": list(std)})
        if not float(self.eps) >= 0 or not float(self.step) > 0:
            raise InputError(f"eps, step: expected eps >= 0 and step > 0, got {self.eps!r}, {self.step!r}")
        object.__setattr__(self, "steps", check_int(self.steps, "steps", 1))
        object.__setattr__(self, "batch_size", check_int(self.batch_size, "batch_size", 1))
        pattern, weight = corner_trigger(height, width, channels)
        object.__setattr__(self, "trigger", frozen_array(pattern))
        object.__setattr__(self, "trigger_weight", frozen_array(weight))

    def _apply(self, x, *, train, labels, rng):
        poisoned = self._perturb(x, labels) if train else x.copy()
        poisoned[:, self.trigger_weight] = self.trigger[self.trigger_weight]
        return poisoned

    def _perturb(self, x: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
        if self.model is None:
            raise InputError("model: poisoning training samples needs the clean model for the PGD step")
        if labels is None:
            raise InputError("labels: the label-consistent PGD needs the true labels of x")
        labels = check_labels(labels, np.iinfo(np.int64).max, "labels")
        if len(labels) != len(x):
            raise InputError(f"labels: expected {len(x)} labels, got {len(labels)}")
        return pgd_untargeted(
            self.model,
            x,
            labels,
            mean=tuple(self.normalisation["mean"]),
            std=tuple(self.normalisation["std"]),
            eps=float(self.eps),
            step=float(self.step),
            steps=self.steps,
            batch_size=self.batch_size,
        )
