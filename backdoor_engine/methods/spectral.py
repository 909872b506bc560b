"""Spectral Signatures (Tran, Li and Madry, NeurIPS 2018): per class (by the given label), centre the penultimate
features, take the top right singular vector v of the centred matrix, score every sample by its squared
projection ((x - mean) . v)^2, and remove the round(removal_factor x expected_rate x class size) highest scores
of every class (the paper's 1.5 epsilon n).

Stages, each a plain function composed by `SpectralSignatures`:
  top_direction      the top right singular vector of the centred class matrix and the two leading singular values
  outlier_scores     centred squared projection (paper) or |x . v| of the uncentred features (official code)
  removal_count      round half up of removal_factor x rate x n, at most n

What the reference code does (checked):
  Official code, MadryLab/backdoor_data_poisoning compute_corr.py: SVD of the *centred* representations of the
    target class only, but the scores are `np.linalg.norm(v[0:1] @ full_cov.T, axis=0)`, the absolute projection
    of the *uncentred* representations; removal `scores > np.percentile(scores, config.data.percentile)`.
  BackdoorBench defense/spectral.py: the same code (same uncentred |x . v|, same percentile rule), percentile 85
    in config/defense/spectral/*.yaml, i.e. the top 15% = 1.5 x 10% of each scanned class; its configs also set
    target_label 0, so by default it scans only the attack's target class (ground truth a defender lacks). We
    scan every class, as the paper does.
Centred, squared and absolute projections rank a class's samples identically; the uncentred projection can rank
them differently (it adds the class mean's component along v), hence the `score` choice.
Flags are exactly removal_count(...) per class, whether the class is poisoned or not: on a clean class that
many samples are false positives by construction. Ties at the threshold are broken by row order.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np

from ..detection import Detection
from ..errors import InputError
from ..params import param
from .base import Detector, ReportParts, ScanData, class_matrix, class_rows, detector_input, per_class_input

ASSUMED_RATE = 0.10  # BackdoorBench: percentile 85 = the top 15% removed = 1.5 x 10%
SCORES = ("centred", "uncentred")
FIGURE_TITLE = "Spectral Signatures: outlier scores per class, removal threshold dashed"
MAX_PANELS = 9


@dataclass(frozen=True)
class SpectralParams:
    expected_rate: float | None = param(None, "official code: unset = 0.10 assumed, BackdoorBench's "
                                        "config/defense/spectral percentile 85 (the top 15% = 1.5 x 10% removed "
                                        "per class); the flags depend on it: give your own estimate")
    removal_factor: float = param(1.5, "paper: remove the 1.5 epsilon n highest scores of each class")
    score: str = param("centred", "paper: squared projection of the centred representation on the top singular "
                       "vector; 'uncentred' = the official code and BackdoorBench, |x . v| of uncentred features",
                       choices=SCORES)

    def __post_init__(self):
        if self.expected_rate is not None:
            if isinstance(self.expected_rate, bool) or not isinstance(self.expected_rate, (int, float)):
                raise InputError(f"expected_rate must be a number in (0, 1) or null, got {self.expected_rate!r}")
            if not 0 < self.expected_rate < 1:
                raise InputError(f"expected_rate must be in (0, 1), got {self.expected_rate}")
            object.__setattr__(self, "expected_rate", float(self.expected_rate))
        if not self.removal_factor > 0:
            raise InputError(f"removal_factor must be > 0, got {self.removal_factor}")

    @property
    def rate(self) -> float:
        """The poison rate used: the user's, else ASSUMED_RATE."""
        return ASSUMED_RATE if self.expected_rate is None else self.expected_rate


@dataclass
class ClassSpectrum:
    """One class's fit: its rows, scores, removal count and threshold, the leading singular values."""

    label: int
    rows: np.ndarray
    scores: np.ndarray | None = None
    n_removed: int = 0
    threshold: float | None = None
    singular_values: tuple | None = None
    skipped: str | None = None


def top_direction(X: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """(class mean, top right singular vector of X - mean, its two leading singular values). Through the D x D
    Gram matrix when there are more rows than columns (cheap at any class size), else a thin SVD."""
    mean = X.mean(axis=0)
    centred = X - mean
    if len(X) > X.shape[1]:
        eigenvalues, vectors = np.linalg.eigh(centred.T @ centred)
        values = np.sqrt(np.clip(eigenvalues[::-1], 0, None))
        v = vectors[:, -1]
    else:
        _, values, vt = np.linalg.svd(centred, full_matrices=False)
        v = vt[0]
    second = float(values[1]) if len(values) > 1 else 0.0
    return mean, v, (float(values[0]), second)


def outlier_scores(X: np.ndarray, mean: np.ndarray, v: np.ndarray, kind: str) -> np.ndarray:
    """centred: ((x - mean) . v)^2 (the paper); uncentred: |x . v| (official code, BackdoorBench)."""
    if kind == "centred":
        return ((X - mean) @ v) ** 2
    return np.abs(X @ v)


def removal_count(n: int, rate: float, factor: float) -> int:
    """factor x rate x n rounded half up, at most n."""
    return min(n, int(math.floor(factor * rate * n + 0.5)))


class SpectralSignatures(Detector):
    """Spectral Signatures, the registered `spectral` detector (cuML/sklearn style).

        detection = SpectralSignatures(expected_rate=0.05).fit(penultimate, y)
        spectral.classes_ ({label: ClassSpectrum}), spectral.flags_, spectral.scores_
    """

    name = "spectral"
    summary = ("Spectral Signatures: per class, the top 1.5 x expected_rate of samples by squared projection on "
               "the top singular vector of the centred penultimate features (Tran et al. 2018)")
    params_class = SpectralParams
    needs = frozenset({"penultimate"})
    seed_param = None  # deterministic: nothing is drawn at random

    def fit(self, features, y) -> Detection:
        """features: N x D penultimate features (float, in memory or memory-mapped); y: N labels (ints)."""
        p = self.params
        n, y = per_class_input(features, y)
        began = time.perf_counter()
        flags, scores = np.zeros(n, bool), np.zeros(n, np.float64)
        self.classes_, per_class = {}, {}
        for label, rows in class_rows(y).items():
            result = ClassSpectrum(label, rows)
            self.classes_[label] = result
            X = class_matrix(features, rows, label)
            if len(rows) < 2:
                result.skipped = "a single sample: no direction to project on"
            else:
                mean, v, result.singular_values = top_direction(X)
                if not result.singular_values[0] > 1e-12 * max(1.0, float(np.abs(X).max())):
                    result.skipped = "every sample has the same features (no variance)"
            if result.skipped is not None:
                per_class[str(label)] = {"n": len(rows), "skipped": result.skipped}
                continue
            result.scores = outlier_scores(X, mean, v, p.score)
            result.n_removed = removal_count(len(rows), p.rate, p.removal_factor)
            top = np.argsort(-result.scores, kind="stable")[: result.n_removed]
            flags[rows[top]] = True
            scores[rows] = result.scores
            result.threshold = float(result.scores[top[-1]]) if result.n_removed else None
            s1, s2 = result.singular_values
            per_class[str(label)] = {
                "n": len(rows), "n_flagged": result.n_removed, "threshold": result.threshold,
                "singular_values": [s1, s2], "top_gap": s1 / s2 if s2 > 0 else None}
        self.flags_, self.scores_ = flags, scores
        skipped = [label for label, c in self.classes_.items() if c.skipped]
        assumed = p.expected_rate is None
        rate_text = (f"no expected_rate given: {p.rate:.0%} assumed (BackdoorBench's default, percentile 85)"
                     if assumed else f"expected_rate {p.rate:g}")
        explanation = (f"Spectral Signatures removed the top {p.removal_factor:g} x {p.rate:.2%} = "
                       f"{p.removal_factor * p.rate:.2%} of every class ({rate_text}): {int(flags.sum())} of {n} "
                       "samples. That many are flagged in every class, poisoned or not, so the flags depend on the "
                       "rate")
        if skipped:
            explanation += f"; {len(skipped)} class(es) skipped (one sample or no variance)"
        diagnostics = {"explanation": explanation, "expected_rate": p.rate, "rate_assumed": assumed,
                       "rate_source": "assumed: BackdoorBench default percentile 85 = 1.5 x 10%" if assumed
                       else "given by the user",
                       "removal_share": p.removal_factor * p.rate, "classes": per_class, "skipped_classes": skipped,
                       "score": ("((x - class mean) . v)^2" if p.score == "centred" else "|x . v|")
                       + ", v = top right singular vector of the centred class features; 0 for skipped classes",
                       "timings_s": {"spectral": time.perf_counter() - began}}
        return Detection(self.name, flags, params=asdict(p), scores=scores, diagnostics=diagnostics)

    def fit_scan(self, data: ScanData) -> Detection:
        return self.fit(detector_input(data, "penultimate"), data.y)

    def report(self, detection: Detection, rows, out_dir) -> ReportParts:
        d = detection.diagnostics
        notes = [d["explanation"]]
        if d["rate_assumed"]:
            notes.append(f"Assumed poison rate: {d['expected_rate']:.0%} (BackdoorBench's default, percentile 85), "
                         "because no expected_rate was given. Spectral Signatures flags a fixed share of every "
                         "class, so a different rate flags a different number of samples: pass "
                         "--param expected_rate=R (API: expected_rate=R) with your own estimate.")
        parts = ReportParts(notes=notes)
        if out_dir is None or not hasattr(self, "classes_"):
            return parts
        scanned = [c for c in self.classes_.values() if c.skipped is None]
        # The classes whose top direction stands out most (s1 / s2) first: where a poisoned sub-population shows.
        scanned.sort(key=lambda c: -(c.singular_values[0] / max(c.singular_values[1], 1e-300)))
        if scanned:
            truth = None if rows.poison is None else np.asarray(rows.poison).astype(bool)
            parts.figures.append((FIGURE_TITLE, histograms_png(scanned[:MAX_PANELS], truth)))
        return parts


def histograms_png(classes: list[ClassSpectrum], truth: np.ndarray | None) -> bytes:
    """Per-class score histograms with the removal threshold dashed."""
    from ..report.figures import class_histograms_png

    panels = []
    for result in classes:
        s1, s2 = result.singular_values
        panels.append({"title": f"class {result.label}: n={len(result.rows)}"
                                + (f", s1/s2 {s1 / s2:.2f}" if s2 > 0 else ""),
                       "scores": result.scores, "rows": result.rows, "threshold": result.threshold,
                       "threshold_label": f"removal: top {result.n_removed}"})
    return class_histograms_png(panels, truth, xlabel="outlier score")
