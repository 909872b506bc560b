"""VBD stage 3 image arithmetic against straightforward references (cv2 where installed)."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from backdoor_engine.methods.vbd_trigger import (BINOMIAL_3X3, binomial_blur, gradient_mask, otsu_binarise,
                                                 otsu_threshold, paste, trigger_mask, variance_map)


def brute_force_otsu(levels: np.ndarray) -> int:
    """Otsu by definition: the t minimising the weighted within-class variance of {<= t} and {> t}."""
    values = levels.ravel().astype(np.float64)
    best, best_t = np.inf, None
    for t in range(256):
        low, high = values[values <= t], values[values > t]
        if not len(low) or not len(high):
            continue
        within = len(low) * low.var() + len(high) * high.var()
        if within < best - 1e-9:
            best, best_t = within, t
    return best_t


@pytest.mark.parametrize("seed", range(6))
def test_otsu_threshold_matches_the_definition(seed):
    rng = np.random.default_rng(seed)
    # Bimodal images of awkward sizes, as a blurred gradient mask looks.
    shape = (int(rng.integers(5, 40)), int(rng.integers(5, 40)))
    levels = np.where(rng.random(shape) < 0.2, rng.normal(200, 20, shape), rng.normal(60, 30, shape))
    levels = np.clip(np.rint(levels), 0, 255).astype(np.uint8)
    assert otsu_threshold(levels) == brute_force_otsu(levels)


@pytest.mark.parametrize("seed", range(6))
def test_otsu_binarise_matches_cv2(seed):
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(seed)
    image = rng.gamma(0.5 + seed, size=(28 + seed, 31))
    levels = np.rint((image - image.min()) / (image.max() - image.min()) * 255).astype(np.uint8)
    threshold, binary = cv2.threshold(levels, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    assert otsu_threshold(levels) == int(threshold)
    np.testing.assert_array_equal(otsu_binarise(image), binary / 255)


def test_binomial_blur_is_a_reflect_padded_convolution():
    rng = np.random.default_rng(0)
    image = rng.random((9, 13))
    # scipy's "mirror" is reflection without repeating the edge, as torch's and cv2's default reflect.
    expected = ndimage.convolve(image, BINOMIAL_3X3, mode="mirror")
    np.testing.assert_allclose(binomial_blur(image), expected, rtol=1e-12)
    cv2 = pytest.importorskip("cv2")
    np.testing.assert_allclose(binomial_blur(image), cv2.filter2D(image, -1, BINOMIAL_3X3,
                                                                  borderType=cv2.BORDER_REFLECT_101), rtol=1e-12)


def test_variance_map_normalises_each_channel_then_averages():
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, size=(7, 5, 6, 3)).astype(np.float64)
    pixels[:, 2, 3, :] = 17  # a constant pixel: variance 0 in every channel
    result = variance_map(pixels)
    variance = pixels.var(axis=0, ddof=1)
    expected = ((variance - variance.min(axis=(0, 1))) / np.ptp(variance, axis=(0, 1))).mean(axis=-1)
    np.testing.assert_allclose(result, expected)
    assert result[2, 3] == 0.0 and result.max() <= 1.0


def test_trigger_mask_finds_a_constant_patch_where_the_gradient_points():
    rng = np.random.default_rng(2)
    pixels = rng.integers(0, 256, size=(20, 28, 28, 1)).astype(np.uint8)
    pixels[:, 24:27, 20:23] = 255  # the trigger: constant across the poisoned samples
    gradient = rng.normal(0, 0.01, size=(1, 28, 28))
    gradient[0, 24:27, 20:23] += 1.0
    mask = trigger_mask(gradient, pixels)
    truth = np.zeros((28, 28), bool)
    truth[24:27, 20:23] = True
    iou = (mask.astype(bool) & truth).sum() / (mask.astype(bool) | truth).sum()
    assert iou >= 0.5
    # The gradient mask alone also takes the blurred neighbourhood; the variance step trims it.
    assert gradient_mask(gradient).sum() >= mask.sum()


def test_paste_follows_eq_1():
    x = torch.randn(4, 3, 5, 5)
    pattern = torch.randn(3, 5, 5)
    mask = torch.zeros(5, 5)
    mask[1:3, 2:4] = 1
    np.testing.assert_allclose(paste(x, pattern, mask, 1.0)[:, :, 1:3, 2:4], pattern[None, :, 1:3, 2:4].expand(4, -1, -1, -1))
    alpha = torch.tensor([0.0, 0.25, 0.5, 1.0])
    out = paste(x, pattern, mask, alpha)
    for i, a in enumerate(alpha.tolist()):
        expected = x[i] * (1 - mask) + (1 - a) * x[i] * mask + a * pattern * mask
        torch.testing.assert_close(out[i], expected)
    torch.testing.assert_close(out[:, :, 0], x[:, :, 0])  # outside the mask nothing changes
