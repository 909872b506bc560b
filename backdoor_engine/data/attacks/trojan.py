"""Trojan-style fixed watermark: a stored logo-like patch stamped at the bottom-right."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .base import Attack, check_int, frozen_array


def watermark(side: int, channels: int) -> np.ndarray:
    """side x side x C concentric square rings; for RGB the channels alternate (magenta/green rings).

    Deterministic in the image shape alone: the TrojanNN trigger is one fixed mark for the whole
    attack, not drawn per seed.
    """
    rows, cols = np.indices((side, side))
    ring = np.minimum(np.minimum(rows, cols), np.minimum(side - 1 - rows, side - 1 - cols))
    planes = [np.where((ring + channel) % 2 == 0, 255, 0) for channel in range(channels)]
    return np.stack(planes, axis=2).astype(np.uint8)


@dataclass(frozen=True, eq=False, kw_only=True)
class Trojan(Attack):
    """Stamped (replacing) patch, as backdoor-toolbox's trojan.py applies the TrojanNN mark
    (x + mask * (mark - x)). The Effective_backdoor_defense variant adds its stored trigger and
    clips instead; we stamp because an additive mark is erased on bright pixels, so the trigger
    would depend on the image. The optimised TrojanNN trigger needs a clean model and is not
    shippable; this fixed mark keeps its size and place. ``seed`` has no effect.
    """

    name = "trojan"

    # About a quarter of the image side (8 px on 32x32, 7 px on 28x28), like TrojanNN's square mark.
    size: int | None = None
    mark: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        height, width, channels = self.image_shape
        side = round(min(height, width) / 4) if self.size is None else self.size
        side = check_int(side, "size", 3, min(height, width))
        object.__setattr__(self, "size", side)
        object.__setattr__(self, "mark", frozen_array(watermark(side, channels)))

    def _apply(self, x, *, train, labels, rng):
        side = self.mark.shape[0]
        out = x.copy()
        out[:, -side:, -side:] = self.mark
        return out
