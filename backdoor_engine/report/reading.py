"""Reading a scan's report back: which samples of a dataset it flagged (what `purify` acts on)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..errors import InputError


def flags_from_report(dataset, report_path: str | os.PathLike) -> np.ndarray:
    """One bool per sample of `dataset`: True where the scan report (report.json) flagged its id."""
    report, path = _read_report(dataset, report_path)
    return _mark(_positions(dataset), len(dataset), report["flagged"], path)


def split_from_report(dataset, report_path: str | os.PathLike, *, clean_fraction: float | None = None) -> np.ndarray:
    """The report's three-way split of `dataset` (detection.CLEAN / UNCERTAIN / POISONED, int8 per sample).

    A method that splits three ways (FCT) lists its uncertain ids; any other detector's report reads as
    flagged = poisoned, the rest clean. clean_fraction: keep as clean only this fraction of all samples, the
    lowest-scoring unflagged ones (samples.csv's scores; the rest of the unflagged become uncertain), for
    repairs that should learn from the samples a detector is surest of (D-BR's clean part is 20%)."""
    from ..detection import CLEAN, POISONED, UNCERTAIN

    report, path = _read_report(dataset, report_path)
    split = np.full(len(dataset), CLEAN, np.int8)
    uncertain = report.get("uncertain", [])
    if not isinstance(uncertain, list):
        raise InputError(f"{path}: 'uncertain' must be a list of ids")
    position = _positions(dataset)
    split[_mark(position, len(dataset), uncertain, path)] = UNCERTAIN
    split[_mark(position, len(dataset), report["flagged"], path)] = POISONED
    if clean_fraction is None:
        return split
    if not 0 < clean_fraction <= 1:
        raise InputError(f"clean_fraction must be in (0, 1], got {clean_fraction!r}")
    scores = _scores_from_csv(position, len(dataset), path.parent / "samples.csv")
    clean = np.flatnonzero(split == CLEAN)
    keep = min(len(clean), int(round(clean_fraction * len(dataset))))
    surest = clean[np.argsort(scores[clean], kind="stable")[:keep]]
    split[clean] = UNCERTAIN
    split[surest] = CLEAN
    return split


def _read_report(dataset, report_path) -> tuple[dict, Path]:
    path = Path(report_path)
    if path.is_dir():
        path = path / "report.json"
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise InputError(f"cannot read the scan report {path}: {error}") from None
    if not isinstance(report, dict) or not isinstance(report.get("flagged"), list):
        raise InputError(f"{path} is not a scan report (no 'flagged' list)")
    if report.get("n_samples") != len(dataset):
        raise InputError(f"{path} covers {report.get('n_samples')} samples but the dataset has {len(dataset)}: "
                         "it is the report of another dataset")
    _check_same_data(dataset, report.get("data"), path)
    return report, path


def _positions(dataset) -> dict[str, int]:
    """{id as text: row}: built once per report read, for every id list and the csv."""
    return {str(i): k for k, i in enumerate(dataset.ids.tolist())}


def _mark(position: dict[str, int], n: int, ids: list, path: Path) -> np.ndarray:
    unknown = [i for i in ids if str(i) not in position]
    if unknown:
        raise InputError(f"{path} lists {len(unknown)} id(s) the dataset does not have, e.g. {unknown[:3]}")
    marked = np.zeros(n, bool)
    marked[[position[str(i)] for i in ids]] = True
    return marked


def _scores_from_csv(position: dict[str, int], n: int, csv_path: Path) -> np.ndarray:
    """samples.csv's score column, in the dataset's order."""
    import csv

    from .writers import unescape_id

    scores = np.full(n, np.nan)
    try:
        with open(csv_path, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                k = position.get(unescape_id(row.get("id", "")))
                if k is not None and row.get("score"):
                    scores[k] = float(row["score"])
    except (OSError, ValueError) as error:
        raise InputError(f"cannot read the scores in {csv_path}: {error}") from None
    if np.isnan(scores).any():
        raise InputError(f"{csv_path} has no score for {int(np.isnan(scores).sum())} sample(s); clean_fraction "
                         "needs a detector that scores every sample")
    return scores


def _check_same_data(dataset, scanned, path: Path) -> None:
    """Refuse a report whose recorded fingerprint is not `dataset`'s: default ids 0..N-1 match any dataset of
    the same size, so the ids alone cannot tell. Only in-memory sets (npz, bundled, CIFAR) are compared: a
    streamed source's fingerprint hashes its file listing at the model's input shape, which an eagerly read
    copy does not reproduce (its ids, file paths, are checked instead). Reports written before the field
    existed have no `data` and are taken on their ids."""
    if not isinstance(scanned, dict) or scanned.get("fingerprint_of") != "ArraySource":
        return
    from ..data.dataset import as_source

    if as_source(dataset).fingerprint() != scanned.get("fingerprint"):
        raise InputError(f"{path} is the report of another dataset ({scanned.get('source')}): its recorded "
                         "fingerprint differs from this dataset's (same size, different pixels, labels or ids)")
