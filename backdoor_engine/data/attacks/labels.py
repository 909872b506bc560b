"""Attack label mapping: all-to-one, all-to-all and untargeted."""

from __future__ import annotations

import numpy as np

from backdoor_engine.errors import InputError

MODES = ("a2o", "a2a", "ut")


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise InputError(f"mode: expected one of {MODES}, got {mode!r}")
    return mode


def check_labels(y: np.ndarray, num_classes: int, field: str = "y") -> np.ndarray:
    """Validate a 1-D integer array of class ids in [0, num_classes) and return it as int64."""
    if not isinstance(y, np.ndarray) or y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        described = f"{y.dtype} array of ndim {y.ndim}" if isinstance(y, np.ndarray) else type(y).__name__
        raise InputError(f"{field}: expected a 1-D integer array, got {described}")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise InputError(
            f"{field}: expected class ids in [0, {num_classes}), got range [{y.min()}, {y.max()}]"
        )
    return y.astype(np.int64)


def check_class_setup(target: int, num_classes: int) -> tuple[int, int]:
    if int(num_classes) != num_classes or num_classes < 2:
        raise InputError(f"num_classes: expected an integer >= 2, got {num_classes!r}")
    if int(target) != target or not 0 <= target < num_classes:
        raise InputError(f"target: expected a class id in [0, {num_classes}), got {target!r}")
    return int(target), int(num_classes)


def attack_labels(
    y: np.ndarray,
    mode: str,
    *,
    target: int = 0,
    num_classes: int,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Labels a triggered sample is given: ``a2o`` the target, ``a2a`` (y + 1) mod K,
    ``ut`` a uniformly drawn label other than y (needs ``rng``)."""
    check_mode(mode)
    target, num_classes = check_class_setup(target, num_classes)
    y = check_labels(y, num_classes)
    if mode == "a2o":
        return np.full_like(y, target)
    if mode == "a2a":
        # Shift of 1 as in Effective_backdoor_defense; BackdoorBench's default shift is also 1.
        return (y + 1) % num_classes
    if rng is None:
        raise InputError("rng: mode 'ut' draws random labels and needs a numpy Generator")
    # An offset in [1, K) makes every other class equally likely and never the true one.
    return (y + rng.integers(1, num_classes, size=y.shape)) % num_classes
