"""SIG (Barni et al. 2019): a horizontal sinusoid added to target-class images, labels kept."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from backdoor_engine.errors import InputError

from .base import Attack, frozen_array, to_uint8


@dataclass(frozen=True, eq=False, kw_only=True)
class SIG(Attack):
    """x' = clip(x + delta * sin(2 pi j f / W)) on every row and channel; same at train and test."""

    name = "sig"
    clean_label = True

    delta: float = 20.0  # Barni et al. 2019, on the 0-255 scale
    frequency: float = 6.0  # Barni et al. 2019
    signal: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not float(self.delta) > 0:
            raise InputError(f"delta: expected a positive amplitude, got {self.delta!r}")
        height, width, channels = self.image_shape
        columns = np.arange(width)
        wave = self.delta * np.sin(2 * np.pi * columns * self.frequency / width)
        signal = np.broadcast_to(wave[None, :, None], (height, width, channels))
        object.__setattr__(self, "signal", frozen_array(signal))

    def _apply(self, x, *, train, labels, rng):
        return to_uint8(x.astype(np.float64) + self.signal)
