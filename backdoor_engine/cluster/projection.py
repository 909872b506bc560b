"""Linear projections fit on a sample and applied chunk by chunk to a matrix of any size.

Used where N is too large for the clustering to see every row: distances after the projection
stand in for distances between the full feature rows. "pca" keeps the directions of largest
variance of the sample (randomised SVD); "random" is a Gaussian Johnson-Lindenstrauss map,
nothing to fit. `benchmarks/bench_scalable_clustering.py` measures which keeps the flags.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from backdoor_engine.cluster.validation import integer
from backdoor_engine.errors import InputError

PROJECTIONS = ("pca", "random")
DEFAULT_CHUNK_ROWS = 65536


@dataclass(frozen=True)
class Projection:
    """x -> (x - mean) @ basis, float32; basis [D, k]."""

    kind: str
    mean: np.ndarray
    basis: np.ndarray

    @property
    def components(self) -> int:
        return int(self.basis.shape[1])

    def apply(self, X) -> np.ndarray:
        X = np.asarray(X)
        if X.ndim != 2 or X.shape[1] != self.basis.shape[0]:
            raise InputError(f"projection expects rows of {self.basis.shape[0]} columns, got shape {X.shape}")
        return (X.astype(np.float32) - self.mean) @ self.basis


def fit_projection(sample: np.ndarray, kind: str, components: int, random_state: int | None = 42) -> Projection:
    """A `kind` projection ("pca" | "random") of the sample's columns onto `components` dimensions;
    when the sample has no more columns than that, the identity (centred)."""
    sample = np.asarray(sample, dtype=np.float32)
    if sample.ndim != 2 or len(sample) < 2:
        raise InputError(f"a projection is fit on a 2-D sample of at least 2 rows, got shape {sample.shape}")
    if kind not in PROJECTIONS:
        raise InputError(f"projection must be one of {PROJECTIONS}, got {kind!r}")
    components = integer(components, "components", 1)
    dimension = sample.shape[1]
    mean = sample.mean(axis=0, dtype=np.float64).astype(np.float32)
    if dimension <= components:
        return Projection("identity", mean, np.eye(dimension, dtype=np.float32))
    if kind == "pca":
        from sklearn.decomposition import PCA

        pca = PCA(components, svd_solver="randomized", random_state=random_state).fit(sample)
        return Projection(kind, pca.mean_.astype(np.float32), pca.components_.T.astype(np.float32))
    rng = np.random.default_rng(random_state)
    basis = rng.standard_normal((dimension, components)).astype(np.float32) / np.float32(np.sqrt(components))
    return Projection(kind, mean, basis)


def project_rows(matrix, projection: Projection, *, columns: Callable[[np.ndarray], np.ndarray] | None = None,
                 chunk_rows: int = DEFAULT_CHUNK_ROWS, progress: Callable[[int], None] | None = None) -> np.ndarray:
    """projection.apply(columns(rows)) of every row of `matrix` (memory-mapped is fine), read
    `chunk_rows` at a time: memory is the output plus one chunk. `columns` picks or reduces the
    columns of a chunk first (default: all); progress(rows_done) after each chunk."""
    n = len(matrix)
    out = np.empty((n, projection.components), np.float32)
    for start in range(0, n, chunk_rows):
        chunk = np.asarray(matrix[start:start + chunk_rows])
        out[start:start + len(chunk)] = projection.apply(chunk if columns is None else columns(chunk))
        if progress is not None:
            progress(start + len(chunk))
    return out
