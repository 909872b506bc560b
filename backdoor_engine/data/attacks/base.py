"""Common shape of every attack: an immutable, seeded object holding its stored trigger."""

from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from backdoor_engine.errors import InputError

MIN_SIDE = 8
CHANNELS = (1, 3)
BLEND_CHUNK = 1024


def check_image_shape(image_shape: Any) -> tuple[int, int, int]:
    """Validate ``(H, W, C)`` and return it as a tuple of ints."""
    try:
        height, width, channels = (int(side) for side in image_shape)
    except (TypeError, ValueError):
        raise InputError(f"image_shape: expected (H, W, C), got {image_shape!r}") from None
    if height < MIN_SIDE or width < MIN_SIDE or channels not in CHANNELS:
        raise InputError(
            f"image_shape: expected H, W >= {MIN_SIDE} and C in {CHANNELS}, got {image_shape!r}"
        )
    return height, width, channels


def check_images(x: Any, image_shape: tuple[int, int, int], field: str = "x") -> np.ndarray:
    """Validate a uint8 N x H x W x C batch matching the attack's image shape."""
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 4:
        described = f"{x.dtype} array of ndim {x.ndim}" if isinstance(x, np.ndarray) else type(x).__name__
        raise InputError(f"{field}: expected a uint8 array N x H x W x C, got {described}")
    if x.shape[1:] != image_shape:
        raise InputError(f"{field}: expected images of shape {image_shape}, got {x.shape[1:]}")
    return x


def to_uint8(values: np.ndarray) -> np.ndarray:
    """Round to the nearest integer and clip to [0, 255]."""
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def blend(x: np.ndarray, pattern: np.ndarray, weight: np.ndarray | float) -> np.ndarray:
    """``(1 - w) x + w p`` rounded to uint8, in chunks so a large batch needs little extra memory."""
    out = np.empty_like(x)
    for start in range(0, len(x), BLEND_CHUNK):
        chunk = x[start : start + BLEND_CHUNK].astype(np.float64)
        out[start : start + BLEND_CHUNK] = to_uint8((1.0 - weight) * chunk + weight * pattern)
    return out


def frozen_array(values: np.ndarray) -> np.ndarray:
    """A read-only copy, so a stored trigger cannot be changed after construction."""
    stored = np.array(values, copy=True)
    stored.flags.writeable = False
    return stored


def check_int(value: Any, field: str, low: int, high: int | None = None) -> int:
    """An integer in [low, high] (no upper bound when high is None)."""
    bound = f"[{low}, {high}]" if high is not None else f">= {low}"
    try:
        as_int = int(value)
        valid = as_int == value and as_int >= low and (high is None or as_int <= high)
    except (TypeError, ValueError):
        valid = False
    if not valid or isinstance(value, bool):
        raise InputError(f"{field}: expected an integer {bound}, got {value!r}")
    return as_int


def check_fraction(value: Any, field: str, *, allow_zero: bool = True) -> float:
    value = float(value)
    low_ok = value >= 0 if allow_zero else value > 0
    if not (low_ok and value <= 1):
        bound = "[0, 1]" if allow_zero else "(0, 1]"
        raise InputError(f"{field}: expected a number in {bound}, got {value}")
    return value


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return type(value).__name__


@dataclass(frozen=True, eq=False)
class Attack(abc.ABC):
    """Base of all attacks. Subclasses add keyword-only parameters and build their trigger once.

    ``apply(x, train=True)`` is pure: a new uint8 array, the input untouched. ``labels`` is used
    only by attacks that need the true class (label-consistent PGD); ``rng`` only by attacks with
    per-sample random choices (Adaptive-Blend pieces, WaNet noise). Without ``rng`` those choices
    come from a stream derived from ``seed``, so repeated calls give the same output.
    """

    name: ClassVar[str]
    clean_label: ClassVar[bool] = False
    # An attack whose trigger is built once (a perturbation, generator networks) and stored in a file names the
    # parameter holding that file's path; harness.prepare_spec builds it through `build_trigger` when a spec names
    # none. needs_clean_model: building (or, for label_consistent, poisoning) needs a clean model of the data.
    trigger_file_param: ClassVar[str | None] = None
    needs_clean_model: ClassVar[bool] = False

    image_shape: tuple[int, int, int]
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_shape", check_image_shape(self.image_shape))
        object.__setattr__(self, "seed", int(self.seed))

    def apply(
        self,
        x: np.ndarray,
        *,
        train: bool = True,
        labels: np.ndarray | None = None,
        rng: np.random.Generator | None = None,
    ) -> np.ndarray:
        """Triggered copy of ``x``; ``train=False`` gives the test-time trigger."""
        check_images(x, self.image_shape)
        return self._apply(x, train=train, labels=labels, rng=rng or self._default_rng())

    def cover_count(self, n_samples: int, rate: float) -> int:
        """How many cover samples (trigger kept with the true label) a poisoned set of this size gets."""
        return 0

    def apply_cover(self, x: np.ndarray, *, rng: np.random.Generator | None = None) -> np.ndarray:
        """Cover version of ``x``: only attacks whose ``cover_count`` can be non-zero have one."""
        raise InputError(f"attack {self.name!r} has no cover samples")

    @classmethod
    def build_trigger(cls, dataset, spec, path, *, clean_model, budget: str, settings: dict, progress) -> dict:
        """Build this attack's stored trigger for `spec` on `dataset`, write it to `path` and return the
        parameters that name it (added to the spec). Only attacks with a `trigger_file_param` have one."""
        raise InputError(f"attack {cls.name!r} has no stored trigger to build")

    def describe(self) -> dict:
        """JSON-serialisable description: name, seed, image shape and every parameter."""
        described = {"name": self.name}
        for field in dataclasses.fields(self):
            if field.init:
                described[field.name] = _jsonable(getattr(self, field.name))
        return described

    def _default_rng(self) -> np.random.Generator:
        # Separate stream from the one that built the trigger, so they are not correlated.
        return np.random.default_rng([self.seed, 1])

    @abc.abstractmethod
    def _apply(
        self, x: np.ndarray, *, train: bool, labels: np.ndarray | None, rng: np.random.Generator
    ) -> np.ndarray:
        """The attack itself, on an already validated batch."""


def attack_fields(attack_class: type[Attack]) -> dict[str, Any]:
    """Parameter names of an attack class (besides image_shape and seed) with their defaults."""
    return {
        field.name: field.default
        for field in dataclasses.fields(attack_class)
        if field.init and field.name not in ("image_shape", "seed")
    }
