"""The Detector interface: what a method declares so that `api.scan` can run it without knowing it.

A detector is a class with
  name          the registry key (`scan --method NAME`)
  summary       one line for `--help` and the README
  params_class  a dataclass made with `params.param`: every default carries its provenance ("paper",
                "official code", "ours: why"); `Detector(**params)` checks names and choices (params.build_params)
  needs         what it reads per sample. Captures of the engine's single pass over the suspect model
                ("bn_minima", "penultimate", "logits"), and/or "pixels": the decoded images with random
                access, for a method that trains its own models (VBD) and so needs no suspect model;
                "model": the suspect model itself, for a method whose definition needs extra passes of its
                own (STRIP's superimpositions, SCALE-UP's amplified pixels); "reference": a small clean set
                the user vouches for (`scan --clean`), read the same way as the suspect set
  seed_param    the params field that `scan --seed` sets (None: the method draws nothing at random)
  in_all        whether `scan --method all` includes it (default True; False for a variant of another method)
  presence_test whether its rule can conclude "no backdoor here" with a false-alarm control built in (a
                statistical threshold, a stability requirement), so that on a clean set it flags nothing by
                design: FLARE, SCAn, VBD. False for a method flagging a share fixed by a budget or a rejection
                rate (Spectral, SPECTRE's one class, STRIP), a per-sample cut clean samples also pass (SCALE-UP,
                IBD-PSC), or a split with no such control (AC's k-means relative size). The consensus'
                `rule=presence` flags what these flag.
  reads_if_extracted   captures it uses when a scan extracts them anyway (no extra pass), e.g. SCALE-UP's plain
                prediction from the logits of a consensus that reads the head for penultimate features
  fit_scan(data: ScanData) -> Detection      the scan's entry point
  report(detection, rows, out_dir) -> ReportParts   its own figures, notes and files (optional)

Each detector keeps its natural estimator call too (`Flare(...).fit(features, layout, y)`,
`Vbd(...).fit(x, y, num_classes=K)`, cuML/sklearn style); `fit_scan` only unpacks ScanData for it.
Ground truth never reaches a detector: ScanData has no `poison` field.
A new detector is one file (a subclass) plus one line in `methods/__init__.py`'s registry, or, from
another package, an entry point in the group `backdoor_engine.detectors`.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import ClassVar

import numpy as np

from ..detection import Detection
from ..engine.feature_set import CAPTURES, FeatureSet
from ..errors import InputError
from ..params import build_params, choices_of, provenance_of

PIXELS = "pixels"
MODEL = "model"
REFERENCE = "reference"
NEEDS = (*CAPTURES, PIXELS, MODEL, REFERENCE)
# api.scan's own keyword arguments: a detector parameter of the same name could never be set through scan.
SCAN_KEYWORDS = frozenset({"method", "out_dir", "batch_size", "store", "kernel_backend", "workers", "dtype",
                           "executor", "checkpoint", "actors", "head", "pixel_cache", "progress", "data_name",
                           "model_info", "clean"})


@dataclass
class ScanData:
    """What `fit_scan` receives: one row per readable sample, in the source's order.

    features: the single pass's captures (those the detector needs), or None when it needs none.
    pixels: a Dataset (uint8 N x H x W x C, memory-mapped for streamed sources), or None unless needed.
    progress: whether the detector may print progress (a CLI scan without --json).
    model, normalisation: the suspect model (eval mode) and its normalisation, for a detector that needs "model".
    reference: the clean reference set as a ScanData of its own (its ids, y, the same captures, pixels), for a
      detector that needs "reference"; None otherwise.
    """

    ids: np.ndarray
    y: np.ndarray
    num_classes: int
    features: FeatureSet | None = None
    pixels: object = None
    progress: bool = False
    model: object = None
    normalisation: object = None
    reference: ScanData | None = None


@dataclass
class ReportParts:
    """A detector's own part of the report: figures (title, PNG bytes) and notes for the HTML, and extra
    top-level report.json fields (added, never renaming the common schema's)."""

    figures: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)


class Detector:
    name: ClassVar[str]
    summary: ClassVar[str]
    params_class: ClassVar[type]
    needs: ClassVar[frozenset[str]]
    seed_param: ClassVar[str | None] = None
    # Whether `scan --method all` runs it (when it reads the suspect model); False for a variant of another
    # registered method, which would otherwise vote twice.
    in_all: ClassVar[bool] = True
    presence_test: ClassVar[bool] = False
    # Captures it uses when the scan extracts them anyway, at no extra pass (e.g. logits beside penultimate features
    # in a consensus); fit_scan must work without them.
    reads_if_extracted: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, **params):
        self.params = build_params(self.params_class, params, self.name)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for attribute in ("name", "summary", "params_class", "needs"):
            if attribute not in vars(cls) and not any(attribute in vars(base) for base in cls.__mro__[1:-1]):
                raise TypeError(f"detector {cls.__name__} must declare {attribute!r}")
        unknown = set(cls.needs) - set(NEEDS)
        if unknown or not set(cls.needs) - {REFERENCE}:
            raise TypeError(f"detector {cls.__name__}: needs must be a non-empty subset of {NEEDS}, got {cls.needs}")
        provenance_of(cls.params_class)  # every default must say where it comes from
        clashes = sorted({f.name for f in fields(cls.params_class)} & SCAN_KEYWORDS)
        if clashes:
            raise TypeError(f"detector {cls.__name__}: parameter(s) {', '.join(clashes)} clash with scan's own "
                            "keyword arguments; rename them")
        if cls.seed_param is not None and cls.seed_param not in {f.name for f in fields(cls.params_class)}:
            raise TypeError(f"detector {cls.__name__}: seed_param {cls.seed_param!r} is not one of its params")

    @classmethod
    def captures(cls) -> tuple[str, ...]:
        """The single-pass captures it reads, in the engine's order (empty: it needs no suspect model)."""
        return tuple(name for name in CAPTURES if name in cls.needs)

    @classmethod
    def needs_model(cls) -> bool:
        return bool(cls.captures()) or MODEL in cls.needs

    @classmethod
    def needs_reference(cls) -> bool:
        return REFERENCE in cls.needs

    def fit_scan(self, data: ScanData) -> Detection:
        raise NotImplementedError

    def report(self, detection: Detection, rows, out_dir) -> ReportParts:
        """Figures, notes and files of its own; `rows` is the scanned sample table (ids, y, poison when
        known, images(rows)); out_dir is None when no files are written."""
        return ReportParts()

    @classmethod
    def describe(cls) -> str:
        """Its --help text: summary, needs, and every parameter with its default and provenance."""
        choices = choices_of(cls.params_class)
        lines = [f"{cls.name}: {cls.summary}",
                 f"  needs: {', '.join(sorted(cls.needs))}" + ("" if cls.needs_model() else " (no suspect model)")]
        defaults = {f.name: f.default if f.default_factory is MISSING else f.default_factory()
                    for f in fields(cls.params_class)}
        for name, provenance in provenance_of(cls.params_class).items():
            allowed = f" one of {'|'.join(map(str, choices[name]))};" if name in choices else ""
            lines.append(f"  {name}={defaults[name]!r} ({allowed} {provenance})".replace("( ", "("))
        return "\n".join(lines)


def detector_input(data: ScanData, capture: str) -> np.ndarray:
    """The capture `capture` of a scan, with an error naming it when the scan did not provide it."""
    values = None if data.features is None else getattr(data.features, capture)
    if values is None:
        raise InputError(f"this detector reads the single pass's {capture!r} capture, which the scan did not provide")
    return values


def per_class_input(features, y) -> tuple[int, np.ndarray]:
    """Check an N x D feature matrix (in memory or memory-mapped) and its N integer labels for a method that
    works class by class; returns (N, y as an array)."""
    if np.ndim(features) != 2 or features.shape[0] == 0 or features.shape[1] == 0:
        raise InputError(f"features: expected an N x D matrix of penultimate features, got shape {np.shape(features)}")
    n = features.shape[0]
    y = np.asarray(y)
    if y.shape != (n,):
        raise InputError(f"y: expected {n} labels (one per feature row), got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise InputError(f"y: expected integer class labels, got dtype {y.dtype}")
    return n, y


def class_rows(y: np.ndarray) -> dict[int, np.ndarray]:
    """{label: sorted row indices} for every label present."""
    order = np.argsort(y, kind="stable")
    labels, starts = np.unique(y[order], return_index=True)
    return {int(label): rows for label, rows in zip(labels, np.split(order, starts[1:]))}


def class_matrix(features, rows: np.ndarray, label: int) -> np.ndarray:
    """The float64 rows of one class, with an error naming the first non-finite value (row, class, column)."""
    X = np.asarray(features[rows], dtype=np.float64)
    if not np.isfinite(X).all():
        row, column = np.argwhere(~np.isfinite(X))[0]
        raise InputError(f"features: row {int(rows[row])} (class {label}) has a non-finite value "
                         f"{X[row, column]} in column {column}")
    return X
