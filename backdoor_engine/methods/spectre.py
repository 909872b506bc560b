"""SPECTRE (Hayase, Kong, Somani and Oh, ICML 2021, "SPECTRE: Defending Against Backdoor Attacks Using Robust
Statistics"): per class (by the given label), project the centred penultimate features on their top k principal
directions, estimate the clean covariance robustly, whiten with it, score every sample by its QUantum Entropy (QUE)
score and remove the round(removal_factor x expected_rate x class size) highest scores. k is swept over a grid and
the k whose removal leaves the most "spiked" whitened spectrum is kept; the class whose statistic is highest is the
suspected target ("top", default), or every class's removal is flagged ("all").

Stages, each a plain function composed by `Spectre`:
  principal_coordinates   the class's centred features on its top principal directions (K = max_dims at most)
  dims_grid               k = round(linspace(1, sqrt(K), dims_tried)^2): 1, 4, 9, ..., 64 by default
  robust_covariance_filter  the DKK17 filter ("Being robust (in high dimensions) can be practical", Diakonikolas et
                          al. 2017) as the official dkk17.jl runs it: which samples to keep for the covariance
  que_matrix / que_scores M = exp(alpha (S - I) / (||S|| - 1)) / trace, S the whitened covariance; tau_i = x_i' M x_i
  quantum_filter          one k: filter, whiten the class with the kept samples' covariance, QUE-score, remove the top
  selection_statistic     tr(S' M) after that removal, in the K-dim space: the per-k and per-class statistic

What the reference code does (checked):
  Official code, SewoongLab/spectre-defense (Julia): quantum_filters.jl `rcov_auto_quantum_filter(reps, eps)` runs on
    the target class only (its label is read from the experiment name; eps = the true poison count). pca(reps, 100),
    then for k in round.(range(1, 10, length=10).^2) `rcov_quantum_filter(reps, eps, k)`: pca(reps, k) (centred by
    the class mean, util.jl); for k = 1 no whitening and score x^2; else `cov_estimation_iterate(reps_pca, eps/n,
    tau=0.1, limit=round(2 eps))` (dkk17.jl), Sigma = cov(kept, corrected=false), x <- Sigma^(-1/2) x for *every*
    sample (still centred by the plain class mean), S' = cov(whitened), M = exp(4 (S' - I)/(opnorm(S') - 1)) (the
    matrix exponential), M /= tr(M), remove the round(1.5 eps) highest x'Mx. k is chosen by re-whitening the 100-dim
    projection with the covariance (corrected) of the kept samples and maximising tr(S' M)/tr(M) of the result.
    dkk17.jl's filter: second moment S'S'/n of the current set (not re-centred), whiten; samples with
    |y|^2 >= 10 k log(n/tau) are removed at once ("early filter"); else the top eigenpair (lambda, V) of the
    k^2 x k^2 fourth-moment operator (1/n) sum (y(x)y)(y(x)y)' - vec(I)vec(I)' (KrylovKit eigsolve from ones());
    stop when lambda <= 1 + 10 eps log(1/eps)^2; else p_i = (y_i'Vy_i - tr V)/sqrt(2), d_i = |p_i - median p|, and
    with d sorted ascending, the first d_(i) with T = d_(i) - 3 > 0 and i/n >= tail(T) (tail = 1 for
    T <= 10 log(1/eps), else 3 eps/(T log T)^2) removes every d > T; at most `limit` samples in all.
  backdoor-toolbox cleansers_tool_box/spectre/{quantum_filters,dkk17,run_filters}.jl: the same Julia with pca(reps,
    64) and k in round.(range(1, 8, length=8).^2) = 1, 4, ..., 64, a 1e-8 I jitter, and it returns the chosen
    tr(S'M) (opnorm.npy); run on every class with eps = int(poison_rate x N) (the whole set's poison count) capped
    at 0.33 n (0.1 n for classes under 500, 0.1 n when 0); other_cleanser.py then keeps only the removal of the
    class with the highest statistic ("class with the highest score is suspected as the target class").
  BackdoorBench detection_pretrain/spectre.py + spectre_utils.py: a Python port of the same (PCA 64, 8 values of k,
    eps = percentile x N, percentile 0.01 in config/detection/spectre/*.yaml = 10% of a CIFAR-10 class, same caps),
    which flags every class's removal and only logs the argmax class. The port departs from the Julia it copies:
    np.exp instead of the matrix exponential for M, np.trace(S' * M) (elementwise) for the statistic, tail test
    1 - i/n >= tail(T) instead of i/n, np.cov(bias=False) where Julia has corrected=false, eigsh from a random
    start. vtu81's cleansers_tool_box/spectre_python.py is another variant (a robust *mean* filter, k <= 2,
    elementwise exp, every class flagged).
We follow the Julia code (matrix exponential, its tail rule and ddofs, limit 2 eps, k = 1 unwhitened, plain-mean
centring) with the toolbox's grid (PCA 64, 8 values of k). Where we differ, and why:
  - eps per class = expected_rate x class size (the project's rate, as `spectral`), not the whole set's poison
    count applied to every class; the 0.33 n cap stays as expected_rate <= 0.33, the 0.1 n cap for classes
    under 500 (which only tames that over-count in small classes) goes.
  - Robust estimator: the reference's own DKK17 filter, not sklearn's MinCovDet: MinCovDet is a different estimator
    (random subsets, breakdown 50%) and would not reproduce the reference's flags; the filter is deterministic.
    Its top eigenpair (FourthMoments) comes from a dense eigh for k <= 16, above from ARPACK (scipy eigsh, start
    ones as Julia's eigsolve) on the rows, O(n k) memory and O(n k^2) a product, and, once that has cost as much
    as forming it, on the k(k+1)/2-square moment matrix (35 MB at k = 64), downdated as rows leave (ski rental:
    3x faster on a heavy-tailed 6,000 x 512 class, where the filter makes ~100 passes at k >= 36).
  - M and tr(S'M) through the eigendecomposition of S' (the same matrix exponential, no overflow); when
    ||S'|| <= 1 (the reference divides by zero or flips the sign) M = I / k, i.e. the squared whitened norm.
  - Exactly round-half-up(1.5 eps) removed per class (Julia's k_lowest_ind also removes ties at the cut); ties are
    broken by row order. A whitening eigenvalue under 1e-12 of the largest is floored (Julia would fail).
  - K is capped by the class's rank and by n - max(limit, removal) - 1 so every covariance we invert is full rank;
    a class where that leaves no dimension (or with no variance) is skipped with a diagnostic.
Flags: "top" flags one class, also on clean data (the reference's rule picks the argmax whatever its value); the
statistic of every class is in the diagnostics to judge it. Scores are each class's QUE scores at its chosen k.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from ..cluster.validation import integer
from ..detection import Detection
from ..errors import InputError
from ..params import param
from .base import Detector, ReportParts, ScanData, class_matrix, class_rows, detector_input, per_class_input
from .spectral import removal_count

ASSUMED_RATE = 0.10  # BackdoorBench: percentile 0.01 x N = 10% of a CIFAR-10 class; the spectral default too
MAX_RATE = 0.33  # run_filters.jl (backdoor-toolbox) and BackdoorBench cap eps at 0.33 n
FLAG_RULES = ("top", "all")
FIGURE_TITLE = "SPECTRE: QUE scores per class at the chosen dimension, removal threshold dashed"
MAX_PANELS = 9
# dkk17.jl's constants (cov_estimation_filter): C = 10, C' = 0, shift 3, tau = 0.1 (quantum_filters.jl).
FILTER_C = 10.0
FILTER_SHIFT = 3.0
FILTER_TAU = 0.1
DENSE_OPERATOR_MAX_K = 16  # up to k = 16 the k^2 x k^2 fourth-moment operator is formed and solved exactly
RANK_TOLERANCE = 1e-6  # a principal direction under this share of the top singular value carries no variance


@dataclass(frozen=True)
class SpectreParams:
    expected_rate: float | None = param(None, "official code: unset = 0.10 assumed, BackdoorBench's "
                                        "config/detection/spectre percentile 0.01 x N = 10% of a CIFAR-10 class; "
                                        "eps = expected_rate x class size; the flags depend on it: give your own")
    removal_factor: float = param(1.5, "paper: remove the 1.5 eps n highest QUE scores (quantum_filters.jl "
                                  "limit2=1.5)")
    alpha: float = param(4.0, "paper: QUE score alpha = 4 (quantum_filters.jl alpha=4)")
    max_dims: int = param(64, "official code: backdoor-toolbox quantum_filters.jl and BackdoorBench "
                          "detection_pretrain/spectre.py PCA to 64 dims (SewoongLab's own run: 100)")
    dims_tried: int = param(8, "official code: k = round(linspace(1, sqrt(max_dims), 8)^2) = 1, 4, ..., 64 "
                            "(backdoor-toolbox, BackdoorBench; SewoongLab: 10 values up to 100)")
    filter_limit: float = param(2.0, "official code: quantum_filters.jl limit1=2, the robust covariance filter "
                                "drops at most 2 eps n samples")
    flag_classes: str = param("top", "official code: backdoor-toolbox other_cleanser.py keeps only the class with "
                              "the highest statistic; 'all' = BackdoorBench detection_pretrain/spectre.py, every "
                              "class's removal", choices=FLAG_RULES)

    def __post_init__(self):
        if self.expected_rate is not None:
            if isinstance(self.expected_rate, bool) or not isinstance(self.expected_rate, (int, float)):
                raise InputError(f"expected_rate must be a number in (0, {MAX_RATE}] or null, "
                                 f"got {self.expected_rate!r}")
            if not 0 < self.expected_rate <= MAX_RATE:
                raise InputError(f"expected_rate must be in (0, {MAX_RATE}] (the reference caps eps at 0.33 n: "
                                 f"the robust filter needs a clean majority), got {self.expected_rate}")
            object.__setattr__(self, "expected_rate", float(self.expected_rate))
        if not self.removal_factor > 0:
            raise InputError(f"removal_factor must be > 0, got {self.removal_factor}")
        if not self.alpha > 0:
            raise InputError(f"alpha must be > 0, got {self.alpha}")
        if not self.filter_limit >= 0:
            raise InputError(f"filter_limit must be >= 0, got {self.filter_limit}")
        integer(self.max_dims, "max_dims", 1)
        integer(self.dims_tried, "dims_tried", 1)

    @property
    def rate(self) -> float:
        """The poison rate used: the user's, else ASSUMED_RATE."""
        return ASSUMED_RATE if self.expected_rate is None else self.expected_rate


@dataclass
class FilterOutcome:
    """What the robust covariance filter did: the rows it keeps, how many passes, why it stopped."""

    keep: np.ndarray
    iterations: int = 0
    stop: str = "no filter"  # converged | no threshold | limit reached | stalled | no filter

    @property
    def n_filtered(self) -> int:
        return int((~self.keep).sum())


@dataclass
class ClassSpectre:
    """One class's fit: rows, the k grid and statistic per k, the chosen k, its QUE scores and removal."""

    label: int
    rows: np.ndarray
    dims: int = 0
    statistics: dict = field(default_factory=dict)  # {k: tr(S'M) after that k's removal}
    chosen_k: int | None = None
    statistic: float | None = None
    scores: np.ndarray | None = None
    removed: np.ndarray | None = None  # bool, the chosen k's removal (flagged when the class is flagged)
    n_removed: int = 0
    threshold: float | None = None
    filter: FilterOutcome | None = None
    flagged: bool = False
    skipped: str | None = None


def principal_coordinates(X: np.ndarray, dims: int) -> tuple[np.ndarray, np.ndarray]:
    """(X - class mean) on its top `dims` principal directions, and all singular values of the centred matrix.
    Through the D x D Gram matrix when there are more rows than columns, else a thin SVD; O(n D) memory."""
    centred = X - X.mean(axis=0)
    if len(X) > X.shape[1]:
        eigenvalues, vectors = np.linalg.eigh(centred.T @ centred)
        singular = np.sqrt(np.clip(eigenvalues[::-1], 0, None))
        basis = vectors[:, ::-1][:, :dims]
    else:
        _, singular, vt = np.linalg.svd(centred, full_matrices=False)
        basis = vt[:dims].T
    # A fixed sign per direction (largest entry positive) so the coordinates do not depend on the LAPACK path.
    signs = np.sign(basis[np.abs(basis).argmax(axis=0), np.arange(basis.shape[1])])
    return centred @ (basis * np.where(signs == 0, 1.0, signs)), singular


def dims_grid(max_dims: int, count: int) -> list[int]:
    """round(linspace(1, sqrt(max_dims), count)^2), rounded half to even as Julia's round, without repeats."""
    values = np.round(np.linspace(1.0, math.sqrt(max_dims), count) ** 2).astype(int)
    return sorted({int(v) for v in np.clip(values, 1, max_dims)})


def inverse_sqrt(sigma: np.ndarray) -> np.ndarray:
    """The symmetric inverse square root of a covariance; eigenvalues under 1e-12 of the largest are floored."""
    values, vectors = np.linalg.eigh((sigma + sigma.T) / 2)
    top = float(values.max())
    if not top > 0:
        raise InputError("SPECTRE: a covariance to whiten with has no positive eigenvalue")
    values = np.maximum(values, 1e-12 * top)
    return (vectors / np.sqrt(values)) @ vectors.T


def _lowest(values: np.ndarray, count: int) -> np.ndarray:
    """Julia's k_lowest_ind: values <= the count-th smallest (ties at the cut included); none when count is 0."""
    if count <= 0:
        return np.zeros(len(values), bool)
    return values <= np.partition(values, count - 1)[count - 1]


class FourthMoments:
    """The top eigenpair of dkk17.jl's operator T = (1/n) sum_i z_i z_i' - e e', z_i = y_i (x) y_i, e = vec(I), for
    the filter's successive passes over shrinking row sets. Worked in the basis of symmetric k x k matrices
    (m = k(k+1)/2 coordinates, svec: off-diagonal entries x sqrt(2), an isometry), where T's top eigenvector lies.
    k <= 16: T formed and solved exactly. Larger k: Lanczos (ARPACK, start ones as the reference's eigsolve) on the
    rows, O(n k^2) a product; once that has cost as much as forming the raw moment matrix F = sum_i svec(s_i s_i')
    svec(s_i s_i')' (m x m, O(n m^2)), F is formed and downdated as rows leave, and a product costs O(m^2 + k^3)
    (T = L_A F L_A / n - e e', L_A: V -> A V A, A the whitening). Memory O(n m) for k <= 16, else O(n k + m^2)."""

    def __init__(self, k: int):
        self.k = k
        self.upper = np.triu_indices(k)
        self.weights = np.where(self.upper[0] == self.upper[1], 1.0, math.sqrt(2))
        self.m = len(self.weights)
        self.identity = self.svec(np.eye(k))
        self.moments = None  # F once formed
        self.spent = 0.0  # flops spent on row-wise products so far

    def svec(self, V: np.ndarray) -> np.ndarray:
        return V[self.upper] * self.weights

    def smat(self, u: np.ndarray) -> np.ndarray:
        V = np.zeros((self.k, self.k))
        V[self.upper] = u / self.weights
        return V + np.triu(V, 1).T

    def lift(self, rows: np.ndarray) -> np.ndarray:
        """svec(r r') of every row r: len(rows) x m."""
        return rows[:, self.upper[0]] * rows[:, self.upper[1]] * self.weights

    def remove(self, rows: np.ndarray) -> None:
        """Rows leave the set: downdate F, or drop it when they carried nearly all of it (cancellation)."""
        if self.moments is not None:
            lifted = self.lift(rows)
            if (lifted * lifted).sum() > 0.999 * np.trace(self.moments):
                self.moments = None
            else:
                self.moments -= lifted.T @ lifted

    def top(self, current: np.ndarray, whiten: np.ndarray, Y: np.ndarray) -> tuple[float, np.ndarray]:
        """(lambda, V): T's top eigenvalue and eigenvector as a symmetric k x k matrix of unit Frobenius norm, for
        the rows `current`, their whitening `whiten` and whitened rows Y = current @ whiten."""
        n, k, m = len(Y), self.k, self.m
        if k <= DENSE_OPERATOR_MAX_K:
            Z = self.lift(Y)
            values, vectors = np.linalg.eigh(Z.T @ Z / n - np.outer(self.identity, self.identity))
            return float(values[-1]), self.smat(vectors[:, -1])
        from scipy.sparse.linalg import LinearOperator, eigsh

        # Ski rental: form F once the row-wise products have cost as much, if a product through F is at least
        # twice as cheap (2 m^2 against 4 n k^2 flops; F is read from memory at every product).
        if self.moments is None and self.spent >= 2.0 * n * m * m and m * m <= n * k * k:
            self.moments = np.zeros((m, m))
            for start in range(0, n, 1024):  # in blocks: never an n x m matrix
                lifted = self.lift(current[start:start + 1024])
                self.moments += lifted.T @ lifted
        calls = [0]
        if self.moments is not None:
            def apply(u):
                inner = self.svec(whiten @ self.smat(u) @ whiten)
                outer = self.svec(whiten @ self.smat(self.moments @ inner / n) @ whiten)
                return outer - self.identity * (self.identity @ u)
        else:
            def apply(u):
                calls[0] += 1
                V = self.smat(u)
                quadratic = ((Y @ V) * Y).sum(axis=1)  # y_i' V y_i, no n x m matrix
                return self.svec((Y.T * quadratic) @ Y / n) - self.identity * np.trace(V)

        operator = LinearOperator((m, m), matvec=apply, rmatvec=apply, dtype=np.float64)
        values, vectors = eigsh(operator, k=1, which="LA", v0=self.svec(np.ones((k, k))))
        self.spent += calls[0] * 4.0 * n * k * k
        return float(values[0]), self.smat(vectors[:, 0])


def _tail_threshold(diffs: np.ndarray, eps: float) -> float | None:
    """dkk17.jl's cut: with d sorted ascending, the first d_(i) > shift whose T = d_(i) - 3 satisfies
    i / n >= tail(T) (tail = 1 for T <= 10 log(1/eps), else 3 eps / (T log T)^2); returns T or None."""
    ordered = np.sort(diffs)
    n = len(ordered)
    T = ordered - FILTER_SHIFT
    positive = T > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        tail = np.where(T <= FILTER_C * math.log(1 / eps), 1.0, 3 * eps / (T * np.log(T)) ** 2)
    hits = np.flatnonzero(positive & (np.arange(1, n + 1) / n >= tail))
    return None if len(hits) == 0 else float(T[hits[0]])


def robust_covariance_filter(S: np.ndarray, eps: float, limit: int) -> FilterOutcome:
    """dkk17.jl cov_estimation_iterate: filter rows of S (n x k, centred) until the whitened fourth moment looks
    Gaussian, no cut is found, or `limit` rows are gone. eps: the poison fraction (0 < eps < 1)."""
    n0, k = S.shape
    index = np.arange(n0)
    remaining, iterations, stop = int(limit), 0, "limit reached"
    bound = 1 + FILTER_C * eps * math.log(1 / eps) ** 2
    current, moments = S, FourthMoments(k)
    while remaining > 0:
        n = len(current)
        whiten = inverse_sqrt(current.T @ current / n)
        Y = current @ whiten
        norms = (Y * Y).sum(axis=1)
        outlying = norms >= FILTER_C * k * math.log(n / FILTER_TAU)
        if outlying.any():
            scores, remove = norms, outlying
        else:
            lam, V = moments.top(current, whiten, Y)
            if lam <= bound:
                stop = "converged"
                break
            p = (((Y @ V) * Y).sum(axis=1) - np.trace(V)) / math.sqrt(2)
            diffs = np.abs(p - np.median(p))
            threshold = _tail_threshold(diffs, eps)
            if threshold is None:
                stop = "no threshold"
                break
            scores, remove = diffs, diffs > threshold
        remove &= ~_lowest(scores, n - remaining)  # never past the limit
        removed = int(remove.sum())
        if removed == 0:  # only ties at the cut were left to remove: the reference would loop forever
            stop = "stalled"
            break
        moments.remove(current[remove])
        current, index = current[~remove], index[~remove]
        remaining -= removed
        iterations += 1
    keep = np.zeros(n0, bool)
    keep[index] = True
    return FilterOutcome(keep, iterations, stop if limit > 0 else "no filter")


def que_matrix(sigma: np.ndarray, alpha: float) -> np.ndarray:
    """M = exp(alpha (sigma - I) / (||sigma||_2 - 1)) / its trace (matrix exponential), through the eigenvectors
    of sigma; M = I / k when ||sigma|| <= 1, where the formula has no meaning."""
    values, vectors = np.linalg.eigh((sigma + sigma.T) / 2)
    top = float(values.max())
    if top - 1 > 1e-12:
        weights = np.exp(alpha * (values - top) / (top - 1))  # the common factor exp(alpha) cancels in M / tr M
    else:
        weights = np.ones_like(values)
    weights /= weights.sum()
    return (vectors * weights) @ vectors.T


def que_scores(W: np.ndarray, M: np.ndarray) -> np.ndarray:
    """tau_i = w_i' M w_i for every row w_i of the whitened coordinates W."""
    return ((W @ M) * W).sum(axis=1)


def _covariance(X: np.ndarray, ddof: int) -> np.ndarray:
    centred = X - X.mean(axis=0)
    return centred.T @ centred / (len(X) - ddof)


def quantum_filter(coords: np.ndarray, eps: float, n_remove: int, limit: int,
                   alpha: float) -> tuple[np.ndarray, np.ndarray, FilterOutcome]:
    """quantum_filters.jl rcov_quantum_filter for one k (coords: n x k, centred): (QUE scores, removed rows as a
    bool mask, the filter's outcome). k = 1: the squared coordinate, unwhitened, as the reference."""
    n, k = coords.shape
    if k == 1:
        outcome = FilterOutcome(np.ones(n, bool))
        scores = coords[:, 0] ** 2
    else:
        outcome = robust_covariance_filter(coords, eps, limit)
        W = coords @ inverse_sqrt(_covariance(coords[outcome.keep], ddof=0))
        scores = que_scores(W, que_matrix(_covariance(W, ddof=1), alpha))
    removed = np.zeros(n, bool)
    removed[np.argsort(-scores, kind="stable")[:n_remove]] = True
    return scores, removed, outcome


def selection_statistic(coords: np.ndarray, keep: np.ndarray, alpha: float) -> float:
    """tr(S' M) with M = que_matrix(S'), S' = the K-dim class covariance whitened by the kept rows' covariance
    (rcov_auto_quantum_filter's criterion; high when the removal left a spike the kept rows do not explain)."""
    whiten = inverse_sqrt(_covariance(coords[keep], ddof=1))
    sigma = whiten @ _covariance(coords, ddof=1) @ whiten
    return float(np.trace(sigma @ que_matrix(sigma, alpha)))


def spectre_class(X: np.ndarray, result: ClassSpectre, p: SpectreParams) -> None:
    """Fill `result` for one class's features X (n x D, float64, finite)."""
    n = len(X)
    n_remove = removal_count(n, p.rate, p.removal_factor)
    limit = removal_count(n, p.rate, p.filter_limit)
    if n < 2:
        result.skipped = "a single sample: no direction to project on"
        return
    coords, singular = principal_coordinates(X, p.max_dims)
    if not singular[0] > 1e-12 * max(1.0, float(np.abs(X).max())):
        result.skipped = "every sample has the same features (no variance)"
        return
    rank = int((singular > RANK_TOLERANCE * singular[0]).sum())
    result.dims = min(p.max_dims, rank, n - max(limit, n_remove) - 1)
    if result.dims < 1:
        result.skipped = (f"{n} samples: too few to keep a full-rank covariance after removing up to "
                          f"{max(limit, n_remove)}")
        return
    coords = coords[:, :result.dims]
    best = None
    for k in dims_grid(result.dims, p.dims_tried):
        scores, removed, outcome = quantum_filter(coords[:, :k], p.rate, n_remove, limit, p.alpha)
        statistic = selection_statistic(coords, ~removed, p.alpha)
        result.statistics[k] = statistic
        if best is None or statistic > best[0]:  # the first k wins ties, as the reference's `>`
            best = (statistic, k, scores, removed, outcome)
    result.statistic, result.chosen_k, result.scores, result.removed, result.filter = best
    result.n_removed = n_remove
    result.threshold = float(result.scores[result.removed].min()) if n_remove else None


class Spectre(Detector):
    """SPECTRE, the registered `spectre` detector (cuML/sklearn style).

        detection = Spectre(expected_rate=0.05).fit(penultimate, y)
        spectre.classes_ ({label: ClassSpectre}), spectre.flags_, spectre.scores_, spectre.flagged_classes_
    """

    name = "spectre"
    summary = ("SPECTRE: per class, robust covariance (DKK17 filter) whitening of the top-k PCA features and "
               "QUantum Entropy scores; removes 1.5 x expected_rate of the class with the highest statistic "
               "(Hayase et al. 2021)")
    params_class = SpectreParams
    needs = frozenset({"penultimate"})
    seed_param = None  # deterministic: nothing is drawn at random

    def fit(self, features, y) -> Detection:
        """features: N x D penultimate features (float, in memory or memory-mapped); y: N labels (ints)."""
        p = self.params
        n, y = per_class_input(features, y)
        began = time.perf_counter()
        flags, scores = np.zeros(n, bool), np.zeros(n, np.float64)
        self.classes_ = {}
        for label, rows in class_rows(y).items():
            result = ClassSpectre(label, rows)
            self.classes_[label] = result
            X = class_matrix(features, rows, label)
            spectre_class(X, result, p)
            if result.skipped is None:
                scores[rows] = result.scores
        scanned = [c for c in self.classes_.values() if c.skipped is None]
        if p.flag_classes == "all":
            chosen = scanned
        else:
            chosen = [max(scanned, key=lambda c: c.statistic)] if scanned else []  # first of equals: lowest label
        for result in chosen:
            result.flagged = True
            flags[result.rows[result.removed]] = True
        self.flags_, self.scores_ = flags, scores
        self.flagged_classes_ = [c.label for c in chosen]
        return Detection(self.name, flags, params=asdict(p), scores=scores,
                         diagnostics=self._diagnostics(n, flags, time.perf_counter() - began))

    def _diagnostics(self, n: int, flags: np.ndarray, seconds: float) -> dict:
        p = self.params
        per_class = {}
        for label, c in self.classes_.items():
            if c.skipped is not None:
                per_class[str(label)] = {"n": len(c.rows), "skipped": c.skipped}
                continue
            per_class[str(label)] = {
                "n": len(c.rows), "expected_poison": p.rate * len(c.rows), "removal_budget": c.n_removed,
                "n_flagged": c.n_removed if c.flagged else 0, "flagged": c.flagged, "threshold": c.threshold,
                "dims": c.dims, "chosen_k": c.chosen_k, "statistic": c.statistic,
                "statistic_by_k": {str(k): v for k, v in c.statistics.items()},
                "filter": {"n_filtered": c.filter.n_filtered, "iterations": c.filter.iterations,
                           "stop": c.filter.stop}}
        skipped = [label for label, c in self.classes_.items() if c.skipped]
        assumed = p.expected_rate is None
        rate_text = (f"no expected_rate given: {p.rate:.0%} assumed (BackdoorBench's default)" if assumed
                     else f"expected_rate {p.rate:g}")
        if p.flag_classes == "all":
            rule = "every class's removal is flagged"
        elif self.flagged_classes_:
            rule = (f"class {self.flagged_classes_[0]} has the highest statistic and only its removal is flagged "
                    "(one class is flagged whatever the statistic, also on clean data)")
        else:
            rule = "no class could be scanned"
        explanation = (f"SPECTRE removes the top {p.removal_factor:g} x {p.rate:.2%} = "
                       f"{p.removal_factor * p.rate:.2%} of a class by QUE score ({rate_text}); {rule}: "
                       f"{int(flags.sum())} of {n} samples flagged")
        if skipped:
            explanation += f"; {len(skipped)} class(es) skipped (too few samples or no variance)"
        return {"explanation": explanation, "expected_rate": p.rate, "rate_assumed": assumed,
                "rate_source": "assumed: BackdoorBench's default, 10% of a class" if assumed else "given by the user",
                "removal_share": p.removal_factor * p.rate, "flag_classes": p.flag_classes,
                "flagged_classes": list(self.flagged_classes_), "classes": per_class, "skipped_classes": skipped,
                "score": "QUE score w' M w, w = robustly whitened top-k PCA coordinates of the class, "
                         "M = exp(alpha (S - I)/(||S|| - 1)) / tr, at the class's chosen k (k = 1: the squared "
                         "coordinate); 0 for skipped classes",
                "statistic": "tr(S' M) of the K-dim class covariance whitened by the kept samples' covariance; "
                             "the k and the class with the highest value are chosen",
                "timings_s": {"spectre": seconds}}

    def fit_scan(self, data: ScanData) -> Detection:
        return self.fit(detector_input(data, "penultimate"), data.y)

    def report(self, detection: Detection, rows, out_dir) -> ReportParts:
        d = detection.diagnostics
        notes = [d["explanation"]]
        if d["rate_assumed"]:
            notes.append(f"Assumed poison rate: {d['expected_rate']:.0%} (BackdoorBench's default), because no "
                         "expected_rate was given. SPECTRE removes a fixed share of the flagged class(es), so a "
                         "different rate flags a different number of samples: pass --param expected_rate=R "
                         "(API: expected_rate=R) with your own estimate.")
        parts = ReportParts(notes=notes)
        if out_dir is None or not hasattr(self, "classes_"):
            return parts
        scanned = [c for c in self.classes_.values() if c.skipped is None]
        scanned.sort(key=lambda c: -c.statistic)  # the suspected target first
        if scanned:
            truth = None if rows.poison is None else np.asarray(rows.poison).astype(bool)
            parts.figures.append((FIGURE_TITLE, histograms_png(scanned[:MAX_PANELS], truth)))
        return parts


def histograms_png(classes: list[ClassSpectre], truth: np.ndarray | None) -> bytes:
    """Per-class QUE score histograms; the removal threshold dashed for a flagged class, dotted for a class whose
    removal budget was not flagged."""
    from ..report.figures import class_histograms_png

    panels = [{"title": f"class {r.label}: n={len(r.rows)}, k={r.chosen_k}, stat {r.statistic:.3g}",
               "scores": r.scores, "rows": r.rows, "threshold": r.threshold,
               "threshold_style": "--" if r.flagged else ":",
               "threshold_label": f"{'removal' if r.flagged else 'not flagged'}: top {r.n_removed}"}
              for r in classes]
    return class_histograms_png(panels, truth, xlabel="QUE score")
