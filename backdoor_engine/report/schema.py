"""report.json, the stable schema (docs/architecture.md, Report): field names are fixed once released; add, don't rename."""

from __future__ import annotations

import importlib.metadata
import platform

import numpy as np

from ..data.dataset import Dataset
from ..detection import UNCERTAIN, Detection, detection_metrics, score_auroc, split_metrics

_VERSIONED_PACKAGES = ("backdoor-engine", "torch", "numpy", "umap-learn", "hdbscan", "faiss-cpu", "scikit-learn")


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in _VERSIONED_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    from .._ext import load_extension

    out["compiled_extension"] = load_extension() is not None
    return out


def _plain(value):
    """JSON-safe copy: numpy scalars and arrays become Python numbers and lists."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    return value


def build_report(detection: Detection, dataset: Dataset, *, timings_s: dict, include_scores: bool = False) -> dict:
    if len(detection.flags) != len(dataset):
        raise ValueError(f"detection has {len(detection.flags)} samples, dataset {len(dataset)}")
    report = {
        "method": detection.method,
        "params": _plain(detection.params),
        "n_samples": len(dataset),
        "n_flagged": detection.n_flagged,
        "flagged": _plain(dataset.ids[detection.flags]),
        "diagnostics": _plain(detection.diagnostics),
        "timings_s": {k: round(float(v), 3) for k, v in timings_s.items()},
        "versions": versions(),
    }
    if detection.split is not None:  # a three-way verdict: the clean part is what is neither listed
        report["uncertain"] = _plain(dataset.ids[detection.split == UNCERTAIN])
    if include_scores and detection.scores is not None:
        report["scores"] = _plain(detection.scores)
    if dataset.poison is not None:
        report["metrics"] = detection_metrics(detection.flags, dataset.poison)
        if detection.scores is not None:
            report["metrics"]["auroc"] = score_auroc(detection.scores, dataset.poison)
        if detection.split is not None:
            report["metrics"]["split"] = split_metrics(detection.split, dataset.poison)
    return report
