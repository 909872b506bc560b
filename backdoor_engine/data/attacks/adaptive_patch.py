"""Adaptive-Patch (Qi et al., ICLR 2023, "Revisiting the assumption of latent separability"; the same paper
as adaptive_blend.py).

Several small patch triggers sit at fixed positions. Each poisoned training sample carries only some of them
(one by default) at a reduced opacity; cover samples carry the same partial trigger but keep their true
labels, which weakens the latent separation that many detectors rely on. The test-time trigger carries every
patch at full opacity, so the backdoor is activated by a stronger trigger than any training sample shows.

Defaults follow backdoor-toolbox (the authors' code, ``config.py`` and ``poison_tool_box/adaptive_patch.py``):

* four training patches with opacities 0.5, 0.2, 0.5, 0.3 (``adaptive_patch_train_trigger_alphas``);
* each poisoned or cover sample carries exactly one of them (the toolbox splits those samples into four equal
  groups by index, one patch per group; here each sample draws its patch from the attack's random stream);
* test opacity 1 (``adaptive_patch_test_trigger_alphas``);
* cover rate twice the poisoning rate (its CIFAR-10 run: poison_rate 0.003, cover_rate 0.006).

What differs, and why:

* Patterns: the toolbox's patches are picture files on 32x32 canvases (phoenix_corner, firefox_corner,
  badnet_patch4, trojan_square) that we do not redistribute. Ours are seeded random 0/255 squares (per pixel and
  channel, as BadNets' random triggers), one per corner: bottom-right, top-left, top-right, bottom-left.
* Size: ``patch_size=None`` gives 4 px per 32 px of the shorter side, rounded half up (4 px on 32x32 CIFAR-10
  and on 28x28 Fashion-MNIST, where 3.5 rounds to 4), so the patches keep their share of a smaller image.
* Test trigger: the toolbox's test trigger is two patches at opacity 1 (CIFAR-10: phoenix_corner2 and
  badnet_patch4; GTSRB: two of the four training patches); here it is all the training patches, so train and
  test triggers are made of the same pieces and the test trigger is the strongest one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from backdoor_engine.errors import InputError

from .base import (
    Attack,
    check_fraction,
    check_images,
    check_int,
    frozen_array,
    to_uint8,
)

CORNERS = ("bottom-right", "top-left", "top-right", "bottom-left")
PIXELS_PER_32 = 4  # default patch side per 32 px of the image's shorter side


def default_patch_size(height: int, width: int) -> int:
    """4 px per 32 px of the shorter side, rounded half up, at least 1."""
    return max(1, int(np.floor(min(height, width) * PIXELS_PER_32 / 32 + 0.5)))


def corner_origins(count: int, patch_size: int, height: int, width: int) -> tuple[tuple[int, int], ...]:
    """Top-left (row, col) of the first ``count`` corners, in CORNERS order."""
    low_row, low_col = height - patch_size, width - patch_size
    by_name = {"bottom-right": (low_row, low_col), "top-left": (0, 0), "top-right": (0, low_col),
               "bottom-left": (low_row, 0)}
    return tuple(by_name[name] for name in CORNERS[:count])


def check_alphas(alphas: Any) -> tuple[float, ...]:
    """One opacity in (0, 1] per patch, 1 to 4 patches (one per corner)."""
    if isinstance(alphas, (str, bytes)) or not hasattr(alphas, "__len__"):
        raise InputError(f"alphas: expected a list of 1 to {len(CORNERS)} opacities, got {alphas!r}")
    if not 1 <= len(alphas) <= len(CORNERS):
        raise InputError(f"alphas: expected 1 to {len(CORNERS)} opacities (one patch per corner), got {len(alphas)}")
    try:
        return tuple(check_fraction(alpha, "alphas", allow_zero=False) for alpha in alphas)
    except (TypeError, ValueError):
        raise InputError(f"alphas: expected numbers in (0, 1], got {alphas!r}") from None


@dataclass(frozen=True, eq=False, kw_only=True)
class AdaptivePatch(Attack):
    """Defaults from backdoor-toolbox (see the module docstring); ``alphas`` sets the number of patches."""

    name = "adaptive_patch"

    alphas: tuple = (0.5, 0.2, 0.5, 0.3)  # training opacity of each patch (toolbox CIFAR-10 / GTSRB)
    test_alpha: float = 1.0  # toolbox test opacity
    patches_per_sample: int = 1  # patches on each poisoned / cover sample (toolbox: one)
    patch_size: int | None = None  # None: 4 px per 32 px of the shorter side
    cover_rate: float | None = None  # None: twice the poisoning rate (toolbox 0.003 / 0.006)
    patterns: np.ndarray = field(init=False, repr=False)  # k x s x s x C uint8, one per patch
    origins: tuple = field(init=False)  # top-left (row, col) of each patch

    def __post_init__(self) -> None:
        super().__post_init__()
        height, width, channels = self.image_shape
        alphas = check_alphas(self.alphas)
        object.__setattr__(self, "alphas", alphas)
        test_alpha = check_fraction(self.test_alpha, "test_alpha", allow_zero=False)
        object.__setattr__(self, "test_alpha", test_alpha)
        per_sample = check_int(self.patches_per_sample, "patches_per_sample", 1, len(alphas))
        object.__setattr__(self, "patches_per_sample", per_sample)
        # Corner patches must not overlap, or a sample's patch count would not be what was asked.
        largest = min(height, width) // 2
        size = default_patch_size(height, width) if self.patch_size is None else self.patch_size
        size = check_int(size, "patch_size", 1, largest)
        object.__setattr__(self, "patch_size", size if self.patch_size is not None else None)
        if self.cover_rate is not None:
            object.__setattr__(self, "cover_rate", check_fraction(self.cover_rate, "cover_rate"))
        rng = np.random.default_rng(self.seed)
        patterns = (rng.integers(0, 2, size=(len(alphas), size, size, channels)) * 255).astype(np.uint8)
        object.__setattr__(self, "patterns", frozen_array(patterns))
        object.__setattr__(self, "origins", corner_origins(len(alphas), size, height, width))

    @property
    def side(self) -> int:
        """The patch side in pixels (the default resolved)."""
        return self.patterns.shape[1]

    def _blend_patch(self, out: np.ndarray, x: np.ndarray, rows: np.ndarray, patch: int, alpha: float) -> None:
        row, col = self.origins[patch]
        window = (rows, slice(row, row + self.side), slice(col, col + self.side))
        pattern = self.patterns[patch].astype(np.float64)
        out[window] = to_uint8((1.0 - alpha) * x[window].astype(np.float64) + alpha * pattern)

    def chosen_patches(self, n_samples: int, rng: np.random.Generator) -> np.ndarray:
        """n x k bool: which patches each training sample carries (a uniform random subset per sample)."""
        count = len(self.alphas)
        order = rng.permuted(np.tile(np.arange(count), (n_samples, 1)), axis=1)
        chosen = np.zeros((n_samples, count), dtype=bool)
        np.put_along_axis(chosen, order[:, : self.patches_per_sample], True, axis=1)
        return chosen

    def _apply(self, x, *, train, labels, rng):
        out = x.copy()
        every = np.arange(len(x))
        chosen = self.chosen_patches(len(x), rng) if train else None
        # Patches do not overlap, so each is blended over the original pixels independently.
        for patch, alpha in enumerate(self.alphas):
            if train:
                self._blend_patch(out, x, np.flatnonzero(chosen[:, patch]), patch, alpha)
            else:
                self._blend_patch(out, x, every, patch, self.test_alpha)
        return out

    def cover_count(self, n_samples: int, rate: float) -> int:
        return int(n_samples * (2 * rate if self.cover_rate is None else self.cover_rate))

    def apply_cover(self, x: np.ndarray, *, rng: np.random.Generator | None = None) -> np.ndarray:
        """The training-time (partial, low-opacity) trigger; the caller keeps the true labels."""
        check_images(x, self.image_shape)
        return self._apply(x, train=True, labels=None, rng=rng or self._default_rng())
