"""BadNets (Gu et al. 2017): a small patch pasted over the image, x' = (1 - w) x + w p with w = 1."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from backdoor_engine.errors import InputError

from .base import Attack, check_int, frozen_array

PATTERNS = ("checkerboard", "square", "random")
NAMED_POSITIONS = ("bottom-right", "bottom-left", "top-right", "top-left", "center")


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


def patch_origin(position: Any, patch_size: int, height: int, width: int) -> tuple[int, int]:
    """Top-left (row, col) of the patch for a named corner or an explicit (row, col)."""
    expected = f"one of {NAMED_POSITIONS} or (row, col)"
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
    patch: np.ndarray = field(init=False, repr=False)
    origin: tuple[int, int] = field(init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        height, width, channels = self.image_shape
        if self.pattern not in PATTERNS:
            raise InputError(f"pattern: expected one of {PATTERNS}, got {self.pattern!r}")
        patch_size = check_int(self.patch_size, "patch_size", 1, min(height, width))
        object.__setattr__(self, "patch_size", patch_size)
        origin = patch_origin(self.position, self.patch_size, height, width)
        if not isinstance(self.position, str):
            object.__setattr__(self, "position", origin)
        object.__setattr__(self, "origin", origin)
        object.__setattr__(
            self, "patch", frozen_array(patch_pattern(self.pattern, self.patch_size, channels, self.seed))
        )

    def _apply(self, x, *, train, labels, rng):
        row, col = self.origin
        out = x.copy()
        out[:, row : row + self.patch_size, col : col + self.patch_size] = self.patch
        return out
