"""Reading a scan's report back: which samples of a dataset it flagged (what `purify` acts on)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..errors import InputError


def flags_from_report(dataset, report_path: str | os.PathLike) -> np.ndarray:
    """One bool per sample of `dataset`: True where the scan report (report.json) flagged its id."""
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
    position = {str(i): k for k, i in enumerate(dataset.ids.tolist())}
    unknown = [i for i in report["flagged"] if str(i) not in position]
    if unknown:
        raise InputError(f"{path} flags {len(unknown)} id(s) the dataset does not have, e.g. {unknown[:3]}")
    flags = np.zeros(len(dataset), bool)
    flags[[position[str(i)] for i in report["flagged"]]] = True
    return flags


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
