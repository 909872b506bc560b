"""BadNets (Gu et al. 2017): a small patch pasted over the image, x' = (1 - w) x + w p with w = 1.

`alpha` < 1 blends the patch instead (VBD's "Blended" attacks, Eq. 1 of the VBD paper: a BadNets patch
at blending factor alpha); `position="per-class"` puts each class's patch in its own slot (VBD's
all-to-all setting: from the bottom right, right to left, then bottom to top, never overlapping).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from backdoor_engine.errors import InputError

from .base import Attack, blend, check_fraction, check_int, frozen_array

PATTERNS = ("checkerboard", "square", "random")
NAMED_POSITIONS = ("bottom-right", "bottom-left", "top-right", "top-left", "center")
PER_CLASS = "per-class"


def patch_pattern(kind: str, patch_size: int, channels: int, seed: int) -> np.ndarray:
    """patch_size x patch_size x C uint8 patch of 0/255 values."""
    if kind == "checkerboard":
        rows, cols = np.indices((patch_size, patch_size))
        # White corners, as in the 3x3 checkerboard of the FLARE evaluation.
        plane = np.where((rows + cols) % 2 == 0, 255, 0).astype(np.uint8)
        return np.repeat(plane[:, :, None], channels, axis=2)
    if kind == "square":
        return np.full((patch_size, patch_size, channels), 255, dtype=np.uint8)
    # Binary per pixel and per channel, as BadNets' own random-pixel triggers.
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 2, size=(patch_size, patch_size, channels)) * 255).astype(np.uint8)


def class_slot_origin(label: int, patch_size: int, height: int, width: int) -> tuple[int, int]:
    """Top-left (row, col) of class `label`'s slot: slots tile the image from the bottom right, right to left,
    then bottom to top (the VBD paper's all-to-all placement)."""
    per_row = width // patch_size
    row, col = divmod(int(label), per_row)
    if (row + 1) * patch_size > height:
        raise InputError(f"position {PER_CLASS!r}: class {label} has no free {patch_size}x{patch_size} slot in "
                         f"a {height}x{width} image ({per_row * (height // patch_size)} slots)")
    return height - (row + 1) * patch_size, width - (col + 1) * patch_size


def patch_origin(position: Any, patch_size: int, height: int, width: int) -> tuple[int, int]:
    """Top-left (row, col) of the patch for a named corner or an explicit (row, col)."""
    expected = f"one of {NAMED_POSITIONS}, {PER_CLASS!r} or (row, col)"
    named = {
        "bottom-right": (height - patch_size, width - patch_size),
        "bottom-left": (height - patch_size, 0),
        "top-right": (0, width - patch_size),
        "top-left": (0, 0),
        "center": ((height - patch_size) // 2, (width - patch_size) // 2),
    }
    if isinstance(position, str):
        if position not in named:
            raise InputError(f"position: expected {expected}, got {position!r}")
        return named[position]
    try:
        row, col = (int(value) for value in position)
    except (TypeError, ValueError):
        raise InputError(f"position: expected {expected}, got {position!r}") from None
    if not (0 <= row <= height - patch_size and 0 <= col <= width - patch_size):
        raise InputError(
            f"position: a {patch_size}x{patch_size} patch at {(row, col)} does not fit in {height}x{width}"
        )
    return row, col


@dataclass(frozen=True, eq=False, kw_only=True)
class BadNets(Attack):
    """Patch trigger; same at train and test time."""

    name = "badnets"

    # BackdoorBox uses a 3x3 patch at the bottom-right for CIFAR-10.
    pattern: str = "checkerboard"
    patch_size: int = 3
    position: Any = "bottom-right"
    alpha: float = 1.0  # 1: the patch replaces the pixels (BadNets); < 1: blended (VBD's Blended attacks)
    patch: np.ndarray = field(init=False, repr=False)
    origin: tuple[int, int] | None = field(init=False)  # None for "per-class"

    def __post_init__(self) -> None:
        super().__post_init__()
        height, width, channels = self.image_shape
        if self.pattern not in PATTERNS:
            raise InputError(f"pattern: expected one of {PATTERNS}, got {self.pattern!r}")
        patch_size = check_int(self.patch_size, "patch_size", 1, min(height, width))
        object.__setattr__(self, "patch_size", patch_size)
        object.__setattr__(self, "alpha", check_fraction(self.alpha, "alpha", allow_zero=False))
        if self.position == PER_CLASS:
            origin = None
            class_slot_origin(0, patch_size, height, width)  # the patch must fit at least once
        else:
            origin = patch_origin(self.position, self.patch_size, height, width)
            if not isinstance(self.position, str):
                object.__setattr__(self, "position", origin)
        object.__setattr__(self, "origin", origin)
        object.__setattr__(
            self, "patch", frozen_array(patch_pattern(self.pattern, self.patch_size, channels, self.seed))
        )

    def _apply(self, x, *, train, labels, rng):
        if self.origin is not None:
            return self._paste(x, *self.origin)
        if labels is None or len(labels) != len(x):
            raise InputError(f"position {PER_CLASS!r} places the patch by class: pass labels, one per image")
        out = np.empty_like(x)
        height, width, _ = self.image_shape
        for label in np.unique(labels):
            rows = np.flatnonzero(labels == label)
            out[rows] = self._paste(x[rows], *class_slot_origin(label, self.patch_size, height, width))
        return out

    def _paste(self, x: np.ndarray, row: int, col: int) -> np.ndarray:
        out = x.copy()
        window = (slice(None), slice(row, row + self.patch_size), slice(col, col + self.patch_size))
        if self.alpha == 1.0:
            out[window] = self.patch
        else:
            out[window] = blend(x[window], self.patch.astype(np.float64), self.alpha)
        return out
