"""WaNet (Nguyen & Tran, ICLR 2021): a fixed smooth warp of the image."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from backdoor_engine.errors import InputError

from .base import Attack, check_images, check_int, frozen_array, to_uint8

WARP_CHUNK = 1024


def warping_grid(
    image_shape: tuple[int, int, int], *, k: int, s: float, grid_rescale: float, seed: int
) -> np.ndarray:
    """H x W x 2 sampling grid (x, y in [-1, 1]) as BackdoorBox's ``gen_grid`` builds it, seeded.

    Noise is normalised by H for both axes, as in BackdoorBox (written for square images).
    """
    height, width, _ = image_shape
    noise = np.random.default_rng(seed).uniform(-1.0, 1.0, size=(1, 2, k, k))
    noise = noise / np.mean(np.abs(noise))
    upsampled = F.interpolate(
        torch.from_numpy(noise), size=(height, width), mode="bicubic", align_corners=True
    )[0].permute(1, 2, 0).numpy()
    cols, rows = np.meshgrid(np.linspace(-1, 1, width), np.linspace(-1, 1, height))
    identity = np.stack([cols, rows], axis=2)
    grid = identity + s * upsampled / height
    return np.clip(grid * grid_rescale, -1, 1).astype(np.float32)


def warp(x: np.ndarray, grids: np.ndarray) -> np.ndarray:
    """Bilinear ``grid_sample`` (align_corners=True) of uint8 NHWC images; grids 1 or N x H x W x 2."""
    out = np.empty_like(x)
    for start in range(0, len(x), WARP_CHUNK):
        # torch.tensor copies: inputs and the stored grid may be read-only arrays.
        chunk = torch.tensor(x[start : start + WARP_CHUNK]).permute(0, 3, 1, 2).float() / 255
        grid = torch.tensor(grids if len(grids) == 1 else grids[start : start + WARP_CHUNK])
        sampled = F.grid_sample(chunk, grid.expand(len(chunk), -1, -1, -1), align_corners=True)
        out[start : start + WARP_CHUNK] = to_uint8(sampled.permute(0, 2, 3, 1).numpy() * 255)
    return out


@dataclass(frozen=True, eq=False, kw_only=True)
class WaNet(Attack):
    """Warp with the stored grid; same at train and test time. Noise mode: ``cross_ratio x rate``
    extra samples are warped with the grid plus per-sample jitter and keep their true label."""

    name = "wanet"

    # BackdoorBox / WaNet paper defaults.
    k: int = 4
    s: float = 0.5
    grid_rescale: float = 1.0
    cross_ratio: float = 2.0  # 0 turns noise mode off
    grid: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        height = self.image_shape[0]
        object.__setattr__(self, "k", check_int(self.k, "k", 2, height))
        if not float(self.grid_rescale) > 0:
            raise InputError(f"grid_rescale: expected a positive number, got {self.grid_rescale!r}")
        if not float(self.cross_ratio) >= 0:
            raise InputError(f"cross_ratio: expected a number >= 0, got {self.cross_ratio!r}")
        grid = warping_grid(
            self.image_shape, k=self.k, s=float(self.s), grid_rescale=float(self.grid_rescale), seed=self.seed
        )
        object.__setattr__(self, "grid", frozen_array(grid))

    def _apply(self, x, *, train, labels, rng):
        return warp(x, self.grid[None])

    def cover_count(self, n_samples: int, rate: float) -> int:
        # BackdoorBox: noise_num = int(total_num * poisoned_rate * 2).
        return int(n_samples * rate * self.cross_ratio)

    def apply_cover(self, x: np.ndarray, *, rng: np.random.Generator | None = None) -> np.ndarray:
        """Warp with the stored grid plus uniform jitter in [-1, 1) / H, drawn per sample."""
        check_images(x, self.image_shape)
        rng = rng or self._default_rng()
        height, width, _ = self.image_shape
        out = np.empty_like(x)
        # Jitter drawn chunk by chunk so its memory stays bounded.
        for start in range(0, len(x), WARP_CHUNK):
            chunk = x[start : start + WARP_CHUNK]
            jitter = (rng.random((len(chunk), height, width, 2), dtype=np.float32) * 2 - 1) / height
            out[start : start + WARP_CHUNK] = warp(chunk, np.clip(self.grid[None] + jitter, -1, 1))
        return out
