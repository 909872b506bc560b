"""Low Frequency attack (Zeng et al., ICCV 2021, "Rethinking the backdoor attacks' triggers: a frequency
perspective"; GIC evaluates against it as "LF"): a universal adversarial perturbation towards the target class,
computed on a clean model and kept in the low-frequency band by a Gaussian low-pass filter, added to every
poisoned image (then clipped to [0, 255]).

Building the perturbation needs a clean model, so it is a separate step (``build_lf_trigger``) whose result is
stored in an ``.npz`` (``save_lf_trigger``); the attack reads that file (``trigger_path``), so a poisoning spec
stays JSON and ``harness.triggered_test`` rebuilds the same trigger from it.

The official code (YiZeng623/frequency-backdoor, Sec5_Smooth_Trigger; BackdoorBench's resource/lowFrequency
copies it) runs a targeted DeepFool on one image at a time over 100 training images, adds each step to the
perturbation, Gaussian-smooths it and min-max rescales it to a range of 0.2 (on the [0, 1] scale), for up to 50
passes (BackdoorBench). Ours keeps the ingredients and replaces the per-image loop by batched gradient steps:

* objective: cross-entropy towards the target on a batch of clean images plus the perturbation (clipped to
  the pixel range), descended along the Gaussian-filtered gradient; the perturbation is the sum of filtered
  steps, so it never leaves the low-pass band (ours: batched instead of per-image DeepFool);
* magnitude: ``eps`` = 25.5 on the 0-255 scale, i.e. the official range of 0.2 (51 levels) centred on zero.
  The official min-max rescaling maps the perturbation into [0, 0.2], which adds a uniform brightening of
  0.1 that comes from the rescaling, not from the adversarial direction; we leave it out. Steps are scaled
  back inside the bound, and at the end the perturbation is stretched to use it fully (as the official
  rescaling always does);
* low-pass: a Gaussian of std 6 px on 32x32 images (official ``gauss_smooth(sig=6)``), scaled with the
  image side (5.25 px on 28x28), reflected at the borders (the official pads with zeros, which fades the
  perturbation towards the edges); ``sigma`` sets it;
* 100 clean images (official and BackdoorBench), 50 steps (BackdoorBench's 50 passes), target given by the
  spec (BackdoorBench; the official code may switch to the "dominant" label the perturbation reaches).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter1d

from backdoor_engine.errors import InputError

from .base import (
    BLEND_CHUNK,
    Attack,
    check_image_shape,
    check_int,
    frozen_array,
    to_uint8,
)
from .label_consistent import check_normalisation

DEFAULT_EPS = 25.5  # official range 0.2 of [0, 1] = 51 levels, centred on zero
OFFICIAL_SIGMA_PER_32 = 6.0  # official gauss_smooth(sig=6) on 32x32 CIFAR-10
DEFAULT_STEPS = 50
DEFAULT_IMAGES = 100
PERTURBATION_KEY = "perturbation"


def default_sigma(height: int, width: int) -> float:
    """The official 6 px Gaussian on 32 px, scaled with the shorter side."""
    return OFFICIAL_SIGMA_PER_32 * min(height, width) / 32


def lowpass_matrix(size: int, sigma: float) -> np.ndarray:
    """size x size matrix M with M @ v = Gaussian filter of v along one axis (reflected borders): the filter is
    linear, so column j is the filtered unit vector e_j. As a matrix it runs on any torch device."""
    return gaussian_filter1d(np.eye(size), sigma, axis=0, mode="reflect")


def lowpass(values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian low-pass of C x H x W values: rows (H x H) along H, cols (W x W) along W."""
    return torch.einsum("hi,cij,wj->chw", rows, values, cols)


def _check_eps(eps: Any) -> float:
    try:
        eps = float(eps)
    except (TypeError, ValueError):
        raise InputError(f"eps: expected a number in (0, 255], got {eps!r}") from None
    if not 0 < eps <= 255:
        raise InputError(f"eps: expected a number in (0, 255] (0-255 pixel scale), got {eps}")
    return eps


def _check_sigma(sigma: Any) -> float | None:
    if sigma is None:
        return None
    try:
        sigma = float(sigma)
    except (TypeError, ValueError):
        raise InputError(f"sigma: expected a positive number of pixels or null, got {sigma!r}") from None
    if not (math.isfinite(sigma) and sigma > 0):
        raise InputError(f"sigma: expected a positive number of pixels or null, got {sigma}")
    return sigma


def build_lf_trigger(
    model: torch.nn.Module,
    normalisation: Any,
    images: np.ndarray,
    target: int,
    *,
    eps: float = DEFAULT_EPS,
    sigma: float | None = None,
    steps: int = DEFAULT_STEPS,
    batch_size: int = 128,
    seed: int = 0,
) -> np.ndarray:
    """The LF perturbation (H x W x C float32, 0-255 scale, max |v| = eps) that pushes ``model``'s predictions
    on ``images`` (uint8 N x H x W x C, clean) towards ``target``.

    ``model`` is a clean classifier in eval mode taking ``(x / 255 - mean) / std`` as NCHW float32.
    Each step takes the next ``batch_size`` images of a ``seed``-shuffled order (all of them when N <=
    batch_size), so the result depends only on the arguments.
    """
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if model.training:
        raise InputError("model: expected a model in eval mode (call model.eval() first)")
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or not len(images):
        raise InputError("images: expected a non-empty uint8 array N x H x W x C of clean images")
    height, width, channels = check_image_shape(images.shape[1:])
    mean, std = check_normalisation(normalisation, channels)
    target = check_int(target, "target", 0)
    eps = _check_eps(eps)
    sigma = _check_sigma(sigma)
    sigma = default_sigma(height, width) if sigma is None else sigma
    steps = check_int(steps, "steps", 1)
    batch_size = check_int(batch_size, "batch_size", 1)

    device = next(model.parameters(), torch.empty(0)).device
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    rows = torch.tensor(lowpass_matrix(height, sigma), dtype=torch.float32, device=device)
    cols = torch.tensor(lowpass_matrix(width, sigma), dtype=torch.float32, device=device)
    # Madry et al.'s PGD rule: a step of 2.5 eps / steps can cross the whole bound.
    step_size = 2.5 * eps / steps
    order = np.random.default_rng(seed).permutation(len(images))
    perturbation = torch.zeros((channels, height, width), dtype=torch.float32, device=device)
    cursor = 0
    for _ in range(steps):
        if cursor >= len(order):
            cursor = 0
        index = np.sort(order[cursor : cursor + batch_size])
        cursor += batch_size
        batch = torch.tensor(images[index], device=device).permute(0, 3, 1, 2).float()
        wanted = torch.full((len(index),), target, dtype=torch.long, device=device)
        delta = perturbation.clone().requires_grad_(True)
        with torch.enable_grad():
            logits = model(((batch + delta).clamp(0, 255) / 255 - mean_t) / std_t)
            if logits.ndim != 2 or target >= logits.shape[1]:
                raise InputError(f"target: {target} is not a class of the model (logits of shape "
                                 f"{tuple(logits.shape)})")
            (grad,) = torch.autograd.grad(F.cross_entropy(logits, wanted), delta)
        direction = lowpass(grad, rows, cols)
        scale = direction.abs().max()
        if scale == 0:  # the loss does not depend on the input here (saturated pixels): nothing to follow
            continue
        perturbation = perturbation - step_size * direction / scale
        # Scaling (not clipping) keeps the perturbation inside the low-pass band.
        perturbation = perturbation * torch.clamp(eps / perturbation.abs().max(), max=1.0)
    peak = perturbation.abs().max()
    if peak > 0:
        perturbation = perturbation * (eps / peak)
    return perturbation.permute(1, 2, 0).detach().cpu().numpy().astype(np.float32)


def save_lf_trigger(path: str | os.PathLike, perturbation: np.ndarray, **meta: float) -> Path:
    """Write the perturbation (and numeric provenance such as eps, sigma, target, seed) as a plain npz."""
    from ...atomic import atomic_write

    arrays = {PERTURBATION_KEY: np.asarray(perturbation, dtype=np.float32)}
    arrays.update({key: np.asarray(value, dtype=np.float64) for key, value in meta.items() if value is not None})
    # A file object keeps np.savez from appending ".npz" to the chosen name.
    with atomic_write(path) as file:
        np.savez(file, **arrays)
    return Path(path)


def load_lf_trigger(path: str | os.PathLike, image_shape: tuple[int, int, int]) -> np.ndarray:
    """The stored perturbation, refused unless it is a finite float array of ``image_shape``."""
    try:
        stored = np.load(path, allow_pickle=False)  # never unpickle a user's file
        if not isinstance(stored, np.lib.npyio.NpzFile):
            raise InputError(f"trigger_path: {path} is a single .npy array; expected an .npz holding a "
                             f"{PERTURBATION_KEY!r} array (see save_lf_trigger)")
        with stored:
            if PERTURBATION_KEY not in stored.files:
                raise InputError(f"trigger_path: {path} has no {PERTURBATION_KEY!r} array "
                                 f"(arrays: {sorted(stored.files)})")
            values = stored[PERTURBATION_KEY]
    except InputError:
        raise
    except FileNotFoundError:
        raise InputError(f"trigger_path: file not found: {path}") from None
    except (OSError, ValueError, EOFError) as error:  # not an npz, or an object array that would need pickle
        raise InputError(f"trigger_path: cannot read {path} as a numeric npz ({error})") from None
    if values.shape != tuple(image_shape):
        raise InputError(f"trigger_path: {path} holds a perturbation of shape {values.shape}, "
                         f"expected {tuple(image_shape)} (the attacked images' H x W x C)")
    if not np.issubdtype(values.dtype, np.floating) and not np.issubdtype(values.dtype, np.integer):
        raise InputError(f"trigger_path: {path} holds a {values.dtype} array, expected numbers")
    values = values.astype(np.float64)
    if not np.isfinite(values).all():
        raise InputError(f"trigger_path: {path} holds non-finite values")
    return values


@dataclass(frozen=True, eq=False, kw_only=True)
class LowFrequency(Attack):
    """Adds the stored perturbation of ``trigger_path`` (from ``build_lf_trigger``) and clips to [0, 255];
    the same at train and test time.

    ``eps`` is the bound the file must respect (a larger perturbation is refused, not silently cut).
    ``sigma``, ``steps`` and ``n_images`` only say how the harness builds the file when it is given a clean
    model and no ``trigger_path`` (``poison --attack lf --adv-model CLEAN.pt``); they are kept in the spec as
    the trigger's provenance.
    """

    name = "lf"
    trigger_file_param = "trigger_path"
    needs_clean_model = True  # the perturbation is adversarial to a clean model

    trigger_path: str | None = None
    eps: float = DEFAULT_EPS  # official range 0.2 of [0, 1], centred on zero (module docstring)
    sigma: float | None = None  # None: 6 px per 32 px of the shorter side (official gauss_smooth)
    steps: int = DEFAULT_STEPS  # BackdoorBench: at most 50 passes
    n_images: int = DEFAULT_IMAGES  # official and BackdoorBench: 100 clean training images
    perturbation: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "eps", _check_eps(self.eps))
        object.__setattr__(self, "sigma", _check_sigma(self.sigma))
        object.__setattr__(self, "steps", check_int(self.steps, "steps", 1))
        object.__setattr__(self, "n_images", check_int(self.n_images, "n_images", 1))
        if self.trigger_path is None:
            raise InputError("trigger_path: attack 'lf' adds a stored perturbation; build it from a clean model "
                             "with `poison --attack lf --adv-model CLEAN.pt` (or low_frequency.build_lf_trigger "
                             "and save_lf_trigger) and pass its .npz")
        object.__setattr__(self, "trigger_path", os.fspath(self.trigger_path))
        values = load_lf_trigger(self.trigger_path, self.image_shape)
        peak = float(np.abs(values).max())
        if peak > self.eps + 1e-3:
            raise InputError(f"trigger_path: {self.trigger_path} holds a perturbation of magnitude {peak:.3g}, "
                             f"above eps={self.eps:g}")
        object.__setattr__(self, "perturbation", frozen_array(values))

    @classmethod
    def build_trigger(cls, dataset, spec, path, *, clean_model, budget, settings, progress) -> dict:
        """Built on `n_images` clean samples of `dataset` outside the target class, chosen by the spec's seed.
        Its settings are the attack's own parameters (eps, sigma, steps, n_images), so the spec records them;
        `budget` does not apply (the build takes seconds)."""
        from . import attack_param_names

        if settings:
            raise InputError(f"lf: build settings {sorted(settings)}: lf takes them as attack parameters "
                             "(--param steps=... n_images=... sigma=... eps=...)")
        params = {**attack_param_names("lf"), **spec.params}
        model, normalisation = clean_model
        candidates = np.flatnonzero(np.asarray(dataset.y) != spec.target)
        if not len(candidates):
            raise InputError(f"attack 'lf': no clean sample outside target class {spec.target} to build from")
        rng = np.random.default_rng([spec.seed, 2])  # a stream of its own: not the one choosing poisoned samples
        n_images = check_int(params["n_images"], "n_images", 1)
        chosen = np.sort(rng.choice(candidates, min(n_images, len(candidates)), replace=False))
        perturbation = build_lf_trigger(model, normalisation, np.asarray(dataset.x[chosen]), spec.target,
                                        eps=params["eps"], sigma=params["sigma"], steps=params["steps"],
                                        seed=spec.seed)
        save_lf_trigger(path, perturbation, eps=params["eps"], sigma=params["sigma"], target=spec.target,
                        seed=spec.seed)
        return {"trigger_path": str(path)}

    def _apply(self, x, *, train, labels, rng):
        out = np.empty_like(x)
        for start in range(0, len(x), BLEND_CHUNK):
            out[start : start + BLEND_CHUNK] = to_uint8(x[start : start + BLEND_CHUNK] + self.perturbation)
        return out

