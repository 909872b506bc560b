"""The Detection contract: what every detector returns (per-sample flags, scores and clusters, plus the
method's diagnostics) and its metrics against ground truth. methods/ produce it, report/ and purify/ read it;
it sits beside them so that neither depends on the other."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import InputError

# The three-way split some methods make (FCT's; SEED_NOTES 2.2 numbers them the same way) and repairs that
# use it (D-BR, D-ST) read: a detector without one has flagged = poisoned and the rest clean.
CLEAN, UNCERTAIN, POISONED = 0, 1, 2
SPLIT_NAMES = ("clean", "uncertain", "poisoned")


@dataclass
class Detection:
    """A detector's verdict on N samples (cleanlab-style tidy table + a summary).

    flags: bool N (True = poisoned); scores: float N, higher = more suspicious, or None;
    clusters: int N (-1 = noise), or None; embedding: N x 2 for plots, or None.
    split: int8 N of CLEAN / UNCERTAIN / POISONED, or None (a two-way verdict); flags must equal
    split == POISONED when both are given.
    columns: extra per-sample columns for samples.csv ({name: N values}), e.g. each method's flags in a consensus.
    """

    method: str
    flags: np.ndarray
    params: dict = field(default_factory=dict)
    scores: np.ndarray | None = None
    clusters: np.ndarray | None = None
    embedding: np.ndarray | None = None
    diagnostics: dict = field(default_factory=dict)
    split: np.ndarray | None = None
    columns: dict = field(default_factory=dict)

    def __post_init__(self):
        self.flags = np.asarray(self.flags, dtype=bool)
        n = len(self.flags)
        for name in ("scores", "clusters", "embedding", "split"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise InputError(f"Detection.{name}: expected {n} rows, got {len(value)}")
        for name, value in self.columns.items():
            if len(value) != n:
                raise InputError(f"Detection.columns[{name!r}]: expected {n} rows, got {len(value)}")
        if self.split is not None:
            self.split = np.asarray(self.split, dtype=np.int8)
            if not np.isin(self.split, (CLEAN, UNCERTAIN, POISONED)).all():
                raise InputError("Detection.split: values must be CLEAN (0), UNCERTAIN (1) or POISONED (2)")
            if not np.array_equal(self.flags, self.split == POISONED):
                raise InputError("Detection.split: flags must be exactly the samples split as POISONED")

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


def score_auroc(scores: np.ndarray, poison: np.ndarray) -> float | None:
    """Area under the ROC curve of "score above a threshold" as a poison detector, over every threshold
    (ties count half); None when the ground truth holds one class only."""
    scores = np.asarray(scores, dtype=np.float64)
    truth = np.asarray(poison).astype(bool)
    positives, negatives = int(truth.sum()), int((~truth).sum())
    if positives == 0 or negatives == 0:
        return None
    from scipy.stats import rankdata

    ranks = rankdata(scores)  # average ranks: the Mann-Whitney U statistic counts ties as half
    return float((ranks[truth].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def split_sizes(split: np.ndarray) -> dict[str, int]:
    """{"clean": n, "uncertain": n, "poisoned": n} of a three-way split."""
    return {name: int((split == code).sum()) for code, name in enumerate(SPLIT_NAMES)}


def split_metrics(split: np.ndarray, poison: np.ndarray) -> dict:
    """How pure each part of a three-way split is: sizes, the precision of the poisoned part (share of
    poison in it), the poison share of the clean part and how much of all poison each part holds."""
    truth = np.asarray(poison).astype(bool)
    total = max(int(truth.sum()), 1)
    out = {}
    for code, name in enumerate(SPLIT_NAMES):
        part = split == code
        size, poison_in = int(part.sum()), int((part & truth).sum())
        out[name] = {"n": size, "n_poison": poison_in, "poison_share": poison_in / size if size else 0.0,
                     "share_of_all_poison": poison_in / total}
    out["poisoned_precision"] = out["poisoned"]["poison_share"]
    out["clean_poison_share"] = out["clean"]["poison_share"]
    return out
