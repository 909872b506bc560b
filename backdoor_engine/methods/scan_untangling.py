"""SCAn (Tang, Wang, Tang and Zhang, USENIX Security 2021, "Demon in the Variant: Statistical Analysis of DNNs for
Robust Backdoor Contamination Detection"): a penultimate feature is modelled as x = identity of its class + a
variation shared by all classes, identity ~ N(0, S_u), variation ~ N(0, S_e). S_u and S_e are estimated on a
small clean reference set the user vouches for (`scan --clean`); then every class of the suspect set is split in
two ("untangled") and tested: a class whose two-identity model fits much better than the one-identity model (its
statistic J is an outlier among the classes by median/MAD) is flagged, with the samples of the subgroup that
holds fewer of the class's reference samples.

Stages, each a plain function composed by `Scan`:
  reference_subspace  the directions where the reference set varies within its classes (all D unless the set
                      is smaller than D + K or has constant features), so that S_e is invertible there
  global_model        EM (the Joint-Bayesian one the reference code uses) for S_u, S_e on the reference set:
                      E-step = posterior class identities, M-step = their covariance and that of the residuals
  untangle            one class (suspect + reference rows): two-means under the Mahalanobis metric S_e^-1,
                      started from a random split, until the split stops changing
  split_statistic     J = mean over the class of |x - identity|^2 - |x - own subgroup mean|^2 (metric S_e^-1)
  anomaly_scores      |J - median| / (1.4826 MAD) over the scanned classes (upper tail by default)
  candidate_subgroup  the subgroup holding fewer of the class's reference samples
  reference_share_p   (ours) whether that subgroup holds fewer reference samples than its share of the class's
                      suspect samples predicts: a benign split holds its share, an injected subgroup none

What the reference code does (checked):
  Authors' code, TDteach/Demon-in-the-Variant pysrc/SCAn.py (a translation of msrc/global_model.m,
    local_model.m, calc_anomaly_index.m, SCAn.m): build_global_model = the EM above, stopping when
    |dS_u|_F + |dS_e|_F <= 1e-2 (absolute) or after 100 iterations; build_local_model centres the features by
    their own mean, find_split = the two-means from np.random.rand(N) >= 0.5 (at most 100 steps), calc_test = J
    with identity = S_e (N S_u + S_e)^+ sum(x); calc_final_score = |y - median(y)| / (1.4826 median|y - median|)
    with y = J / max(J). It sets no threshold (msrc/SCAn_test.m reads thresholds off an ROC against ground truth).
  BackdoorBench detection_pretrain/scan.py: the same class (EPS 1e-5); the global model on `clean_sample_num`
    clean test images, the local model on the training set's features followed by the clean ones, threshold
    np.exp(2), and in a flagged class the training samples of the subgroup with fewer clean samples are flagged
    (`if len(cluster_0_clean) < len(cluster_1_clean)` flag subgroup 0, else subgroup 1). Its count uses
    `tar[index] > size_inspection_set`, so the first clean sample is counted as a training sample.
  backdoor-toolbox cleansers_tool_box/scan.py: the same code and rule with threshold np.e (and `class_score[k] =
    [k, i_sc, ...]` with a 1 x 1 i_sc, which fails on numpy >= 1.25 where BackdoorBench writes i_sc[0][0]).

Where we differ, and why:
  - threshold: e^2 as BackdoorBench, not backdoor-toolbox's e: on 40 clean planted sets of 10 classes, 9 of the 400
    clean classes scored above e (each flag costs about half of a clean class), 1 above e^2; 5-10% poisons scored
    15 or more.
  - identity (null_identity): the authors' calc_test drops the S_u S_e^-1 factor their own global E-step has, so
    its "identity" is S_e (N S_u + S_e)^-1 sum(x), which along every direction S_u does not span is sum(x) = N x the
    class mean: J then grows with N^2 x the part of the class mean outside the reference's between-class span and
    swamps the two-subgroup term. Measured on planted Gaussian data (10 classes of 340, a 10% poison shifted by 11
    standard deviations, 40 reference samples per class), the authors' J put the poisoned class at MAD scores 0.8,
    5.8 and 6.2 over three seeds, never above e^2, and flagged no poison. The default ("posterior") uses the
    posterior identity of the global model's own E-step, S_u (N S_u + S_e)^-1 sum(x); "official" reproduces theirs.
  - tail: a class with an unusually *low* J is more unimodal than the others, not evidence of a second population;
    the authors' two-sided |J - median| would flag it and then half of a clean class. We score the upper tail
    (msrc/calc_anomaly_index.m keeps this one-sided form, max(0, a - ma) / mm, commented out); "both" = theirs.
  - the global EM stops on a *relative* change (tol), so that when it stops does not depend on the scale of the
    features: measured on planted 32-dimensional features scaled by 0.01, 1 and 10, BackdoorBench's absolute 1e-5
    stopped after 2, 3 and 4 iterations, the authors' 1e-2 after 1, 2 and 3, tol=1e-6 after 3 at every scale.
  - matrices: each EM iteration is one Cholesky of S_e and a rank-(K-1) eigenproblem (S_u is the covariance of K
    class identities) instead of K pseudo-inverses of D x D matrices and a D x D product per sample: D = 512 runs in
    milliseconds per iteration. Where S_e is singular (see reference_subspace) the reference's pseudo-inverses act
    on S_e's range; we restrict to the range of the reference's within-class scatter. With constant (dead) features
    both give the same splits and scores (measured: 4 dead of 32); with a reference set smaller than D + K the
    reference's S_e picks up further directions from its EM and the two differ (30 reference samples for 32
    dimensions: different splits in 9-10 of 10 classes): give SCAn more than D + K reference samples.
  - the subgroup means of the statistic are those of the split returned (the reference keeps the means of the
    step before, different only if the loop hit its cap or swapped every label); a class whose split ends with one
    side empty (no subgroup) is scored but none of its samples flagged.
  - ties in the reference count (e.g. a class with no reference sample) flag the smaller suspect subgroup, not
    subgroup 1; the first reference sample is not counted as a suspect one.
  - the reference-share check (reference_alpha, ours): the reference codes flag every class scoring above the
    threshold. A class whose suspect samples fall into two benign sub-populations (bags with and without handles)
    can score there too, and then the reference samples split in the same proportion: measured on a clean 10k
    Fashion-MNIST model, class 8 scored 10.2 > e^2 and its candidate subgroup held 404 of 996 suspect samples and
    16 of 50 reference samples (20 expected), while the poisoned classes' candidates held 0 of 50. A flagged class
    stays flagged only if P(Bin(n_reference, suspect share) <= candidate's reference count), doubled because the
    candidate is whichever side holds fewer, is below reference_alpha. Where even a candidate without any
    reference sample could not reach that (too few reference samples in the class, none included), the check
    cannot tell and the class is flagged on its score alone, as in the reference codes.
  - only the classes of the suspect set are scored; a median/MAD over fewer than 3 classes (or MAD = 0) does not
    normalise anything, so then no class is flagged and the diagnostics say why.
Randomness: the untangling starts from numpy's legacy RandomState(seed).rand(n) drawn class by class in label
order, exactly as the reference's np.random.rand after np.random.seed(seed), so a run is repeatable and, with
null_identity="official" and tail="both", gives the reference's splits and scores (and with reference_alpha=None
its flags). Per-sample output: `scores` = the class's score for the suspect samples of its candidate subgroup, 0
elsewhere (flags = scores > threshold, except in the classes the reference-share check cleared); `clusters` =
2 x label + 1 for the candidate subgroup, 2 x label for the other subgroup, -1 for a skipped class.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np

from ..detection import Detection
from ..errors import InputError
from ..params import param
from .base import Detector, ReportParts, ScanData, class_rows, detector_input, per_class_input

TAILS = ("upper", "both")
IDENTITIES = ("posterior", "official")
MAD_SCALE = 1.4826  # the normal-consistent MAD factor of calc_anomaly_index
MIN_CLASSES = 3  # a median/MAD over fewer classes says nothing
# Directions where the reference varies less than this fraction of its largest within-class variance are dropped:
# numerically they are rounding noise, and S_e must stay safely invertible (the reference's pinv cuts at ~D x eps).
SUBSPACE_RTOL = 1e-10
FIGURE_TITLE = "SCAn: per-class anomaly score of the untangling statistic J, threshold dashed"
CHUNK = 8192


@dataclass(frozen=True)
class ScanParams:
    threshold: float = param(math.exp(2), "official code: BackdoorBench detection_pretrain/scan.py threshold = "
                             "np.exp(2); backdoor-toolbox cleansers_tool_box/scan.py uses np.e, the authors' "
                             "pysrc/SCAn.py sets none. e^2 because a falsely flagged class costs about half of a "
                             "clean class in false positives: on 40 clean planted sets of 10 classes 9 of the 400 "
                             "classes scored above e, 1 above e^2, while 5-10% poisons scored 15 or more")
    tail: str = param("upper", "ours: only an unusually high J (a class that splits in two) is evidence of poison; "
                      "'both' = the authors' |J - median| (pysrc/SCAn.py calc_anomaly_index), whose one-sided form "
                      "msrc/calc_anomaly_index.m keeps commented out", choices=TAILS)
    null_identity: str = param("posterior", "ours: the one-identity model's identity = the global model's own "
                               "posterior S_u (N S_u + S_e)^-1 sum(x); 'official' = the authors' calc_test, "
                               "S_e (N S_u + S_e)^+ sum(x), whose J grows with N^2 and missed a planted poison "
                               "(module docstring)", choices=IDENTITIES)
    max_iter: int = param(100, "official code: pysrc/SCAn.py, BackdoorBench and backdoor-toolbox stop the global "
                          "EM and the untangling after 100 iterations")
    tol: float = param(1e-6, "ours: the global EM stops when |dS_u|_F + |dS_e|_F <= tol x (|S_u|_F + |S_e|_F), "
                       "scale-free; the reference codes use an absolute 1e-5 (BackdoorBench, backdoor-toolbox) or "
                       "1e-2 (pysrc/SCAn.py, msrc/global_model.m)")
    reference_alpha: float | None = param(
        0.05, "ours: a class scoring above the threshold is flagged only if its candidate subgroup holds "
        "significantly fewer reference samples than its share of the class's suspect samples predicts (one-sided "
        "binomial, doubled for picking the side with fewer; p < reference_alpha), where the class has enough "
        "reference samples to tell; measured: a clean model's benign class scored 10.2 > e^2 with its candidate "
        "holding 16 of 50 reference samples (p 0.28), poisoned classes' candidates 0 of 50. 0.05 keeps a 2% "
        "all-to-one poison whose subgroup took in 2 of 50 clean reference samples flagged (p 0.013); None = the "
        "reference codes' rule, the score alone")
    seed: int = param(0, "ours: the untangling starts from a random split (the reference's unseeded np.random.rand; "
                      "BackdoorBench fixes random_seed 0); seed s gives the reference's start after np.random.seed(s)")

    def __post_init__(self):
        if not self.threshold > 0:
            raise InputError(f"threshold must be > 0, got {self.threshold}")
        if self.max_iter < 1:
            raise InputError(f"max_iter must be >= 1, got {self.max_iter}")
        if not 0 < self.tol < 1:
            raise InputError(f"tol must be in (0, 1), got {self.tol}")
        if self.reference_alpha is not None and not 0 < self.reference_alpha < 1:
            raise InputError(f"reference_alpha must be in (0, 1) or None, got {self.reference_alpha}")
        if not 0 <= self.seed < 2 ** 32:
            raise InputError(f"seed must be in [0, 2^32), got {self.seed}")


@dataclass
class GlobalModel:
    """S_u, S_e (r x r, in the coordinates of `basis`), the reference mean, the EM's iteration count."""

    Su: np.ndarray
    Se: np.ndarray
    Su_factor: np.ndarray  # K x r, S_u = Su_factor^T Su_factor
    mean: np.ndarray
    basis: np.ndarray | None  # D x r orthonormal columns, or None: all D directions
    iterations: int
    converged: bool
    n_reference: int
    reference_classes: dict


@dataclass
class ClassSplit:
    """One class's untangling: its suspect rows, the split of suspect + reference rows, J and its score."""

    label: int
    rows: np.ndarray
    n_reference: int
    groups: np.ndarray | None = None  # bool over suspect rows then reference rows: True = subgroup 1
    candidate: int | None = None  # 0 or 1: the subgroup flagged if the class is; None = no split
    J: float | None = None
    score: float | None = None
    steps: int = 0
    converged: bool = False
    flagged: bool = False
    skipped: str | None = None
    reference_p: float | None = None  # reference_share_p of the candidate; None where there is no candidate
    reference_floor: float | None = None  # the p a candidate without reference samples would get
    cleared: bool = False  # scored above the threshold, but its candidate held its share of the reference

    def sizes(self) -> dict:
        """Suspect and reference samples in the candidate and the other subgroup."""
        n = len(self.rows)
        suspect, reference = self.groups[:n], self.groups[n:]
        pick = bool(self.candidate) if self.candidate is not None else True
        return {"candidate": int((suspect == pick).sum()), "candidate_reference": int((reference == pick).sum()),
                "other": int((suspect != pick).sum()), "other_reference": int((reference != pick).sum())}


def reference_subspace(scatter: np.ndarray, scale: float) -> np.ndarray | None:
    """Orthonormal D x r basis of the within-class scatter's range: eigenvalues above SUBSPACE_RTOL x `scale` (the
    total scatter's mean variance) and x its own largest; None when that is every direction."""
    values, vectors = np.linalg.eigh(scatter)
    keep = values > SUBSPACE_RTOL * max(values[-1], scale)
    if not keep.any():
        raise InputError("the clean reference set shows no variation within its classes (every class holds one "
                         "sample or identical features): SCAn cannot estimate S_e from it")
    return None if keep.all() else vectors[:, keep]


def _identity_shrinkage(Su_factor: np.ndarray, L: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(Q, lam): the whitened S_u, L^-1 S_u L^-T = Q diag(lam) Q^T on its non-zero eigenvalues, where S_e = L L^T and
    S_u = Su_factor^T Su_factor (K x r: S_u is the covariance of K class identities, rank K - 1 at most), so a thin
    SVD of an r x K matrix gives it."""
    from scipy.linalg import solve_triangular

    Q, singular, _ = np.linalg.svd(solve_triangular(L, Su_factor.T, lower=True), full_matrices=False)
    lam = singular ** 2
    keep = lam > len(L) * np.finfo(np.float64).eps * max(lam.max(initial=0.0), 0.0)
    return Q[:, keep], lam[keep]


def global_model(features: np.ndarray, y: np.ndarray, max_iter: int = 100, tol: float = 1e-6) -> GlobalModel:
    """S_u and S_e of the clean reference set (n x D float, labels y) by the EM of the reference's
    build_global_model. E-step: each class identity = its posterior mean S_e (n_k S_u + S_e)^-1 S_u S_e^-1 sum_k(x),
    computed in S_e-whitened coordinates, where it is Q diag(lam / (n_k lam + 1)) Q^T sum_k(z); M-step: S_u =
    covariance of the identities over the samples, S_e = covariance of the residuals (ddof 1, as np.cov)."""
    from scipy.linalg import cholesky, solve_triangular

    X = np.asarray(features, dtype=np.float64)
    mean = X.mean(axis=0)
    X = X - mean
    labels, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    n = len(X)
    sums = np.zeros((len(labels), X.shape[1]))
    np.add.at(sums, inverse, X)
    gram = X.T @ X
    class_means = sums / counts[:, None]
    residuals = X - class_means[inverse]  # the within-class scatter from residuals: no cancellation
    basis = reference_subspace(residuals.T @ residuals, np.trace(gram) / len(gram))
    if basis is not None:
        gram, sums, class_means = basis.T @ gram @ basis, sums @ basis, class_means @ basis

    def moments(identities):
        """(S_u, its K x r factor, S_e) of per-class identities, as np.cov over the samples."""
        weighted = identities.T * counts  # r x K
        overall = weighted.sum(axis=1) / n
        factor = np.sqrt(counts / (n - 1))[:, None] * (identities - overall)
        cross = sums.T @ identities
        # residual e_i = x_i - identity of its class; its mean is -overall (the x are centred)
        Se = (gram - cross - cross.T + weighted @ identities - n * np.outer(overall, overall)) / (n - 1)
        return factor.T @ factor, factor, (Se + Se.T) / 2

    Su, factor, Se = moments(class_means)
    iterations, converged = 0, False
    while iterations < max_iter and not converged:
        iterations += 1
        L = cholesky(Se, lower=True)
        Q, lam = _identity_shrinkage(factor, L)
        projected = Q.T @ solve_triangular(L, sums.T, lower=True)  # K' x K
        projected *= lam[:, None] / (counts[None, :] * lam[:, None] + 1)
        identities = (L @ (Q @ projected)).T
        new_Su, factor, new_Se = moments(identities)
        change = np.linalg.norm(new_Su - Su) + np.linalg.norm(new_Se - Se)
        converged = bool(change <= tol * (np.linalg.norm(new_Su) + np.linalg.norm(new_Se)))
        Su, Se = new_Su, new_Se
    return GlobalModel(Su, Se, factor, mean, basis, iterations, converged, n,
                       {int(label): int(count) for label, count in zip(labels, counts)})


def untangle(Z: np.ndarray, draws: np.ndarray, max_iter: int = 100) -> tuple[np.ndarray, int, bool]:
    """Split whitened class features Z (n x r) in two as the reference's find_split: start from draws >= 0.5
    (one forced to each side if all fall on one), then assign every row to the nearer subgroup mean, until the
    split repeats (or comes back with every label swapped) or max_iter steps. Returns (groups, steps, converged)."""
    groups = draws >= 0.5
    if len(groups) > 1:
        if not groups.any():
            groups[0] = True
        elif groups.all():
            groups[0] = False
    steps = 0
    while steps < max_iter:
        steps += 1
        if groups.all() or not groups.any():
            return groups, steps, True
        c1, c2 = Z[groups].mean(axis=0), Z[~groups].mean(axis=0)
        new = 2 * (Z @ (c1 - c2)) > c1 @ c1 - c2 @ c2  # |z - c1|^2 < |z - c2|^2
        if np.array_equal(new, groups) or np.array_equal(new, ~groups):
            return new, steps, True
        groups = new
    return groups, steps, False


def split_statistic(Z: np.ndarray, groups: np.ndarray, Q: np.ndarray, lam: np.ndarray, identity: str) -> float:
    """J = mean over rows of |z - identity|^2 - |z - mean of its subgroup|^2 in S_e-whitened coordinates (the log
    likelihood ratio of two identities against one, up to a factor 2). identity: "posterior", the global model's
    Q diag(N lam / (N lam + 1)) Q^T mean(z); "official", the authors' (N M + I)^-1 sum(z)."""
    N = len(Z)
    total = Z.sum(axis=0)
    shrunk = Q @ ((N * lam / (N * lam + 1)) * (Q.T @ total))
    mu = shrunk / N if identity == "posterior" else total - shrunk
    means = np.zeros((2, Z.shape[1]))
    for side in (False, True):
        if (groups == side).any():
            means[int(side)] = Z[groups == side].mean(axis=0)
    one = ((Z - mu) ** 2).sum(axis=1)
    two = ((Z - means[groups.astype(int)]) ** 2).sum(axis=1)
    return float((one - two).mean())


def anomaly_scores(J: np.ndarray, tail: str = "upper") -> tuple[np.ndarray | None, float, float]:
    """(scores, median, MAD): (J - median) / (1.4826 MAD), its absolute value for tail="both", clipped at 0 for
    "upper"; scores None when there are fewer than MIN_CLASSES values or the MAD is 0."""
    J = np.asarray(J, dtype=np.float64)
    if len(J) == 0:
        return None, float("nan"), float("nan")
    median = float(np.median(J))
    mad = float(np.median(np.abs(J - median)))
    if len(J) < MIN_CLASSES or not mad > 0:
        return None, median, mad
    deviation = J - median
    deviation = np.abs(deviation) if tail == "both" else np.maximum(deviation, 0.0)
    return deviation / (MAD_SCALE * mad), median, mad


def candidate_subgroup(groups: np.ndarray, n_suspect: int) -> int | None:
    """The subgroup holding fewer of the class's reference rows (rows after the first n_suspect); on a tie the one
    with fewer suspect rows, then subgroup 1 (the reference's else-branch). None when one side is empty."""
    if groups.all() or not groups.any():
        return None
    suspect, reference = groups[:n_suspect], groups[n_suspect:]
    ref_counts = (int((~reference).sum()), int(reference.sum()))
    if ref_counts[0] != ref_counts[1]:
        return int(ref_counts[1] < ref_counts[0])
    sizes = (int((~suspect).sum()), int(suspect.sum()))
    return 0 if sizes[0] < sizes[1] else 1


def reference_counts(sizes: dict) -> tuple[int, float]:
    """(the class's reference samples, the candidate's share of its suspect samples) for ClassSplit.sizes."""
    n_suspect = sizes["candidate"] + sizes["other"]
    return sizes["candidate_reference"] + sizes["other_reference"], sizes["candidate"] / n_suspect if n_suspect else 0.0


def reference_share_p(sizes: dict) -> tuple[float, float]:
    """(p, floor) for a class's subgroups (ClassSplit.sizes): p = the chance that a benign candidate subgroup, as
    common among clean samples as among the suspect ones, holds this few of the class's reference samples or fewer
    (one-sided binomial at the candidate's suspect share, doubled since the candidate is whichever side holds fewer
    reference samples, at most 1); floor = the p of a candidate holding none, the lowest the class's reference can
    give: the check can tell only where floor < alpha."""
    from scipy.stats import binom

    n_reference, share = reference_counts(sizes)
    p = min(1.0, 2 * float(binom.cdf(sizes["candidate_reference"], n_reference, share)))
    return p, min(1.0, 2 * (1 - share) ** n_reference)


def _finite(X: np.ndarray, rows: np.ndarray, what: str) -> None:
    if not np.isfinite(X).all():
        row, column = np.argwhere(~np.isfinite(X))[0]
        raise InputError(f"{what}: row {int(rows[row])} has a non-finite value {X[row, column]} in column {column}")


def _mean(features, n: int) -> np.ndarray:
    """Column means in float64, a chunk at a time (features may be memory-mapped); a non-finite value is refused
    with its row."""
    total = np.zeros(features.shape[1])
    for start in range(0, n, CHUNK):
        chunk = np.asarray(features[start:start + CHUNK], dtype=np.float64)
        _finite(chunk, np.arange(start, start + len(chunk)), "features")
        total += chunk.sum(axis=0)
    return total / n


class Scan(Detector):
    """SCAn, the registered `scan` detector (cuML/sklearn style).

        detection = Scan(seed=0).fit(penultimate, y, reference_penultimate, reference_y)
        scan.global_ (GlobalModel), scan.classes_ ({label: ClassSplit}), scan.flags_, scan.scores_
    """

    name = "scan"
    summary = ("SCAn: S_u/S_e of a clean reference set (--clean), then every class split in two and flagged when "
               "its two-identity statistic is a median/MAD outlier; the odd subgroup's samples (Tang et al. 2021)")
    params_class = ScanParams
    needs = frozenset({"penultimate", "reference"})
    presence_test = True  # a class is flagged only when its untangling statistic J exceeds e^2
    seed_param = "seed"

    def fit(self, features, y, reference_features, reference_y) -> Detection:
        """features: N x D suspect penultimate features (in memory or memory-mapped), y: N labels; reference_features,
        reference_y: the clean reference set's features (n x D) and labels, from the same model."""
        p = self.params
        if reference_features is None or reference_y is None:
            raise InputError("SCAn needs a clean reference set that you vouch for (CLI: --clean DIR_OR_FILE; API: "
                             "clean=Dataset): it estimates the class-identity and variation covariances from it")
        n, y = per_class_input(features, y)
        try:
            n_ref, reference_y = per_class_input(reference_features, reference_y)
        except InputError as error:
            raise InputError(f"clean reference set: {error}") from None
        if reference_features.shape[1] != features.shape[1]:
            raise InputError(f"clean reference set: features have {reference_features.shape[1]} columns, the "
                             f"scanned set's {features.shape[1]}: they must come from the same model and layer")
        began = time.perf_counter()
        R = np.asarray(reference_features, dtype=np.float64)
        _finite(R, np.arange(n_ref), "clean reference set features")
        if len(np.unique(reference_y)) < 2:
            raise InputError("clean reference set: SCAn needs at least two classes in it (S_u is the covariance of "
                             f"the class identities), got {len(np.unique(reference_y))}")
        self.global_ = model = global_model(R, reference_y, p.max_iter, p.tol)
        timings = {"global_model": time.perf_counter() - began}

        from scipy.linalg import cholesky, solve_triangular

        L = cholesky(model.Se, lower=True)
        Q, lam = _identity_shrinkage(model.Su_factor, L)
        whiten = solve_triangular(L, np.eye(len(L)), lower=True).T  # z = x @ whiten: S_e^-1 becomes the identity
        if model.basis is not None:
            whiten = model.basis @ whiten
        # The local model centres suspect + reference rows by their own mean (build_local_model's mean_a).
        centre = (_mean(features, n) * n + R.sum(axis=0)) / (n + n_ref)
        suspect_rows, reference_rows = class_rows(y), class_rows(reference_y)
        rng = np.random.RandomState(p.seed)
        began = time.perf_counter()
        self.classes_ = {}
        for label in sorted(set(suspect_rows) | set(reference_rows)):
            rows = suspect_rows.get(label, np.zeros(0, np.int64))
            ref = reference_rows.get(label, np.zeros(0, np.int64))
            draws = rng.rand(len(rows) + len(ref))  # drawn for every class, in label order, as the reference
            if not len(rows):
                continue  # a class of the reference set only: nothing to scan
            result = ClassSplit(label, rows, len(ref))
            self.classes_[label] = result
            X = np.concatenate([np.asarray(features[rows], dtype=np.float64), R[ref]])
            if len(X) < 2:
                result.skipped = "a single sample: nothing to split"
                continue
            Z = (X - centre) @ whiten
            result.groups, result.steps, result.converged = untangle(Z, draws, p.max_iter)
            result.J = split_statistic(Z, result.groups, Q, lam, p.null_identity)
            result.candidate = candidate_subgroup(result.groups, len(rows))
        timings["untangling"] = time.perf_counter() - began

        scored = [c for c in self.classes_.values() if c.J is not None]
        scores_by_class, median, mad = anomaly_scores([c.J for c in scored], p.tail)
        flags, scores = np.zeros(n, bool), np.zeros(n, np.float64)
        clusters = np.full(n, -1, np.int64)
        for i, result in enumerate(scored):
            side = result.groups[:len(result.rows)]
            pick = bool(result.candidate) if result.candidate is not None else True
            clusters[result.rows] = 2 * result.label + (side == pick)
            if scores_by_class is None:
                continue
            result.score = float(scores_by_class[i])
            if result.candidate is None:
                continue
            members = result.rows[side == pick]
            scores[members] = result.score
            result.reference_p, result.reference_floor = reference_share_p(result.sizes())
            result.flagged = result.score > p.threshold
            if result.flagged and p.reference_alpha is not None and result.reference_floor < p.reference_alpha:
                result.cleared = result.reference_p >= p.reference_alpha
                result.flagged = not result.cleared
            if result.flagged:
                flags[members] = True
        self.flags_, self.scores_ = flags, scores
        diagnostics = self._diagnostics(n, n_ref, features.shape[1], median, mad, scores_by_class is None)
        diagnostics["timings_s"] = timings
        return Detection(self.name, flags, params=asdict(p), scores=scores, clusters=clusters,
                         diagnostics=diagnostics)

    def _diagnostics(self, n: int, n_ref: int, dims: int, median: float, mad: float, unnormalised: bool) -> dict:
        p, model = self.params, self.global_
        per_class, flagged = {}, []
        for label, result in self.classes_.items():
            entry = {"n": len(result.rows), "n_reference": result.n_reference}
            if result.skipped:
                entry["skipped"] = result.skipped
            else:
                entry.update({"J": result.J, "score": result.score, "flagged": result.flagged,
                              "n_flagged": result.sizes()["candidate"] if result.flagged else 0,
                              "subgroups": result.sizes() if result.candidate is not None else None,
                              "reference_p": result.reference_p, "reference_floor": result.reference_floor,
                              "cleared_by_reference": result.cleared,
                              "untangling_steps": result.steps, "untangling_converged": result.converged})
            per_class[str(label)] = entry
            if result.flagged:
                flagged.append(label)
        n_flagged = int(sum(per_class[str(label)]["n_flagged"] for label in flagged))
        rank = model.Se.shape[0]
        if unnormalised:
            explanation = (f"SCAn scored {sum(c.J is not None for c in self.classes_.values())} class(es), but a "
                           f"median/MAD needs at least {MIN_CLASSES} classes with J not all equal (MAD "
                           f"{mad:.3g}): no class can be called an outlier, nothing was flagged")
        else:
            statistic = "J - median" if p.tail == "upper" else "|J - median|"
            cleared = [c for c in self.classes_.values() if c.cleared]
            outcome = (f"{len(flagged)} class(es) scored above {p.threshold:.4g} ({', '.join(map(str, flagged))}): the "
                       f"{n_flagged} samples of their subgroup holding fewer reference samples were flagged"
                       if flagged else "nothing was flagged" if cleared else
                       f"no class scored above {p.threshold:.4g}: nothing was flagged")
            outcome += self._reference_check_note(flagged, cleared)
            explanation = (f"SCAn fitted S_u and S_e on the clean reference set ({n_ref} samples of "
                           f"{len(model.reference_classes)} classes), split every class in two and scored its "
                           f"statistic J by ({statistic}) / (1.4826 MAD), median {median:.4g}, MAD {mad:.4g}; "
                           f"{outcome}")
        if rank < dims:
            explanation += (f". The reference set varies in only {rank} of the {dims} feature directions within its "
                            "classes (fewer samples than dimensions, or constant features): SCAn worked in those")
        if not model.converged:
            explanation += f". The global EM stopped at max_iter={p.max_iter} before converging (tol {p.tol:g})"
        reference_sizes = list(model.reference_classes.values())
        return {"explanation": explanation, "threshold": p.threshold, "tail": p.tail,
                "null_identity": p.null_identity, "flagged_classes": flagged, "classes": per_class,
                "median_J": median, "mad_J": mad, "normalised": not unnormalised,
                "reference": {"n": n_ref, "classes": {str(k): v for k, v in model.reference_classes.items()},
                              "per_class_min": min(reference_sizes), "per_class_max": max(reference_sizes),
                              "missing_classes": sorted(set(self.classes_) - set(model.reference_classes))},
                "global_model": {"iterations": model.iterations, "converged": model.converged,
                                 "dims": dims, "subspace_dims": rank},
                "score": "the class's anomaly score for the suspect samples of its candidate subgroup (the one "
                         "holding fewer reference samples), 0 elsewhere; flagged = score > threshold, except in "
                         "classes the reference-share check cleared (cleared_by_reference)"}

    def _reference_check_note(self, flagged: list, cleared: list) -> str:
        """What the reference-share check decided, for the explanation ("" when it changed nothing to say)."""
        alpha, note = self.params.reference_alpha, ""
        if alpha is None:
            return note
        for c in cleared:
            sizes = c.sizes()
            n_reference, share = reference_counts(sizes)
            note += (f". Class {c.label} scored {c.score:.3g}, above the threshold, but is not flagged: its "
                     "candidate subgroup holds "
                     f"{sizes['candidate']} of its {sizes['candidate'] + sizes['other']} suspect samples and "
                     f"{sizes['candidate_reference']} of its {n_reference} reference samples ({share * n_reference:.1f}"
                     f" expected; p {c.reference_p:.2g} >= reference_alpha {alpha:g}): a split within clean data, "
                     "not an injected subgroup")
        unchecked = [self.classes_[label] for label in flagged if self.classes_[label].reference_floor >= alpha]
        if unchecked:
            note += (f". Class(es) {', '.join(str(c.label) for c in unchecked)} hold too few reference samples for "
                     f"the reference-share check (even none in the candidate would give p >= {alpha:g}): flagged on "
                     "the score alone")
        return note

    def fit_scan(self, data: ScanData) -> Detection:
        if data.reference is None:
            raise InputError("SCAn needs a clean reference set that you vouch for (CLI: --clean DIR_OR_FILE; API: "
                             "clean=Dataset): it estimates the class-identity and variation covariances from it")
        features = detector_input(data, "penultimate")
        try:
            reference = detector_input(data.reference, "penultimate")
        except InputError:
            raise InputError("the clean reference set (--clean) came without its 'penultimate' capture") from None
        return self.fit(features, data.y, reference, data.reference.y)

    def report(self, detection: Detection, rows, out_dir) -> ReportParts:
        d = detection.diagnostics
        ref = d["reference"]
        size = (f"Clean reference set: {ref['n']} samples in {len(ref['classes'])} classes ({ref['per_class_min']} to "
                f"{ref['per_class_max']} per class). SCAn estimates S_u and S_e from it alone and decides which "
                "subgroup of a flagged class is poisoned by where its samples fall, so it must be clean and drawn "
                "from the same distribution as the scanned set.")
        notes = [d["explanation"], size]
        if ref["missing_classes"]:
            notes.append(f"The reference set holds no sample of class(es) {', '.join(map(str, ref['missing_classes']))}"
                         ": in those the smaller subgroup is taken as the poisoned one.")
        parts = ReportParts(notes=notes)
        if out_dir is None or not hasattr(self, "classes_") or not d["normalised"]:
            return parts
        parts.figures.append((FIGURE_TITLE, scores_png(self.classes_, self.params.threshold)))
        return parts


def scores_png(classes: dict, threshold: float) -> bytes:
    """Bar chart of the per-class anomaly scores (flagged classes red) with the threshold dashed."""
    from ..report.figures import _pyplot, _to_png

    plt = _pyplot()
    shown = [c for c in classes.values() if c.score is not None]
    fig, ax = plt.subplots(figsize=(max(5.0, min(16.0, 0.35 * len(shown) + 2)), 3.4))
    positions = np.arange(len(shown))
    ax.bar(positions, [c.score for c in shown], color=["#d64545" if c.flagged else "#9aa5b1" for c in shown])
    ax.axhline(threshold, color="k", linestyle="--", linewidth=1, label=f"threshold {threshold:.3g}")
    step = max(1, len(shown) // 40)
    ax.set_xticks(positions[::step], [str(c.label) for c in shown][::step], fontsize=7)
    ax.set_xlabel("class")
    ax.set_ylabel("anomaly score of J")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    return _to_png(fig)
