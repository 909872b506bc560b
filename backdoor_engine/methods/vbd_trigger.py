"""VBD stage 3 image arithmetic: gradient mask, variance map, Otsu binarisation, pattern, pasting.

Plain vectorised numpy/torch functions (SEED_NOTES.md section 3.4), each checked in the tests against a
straightforward reference (cv2's Otsu where opencv is installed).
"""

from __future__ import annotations

import numpy as np
import torch

# The official "Gaussian blur": a fixed 3x3 binomial kernel (implicit sigma ~0.85), reflection padding.
BINOMIAL_3X3 = np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=np.float64) / 16.0


def min_max(values: np.ndarray, axis=None) -> np.ndarray:
    """Scale to [0, 1]; a constant input becomes all zeros (nothing stands out)."""
    low = values.min(axis=axis, keepdims=True)
    span = values.max(axis=axis, keepdims=True) - low
    return np.divide(values - low, span, out=np.zeros_like(values, dtype=np.float64), where=span > 0)


def binomial_blur(image: np.ndarray) -> np.ndarray:
    """H x W image convolved with BINOMIAL_3X3 under reflection padding (cv2/torch 'reflect': edge not repeated)."""
    padded = np.pad(image.astype(np.float64), 1, mode="reflect")
    height, width = image.shape
    out = np.zeros((height, width))
    for dy in range(3):
        for dx in range(3):
            out += BINOMIAL_3X3[dy, dx] * padded[dy:dy + height, dx:dx + width]
    return out


def to_uint8_levels(image: np.ndarray) -> np.ndarray:
    """Min-max to the 0..255 grey levels Otsu works on."""
    return np.rint(min_max(image) * 255.0).astype(np.uint8)


def otsu_threshold(levels: np.ndarray) -> int:
    """Otsu's threshold of a uint8 image: the t maximising the between-class variance of {<= t} and {> t}
    (cv2.THRESH_OTSU's rule, first maximum on ties)."""
    histogram = np.bincount(levels.ravel(), minlength=256).astype(np.float64)
    probability = histogram / histogram.sum()
    grey = np.arange(256, dtype=np.float64)
    weight_low = np.cumsum(probability)
    mass_low = np.cumsum(probability * grey)
    weight_high = 1.0 - weight_low
    mean_total = mass_low[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mean_total * weight_low - mass_low) ** 2 / (weight_low * weight_high)
    # cv2 skips thresholds where one class is empty (within rounding of its float sums).
    between[(weight_low < 1e-12) | (weight_high < 1e-12)] = -1.0
    return int(np.argmax(between))


def otsu_binarise(image: np.ndarray) -> np.ndarray:
    """{0, 1} float mask: min-max to 0..255, then pixels above Otsu's threshold (the official recipe)."""
    levels = to_uint8_levels(image)
    return (levels > otsu_threshold(levels)).astype(np.float64)


def gradient_mask(mean_gradient: np.ndarray) -> np.ndarray:
    """C x H x W gradient of the mean margin -> H x W {0,1}: channel L2 norm, min-max, blur, Otsu."""
    norm = np.sqrt((np.asarray(mean_gradient, dtype=np.float64) ** 2).sum(axis=0))
    return otsu_binarise(binomial_blur(min_max(norm)))


def variance_map(pixels: np.ndarray) -> np.ndarray:
    """N x H x W x C images on the 0..255 scale -> H x W in [0, 1] (Eq. 3): per-pixel unbiased variance
    across the N images, min-max per channel, mean over channels. Needs N >= 2."""
    variance = np.rint(np.asarray(pixels, dtype=np.float64)).var(axis=0, ddof=1)
    return min_max(variance, axis=(0, 1)).mean(axis=-1)


def trigger_mask(mean_gradient: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """Algorithm 2: Otsu(gradient mask x (1 - variance map)), H x W in {0, 1}."""
    return otsu_binarise(gradient_mask(mean_gradient) * (1.0 - variance_map(pixels)))


def paste(x: torch.Tensor, pattern: torch.Tensor, mask: torch.Tensor, alpha: torch.Tensor | float) -> torch.Tensor:
    """Eq. 1 on normalised N x C x H x W inputs: x (1 - m) + (1 - alpha) x m + alpha m p.
    `alpha` is a number or one value per sample."""
    if isinstance(alpha, torch.Tensor):
        alpha = alpha.reshape(-1, 1, 1, 1)
    return x - alpha * mask * x + alpha * mask * pattern
