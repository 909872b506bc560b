"""Full-image trigger patterns shared by the blending attacks."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, UnidentifiedImageError

from backdoor_engine.errors import InputError


def noise_pattern(image_shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """Seeded uniform-noise image in [0, 255].

    The usual Blended trigger is the Hello-Kitty photo, which is not licensed for redistribution;
    uniform noise is the other trigger of the Blended paper (Chen et al. 2017, "random pattern").
    """
    return np.random.default_rng(seed).integers(0, 256, size=image_shape, dtype=np.uint8)


def image_pattern(path: str | os.PathLike, image_shape: tuple[int, int, int]) -> np.ndarray:
    """A user's trigger image, converted to the channel count and resized (bilinear) to H x W."""
    height, width, channels = image_shape
    try:
        with Image.open(path) as image:
            converted = image.convert("L" if channels == 1 else "RGB")
            resized = converted.resize((width, height), Image.Resampling.BILINEAR)
    except FileNotFoundError:
        raise InputError(f"pattern_path: file not found: {path}") from None
    except (UnidentifiedImageError, OSError) as error:
        raise InputError(f"pattern_path: cannot read {path} as an image ({error})") from None
    return np.asarray(resized, dtype=np.uint8).reshape(image_shape)
