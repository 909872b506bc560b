"""uint8 NHWC images -> the float32 NCHW tensors a model sees, with its per-channel normalisation."""

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import InputError

SUPPORTED_CHANNELS = (1, 3)
# Images per chunk when scanning a dataset for its statistics: bounds memory on memmapped sets.
STATS_CHUNK = 8192


def check_images(x, name: str = "x") -> None:
    """Raise InputError unless `x` is a uint8 N x H x W x C array or tensor with C in (1, 3)."""
    dtype_ok = x.dtype == torch.uint8 if isinstance(x, torch.Tensor) else (
        isinstance(x, np.ndarray) and x.dtype == np.uint8)
    if not dtype_ok:
        raise InputError(f"{name} must be a uint8 array, got {type(x).__name__} of dtype {getattr(x, 'dtype', None)}")
    if x.ndim != 4 or x.shape[-1] not in SUPPORTED_CHANNELS:
        raise InputError(f"{name} must have shape N x H x W x C with C in (1, 3), got {tuple(x.shape)}")


@dataclass(frozen=True)
class Normalisation:
    """Per-channel mean and std on the [0, 1] pixel scale: model input = (pixel / 255 - mean) / std."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self):
        mean, std = tuple(float(v) for v in self.mean), tuple(float(v) for v in self.std)
        if len(mean) not in SUPPORTED_CHANNELS or len(std) != len(mean):
            raise InputError(f"normalisation mean/std need 1 or 3 values each, got {len(mean)} and {len(std)}")
        if not all(math.isfinite(v) for v in mean) or not all(math.isfinite(v) and v > 0 for v in std):
            raise InputError(f"normalisation mean must be finite and std finite and > 0, got {mean} / {std}")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    @property
    def channels(self) -> int:
        return len(self.mean)

    def to_dict(self) -> dict:
        return {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, data: Mapping) -> "Normalisation":
        if not isinstance(data, Mapping) or set(data) != {"mean", "std"}:
            keys = sorted(data) if isinstance(data, Mapping) else type(data).__name__
            raise InputError(f"normalisation must be a mapping with keys mean and std, got {keys}")
        try:
            return cls(tuple(data["mean"]), tuple(data["std"]))
        except InputError:
            raise
        except (TypeError, ValueError) as error:
            raise InputError(f"normalisation mean/std must be lists of numbers: {error}") from None


def fit_normalisation(x: np.ndarray) -> Normalisation:
    """Per-channel mean and (population) std of uint8 NHWC images, in bounded memory.

    Counts each channel's 256 pixel values chunk by chunk (exact integers), then takes the moments
    of the histogram in float64: no accumulation error grows with N.
    """
    check_images(x)
    if len(x) == 0:
        raise InputError("x is empty: cannot fit a normalisation on zero images")
    channels = x.shape[-1]
    counts = np.zeros((channels, 256), dtype=np.int64)
    for start in range(0, len(x), STATS_CHUNK):
        chunk = np.asarray(x[start:start + STATS_CHUNK])
        for channel in range(channels):
            counts[channel] += np.bincount(chunk[..., channel].ravel(), minlength=256)
    values = np.arange(256, dtype=np.float64) / 255.0
    total = counts.sum(axis=1).astype(np.float64)
    mean = counts @ values / total
    variance = counts @ values**2 / total - mean**2
    std = np.sqrt(np.maximum(variance, 0.0))
    if np.any(std == 0):
        raise InputError(f"x has a constant channel (std {std.tolist()}): nothing to normalise by")
    return Normalisation(tuple(mean.tolist()), tuple(std.tolist()))


def to_model_input(x: np.ndarray | torch.Tensor, normalisation: Normalisation) -> torch.Tensor:
    """float32 N x C x H x W tensor (contiguous) of normalised `x`; a tensor stays on its device."""
    check_images(x)
    if x.shape[-1] != normalisation.channels:
        raise InputError(f"x has {x.shape[-1]} channels but the normalisation has {normalisation.channels}")
    pixels = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    mean = torch.tensor(normalisation.mean, dtype=torch.float32, device=pixels.device)
    std = torch.tensor(normalisation.std, dtype=torch.float32, device=pixels.device)
    # Fold 1/255 into the scale: one multiply-add per value.
    scale, shift = 1.0 / (255.0 * std), -mean / std
    normalised = torch.addcmul(shift, pixels.to(torch.float32), scale)
    return normalised.permute(0, 3, 1, 2).contiguous()


def float_pixels(x: np.ndarray, device="cpu") -> torch.Tensor:
    """uint8 N x H x W x C images as float32 N x C x H x W on [0, 1]: the space in which the purifiers and GIC
    perturb images (their radii are on [0, 1] pixels)."""
    check_images(x)
    return torch.from_numpy(np.ascontiguousarray(x)).to(device).permute(0, 3, 1, 2).float().div_(255.0)


def normaliser(normalisation: Normalisation, device="cpu"):
    """The model's input normalisation of [0, 1] N x C x H x W pixels (float_pixels), differentiable."""
    mean = torch.tensor(normalisation.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std = torch.tensor(normalisation.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return lambda pixels: (pixels - mean) / std
