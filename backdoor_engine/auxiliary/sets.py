"""Auxiliary sets as the GIC paper builds them (seeds/gic.txt section 4.2; BackdoorBenchER's
`get_reserved_data`, SEED_NOTES section 5): a small labelled clean set, stratified by class, of a size
relative to the victim's training set (default 5%, `ratio 0.05` there).

    seen      the clean part of the (poisoned) training set itself; reads the ground-truth `poison` column,
              so it is an oracle: no defender knows which training samples are clean
    reserved  images of the training distribution the victim never saw (e.g. Fashion-MNIST training images
              outside a subset it was trained on, or a split held out before poisoning)
    bright    reserved images made brighter: x + 0.3 (on [0, 1] pixels), clipped
    dark      reserved images made darker: 0.5 x
    inverted  reserved images with inverted intensities, 1 - x: the strongest shift this machine's data allows.
              No external same-class set exists for Fashion-MNIST here (the paper's "external" kind draws
              other images of the same classes); this is a synthetic stand-in, and named as such
Reserved and shifted kinds draw from a `pool` of clean images minus every id of the training set.

`backdoor-engine aux` writes AUX.npz and, beside it, AUX.aux.json (its kind, size and sources); `calibrate`
carries the kind into AUX_CAL.gic.json, and `purify` reads either so that a repair's record names the set's kind.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..data.dataset import Dataset
from ..errors import InputError

KINDS = ("seen", "reserved", "bright", "dark", "inverted")
DEFAULT_RATIO = 0.05  # BackdoorBenchER: ratio 0.05 of the training set size
BRIGHTNESS = 0.3
DARKNESS = 0.5


def describe_kinds() -> str:
    """The kinds, as this module's docstring lists them (for --help)."""
    return __doc__.split("\n\n")[1]


def stratified(y: np.ndarray, size: int, num_classes: int, seed: int) -> np.ndarray:
    """Sorted positions of `size` samples with every class as close to size / num_classes as it can hold
    (classes short of samples give all they have, the rest is spread over the others)."""
    rng = np.random.default_rng(seed)
    by_class = [rng.permutation(np.flatnonzero(y == c)) for c in range(num_classes)]
    available = np.array([len(rows) for rows in by_class])
    if size > available.sum():
        raise InputError(f"aux: asked for {size} samples, the pool holds {int(available.sum())}")
    take = np.zeros(num_classes, np.int64)
    left = size
    while left > 0:
        open_classes = np.flatnonzero(take < available)
        share = max(left // len(open_classes), 1)
        for c in open_classes:
            step = min(share, available[c] - take[c], left)
            take[c] += step
            left -= step
            if left == 0:
                break
    return np.sort(np.concatenate([rows[:k] for rows, k in zip(by_class, take)]))


def shift(x: np.ndarray, kind: str) -> np.ndarray:
    """The kind's intensity shift of uint8 images (reserved and seen: unchanged)."""
    pixels = x.astype(np.float32) / 255.0
    if kind == "bright":
        pixels = pixels + BRIGHTNESS
    elif kind == "dark":
        pixels = pixels * DARKNESS
    elif kind == "inverted":
        pixels = 1.0 - pixels
    return np.clip(np.round(pixels * 255.0), 0, 255).astype(np.uint8)


def make_aux(kind: str, train: Dataset, pool: Dataset | None = None, *, size: int | None = None,
             ratio: float = DEFAULT_RATIO, seed: int = 0) -> Dataset:
    """The `kind` auxiliary set for a victim trained on `train`; `pool` (clean images, ids comparable to
    train's) for every kind but seen. Default size: `ratio` x len(train)."""
    if kind not in KINDS:
        raise InputError(f"aux: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    size = int(round(ratio * len(train))) if size is None else int(size)
    if size < 1:
        raise InputError(f"aux: the size must be >= 1, got {size}")
    num_classes = train.num_classes
    if kind == "seen":
        if train.poison is None:
            raise InputError("aux --kind seen takes the clean part of the training set, which needs its ground-truth "
                             "`poison` column (a set written by `poison`); without it, use reserved")
        clean = np.flatnonzero(train.poison == 0)
        chosen = clean[stratified(train.y[clean], size, num_classes, seed)]
        return train.subset(chosen)
    if pool is None:
        raise InputError(f"aux --kind {kind} draws from a pool of clean images the victim never saw: give --pool")
    if pool.image_shape != train.image_shape:
        raise InputError(f"aux: the pool's images are {pool.image_shape}, the training set's {train.image_shape}")
    unseen = np.flatnonzero(~np.isin(pool.ids, train.ids))
    if len(unseen) == 0:
        raise InputError("aux: every pool image is in the training set (same ids): nothing reserved to draw from")
    chosen = unseen[stratified(pool.y[unseen], size, num_classes, seed)]
    reserved = pool.subset(chosen)
    return Dataset(shift(reserved.x, kind), reserved.y, reserved.ids)


SIDECAR_MAX_BYTES = 1 << 20  # a description of a set is a few hundred bytes; the file beside it is untrusted


def sidecar_path(npz: str | os.PathLike, suffix: str) -> str | None:
    """AUX.<suffix> beside AUX.npz, spelt as the set's path was (None for a source that is not an .npz file)."""
    name = os.fspath(npz)
    return name[: -len(".npz")] + suffix if name.endswith(".npz") else None


def _read_sidecar(source: str | os.PathLike, suffix: str) -> dict | None:
    """The JSON object in AUX.<suffix> beside `source`; None when it is missing, oversized or not a JSON object."""
    name = sidecar_path(source, suffix)
    if name is None:
        return None
    path = Path(name)
    if not path.is_file() or path.stat().st_size > SIDECAR_MAX_BYTES:
        return None
    try:
        info = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        return None
    return info if isinstance(info, dict) else None


def aux_description(source: str | os.PathLike) -> dict:
    """What the files beside an auxiliary set say about it: {"kind", "calibrated"}; kind None when nothing does
    (a set not written by `aux`, or one whose description is missing, oversized or not JSON)."""
    described = _read_sidecar(source, ".aux.json") or {}
    calibration = _read_sidecar(source, ".gic.json")
    kind = described.get("kind") or (calibration or {}).get("aux_kind")
    return {"kind": kind if kind in KINDS else None, "calibrated": calibration is not None}
