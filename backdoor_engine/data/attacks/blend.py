"""Blended (Chen et al. 2017): a full-image pattern mixed in, x' = (1 - alpha) x + alpha p."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from .base import Attack, blend, check_fraction, frozen_array
from .patterns import image_pattern, noise_pattern


def load_or_draw_pattern(pattern_path: str | None, image_shape, seed: int) -> np.ndarray:
    """The user's image when a path is given, else seeded noise."""
    if pattern_path is None:
        return noise_pattern(image_shape, seed)
    return image_pattern(pattern_path, image_shape)


@dataclass(frozen=True, eq=False, kw_only=True)
class Blend(Attack):
    """Full-image blend; same at train and test time.

    Rounds to the nearest integer where BackdoorBox truncates (``.type(torch.uint8)``), which
    would darken every blended pixel by half a level on average.
    """

    name = "blend"

    alpha: float = 0.2  # BackdoorBox Blended tests and the Blended paper's typical setting
    pattern_path: str | None = None  # None: seeded uniform noise (see patterns.noise_pattern)
    pattern: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "alpha", check_fraction(self.alpha, "alpha", allow_zero=False))
        if self.pattern_path is not None:
            object.__setattr__(self, "pattern_path", os.fspath(self.pattern_path))
        pattern = load_or_draw_pattern(self.pattern_path, self.image_shape, self.seed)
        object.__setattr__(self, "pattern", frozen_array(pattern))

    def _apply(self, x, *, train, labels, rng):
        return blend(x, self.pattern.astype(np.float64), self.alpha)
