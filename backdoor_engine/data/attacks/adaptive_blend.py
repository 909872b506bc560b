"""Adaptive-Blend (Qi et al., ICLR 2023, "Revisiting the assumption of latent separability").

The blend pattern is cut into a grid of pieces; each training sample blends a random subset of
them at a low alpha, the test-time trigger blends all pieces at a higher alpha. Cover samples carry
the same partial trigger but keep their true labels, which weakens latent separability.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from backdoor_engine.errors import InputError

from .base import BLEND_CHUNK, Attack, blend, check_fraction, check_images, check_int, frozen_array, to_uint8
from .blend import load_or_draw_pattern


def piece_map(height: int, width: int, pieces_per_side: int) -> np.ndarray:
    """H x W map of piece ids (row-major); sides that do not divide evenly get near-equal pieces."""
    row_edges = np.linspace(0, height, pieces_per_side + 1).round().astype(int)
    col_edges = np.linspace(0, width, pieces_per_side + 1).round().astype(int)
    row_block = np.searchsorted(row_edges, np.arange(height), side="right") - 1
    col_block = np.searchsorted(col_edges, np.arange(width), side="right") - 1
    return row_block[:, None] * pieces_per_side + col_block[None, :]


@dataclass(frozen=True, eq=False, kw_only=True)
class AdaptiveBlend(Attack):
    """Defaults from backdoor-toolbox (the authors' code): 16 pieces, half masked, alpha 0.15
    for training and 0.2 at test time."""

    name = "adaptive_blend"

    pieces: int = 16
    mask_rate: float = 0.5  # fraction of pieces left out of each training trigger
    alpha: float = 0.15
    test_alpha: float = 0.2
    cover_rate: float | None = None  # None: same as the poisoning rate
    pattern_path: str | None = None  # None: seeded uniform noise (see patterns.noise_pattern)
    pattern: np.ndarray = field(init=False, repr=False)
    piece_ids: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        height, width, _ = self.image_shape
        pieces = check_int(self.pieces, "pieces", 1, min(height, width) ** 2)
        per_side = math.isqrt(pieces)
        if per_side**2 != pieces:
            raise InputError(f"pieces: expected a perfect square (4, 9, 16, ...), got {pieces}")
        object.__setattr__(self, "pieces", pieces)
        mask_rate = check_fraction(self.mask_rate, "mask_rate")
        if self.pieces - round(mask_rate * self.pieces) < 1:
            raise InputError(f"mask_rate: leaves no piece of the trigger on, got {self.mask_rate!r}")
        object.__setattr__(self, "mask_rate", mask_rate)
        object.__setattr__(self, "alpha", check_fraction(self.alpha, "alpha", allow_zero=False))
        test_alpha = check_fraction(self.test_alpha, "test_alpha", allow_zero=False)
        object.__setattr__(self, "test_alpha", test_alpha)
        if self.cover_rate is not None:
            object.__setattr__(self, "cover_rate", check_fraction(self.cover_rate, "cover_rate"))
        pattern = load_or_draw_pattern(self.pattern_path, self.image_shape, self.seed)
        object.__setattr__(self, "pattern", frozen_array(pattern))
        object.__setattr__(self, "piece_ids", frozen_array(piece_map(height, width, per_side)))

    @property
    def kept_pieces(self) -> int:
        """Pieces blended into each training trigger."""
        return self.pieces - round(self.mask_rate * self.pieces)

    def _apply(self, x, *, train, labels, rng):
        pattern = self.pattern.astype(np.float64)
        if not train:
            return blend(x, pattern, self.test_alpha)
        out = np.empty_like(x)
        for start in range(0, len(x), BLEND_CHUNK):
            chunk = x[start : start + BLEND_CHUNK]
            kept = np.zeros((len(chunk), self.pieces), dtype=bool)
            # A random permutation of the piece ids per sample; its first entries are kept.
            order = rng.permuted(np.tile(np.arange(self.pieces), (len(chunk), 1)), axis=1)
            chosen = order[:, : self.kept_pieces]
            np.put_along_axis(kept, chosen, True, axis=1)
            weight = self.alpha * kept[:, self.piece_ids][..., None]
            out[start : start + BLEND_CHUNK] = to_uint8((1.0 - weight) * chunk + weight * pattern)
        return out

    def cover_count(self, n_samples: int, rate: float) -> int:
        return int(n_samples * (rate if self.cover_rate is None else self.cover_rate))

    def apply_cover(self, x: np.ndarray, *, rng: np.random.Generator | None = None) -> np.ndarray:
        """The training-time (partial) trigger; the caller keeps the true labels."""
        check_images(x, self.image_shape)
        return self._apply(x, train=True, labels=None, rng=rng or self._default_rng())
