"""Several detectors from one pass, and their combined verdict (`scan --method flare,ac,spectral` or `all`).

Stages, each a plain function composed by `Consensus`:
  route_params      `method.key=value` goes to that method; a plain `key=value` to the consensus itself when it is
                    one of its own parameters, else to every chosen method that has it (an error if none has)
  the pass          api.scan extracts the union of the members' captures in ONE pass of the suspect model (plus
                    the decoded pixels, the model itself or the clean reference when a member needs them by
                    definition: STRIP's superimpositions, SCALE-UP's scaled copies, VBD's own models)
  combine_votes     every member's flags, a per-sample count of the methods flagging it, and the verdict:
                    flagged when at least `min_votes` methods flag the sample (rule=vote)
  dawid_skene       rule=dawid-skene: each member's true and false positive rates and the poison share estimated
                    from the flags alone by EM (Dawid & Skene 1979, members assumed independent given the truth);
                    flagged when the posterior of poison exceeds 1/2, so a member flagging most of the set (SCALE-UP
                    on clean data) counts for little and a precise one for much
  presence_flags    rule=presence: flagged when a member with a presence test flags it (Detector.presence_test:
                    FLARE, SCAn, VBD, whose rules can conclude "no backdoor" with a false-alarm control); the
                    members flagging a fixed share or by a per-sample cut rank the samples (the score) and are
                    reported, but add no flags
  agreement         pairwise Jaccard of the members' flag sets
  passes            the forward passes over the data: one shared, plus each method's own by definition

The combined score is the mean over members of each member's within-scan rank of its score (0 = least, 1 = most
suspicious; a member without scores ranks by its flags), so one method's scale cannot dominate.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, fields

import numpy as np

from ..detection import Detection
from ..errors import InputError
from ..params import build_params, param
from .base import MODEL, REFERENCE, ReportParts, ScanData

ALL = "all"
NAME = "consensus"


RULES = ("vote", "dawid-skene", "presence")


@dataclass(frozen=True)
class ConsensusParams:
    rule: str = param("presence", "ours", choices=RULES,
                      reason="presence = flagged when a member with a presence test (FLARE, SCAn, VBD) flags the "
                             "sample, the vote when none ran; vote = at least min_votes members; dawid-skene = the "
                             "posterior of an EM fit of each member's error rates to the flags (no labels). On the "
                             "development sets (BadNets a2o, Blend a2o, clean; RESULTS.md, issue 16) only presence "
                             "stayed within a point of the best single F1 on both attacks with no clean false "
                             "positive: the vote at half flagged 1.7% of the clean set, Dawid-Skene 22%")
    min_votes: int | None = param(None, "ours", reason="rule=vote only; unset = at least half of the methods run "
                                  "(rounded up): on the development sets (RESULTS.md, issue 16) a strict majority "
                                  "of the eight lost Blend a2o (TPR 10.6%) when three methods missed it, half kept "
                                  "it (99.5%)")
    max_poison_share: float = param(0.25, "ours", reason="rule=dawid-skene: the largest poison share its fit may "
                                    "claim; above it nothing is flagged. The seeds' attacks poison 1-10% of a set "
                                    "(SIG: the target class, 10% of Fashion-MNIST); on the clean set of the "
                                    "detector table (RESULTS.md, session 10) EM fitted a 'poison' class of 50% to "
                                    "the members' correlated false positives (71% FPR), on the 16 attacked rows "
                                    "7.6-11.2%")

    def __post_init__(self):
        if self.rule != "vote" and self.min_votes is not None:
            raise InputError(f"consensus: min_votes applies to rule=vote only, not rule={self.rule}; give "
                             "rule=vote with it")
        if self.min_votes is not None and (isinstance(self.min_votes, bool) or not isinstance(self.min_votes, int)
                                           or self.min_votes < 1):
            raise InputError(f"consensus: min_votes must be a whole number >= 1, got {self.min_votes!r}")
        if not 0 < self.max_poison_share < 1:
            raise InputError(f"consensus: max_poison_share must be in (0, 1), got {self.max_poison_share!r}")


def method_list(method, available: list[str], *, have_reference: bool) -> list[str] | None:
    """The member names when `method` asks for several ("a,b", a list, or "all"); None for a single method.
    "all" = every registered detector that reads the suspect model (those training their own models, VBD, FCT
    and TRAP, cost trainings: name them to add them), those needing a clean reference only when one is given,
    variants of another method (in_all False) left out."""
    if isinstance(method, (list, tuple)):
        names = [str(m).strip() for m in method]
    elif isinstance(method, str) and ("," in method or method.strip() == ALL):
        names = [m.strip() for m in method.split(",")] if method.strip() != ALL else None
    else:
        return None
    if names is None:
        from . import get_detector

        chosen = []
        for name in available:
            detector = get_detector(name)
            if detector.needs_model() and detector.in_all and (have_reference or not detector.needs_reference()):
                chosen.append(name)
        return chosen
    if any(not name for name in names):
        raise InputError(f"--method: empty name in {method!r}; give registered names separated by commas")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise InputError(f"--method: {', '.join(repeated)} given more than once")
    if ALL in names:
        raise InputError("--method: 'all' stands alone (it means every registered detector)")
    return names


def route_params(members: dict, params: dict) -> tuple[dict, dict]:
    """Split scan parameters into the consensus' own and each member's ({name: {key: value}})."""
    own_names = {f.name for f in fields(ConsensusParams)}
    own, routed = {}, {name: {} for name in members}
    for key, value in params.items():
        head, dot, rest = key.partition(".")
        if dot:
            if head not in members:
                raise InputError(f"parameter {key!r}: {head!r} is not one of the methods run ({', '.join(members)})")
            routed[head][rest] = value
        elif key in own_names:
            own[key] = value
        else:
            takers = [name for name, cls in members.items() if key in {f.name for f in fields(cls.params_class)}]
            if not takers:
                raise InputError(f"parameter {key!r} belongs to none of the methods run ({', '.join(members)}); "
                                 "name one as METHOD.KEY=VALUE")
            for name in takers:
                routed[name][key] = value
    return own, routed


def combine_votes(flags: dict[str, np.ndarray], min_votes: int) -> tuple[np.ndarray, np.ndarray]:
    """(votes per sample, verdict = votes >= min_votes)."""
    votes = np.sum(np.stack(list(flags.values())), axis=0, dtype=np.int32)
    return votes, votes >= min_votes


def dawid_skene(flags: np.ndarray, *, max_share: float = ConsensusParams.max_poison_share, iterations: int = 200,
                tol: float = 1e-8) -> dict:
    """Posterior of poison per sample from an n x m bool matrix of m members' flags, without labels.

    Two-class Dawid-Skene EM: each member j flags a poisoned sample with probability tpr_j and a clean one with
    fpr_j, independently given the truth; the poison share is `prior`. Started from the soft vote (the share of
    members flagging each sample); rates carry a Beta(1, 1) prior so a member that never or always flags stays
    finite. The E-step runs on the distinct flag patterns (at most 2^m), so its cost does not grow with n.
    Poison is the class the members flag (their TPR above their FPR, summed over members: the usual assumption of
    members better than chance, which fixes EM's label switching). Where that class holds more than `max_share`
    of the set (`plausible` False), the flags fit no poison class but the members' correlated false positives (on
    clean data the half of the set the model is least sure of), and `flags_of_fit` flags nothing.
    Returns {"posterior", "tpr", "fpr", "prior", "plausible", "iterations"}.
    """
    flags = np.asarray(flags, bool)
    if flags.ndim != 2 or flags.shape[1] < 2:
        raise InputError(f"dawid_skene: expected an n x m flag matrix with m >= 2 members, got {flags.shape}")
    patterns, inverse, counts = np.unique(flags, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    f = patterns.astype(np.float64)
    q = f.mean(axis=1)  # soft vote
    for iteration in range(1, iterations + 1):
        w_poison, w_clean = counts * q, counts * (1 - q)
        prior = (w_poison.sum() + 1) / (counts.sum() + 2)
        tpr = (w_poison @ f + 1) / (w_poison.sum() + 2)
        fpr = (w_clean @ f + 1) / (w_clean.sum() + 2)
        log_odds = (np.log(prior / (1 - prior)) + f @ np.log(tpr / fpr)
                    + (1 - f) @ np.log((1 - tpr) / (1 - fpr)))
        new_q = 1 / (1 + np.exp(-np.clip(log_odds, -700, 700)))
        done = np.max(np.abs(new_q - q)) < tol
        q = new_q
        if done:
            break
    if np.sum(tpr - fpr) < 0:
        q, prior, tpr, fpr = 1 - q, 1 - prior, fpr, tpr
    return {"posterior": q[inverse], "tpr": tpr, "fpr": fpr, "prior": float(prior),
            "plausible": bool(prior <= max_share),
            "iterations": iteration}


def flags_of_fit(fit: dict) -> np.ndarray:
    """dawid_skene's verdict: the posterior of poison above 1/2, nothing where the fitted poison share is not
    plausible."""
    return (fit["posterior"] > 0.5) & fit["plausible"]


def presence_flags(flags: dict[str, np.ndarray], testers: list[str]) -> np.ndarray:
    """The union of the flags of the members named in `testers` (at least one)."""
    return np.logical_or.reduce([flags[name] for name in testers])


def score_ranks(detection: Detection) -> np.ndarray:
    """Each sample's rank of its score within the scan, on [0, 1] (ties share their mean rank); flags when the
    method gives no score."""
    from scipy.stats import rankdata

    values = detection.scores if detection.scores is not None else detection.flags.astype(np.float64)
    values = np.nan_to_num(np.asarray(values, np.float64), nan=-np.inf)
    n = len(values)
    return np.zeros(n) if n < 2 else (rankdata(values) - 1) / (n - 1)


def jaccard(a: np.ndarray, b: np.ndarray) -> float | None:
    """|a and b| / |a or b|; None when neither flags anything."""
    union = int(np.sum(a | b))
    return None if union == 0 else int(np.sum(a & b)) / union


def agreement(flags: dict[str, np.ndarray]) -> dict[str, float | None]:
    names = list(flags)
    return {f"{a}|{b}": jaccard(flags[a], flags[b]) for i, a in enumerate(names) for b in names[i + 1:]}


def passes_over_the_data(captures, detections: dict[str, Detection], n: int) -> dict:
    """Forward passes over the scanned set, in units of one pass (n images): the shared single pass of the
    captures, then each method's own by definition (its n_forward / n; reference-set images included)."""
    passes = {"shared_single_pass": 1 if captures else 0}
    for name, d in detections.items():
        if "n_forward" in d.diagnostics and n:
            passes[name] = round(d.diagnostics["n_forward"] / n, 3)
    passes["total"] = round(sum(passes.values()), 3)
    return passes


class Consensus:
    """The detectors `names` run on one scan; duck-types the Detector interface for api.scan.

        Consensus(["flare", "ac", "spectral"], {"spectral.expected_rate": 0.1}).fit_scan(data)
        consensus.members_ ({name: detector}), .detections_ ({name: Detection}), .votes_
    """

    name = NAME
    seed_param = None

    def __init__(self, names: list[str], params: dict | None = None):
        from . import get_detector

        if len(names) < 2:
            raise InputError(f"a consensus needs two methods or more, got {names}")
        classes = {name: get_detector(name) for name in names}
        own, routed = route_params(classes, dict(params or {}))
        self.params = build_params(ConsensusParams, own, NAME)
        self.members_ = {name: cls(**routed[name]) for name, cls in classes.items()}
        if self.params.min_votes is not None and self.params.min_votes > len(names):
            raise InputError(f"consensus: min_votes {self.params.min_votes} exceeds the {len(names)} methods run")
        self.needs = frozenset().union(*(cls.needs for cls in classes.values()))

    @property
    def min_votes(self) -> int:
        m = len(getattr(self, "detections_", None) or self.members_)
        # Capped at the methods that ran: one refusing the scan does not make the verdict impossible.
        return min(self.params.min_votes, m) if self.params.min_votes is not None else (m + 1) // 2

    def set_seed(self, seed: int) -> list[str]:
        """Set every member's seed parameter; returns the members that draw nothing at random."""
        fixed = []
        for name, detector in self.members_.items():
            if detector.seed_param is None:
                fixed.append(name)
            else:
                detector.params = build_params(type(detector.params),
                                               {**asdict(detector.params), detector.seed_param: seed}, name)
        return fixed

    def captures(self) -> tuple[str, ...]:
        """The union of the members' captures, plus logits when the head is read anyway (penultimate features)
        and a member uses them if present: the same hook, no extra pass."""
        from ..engine.feature_set import CAPTURES

        wanted = set(self.needs)
        if "penultimate" in wanted and any("logits" in d.reads_if_extracted for d in self.members_.values()):
            wanted.add("logits")
        return tuple(c for c in CAPTURES if c in wanted)

    def needs_model(self) -> bool:
        return bool(self.captures()) or MODEL in self.needs

    def needs_reference(self) -> bool:
        return REFERENCE in self.needs

    def describe(self) -> str:
        return "\n\n".join(type(d).describe() for d in self.members_.values())

    def fit_scan(self, data: ScanData) -> Detection:
        self.detections_, self.failed_, timings = {}, {}, {}
        for name, detector in self.members_.items():
            began = time.perf_counter()
            try:
                self.detections_[name] = detector.fit_scan(data)
            except InputError as error:  # one method's refusal (no BatchNorm, a flat reference) is reported, not fatal
                self.failed_[name] = str(error)
            timings[name] = time.perf_counter() - began
        if not self.detections_:
            raise InputError("every method of the consensus refused this scan: " + "; ".join(
                f"{name}: {message}" for name, message in self.failed_.items()))
        flags = {name: d.flags for name, d in self.detections_.items()}
        self.votes_, verdict = combine_votes(flags, self.min_votes)
        scores = np.mean([score_ranks(d) for d in self.detections_.values()], axis=0)
        m = len(self.detections_)
        rule = (f"flagged when >= {self.min_votes} of {m} methods flag the sample; score = mean rank of the "
                "members' scores")
        how = f"at least {self.min_votes} of them flag it"
        estimated = None
        if self.params.rule == "dawid-skene" and m >= 2:
            fit = dawid_skene(np.stack(list(flags.values()), axis=1), max_share=self.params.max_poison_share)
            verdict, scores = flags_of_fit(fit), fit["posterior"]
            estimated = {name: {"tpr": round(float(t), 4), "fpr": round(float(f), 4)}
                         for name, t, f in zip(self.detections_, fit["tpr"], fit["fpr"])}
            rule = (f"flagged when the Dawid-Skene posterior of poison exceeds 1/2 (each member's error rates fitted "
                    f"to the flags by EM, no labels; estimated poison share {fit['prior']:.4f}); score = posterior")
            how = "the Dawid-Skene posterior of poison from their flags exceeds 1/2"
            if not fit["plausible"]:
                rule += (f"; nothing flagged: the class the members flag holds {fit['prior']:.0%} of the set, above "
                         f"max_poison_share {self.params.max_poison_share}, so it is their correlated false "
                         "positives, not a poison class")
        if self.params.rule == "presence":
            testers = [name for name in self.detections_ if self.members_[name].presence_test]
            if testers:
                verdict = presence_flags(flags, testers)
                rule = (f"flagged when a member with a presence test ({', '.join(testers)}) flags the sample; the "
                        "others rank (score = mean rank of the members' scores) but add no flags")
                how = f"one of the members with a presence test ({', '.join(testers)}) flags it"
            else:
                rule += ("; rule=presence fell back to this vote: no member with a presence test (FLARE, SCAn, "
                         "VBD) ran")
        pairs = agreement(flags)
        columns = {}
        for name, d in self.detections_.items():
            columns[f"flagged_{name}"] = d.flags.astype(np.int8)
            columns[f"score_{name}"] = d.scores if d.scores is not None else np.full(len(d.flags), np.nan)
        columns["votes"] = self.votes_
        per_method = {name: {"n_flagged": d.n_flagged, "time_s": round(timings[name], 3),
                             "explanation": d.diagnostics.get("explanation"),
                             **({} if estimated is None else {"estimated": estimated[name]})}
                      for name, d in self.detections_.items()}
        explanation = (f"{m} methods ({', '.join(self.detections_)}) ran on one pass; a sample is flagged when "
                       f"{how}: {int(verdict.sum())} of {len(verdict)} samples. "
                       + "; ".join(f"{name} flagged {d.n_flagged}" for name, d in self.detections_.items()))
        if estimated is not None:
            explanation += (". Estimated rates (no labels): " + "; ".join(
                f"{name} TPR {e['tpr']:.2f} FPR {e['fpr']:.3f}" for name, e in estimated.items()))
        if self.failed_:
            explanation += ". Could not run: " + "; ".join(f"{name} ({message})" for name, message in
                                                          self.failed_.items())
        diagnostics = {
            "explanation": explanation, "methods": list(self.detections_), "failed": self.failed_,
            "min_votes": self.min_votes, "rule": rule, "per_method": per_method, "jaccard": pairs,
            "votes_histogram": np.bincount(self.votes_, minlength=m + 1).tolist(),
            "passes": passes_over_the_data(self.captures(), self.detections_, len(verdict)),
            "member_diagnostics": {name: d.diagnostics for name, d in self.detections_.items()},
            "timings_s": {f"detect_{name}": t for name, t in timings.items()}}
        params = {"consensus": asdict(self.params), **{name: d.params for name, d in self.detections_.items()}}
        return Detection(f"{NAME}({','.join(self.detections_)})", verdict, params=params, scores=scores,
                         diagnostics=diagnostics, columns=columns)

    def report(self, detection: Detection, rows, out_dir) -> ReportParts:
        parts = ReportParts(notes=[detection.diagnostics["explanation"]])
        for name, detection_of_member in self.detections_.items():
            own = self.members_[name].report(detection_of_member, rows, out_dir)
            parts.figures += [(f"[{name}] {title}", png) for title, png in own.figures]
            parts.notes += [f"[{name}] {note}" for note in own.notes]
            parts.extra.update({f"{name}.{key}": value for key, value in own.extra.items()})
        if out_dir is not None:
            parts.figures.insert(0, ("Agreement: pairwise Jaccard of the flag sets, and votes per sample",
                                     agreement_png(list(self.detections_), detection.diagnostics["jaccard"],
                                                   self.votes_, detection.flags)))
        return parts


def agreement_png(names: list[str], pairs: dict, votes: np.ndarray, verdict: np.ndarray) -> bytes:
    from ..report.figures import _pyplot, _to_png

    plt = _pyplot()
    m = len(names)
    matrix = np.eye(m)
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            if i != j:
                value = pairs.get(f"{a}|{b}", pairs.get(f"{b}|{a}"))
                matrix[i, j] = np.nan if value is None else value
    fig, (left, right) = plt.subplots(1, 2, figsize=(4 + 0.5 * m, 3.2), gridspec_kw={"width_ratios": [1.2, 1]})
    image = left.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
    left.set_xticks(range(m), names, rotation=45, ha="right", fontsize=7)
    left.set_yticks(range(m), names, fontsize=7)
    for i in range(m):
        for j in range(m):
            if not math.isnan(matrix[i, j]):
                left.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=6,
                          color="w" if matrix[i, j] < 0.6 else "k")
    fig.colorbar(image, ax=left, fraction=0.046)
    # Stacked per vote count: under rule=presence or dawid-skene the verdict is not a function of the count alone.
    flagged = np.bincount(votes[verdict], minlength=m + 1)
    kept = np.bincount(votes[~verdict], minlength=m + 1)
    right.bar(range(m + 1), kept, color="#9aa5b1", label="not flagged")
    right.bar(range(m + 1), flagged, bottom=kept, color="#d64545", label="flagged by the consensus")
    right.set_yscale("log")
    right.set_xlabel("methods flagging the sample", fontsize=7)
    right.set_title("samples per vote count", fontsize=8)
    right.legend(fontsize=6)
    right.tick_params(labelsize=6)
    fig.tight_layout()
    return _to_png(fig)
