"""FLARE(P) (paper Eq. 9): drop the flagged samples and train a fresh model on the rest, standard recipe."""

from __future__ import annotations

import numpy as np

from ..data.dataset import Dataset
from ..errors import InputError
from ..models.train import TrainConfig, TrainResult, train_model


def kept_and_flagged(dataset: Dataset, flags: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the kept and of the flagged samples; `flags` must have one bool per sample."""
    flags = np.asarray(flags)
    if flags.shape != (len(dataset),) or flags.dtype != bool:
        raise InputError(f"flags: expected {len(dataset)} booleans (one per sample), got {flags.dtype} {flags.shape}")
    return np.flatnonzero(~flags), np.flatnonzero(flags)


def retrain_on_kept(dataset: Dataset, flags: np.ndarray, *, arch: str, config: TrainConfig) -> TrainResult:
    """A fresh `arch` trained on the unflagged samples (normalisation fitted on them too)."""
    kept, _ = kept_and_flagged(dataset, flags)
    if len(kept) < 2:
        raise InputError(f"only {len(kept)} sample(s) left after removing the {int(flags.sum())} flagged; nothing to train on")
    return train_model(dataset.x[kept], dataset.y[kept], arch=arch, num_classes=dataset.num_classes, config=config)
