"""Activation Clustering (Chen et al. 2018, "Detecting Backdoor Attacks on Deep Neural Networks by Activation
Clustering"): per class (by the given label), the penultimate features are reduced to `nb_dims` dimensions
(FastICA or PCA) and split by k-means into `nb_clusters`; a cluster holding under `size_threshold` of its class
is flagged ("relative-size"), or the smallest cluster of every class ("smaller", ART's and BackdoorBench's
default analysis).

Stages, each a plain function composed by `ActivationClustering`:
  reduce_features   FastICA / PCA to nb_dims (no reduction when the features have <= nb_dims columns, as ART)
  two_means         k-means, clusters renumbered by size (0 = the largest), so the ids do not depend on the seed
  analyse_sizes     which clusters are poisoned: relative-size or smaller

What the reference code does (checked):
  ART art/defences/detector/poison/activation_defence.py: `cluster_activations(..., nb_clusters=2, nb_dims=10,
    reduce="FastICA", clustering_method="KMeans")`, FastICA(max_iter=1000, tol=0.005); `ActivationDefence.__init__`
    itself sets reduce="PCA" and cluster_analysis="smaller" (the smallest cluster of every class is poisoned, no
    size test); clustering_analyzer.analyze_by_relative_size(size_threshold=0.35) flags a cluster whose share,
    rounded to 2 decimals, is under 0.35. KMeans() unseeded, sklearn defaults.
  BackdoorBench defense/ac.py: ART's code with reduce="PCA" hard-coded, nb_dims 10, nb_clusters 2,
    cluster_analysis "smaller" (config/defense/ac/*.yaml), and the clustering run separately on each shuffled
    *batch* of cluster_batch_size rows. We cluster each whole class once, as the paper and ART do.
Scores: 1 - (share of its class in the sample's own cluster): 0.9 for a member of a 10% cluster, 0.1 for one of
the 90% cluster; with relative-size a sample is flagged exactly when its score exceeds 1 - size_threshold.
Skipped classes (fewer than 2 x nb_dims samples, or no variance) score 0 and keep cluster -1.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass

import numpy as np

from ..cluster.validation import integer
from ..detection import Detection
from ..errors import InputError
from ..params import param
from .base import Detector, ReportParts, ScanData, class_matrix, class_rows, detector_input, per_class_input

REDUCTIONS = ("fastica", "pca")
ANALYSES = ("relative-size", "smaller")
FIGURE_TITLE = "Activation Clustering: each class in its reduced features, coloured by k-means cluster"
MAX_PANELS = 9


@dataclass(frozen=True)
class AcParams:
    nb_dims: int = param(10, "official code: ART cluster_activations nb_dims=10, BackdoorBench config nb_dims: 10")
    reduce: str = param("fastica", "official code: ART cluster_activations / reduce_dimensionality default "
                        "FastICA (ART's ActivationDefence object sets PCA; BackdoorBench hard-codes PCA)",
                        choices=REDUCTIONS)
    nb_clusters: int = param(2, "official code: ART nb_clusters=2, BackdoorBench config nb_clusters: 2")
    cluster_analysis: str = param("relative-size", "ours: the paper's relative-size rule as ART implements it "
                                  "(analyze_by_relative_size); ART's and BackdoorBench's default 'smaller' flags "
                                  "a cluster in every class, clean or not", choices=ANALYSES)
    size_threshold: float = param(0.35, "official code: ART analyze_by_relative_size size_threshold=0.35")
    n_init: int = param(10, "ours: k-means restarts; ART's unseeded KMeans() gets sklearn's default, which became "
                        "a single k-means++ start in sklearn 1.4, and one start can settle on a poor split")
    ica_max_iter: int = param(1000, "official code: ART FastICA(max_iter=1000, tol=0.005)")
    ica_tol: float = param(0.005, "official code: ART FastICA(max_iter=1000, tol=0.005)")
    random_state: int = param(0, "ours: ART leaves FastICA and KMeans unseeded; BackdoorBench fixes the global "
                              "seed to 0; a fixed seed makes a scan repeatable")

    def __post_init__(self):
        integer(self.nb_dims, "nb_dims", 1)
        integer(self.nb_clusters, "nb_clusters", 2)
        integer(self.n_init, "n_init", 1)
        integer(self.ica_max_iter, "ica_max_iter", 1)
        integer(self.random_state, "random_state", 0)
        if not 0 < self.size_threshold < 1:
            raise InputError(f"size_threshold must be in (0, 1), got {self.size_threshold}")
        if not self.ica_tol > 0:
            raise InputError(f"ica_tol must be > 0, got {self.ica_tol}")


@dataclass
class ClassClusters:
    """One class's fit: its rows, reduced features, cluster per row (0 = largest), sizes and flagged clusters."""

    label: int
    rows: np.ndarray
    reduced: np.ndarray | None = None
    clusters: np.ndarray | None = None
    sizes: list | None = None
    flagged: list | None = None
    skipped: str | None = None
    reduction: str | None = None
    ica_iterations: int | None = None


def single_threaded():
    """BLAS / OpenMP limited to one thread for a class's small fits: on N_c x 10 problems their threads cost more
    in synchronisation than they save (measured on 2 busy cores: PCA 2 s -> 0.07 s, 2-means 5 s -> 0.2 s for 400
    rows); the classes are independent, so a caller may run them in parallel instead."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1)


def reduce_features(X: np.ndarray, nb_dims: int, method: str, *, random_state: int, max_iter: int, tol: float):
    """(X reduced to nb_dims columns, the reduction used, FastICA's iteration count or None). As ART: features
    with nb_dims or fewer columns are kept as they are."""
    from sklearn.decomposition import PCA, FastICA

    if X.shape[1] <= nb_dims:
        return X, "none", None
    if method == "pca":
        return PCA(n_components=nb_dims, random_state=random_state).fit_transform(X), "pca", None
    ica = FastICA(n_components=nb_dims, max_iter=max_iter, tol=tol, whiten="unit-variance",
                  random_state=random_state)
    with warnings.catch_warnings():
        # Non-convergence is recorded in the diagnostics (ica_iterations == ica_max_iter), not warned per class.
        warnings.filterwarnings("ignore", message=".*did not converge.*")
        reduced = ica.fit_transform(X)
    return reduced, "fastica", int(ica.n_iter_)


def two_means(Z: np.ndarray, k: int, *, n_init: int, random_state: int) -> np.ndarray:
    """k-means cluster of each row, renumbered by size (0 = the largest; ties by the lower original id)."""
    from sklearn.cluster import KMeans

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*distinct clusters.*")  # fewer distinct points than k
        raw = KMeans(n_clusters=k, n_init=n_init, random_state=random_state).fit_predict(Z)
    sizes = np.bincount(raw, minlength=k)
    rank = np.empty(k, np.int64)
    rank[np.argsort(-sizes, kind="stable")] = np.arange(k)
    return rank[raw]


def analyse_sizes(sizes: np.ndarray, analysis: str, threshold: float) -> list[int]:
    """Poisoned clusters of one class: every non-empty cluster under `threshold` of the class (relative-size),
    or the smallest non-empty cluster (smaller; nothing when only one cluster is non-empty)."""
    total = sizes.sum()
    nonempty = np.flatnonzero(sizes)
    if analysis == "relative-size":
        # ART rounds the share to 2 decimals before comparing (0.347 -> 0.35: kept); we compare the exact share.
        return [int(c) for c in nonempty if sizes[c] / total < threshold]
    if len(nonempty) < 2:
        return []
    return [int(nonempty[np.argmin(sizes[nonempty])])]


class ActivationClustering(Detector):
    """Activation Clustering, the registered `ac` detector (cuML/sklearn style).

        detection = ActivationClustering(reduce="pca").fit(penultimate, y)
        ac.classes_ ({label: ClassClusters}), ac.flags_, ac.scores_
    """

    name = "ac"
    summary = ("Activation Clustering: per class, penultimate features -> 10-D FastICA -> 2-means, the cluster "
               "under 35% of its class flagged (Chen et al. 2018)")
    params_class = AcParams
    needs = frozenset({"penultimate"})
    seed_param = "random_state"

    def fit(self, features, y) -> Detection:
        """features: N x D penultimate features (float, in memory or memory-mapped); y: N labels (ints)."""
        p = self.params
        n, y = per_class_input(features, y)
        began = time.perf_counter()
        flags, scores = np.zeros(n, bool), np.zeros(n, np.float64)
        clusters = np.full(n, -1, np.int64)
        self.classes_, per_class = {}, {}
        dims = min(p.nb_dims, features.shape[1])
        needed = max(2 * dims, p.nb_clusters)
        for label, rows in class_rows(y).items():
            result = ClassClusters(label, rows)
            self.classes_[label] = result
            X = class_matrix(features, rows, label)
            if len(rows) < needed:
                result.skipped = f"{len(rows)} samples, fewer than {needed} (2 x nb_dims)"
            elif np.ptp(X, axis=0).max() == 0:
                result.skipped = "every sample has the same features (no variance)"
            if result.skipped is None:
                with single_threaded():
                    Z, result.reduction, result.ica_iterations = reduce_features(
                        X, p.nb_dims, p.reduce, random_state=p.random_state, max_iter=p.ica_max_iter, tol=p.ica_tol)
                if not np.isfinite(Z).all():
                    result.skipped = f"the {result.reduction} reduction gave non-finite values (degenerate features)"
            if result.skipped is not None:
                per_class[str(label)] = {"n": len(rows), "skipped": result.skipped}
                continue
            result.reduced = Z.astype(np.float32)
            with single_threaded():
                result.clusters = two_means(Z, p.nb_clusters, n_init=p.n_init, random_state=p.random_state)
            sizes = np.bincount(result.clusters, minlength=p.nb_clusters)
            result.sizes = sizes.tolist()
            result.flagged = analyse_sizes(sizes, p.cluster_analysis, p.size_threshold)
            share = sizes / len(rows)
            flags[rows] = np.isin(result.clusters, result.flagged)
            scores[rows] = 1.0 - share[result.clusters]
            clusters[rows] = label * p.nb_clusters + result.clusters
            per_class[str(label)] = {
                "n": len(rows), "cluster_sizes": result.sizes, "cluster_shares": [round(float(s), 4) for s in share],
                "flagged_clusters": result.flagged, "n_flagged": int(sizes[result.flagged].sum()),
                "reduction": result.reduction, "ica_iterations": result.ica_iterations,
                "ica_converged": None if result.ica_iterations is None else result.ica_iterations < p.ica_max_iter}
        self.flags_, self.scores_ = flags, scores
        skipped = [label for label, c in self.classes_.items() if c.skipped]
        flagged_classes = [label for label, c in self.classes_.items() if c.flagged]
        rule = (f"a cluster under {p.size_threshold:.0%} of its class" if p.cluster_analysis == "relative-size"
                else "the smallest cluster of every class")
        explanation = (f"Activation Clustering flagged {int(flags.sum())} of {n} samples: {rule}, in "
                       f"{len(flagged_classes)} of {len(self.classes_) - len(skipped)} clustered classes")
        if skipped:
            explanation += (f"; {len(skipped)} class(es) skipped (too few samples or no variance): "
                            f"{', '.join(map(str, skipped[:10]))}{' ...' if len(skipped) > 10 else ''}")
        diagnostics = {"explanation": explanation, "classes": per_class, "flagged_classes": flagged_classes,
                       "skipped_classes": skipped, "min_class_size": needed,
                       "score": "1 - share of its class in the sample's cluster (0 for skipped classes)",
                       "cluster_ids": f"label x {p.nb_clusters} + cluster (0 = the class's largest); -1 = skipped",
                       "timings_s": {"cluster": time.perf_counter() - began}}
        return Detection(self.name, flags, params=asdict(p), scores=scores, clusters=clusters,
                         diagnostics=diagnostics)

    def fit_scan(self, data: ScanData) -> Detection:
        return self.fit(detector_input(data, "penultimate"), data.y)

    def report(self, detection: Detection, rows, out_dir) -> ReportParts:
        parts = ReportParts(notes=[detection.diagnostics["explanation"]])
        if out_dir is None or not hasattr(self, "classes_"):
            return parts
        clustered = [c for c in self.classes_.values() if c.skipped is None]
        # The classes with flags first (most flagged first), then the largest others, up to MAX_PANELS.
        clustered.sort(key=lambda c: (-sum(c.sizes[k] for k in c.flagged), -len(c.rows)))
        shown = clustered[:MAX_PANELS]
        if shown:
            truth = None if rows.poison is None else np.asarray(rows.poison).astype(bool)
            parts.figures.append((FIGURE_TITLE, clusters_png(shown, self.params.size_threshold, truth)))
        return parts


def _plane(Z: np.ndarray, clusters: np.ndarray) -> tuple[np.ndarray, tuple[str, str]]:
    """2-D view of one class: x along the line joining the two largest clusters' centroids, y the main
    direction left over; the two leading principal axes when the clusters coincide."""
    centred = Z - Z.mean(axis=0)
    axis = Z[clusters == 0].mean(axis=0) - Z[clusters == 1].mean(axis=0) if (clusters == 1).any() else None
    if axis is None or not np.linalg.norm(axis) > 0:
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        basis = vt[:2] if len(vt) > 1 else np.vstack([vt[0], np.zeros_like(vt[0])])
        return centred @ basis.T, ("principal axis 1", "principal axis 2")
    axis = axis / np.linalg.norm(axis)
    rest = centred - np.outer(centred @ axis, axis)
    _, _, vt = np.linalg.svd(rest, full_matrices=False)
    return np.c_[centred @ axis, rest @ vt[0]], ("centroid to centroid", "main other direction")


def clusters_png(classes: list[ClassClusters], threshold: float, truth: np.ndarray | None) -> bytes:
    """A grid of per-class panels: points coloured by cluster, a flagged cluster in red with x markers, true
    poison (when known) ringed in black."""
    from ..report.figures import _pyplot, _to_png

    plt = _pyplot()
    columns = min(3, len(classes))
    lines = (len(classes) + columns - 1) // columns
    fig, axes = plt.subplots(lines, columns, figsize=(4.2 * columns, 3.8 * lines), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    palette = ["#3b6fb6", "#9aa5b1", "#2a9d8f", "#e9c46a", "#8d6cab", "#6c757d"]
    for ax, result in zip(axes.flat, classes):
        ax.axis("on")
        xy, (xlabel, ylabel) = _plane(result.reduced.astype(np.float64), result.clusters)
        size = max(1.0, min(10.0, 3000 / len(xy)))
        n = len(result.rows)
        for k, count in enumerate(result.sizes):
            members = result.clusters == k
            if not members.any():
                continue
            flagged = k in result.flagged
            label = f"cluster {k}: {count} ({count / n:.0%})" + (" flagged" if flagged else "")
            ax.scatter(*xy[members].T, s=size * (2 if flagged else 1), linewidths=0.6 if flagged else 0,
                       c="#d64545" if flagged else palette[k % len(palette)], marker="x" if flagged else "o",
                       label=label)
        if truth is not None:
            poisoned = truth[result.rows]
            if poisoned.any():
                ax.scatter(*xy[poisoned].T, s=size * 5, facecolors="none", edgecolors="k", linewidths=0.4,
                           label=f"ground truth poison ({int(poisoned.sum())})")
        state = "flagged" if result.flagged else f"nothing under {threshold:.0%}"
        ax.set_title(f"class {result.label}: n={n}, {state}", fontsize=9)
        ax.set_xlabel(xlabel, fontsize=7)
        ax.set_ylabel(ylabel, fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(fontsize=6, loc="best", markerscale=max(1.0, 3 / size ** 0.5))
    fig.tight_layout()
    return _to_png(fig)
