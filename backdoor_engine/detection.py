"""The Detection contract: what every detector returns (per-sample flags, scores and clusters, plus the
method's diagnostics) and its metrics against ground truth. methods/ produce it, report/ and purify/ read it;
it sits beside them so that neither depends on the other."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import InputError


@dataclass
class Detection:
    """A detector's verdict on N samples (cleanlab-style tidy table + a summary).

    flags: bool N (True = poisoned); scores: float N, higher = more suspicious, or None;
    clusters: int N (-1 = noise), or None; embedding: N x 2 for plots, or None.
    """

    method: str
    flags: np.ndarray
    params: dict = field(default_factory=dict)
    scores: np.ndarray | None = None
    clusters: np.ndarray | None = None
    embedding: np.ndarray | None = None
    diagnostics: dict = field(default_factory=dict)

    def __post_init__(self):
        self.flags = np.asarray(self.flags, dtype=bool)
        n = len(self.flags)
        for name in ("scores", "clusters", "embedding"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise InputError(f"Detection.{name}: expected {n} rows, got {len(value)}")

    @property
    def n_flagged(self) -> int:
        return int(self.flags.sum())


def detection_metrics(flags: np.ndarray, poison: np.ndarray) -> dict:
    """TPR, FPR, precision and F1 of `flags` against ground truth `poison` (0/1)."""
    flags = np.asarray(flags, dtype=bool)
    truth = np.asarray(poison).astype(bool)
    if flags.shape != truth.shape:
        raise InputError(f"poison: expected {flags.shape[0]} ground-truth values, got {truth.shape[0]}")
    tp = int((flags & truth).sum())
    fp = int((flags & ~truth).sum())
    fn = int((~flags & truth).sum())
    tn = int((~flags & ~truth).sum())
    tpr = tp / (tp + fn) if tp + fn else 0.0
    fpr = fp / (fp + tn) if fp + tn else 0.0
    precision = tp / (tp + fp) if tp + fp else 0.0
    f1 = 2 * precision * tpr / (precision + tpr) if precision + tpr else 0.0
    return {"tpr": tpr, "fpr": fpr, "precision": precision, "f1": f1, "tp": tp, "fp": fp, "fn": fn, "tn": tn}
