"""TRAP's poisoned sample isolation ("treating poison with poison", IEEE; no public code, SEED_NOTES section 4):
in the first E_d epochs of ordinary training, poisoned samples form clusters of their own in feature space
before the benign ones separate. Every numeric default is the paper's text and marked `paper`; those the paper
does not give are `ours` with the reason.

Per epoch e <= E_d (Algorithm 1), each stage a plain function:
  1 epoch_features      every training sample's penultimate features, un-augmented, through the engine's
                        single pass (a probe on the head of the model being trained; no second copy)
  2 reduce_features     PCA to `pca_components` (ours, for speed)
    embed               2-D t-SNE through the cluster registry (openTSNE on CPU, cuML on GPU)
  3 cluster_embedding   DBSCAN (eps 3, min_samples 50) through the cluster registry
    place               (only with `tsne_sample`) the rows t-SNE did not see take the majority cluster of their
                        nearest embedded rows in the reduced space, through the engine's kNN search
  4 suspicious_clusters a cluster that is not the largest and holds one class or all classes (section IV-A3)
Two cost cuts, off by default (the paper fits t-SNE on every sample every epoch), measured in RESULTS.md:
`tsne_sample` (t-SNE and DBSCAN on a fixed random sample, the rest placed) and `tsne_warm_start` (each epoch's
t-SNE continues from the previous epoch's embedding with a short schedule and no early exaggeration).
The flags are the union over the E_d epochs. `Isolation` is the trainer's per-epoch callback (the training loop
is models.train's, not a copy), so `train --defense trap` isolates while it trains; `Trap` is the detector
(`scan --method trap`), which trains only the first E_d epochs of an E_t-epoch schedule.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from ..data.dataset import Dataset
from ..detection import Detection
from ..errors import InputError
from ..models.preprocess import Normalisation, fit_normalisation
from ..models.registry import available_archs, default_arch
from ..params import param
from .base import PIXELS, Detector, ReportParts, ScanData

RULES = ("one_or_all_classes", "not_largest")
EPS_MODES = ("absolute", "scaled")


@dataclass(frozen=True)
class TrapParams:
    arch: str | None = param(None, "ours", reason="small_resnet below 32 px, resnet18 from 32 px (the paper "
                             "trains ResNet-18 on CIFAR-10)")
    detect_epochs: int = param(10, "paper: E_d = 10 (section V, parameter settings)")
    train_epochs: int = param(100, "paper: E_t = 100; the schedule's length (a scan trains only E_d epochs of it)")
    eps: float = param(3.0, "paper: DBSCAN eps 3 (Table V), in t-SNE output units")
    eps_mode: str = param("scaled", "ours", choices=EPS_MODES,
                          reason="t-SNE's local scale shrinks as N grows (openTSNE, median 50th-neighbour distance "
                                 "6.1 at 2k, 4.2 at 10k, 2.5 at 50k: RESULTS.md), so eps 3 leaves 85% of a 10k set "
                                 "as noise; scaled = eps x that distance / its value at the paper's N = 50k, equal "
                                 "to the paper's eps there; absolute = the paper's eps as is")
    min_samples: int = param(50, "paper: DBSCAN min_samples 50")
    union_min_epochs: int = param(
        2, "ours", reason="a sample flagged in at least 2 of the E_d epochs: the paper's union (1, Algorithm 1) keeps "
        "one-epoch benign islands (432 bags in 1 of 10 epochs of Blend, 47.7% of their class, under the class "
        "guard; union precision 69.8%) while the poison, once separated, is flagged epoch after epoch; the paper "
        "takes E_d epochs for the stability of the training dynamics (section IV-A4 remark). 1 = the paper; capped "
        "at detect_epochs")
    class_coverage: float | None = param(
        0.5, "ours", reason="a suspicious cluster holding more than this share of each of its labels' samples is "
        "a benign class that separated early, not poison, unless its label is inflated by about its size "
        "(all-to-one relabelling): FLARE's class make-up guard (methods/flare.py class_makeup), adopted after a "
        "whole class (938 of 980 trousers) was called suspicious in 3 of 10 epochs on a clean 10k set and an ~800 "
        "trouser cluster in 2 epochs of BadNets (RESULTS.md); None = the paper's rule alone")
    rule: str = param("one_or_all_classes", "paper", choices=RULES,
                      reason="section IV-A3: not the largest and holding one class or all classes; `not_largest` "
                             "is the looser wording of the Algorithm 1 text")
    perplexity: float = param(30.0, "ours", reason="the paper gives no t-SNE setting; 30 is both libraries' default")
    pca_components: int | None = param(50, "ours", reason="PCA to 50 before t-SNE, the usual t-SNE preprocessing "
                                       "and the cost cut the issue names; None = t-SNE on the raw features")
    lr: float = param(0.05, "ours", reason="the engine trainer's default; the paper gives no optimiser for "
                      "the standard training stage")
    train_batch_size: int = param(128, "ours", reason="the engine trainer's default (the paper gives none)")
    augment: bool = param(True, "ours", reason="standard supervised learning = crop + flip, the engine's recipe")
    tsne_sample: int | None = param(None, "ours", reason="t-SNE and DBSCAN on this many rows (drawn once from "
                                    "the seed, the same every epoch), the rest placed by their nearest embedded "
                                    "rows: the cost cut for large sets; None = every row, as the paper")
    assign_k: int = param(15, "ours", reason="neighbours that place a row outside the t-SNE sample (majority "
                          "cluster, mean position); the engine's kNN assignment")
    tsne_warm_start: bool = param(False, "ours", reason="epochs after the first continue from the previous "
                                  "epoch's embedding (openTSNE only): the features move little between epochs; "
                                  "false = a fresh fit every epoch, as the paper")
    warm_iter: int = param(250, "ours", reason="iterations of a warm-started t-SNE (no early exaggeration), a "
                           "third of openTSNE's 750")
    tsne_backend: str = param("auto", "ours", choices=("auto", "cuml", "opentsne"),
                              reason="cuML on a GPU (the paper's GPU t-SNE), openTSNE on CPU")
    dbscan_backend: str = param("auto", "ours", choices=("auto", "cuml", "sklearn"),
                                reason="cuML on a GPU, scikit-learn on CPU")
    seed: int = param(0, "ours", reason="any fixed seed: the training run and every t-SNE")

    def __post_init__(self):
        if self.arch is not None and self.arch not in available_archs():
            raise InputError(f"trap: unknown arch {self.arch!r}; available: {', '.join(available_archs())}")
        if not 1 <= self.detect_epochs <= self.train_epochs:
            raise InputError(f"trap: detect_epochs must be in [1, train_epochs={self.train_epochs}], got "
                             f"{self.detect_epochs}")
        if self.union_min_epochs < 1:
            raise InputError(f"trap: union_min_epochs must be >= 1, got {self.union_min_epochs}")
        if not self.eps > 0 or self.min_samples < 1 or not self.perplexity > 0:
            raise InputError(f"trap: eps and perplexity must be > 0 and min_samples >= 1, got {self.eps}, "
                             f"{self.perplexity}, {self.min_samples}")
        if self.pca_components is not None and self.pca_components < 2:
            raise InputError(f"trap: pca_components must be >= 2 or None, got {self.pca_components}")
        if self.tsne_sample is not None and self.tsne_sample <= max(3 * self.perplexity, self.min_samples):
            raise InputError(f"trap: tsne_sample must exceed 3 x perplexity and min_samples "
                             f"({int(max(3 * self.perplexity, self.min_samples))}), got {self.tsne_sample}")
        if self.class_coverage is not None and not 0 < self.class_coverage <= 1:
            raise InputError(f"trap: class_coverage must be in (0, 1] or None, got {self.class_coverage}")
        if self.assign_k < 1 or self.warm_iter < 1:
            raise InputError(f"trap: assign_k and warm_iter must be >= 1, got {self.assign_k}, {self.warm_iter}")
        if self.tsne_warm_start and self.tsne_backend == "cuml":
            raise InputError("trap: tsne_warm_start needs openTSNE (cuML's TSNE cannot start from an embedding); "
                             "on a GPU the full fit is the cheap one")


# eps_mode="scaled": the embedding's length unit is the median distance from a point to its 50th neighbour;
# the reference is its value on an openTSNE embedding (perplexity 30) of 50,000 Fashion-MNIST images (PCA 50),
# the size of the paper's CIFAR-10 training set (RESULTS.md, TRAP: the t-SNE scale; benchmarks/tsne_scale.py).
REFERENCE_K = 50
REFERENCE_NEIGHBOUR_DISTANCE = 2.458


@dataclass
class ClusterInfo:
    label: int
    size: int
    n_classes: int
    majority: int
    majority_share: float
    suspicious: bool
    reason: str
    rule_suspicious: bool = False  # the paper's rule alone, before the class make-up guard
    class_share: float = 0.0  # member-weighted share of its labels' samples it holds (flare.whole_class_share)

    def summary(self) -> dict:
        return asdict(self)


@dataclass
class EpochResult:
    epoch: int
    flags: np.ndarray
    clusters: np.ndarray
    embedding: np.ndarray
    table: list[ClusterInfo]
    eps: float
    seconds: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return {"epoch": self.epoch, "n_flagged": int(self.flags.sum()), "eps": self.eps,
                "n_clusters": len(self.table), "n_noise": int((self.clusters < 0).sum()),
                "clusters": [c.summary() for c in self.table], "seconds": self.seconds}


def epoch_features(model, dataset: Dataset, normalisation: Normalisation, batch_size: int = 256) -> np.ndarray:
    from ..engine import extract_features

    return np.asarray(extract_features(model, dataset, normalisation, capture=("penultimate",),
                                       batch_size=batch_size, progress=False).penultimate, dtype=np.float32)


def sample_rows(n: int, params: TrapParams) -> np.ndarray | None:
    """The rows t-SNE embeds (sorted), the same every epoch; None = all of them."""
    if params.tsne_sample is None or params.tsne_sample >= n:
        return None
    return np.sort(np.random.default_rng(params.seed).choice(n, params.tsne_sample, replace=False))


def reduce_features(features: np.ndarray, params: TrapParams, random_state: int,
                    rows: np.ndarray | None = None) -> np.ndarray:
    """float32 features, PCA-reduced to `pca_components` (fitted on the rows t-SNE will see)."""
    data = np.asarray(features, dtype=np.float32)
    if params.pca_components is None or data.shape[1] <= params.pca_components:
        return data
    from sklearn.decomposition import PCA

    pca = PCA(params.pca_components, random_state=random_state).fit(data if rows is None else data[rows])
    return pca.transform(data).astype(np.float32)


def embed(reduced: np.ndarray, params: TrapParams, random_state: int, init: np.ndarray | None = None) -> np.ndarray:
    """2-D t-SNE; from `init` (the previous epoch's embedding) with the short warm schedule when given."""
    from .. import cluster

    warm = {} if init is None else {"init": init, "exaggeration_iter": 0, "n_iter": params.warm_iter}
    return cluster.tsne(reduced, perplexity=params.perplexity, random_state=random_state,
                        backend=params.tsne_backend, **warm)


def place(reduced: np.ndarray, rows: np.ndarray, embedding: np.ndarray, clusters: np.ndarray,
          k: int) -> tuple[np.ndarray, np.ndarray]:
    """Embedding and cluster labels of every row, from those of the embedded `rows`: each other row takes the
    majority label (noise counts as one) and the mean position of its k nearest embedded rows, found in the
    reduced feature space the t-SNE read."""
    from .. import cluster
    from ..cluster.assign import majority_label

    n = len(reduced)
    others = np.setdiff1d(np.arange(n), rows)
    full_embedding = np.empty((n, embedding.shape[1]), np.float32)
    full_clusters = np.empty(n, np.int64)
    full_embedding[rows], full_clusters[rows] = embedding, clusters
    if len(others):
        neighbours = cluster.knn_search(reduced[rows], reduced[others], min(k, len(rows)))
        full_clusters[others] = majority_label(clusters[neighbours])  # ties: the lower label, noise first
        full_embedding[others] = embedding[neighbours].mean(axis=1)
    return full_embedding, full_clusters


def neighbour_scale(embedding: np.ndarray, k: int) -> float:
    """Median distance from a point to its k-th nearest neighbour: the embedding's local length unit."""
    from .. import cluster

    _, distances = cluster.knn(np.ascontiguousarray(embedding, dtype=np.float32), min(k + 1, len(embedding)))
    return float(np.median(distances[:, -1]))


def effective_eps(embedding: np.ndarray, params: TrapParams) -> float:
    """The DBSCAN radius for this embedding: the paper's eps as is (absolute), or scaled by the embedding's
    local length unit against the reference one (scaled; the same eps at the paper's N)."""
    if params.eps_mode == "absolute":
        return params.eps
    return params.eps * neighbour_scale(embedding, REFERENCE_K) / REFERENCE_NEIGHBOUR_DISTANCE


def cluster_embedding(embedding: np.ndarray, eps: float, params: TrapParams) -> np.ndarray:
    from .. import cluster

    return cluster.dbscan(embedding, eps=eps, min_samples=min(params.min_samples, len(embedding)),
                          backend=params.dbscan_backend)


def suspicious_clusters(clusters: np.ndarray, y: np.ndarray, num_classes: int, rule: str,
                        class_coverage: float | None = None) -> list[ClusterInfo]:
    """One row per DBSCAN cluster (noise excluded), largest first, each called suspicious or not with why.

    The paper's rule (section IV-A3) first; then, with `class_coverage`, FLARE's class make-up guard overrules
    a suspicious cluster that holds more than that share of each of its labels' samples (a benign class that
    separated early: measured on clean sets) unless its label is inflated by about the cluster's size, the
    footprint of all-to-one relabelling. Poison of all-to-all attacks and clean-label poison of part of a class
    hold a small share of their labels and stay suspicious; clean-label poison of most of a class does not."""
    from .flare import class_makeup, label_excess

    labels = [c for c in np.unique(clusters) if c >= 0]
    sizes = {c: int((clusters == c).sum()) for c in labels}
    largest = max(labels, key=lambda c: (sizes[c], -c)) if labels else None
    excess = label_excess(y) if labels else None
    table = []
    for c in sorted(labels, key=lambda c: (-sizes[c], c)):
        samples = np.flatnonzero(clusters == c)
        counts = np.bincount(y[samples], minlength=num_classes)
        n_classes = int((counts > 0).sum())
        majority = int(counts.argmax())
        if c == largest:
            suspicious, reason = False, "the largest cluster (the benign bulk early in training)"
        elif rule == "not_largest":
            suspicious, reason = True, "not the largest cluster"
        elif n_classes == 1:
            suspicious, reason = True, f"not the largest, and every member carries label {majority}"
        elif n_classes == num_classes:
            suspicious, reason = True, f"not the largest, and it holds all {num_classes} classes"
        else:
            suspicious, reason = False, f"holds {n_classes} of {num_classes} classes (neither one nor all)"
        # TRAP's guard was measured with the 0.9 one-label bar (FLARE's default is lower since; not re-measured here).
        makeup = class_makeup(y, samples, np.arange(len(y)), excess, class_coverage or 1.0, island_purity=0.9)
        rule_suspicious = suspicious
        if (suspicious and class_coverage is not None and makeup["class_share"] > class_coverage
                and not makeup["inflated"]):
            suspicious = False
            reason += (f"; but it holds {makeup['class_share']:.0%} of its labels' samples (> class_coverage "
                       f"{class_coverage:g}) and label {makeup['top_label']} is not inflated by its size: a benign "
                       "class separated early, not flagged")
        table.append(ClusterInfo(int(c), sizes[c], n_classes, majority, float(counts[majority] / sizes[c]),
                                 suspicious, reason, rule_suspicious, makeup["class_share"]))
    return table


def isolate_epoch(features: np.ndarray, y: np.ndarray, num_classes: int, params: TrapParams,
                  epoch: int, previous: "EpochResult | None" = None) -> EpochResult:
    """Stages 2-4 on one epoch's features; `previous` (the last epoch's result) seeds a warm start."""
    t0 = time.perf_counter()
    rows = sample_rows(len(features), params)
    fitted = slice(None) if rows is None else rows
    reduced = reduce_features(features, params, params.seed + epoch, rows)
    init = previous.embedding[fitted] if params.tsne_warm_start and previous is not None else None
    embedding = embed(reduced[fitted], params, random_state=params.seed + epoch, init=init)
    t1 = time.perf_counter()
    eps = effective_eps(embedding, params)
    clusters = cluster_embedding(embedding, eps, params)
    t2 = time.perf_counter()
    if rows is not None:
        embedding, clusters = place(reduced, rows, embedding, clusters, params.assign_k)
    table = suspicious_clusters(clusters, y, num_classes, params.rule, params.class_coverage)
    flagged = [c.label for c in table if c.suspicious]
    flags = np.isin(clusters, flagged)
    return EpochResult(epoch, flags, clusters, embedding, table, eps,
                       {"tsne": t1 - t0, "dbscan": t2 - t1, "place": time.perf_counter() - t2})


class Isolation:
    """The trainer's per-epoch callback: isolation after each of the first E_d epochs (`results_`), how many of
    them flagged each sample (`counts_`) and the union (`flags_`: flagged in at least `union_min_epochs`)."""

    def __init__(self, dataset: Dataset, normalisation: Normalisation, params: TrapParams, *,
                 num_classes: int | None = None, progress: bool = False):
        self.dataset, self.normalisation, self.params, self.progress = dataset, normalisation, params, progress
        self.num_classes = num_classes or dataset.num_classes
        self.results_: list[EpochResult] = []
        self.counts_ = np.zeros(len(dataset), np.int64)

    @property
    def flags_(self) -> np.ndarray:
        # capped at the epochs isolated, so that detect_epochs=1 is the one epoch's flags
        return self.counts_ >= min(self.params.union_min_epochs, self.params.detect_epochs)

    def __call__(self, epoch: int, model) -> None:
        if epoch > self.params.detect_epochs:
            return
        t0 = time.perf_counter()
        features = epoch_features(model, self.dataset, self.normalisation)
        self.observe(epoch, features, features_s=time.perf_counter() - t0)

    def observe(self, epoch: int, features: np.ndarray, features_s: float = 0.0) -> EpochResult:
        """Isolation on one epoch's features (what __call__ does after extracting them)."""
        previous = self.results_[-1] if self.results_ else None
        result = isolate_epoch(features, np.asarray(self.dataset.y), self.num_classes, self.params, epoch, previous)
        result.seconds["features"] = features_s
        self.results_.append(result)
        self.counts_ += result.flags
        if self.progress:
            print(f"trap: epoch {epoch}: {len(result.table)} clusters, {int(result.flags.sum())} flagged, "
                  f"{int(self.flags_.sum())} in the union", flush=True)
        return result

    def detection(self, name: str = "trap", params: dict | None = None, timings: dict | None = None) -> Detection:
        """The union as a Detection; scores = how many of the E_d epochs flagged the sample."""
        if not self.results_:
            raise InputError("trap: no isolation epoch has run")
        counts = self.counts_.astype(np.float64)
        last = self.results_[-1]
        per_epoch = [r.summary() for r in self.results_]
        seconds = {key: sum(r.seconds.get(key, 0.0) for r in self.results_)
                   for key in ("features", "tsne", "dbscan", "place")}
        diagnostics = {"epochs": per_epoch, "timings_s": {**(timings or {}), **{f"isolation_{k}": v
                                                                                 for k, v in seconds.items()}}}
        if not self.flags_.any():
            diagnostics["explanation"] = (f"No suspicious cluster in the first {len(self.results_)} epochs: every "
                                          "cluster was the largest or held some but not all classes.")
        return Detection(name, self.flags_.copy(), params=params or asdict(self.params), scores=counts,
                         clusters=last.clusters, embedding=last.embedding, diagnostics=diagnostics)


def train_config(params: TrapParams, *, progress: bool):
    from ..models.train import TrainConfig

    return TrainConfig(epochs=params.train_epochs, batch_size=params.train_batch_size, lr=params.lr,
                       augment=params.augment, seed=params.seed, progress=progress)


class Trap(Detector):
    """Estimator: ``Trap(**params).fit(x, y, num_classes=K) -> Detection``; the registered `trap` detector.

    Fitted attributes: ``isolation_`` (per-epoch results: embedding, DBSCAN clusters, cluster table, flags),
    ``model_`` (the model after E_d epochs), ``normalisation_``.
    """

    name = "trap"
    summary = ("TRAP's isolation: trains a model itself and flags the samples of suspicious t-SNE + DBSCAN "
               "clusters in its first E_d epochs (no suspect model)")
    params_class = TrapParams
    # Random access to the pixels for E_d epochs of training; per epoch the features (N x D), the 2-D
    # embedding and the cluster labels of each epoch are kept for the report.
    needs = frozenset({PIXELS})
    seed_param = "seed"

    def fit(self, x: np.ndarray, y: np.ndarray, *, num_classes: int, progress: bool = False) -> Detection:
        from ..models.train import train_model

        params = self.params
        y = np.asarray(y)
        if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
            raise InputError(f"y: expected {len(x)} integer labels, got shape {y.shape} of {y.dtype}")
        if len(x) <= 3 * params.perplexity:
            raise InputError(f"trap: t-SNE with perplexity {params.perplexity} needs more than "
                             f"{int(3 * params.perplexity)} samples, got {len(x)}")
        dataset = x if isinstance(x, Dataset) else Dataset(x, y)
        self.normalisation_ = fit_normalisation(dataset.x)
        self.isolation_ = Isolation(dataset, self.normalisation_, params, num_classes=num_classes, progress=progress)
        t0 = time.perf_counter()
        trained = train_model(dataset.x, y, arch=params.arch or default_arch(dataset.image_shape),
                              num_classes=num_classes, config=train_config(params, progress=progress),
                              normalisation=self.normalisation_, callback=self.isolation_,
                              stop_after=params.detect_epochs)
        self.model_ = trained.model
        seconds = time.perf_counter() - t0
        isolation_s = sum(sum(r.seconds.values()) for r in self.isolation_.results_)
        return self.isolation_.detection(self.name, asdict(params), {"training": seconds - isolation_s})

    def fit_scan(self, data: ScanData) -> Detection:
        return self.fit(data.pixels, data.pixels.y, num_classes=data.num_classes, progress=data.progress)

    def report(self, detection: Detection, rows, out_dir) -> ReportParts:
        return isolation_report(self.isolation_, rows)


def isolation_report(isolation: Isolation, rows) -> ReportParts:
    """Per epoch: the embedding coloured by cluster, by flag (and by ground truth), and the cluster table."""
    notes = []
    truth = None if rows.poison is None else np.asarray(rows.poison).astype(bool)
    figures = []
    for result in isolation.results_:
        figures.append((f"Epoch {result.epoch}: t-SNE of the penultimate features, eps {result.eps:.3g}, "
                        f"{int(result.flags.sum())} flagged", epoch_png(result, truth)))
        rows_html = "; ".join(f"cluster {c.label}: {c.size} samples, {c.n_classes} class(es), majority label "
                              f"{c.majority} ({100 * c.majority_share:.0f}%) - "
                              f"{'SUSPICIOUS' if c.suspicious else 'kept'}: {c.reason}" for c in result.table[:12])
        notes.append(f"Epoch {result.epoch} clusters (largest first): {rows_html or 'none (all noise)'}")
    per_epoch = ", ".join(f"e{r.epoch}: {int(r.flags.sum())}" for r in isolation.results_)
    k = min(isolation.params.union_min_epochs, isolation.params.detect_epochs)
    union = ("the union" if k == 1 else
             f"flagged in at least {k} epochs (the paper's union of all: {int((isolation.counts_ > 0).sum())})")
    notes.insert(0, f"Flagged per epoch ({per_epoch}); {union}: {int(isolation.flags_.sum())} samples.")
    return ReportParts(figures=figures, notes=notes)


def epoch_png(result: EpochResult, truth: np.ndarray | None) -> bytes:
    from ..report.figures import _pyplot, _to_png

    plt = _pyplot()
    panels = 3 if truth is not None else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.6 * panels, 4.2), squeeze=False)
    points = result.embedding
    size = max(0.5, min(6.0, 20000 / max(len(points), 1)))
    ax = axes[0, 0]
    ax.scatter(*points.T, s=size, c=np.where(result.clusters < 0, -1, result.clusters % 20), cmap="tab20",
               linewidths=0)
    ax.set_title(f"DBSCAN clusters ({len(result.table)}; noise grey)")
    for ax, (title, marked) in zip(axes[0, 1:], [("flagged", result.flags)]
                                   + ([("ground truth: poisoned", truth)] if truth is not None else [])):
        ax.scatter(*points[~marked].T, s=size, c="#9aa5b1", linewidths=0)
        ax.scatter(*points[marked].T, s=size, c="#d64545", linewidths=0)
        ax.set_title(f"{title} ({int(marked.sum())})")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    return _to_png(fig)
