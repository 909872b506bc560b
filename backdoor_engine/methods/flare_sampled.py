"""FLARE beyond what one clustering can hold: fit on a stratified sample, assign the rest by kNN vote.

Stages, each a plain function composed by `SampledFlare`:
  stratified_sample   the same share of every label (the class make-up guard reads label counts)
  Flare.fit           the whole subspace search and labelling, on the sample only
  subspace_columns    the chosen subspace's columns of any chunk of rows (sliced, never re-extracted)
  fit_projection      PCA (or a random projection) of those columns, fit on the sample
  ReferenceIndex      FAISS over the projected sample; every other row takes the flag most of its
                      `assign_k` nearest sample rows carry (score: the flagged share)
The features may be a memory-mapped matrix of any N: rows are read in chunks, so memory is the
sample, its index and the per-row outputs. `benchmarks/bench_scalable_clustering.py` measures the
flags' agreement with `Flare` on every row, and the time and memory saved.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, fields

import numpy as np

from ..cluster.assign import INDEXES, ReferenceIndex, vote
from ..cluster.projection import PROJECTIONS, fit_projection, project_rows
from ..cluster.validation import integer
from ..engine.layout import FeatureLayout
from ..errors import InputError
from .detection import Detection
from .flare import Flare, FlareParams


@dataclass(frozen=True)
class SampledParams:
    # Rows FLARE clusters; the paper's sets (CIFAR-10, 50k) sit at this size, where UMAP takes ~1-2 min
    # per subspace on 2 cores.
    sample_size: int = 50_000
    # Up to this many rows FLARE clusters every row (no sampling): 60k-sample sets stay exact.
    exact_max_samples: int = 100_000
    # Nearest sample rows voting on each other row's flag (ours: odd, so a vote cannot tie).
    assign_k: int = 15
    projection: str = "pca"
    projection_components: int = 64
    knn_index: str = "auto"
    nprobe: int = 16

    def __post_init__(self):
        integer(self.sample_size, "sample_size", 2)
        integer(self.exact_max_samples, "exact_max_samples", 0)
        integer(self.assign_k, "assign_k", 1)
        integer(self.projection_components, "projection_components", 1)
        integer(self.nprobe, "nprobe", 1)
        if self.projection not in PROJECTIONS:
            raise InputError(f"projection must be one of {PROJECTIONS}, got {self.projection!r}")
        if self.knn_index not in INDEXES:
            raise InputError(f"knn_index must be one of {INDEXES}, got {self.knn_index!r}")


def stratified_sample(y: np.ndarray | None, n: int, size: int, random_state: int | None) -> np.ndarray:
    """Sorted row indices of `size` of n rows, each label holding its share (rounded, largest
    remainders first); uniform when y is None."""
    rng = np.random.default_rng(random_state)
    if size >= n:
        return np.arange(n)
    if y is None:
        return np.sort(rng.choice(n, size, replace=False))
    labels, counts = np.unique(y, return_counts=True)
    quota = counts * size / n
    take = np.floor(quota).astype(np.int64)
    take[np.argsort(-(quota - take), kind="stable")[: size - take.sum()]] += 1
    chosen = [rng.choice(np.flatnonzero(y == label), count, replace=False) for label, count in zip(labels, take)]
    return np.sort(np.concatenate(chosen))


def subspace_columns(layout: FeatureLayout, dropped: int, reduce: str):
    """A function from a chunk of full feature rows to the chosen subspace's columns."""
    if reduce == "layer":
        return lambda chunk: layout.per_layer(np.asarray(chunk, dtype=np.float32))[:, : layout.num_layers - dropped]
    stop = layout.layer_slices[layout.num_layers - dropped - 1].stop
    return lambda chunk: chunk[:, :stop]


class SampledFlare:
    """FLARE fit on a stratified sample, the other rows assigned (cuML/sklearn style).

        detection = SampledFlare(sample_size=50_000, exact_max_samples=100_000).fit(features, layout, y=labels)
        flare.sample_ (row indices), flare.flare_ (the Flare fit on them), flare.assigned_share_
    """

    name = "flare"

    def __init__(self, **params):
        sampled_names = {f.name for f in fields(SampledParams)}
        flare_names = {f.name for f in fields(FlareParams)}
        unknown = sorted(set(params) - sampled_names - flare_names)
        if unknown:
            raise InputError(f"unknown FLARE parameter(s) {unknown}; known: {sorted(sampled_names | flare_names)}")
        self.sampled = SampledParams(**{k: v for k, v in params.items() if k in sampled_names})
        self.flare_params = {k: v for k, v in params.items() if k in flare_names}

    def fit(self, features, layout: FeatureLayout, y: np.ndarray | None = None, *, progress=None,
            chunk_rows: int = 65536) -> Detection:
        """features: N x layout.num_columns BN minima, float32 or float16, in memory or memory-mapped."""
        if np.ndim(features) != 2 or features.shape[1] != layout.num_columns:
            raise InputError(f"features: expected N x {layout.num_columns} BN-minima columns, got shape "
                             f"{np.shape(features)}")
        n = len(features)
        if y is not None and np.shape(y) != (n,):
            raise InputError(f"y: expected shape ({n},), got {np.shape(y)}")
        timings = {}
        began = time.perf_counter()
        self.flare_ = Flare(**self.flare_params)
        seed = self.flare_.params.random_state
        size = n if n <= self.sampled.exact_max_samples else self.sampled.sample_size
        self.sample_ = stratified_sample(None if y is None else np.asarray(y), n, size, seed)
        sample = np.asarray(features[self.sample_], dtype=np.float32)
        sample_y = None if y is None else np.asarray(y)[self.sample_]
        timings["sample"] = time.perf_counter() - began
        began = time.perf_counter()
        fitted = self.flare_.fit(sample, layout, y=sample_y, progress=progress)
        timings["fit_sample"] = time.perf_counter() - began
        # scores: the flagged share of each row's assign_k nearest sample rows.
        flags, scores = np.zeros(n, bool), np.zeros(n, np.float32)
        clusters = np.full(n, -1, np.int64)
        diagnostics = {**fitted.diagnostics, "sampled": {**asdict(self.sampled), "n_rows": n,
                                                         "n_sample": int(len(self.sample_))}}
        self.assigned_share_ = None
        if len(self.sample_) == n:
            self.flags_ = fitted.flags
            diagnostics["sampled"]["timings_s"] = timings
            fitted.diagnostics = diagnostics
            return fitted
        # With nothing flagged in the sample every vote is 0: no search needed.
        if fitted.flags.any():
            began = time.perf_counter()
            columns = subspace_columns(layout, self.flare_.subspace_, self.flare_.params.reduce)
            sample_columns = columns(sample)
            projection = fit_projection(sample_columns, self.sampled.projection, self.sampled.projection_components,
                                        seed)
            index = ReferenceIndex(projection.apply(sample_columns), index=self.sampled.knn_index,
                                   nprobe=self.sampled.nprobe, random_state=seed)
            timings["index"] = time.perf_counter() - began
            began = time.perf_counter()
            projected = project_rows(features, projection, columns=columns, chunk_rows=chunk_rows)
            timings["project"] = time.perf_counter() - began
            began = time.perf_counter()
            neighbours = index.search(projected, min(self.sampled.assign_k, len(self.sample_)))
            del projected
            scores = vote(fitted.flags[neighbours])
            flags = scores > 0.5
            clusters = fitted.clusters[neighbours[:, 0]]
            self.assigned_share_ = scores
            timings["assign"] = time.perf_counter() - began
            diagnostics["sampled"].update(index=index.kind, projection_kind=projection.kind,
                                          sample_disagreement=int((flags[self.sample_] != fitted.flags).sum()))
        # The sample keeps its own verdicts: those are FLARE's, not a vote's.
        flags[self.sample_] = fitted.flags
        if fitted.clusters is not None:
            clusters[self.sample_] = fitted.clusters
        self.flags_ = flags
        diagnostics["sampled"]["timings_s"] = timings
        return Detection(self.name, flags, params={**fitted.params, **asdict(self.sampled)}, scores=scores,
                         clusters=clusters, diagnostics=diagnostics)
