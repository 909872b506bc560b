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
from ..detection import Detection
from ..params import param
from .base import Detector, ReportParts, ScanData, detector_input
from .flare import FLAGGED_BY, Flare, FlareParams


@dataclass(frozen=True)
class SampledParams(FlareParams):
    """FLARE's parameters plus those of fitting on a sample and assigning the rest."""

    sample_size: int = param(50_000, "ours: the paper's sets (CIFAR-10, 50k) sit at this size, where UMAP takes "
                             "~1-2 min per subspace on 2 cores")
    exact_max_samples: int = param(100_000, "ours: up to this many rows every row is clustered (60k sets stay exact)")
    assign_k: int = param(15, "ours: odd, so a vote cannot tie; 100% flag agreement at 60k (RESULTS.md issue 5)")
    projection: str = param("pca", "ours: follows the sample's variance; equal flags to random projection at 60k",
                            choices=PROJECTIONS)
    projection_components: int = param(64, "ours: dimension of the assignment's kNN search (RESULTS.md issue 5)")
    knn_index: str = param("auto", "ours: IVF from 20k sample rows, flat below (measured flag-identical, 9.5x faster)",
                           choices=INDEXES)
    nprobe: int = param(16, "ours: IVF cells visited per query (RESULTS.md issue 5)")

    def __post_init__(self):
        super().__post_init__()
        integer(self.sample_size, "sample_size", 2)
        integer(self.exact_max_samples, "exact_max_samples", 0)
        integer(self.assign_k, "assign_k", 1)
        integer(self.projection_components, "projection_components", 1)
        integer(self.nprobe, "nprobe", 1)


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


def sampled_columns(fitted: Detection, sample: np.ndarray, flags: np.ndarray) -> dict:
    """FLARE's per-sample columns for every row: the sample rows keep the fit's, a row outside the sample has
    flagged_by "assigned" when its nearest sample rows flagged it, and no run counts (NaN: written empty)."""
    columns = {}
    for name, values in fitted.columns.items():
        if name == "flagged_by":
            column = np.where(flags, "assigned", "").astype(object)
        else:
            column = np.full(len(flags), np.nan)
        column[sample] = values
        columns[name] = column
    return columns


class SampledFlare(Detector):
    """FLARE, the registered `flare` detector: every row clustered up to `exact_max_samples`, beyond that
    fit on a stratified sample with the other rows assigned (cuML/sklearn style).

        detection = SampledFlare(sample_size=50_000, exact_max_samples=100_000).fit(features, layout, y=labels)
        flare.sample_ (row indices), flare.flare_ (the Flare fit on them), flare.assigned_share_
    """

    name = "flare"
    summary = ("BN-aligned activation minima of every layer, UMAP + HDBSCAN, stable-subspace search "
               "(Pan et al., TIFS 2025)")
    params_class = SampledParams
    needs = frozenset({"bn_minima"})
    presence_test = True  # flags only a cluster that stays split off in the subspace search
    seed_param = "random_state"

    def __init__(self, **params):
        super().__init__(**params)
        self.flare_params = {f.name: getattr(self.params, f.name) for f in fields(FlareParams)}

    def _sampling_params(self) -> dict:
        return {k: v for k, v in asdict(self.params).items() if k not in self.flare_params}

    def fit(self, features, layout: FeatureLayout, y: np.ndarray | None = None, *, progress=None, stage=None,
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
        size = n if n <= self.params.exact_max_samples else self.params.sample_size
        self.sample_ = stratified_sample(None if y is None else np.asarray(y), n, size, seed)
        sample = np.asarray(features[self.sample_], dtype=np.float32)
        sample_y = None if y is None else np.asarray(y)[self.sample_]
        timings["sample"] = time.perf_counter() - began
        began = time.perf_counter()
        fitted = self.flare_.fit(sample, layout, y=sample_y, progress=progress, stage=stage)
        timings["fit_sample"] = time.perf_counter() - began
        # scores: the flagged share of each row's assign_k nearest sample rows.
        flags, scores = np.zeros(n, bool), np.zeros(n, np.float32)
        clusters = np.full(n, -1, np.int64)
        diagnostics = {**fitted.diagnostics, "sampled": {**self._sampling_params(), "n_rows": n,
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
            projection = fit_projection(sample_columns, self.params.projection, self.params.projection_components,
                                        seed)
            index = ReferenceIndex(projection.apply(sample_columns), index=self.params.knn_index,
                                   nprobe=self.params.nprobe, random_state=seed)
            timings["index"] = time.perf_counter() - began
            began = time.perf_counter()
            projected = project_rows(features, projection, columns=columns, chunk_rows=chunk_rows)
            timings["project"] = time.perf_counter() - began
            began = time.perf_counter()
            neighbours = index.search(projected, min(self.params.assign_k, len(self.sample_)))
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
        return Detection(self.name, flags, params=asdict(self.params), scores=scores, clusters=clusters,
                         diagnostics=diagnostics, columns=sampled_columns(fitted, self.sample_, flags))

    def fit_scan(self, data: ScanData) -> Detection:
        def report_step(step):
            found = ("no stable split" if not step.split else
                     "stable split of benign classes only (excused)" if step.excused else
                     "the all-to-one footprint flagged past the walk's depth" if step.footprint_walk else
                     "stable split")
            print(f"flare: {step.dropped_layers} trailing layer(s) dropped, {step.n_columns} columns: {found} "
                  f"(largest gap {max(step.gaps, default=0.0):.4g}, threshold {step.threshold:.4g}, "
                  f"{step.seconds:.1f} s)", flush=True)

        def report_stage(name, shape):
            if name == "run":
                print(f"flare: UMAP seed {shape[0]} of {shape[1]} (random_state={shape[2]})", flush=True)
                return
            # Said before the fit, not after: a UMAP fit on 50k rows runs for a minute or more without output.
            what = {"umap": "UMAP embedding", "hdbscan": "HDBSCAN clustering",
                    "zoom": "zoom (UMAP and HDBSCAN of one cluster alone)"}.get(name, name)
            print(f"flare: {what} of {shape[0]:,} rows x {shape[1]} columns started", flush=True)

        return self.fit(detector_input(data, "bn_minima"), data.features.layout, y=data.y,
                        progress=report_step if data.progress else None,
                        stage=report_stage if data.progress else None)

    def report(self, detection: Detection, rows, out_dir) -> ReportParts:
        from ..report.figures import condensed_tree_png, embedding_png, subspace_search_png

        parts = ReportParts()
        sampled = detection.diagnostics["sampled"]
        if sampled["n_sample"] < sampled["n_rows"]:
            parts.notes.append(f"FLARE clustered a stratified sample of {sampled['n_sample']:,} of the "
                               f"{sampled['n_rows']:,} samples; every other sample took the flag of most of its "
                               f"{sampled['assign_k']} nearest sample rows (score = the flagged share)")
        runs = detection.diagnostics.get("seed_runs")
        if runs:
            parts.notes.append(
                f"FLARE ran under {len(runs)} UMAP seeds and flagged the samples most "
                + ("of the runs that flagged anything flagged (a run that flags nothing abstains)"
                   if detection.params.get("abstain") else "runs flagged") + "; the runs flagged "
                + ", ".join(f"{r['n_flagged']:,}" for r in runs) + " samples (random_state "
                + ", ".join(str(r["random_state"]) for r in runs) + "); the figures show the run closest to "
                "the majority")
        walked = [r for r in runs or () if r.get("footprint_walk")]
        if walked or detection.diagnostics.get("footprint_walk"):
            parts.notes.append(
                (f"{len(walked)} of the {len(runs)} runs" if runs else "the run") + " found no stable split to flag "
                f"within depth {detection.params.get('depth')} of any subspace and flagged a cluster of the inflated "
                "label's footprint further down its branch (footprint_levels)")
        off_label = detection.diagnostics.get("off_label_unflagged", 0)
        if off_label:
            parts.notes.append(f"in the run the figures show, the flagged cluster was mostly one inflated label "
                               f"(all-to-one relabelling) and its {off_label:,} members with another label were left "
                               "unflagged (drop_off_label)")
        others = detection.diagnostics.get("other_footprints")
        if others:
            parts.notes.append(
                f"in the run the figures show, {len(others)} more cluster(s) of the flagged label sat among other "
                f"labels (that label under {detection.params.get('footprint_rest_share')} of the rest of their "
                f"split: relabelled poison split off by source class), and their "
                f"{detection.diagnostics.get('other_footprints_added', 0):,} members of that label not yet flagged "
                "were flagged too (footprint_rest_share)")
        recovered = detection.diagnostics.get("recovered_by_neighbours", 0)
        if recovered:
            parts.notes.append(f"{recovered:,} more samples were flagged because most of their "
                               f"{detection.params.get('recover_neighbors')} nearest neighbours in the runs' "
                               "all-layers embeddings were flagged (recover_neighbors)")
        exclusion = detection.diagnostics.get("exclusion")
        if exclusion and exclusion["applied"] and any(exclusion["runs_dropped"] + exclusion["runs_completed"]):
            dropped, completed = exclusion["runs_dropped"], exclusion["runs_completed"]
            parts.notes.append(
                f"{exclusion['complete_clusters']} run cluster(s) held label {exclusion['label']}'s whole excess "
                f"over the median label count (the all-to-one footprint, complete): the clusters lying outside "
                f"them could not be relabelled poison too and were dropped from {sum(d > 0 for d in dropped)} "
                f"run(s) ({sum(dropped):,} samples), and {sum(c > 0 for c in completed)} run(s) that found part of "
                f"it were completed with it ({sum(completed):,} samples) before the vote (footprint_exclusion)")
        elif exclusion and not exclusion["applied"]:
            parts.notes.append(
                f"{exclusion['complete_clusters']} run clusters each held label {exclusion['label']}'s whole excess, "
                f"but {exclusion['reason']}: no run's clusters were dropped (footprint_exclusion)")
        footprint = detection.diagnostics.get("footprint")
        if footprint and footprint["incomplete"]:
            added, separation = footprint["added"], footprint.get("separation")
            cut = ("" if separation is None else
                   f" (the upper of the two populations of its scores, Ashman's D {separation:.1f})"
                   if footprint.get("cut") == "mixture" else
                   f" (its scores were not two populations apart, D {separation:.1f}"
                   + (", one mode" if footprint.get("modes") == 1 else "") + ": those past its zero)")
            runs_added = footprint.get("runs_added")
            whose = ("the flags" if not footprint.get("per_run") else
                     "each seed's run was completed before the vote (added " + ", ".join(f"{a:,}" for a in runs_added)
                     + "); the representative run's flags")
            if footprint.get("clusters"):
                whose += f" (one probe for each of its {footprint['clusters']} footprint clusters)"
            parts.notes.append(
                f"{whose} are one inflated label ({footprint['label']}, {footprint['label_excess']:,} samples above "
                f"the median label count), and they left {footprint['unexplained']:,} of that excess unexplained: "
                + (f"{added:,} more samples of the label, those a linear probe puts with the flagged ones{cut}, were "
                   "flagged (complete_footprint)" if added else
                   "relabelled poison may remain unflagged" + ("" if detection.params.get("complete_footprint")
                                                                else " (complete_footprint is off)")))
        zoom = detection.diagnostics.get("zoom")
        if zoom and zoom.get("region_size"):
            what = ("a cluster of it read as the footprint with the attack's cover samples (other labels spread "
                    f"over many classes), and its {zoom['added']:,} unflagged members of the label were flagged"
                    if zoom["applied"] else zoom["reason"])
            parts.notes.append(
                f"the representative run's cluster of {zoom['region_size']:,} samples that held most of label "
                f"{zoom['label']}'s unflagged samples "
                + ("was embedded and clustered alone: " if "clusters" in zoom else "was not zoomed: ")
                + f"{what} (footprint_zoom)")
        minority = detection.diagnostics.get("minority")
        if minority and minority["applied"]:
            parts.notes.append(
                f"{minority['added']:,} more samples of label {minority['label']} were flagged: in most runs' trees "
                "they sat as a minority inside one other class's cluster, far more of them than of that cluster's "
                "other off-labels (source_minority)")
        linked = detection.diagnostics.get("components")
        if linked and linked["components"]:
            taken = [c for c in linked["components"] if c["taken"]]
            sizes = ", ".join(f"{c['size']:,}" for c in taken)
            read = (f"the features linked label {linked['label']}'s members as mutual {linked['k']}-nearest "
                    f"neighbours into {len(linked['components'])} component(s) of at least "
                    f"{detection.params.get('min_cluster_size')} samples")
            parts.notes.append(
                read + (f"; {len(taken)} of them ({sizes} samples) sat among "
                        "several other classes (relabelled poison drawn from several sources), and their "
                        f"{linked['added']:,} members not yet flagged were flagged (footprint_components)" if taken else
                        "; none was taken: each was larger than the label's excess or sat beside one class, as the "
                        "label's clean class does (footprint_components)"))
        residual = detection.diagnostics.get("residual")
        if residual and residual["added"]:
            parts.notes.append(
                f"{residual['added']:,} more samples of label {residual['label']} (of its {residual['candidates']:,} "
                "unflagged) were flagged: a linear probe fitted within the label, flagged against unflagged, put "
                "them with the flagged ones on the folds it was not fitted on (residual_probe)")
        settle = detection.diagnostics.get("settle")
        if settle and settle.get("settled"):
            parts.notes.append(
                f"the flags of label {settle['label']} were settled: linear probes fitted within the label, flagged "
                f"against unflagged, decided each of its {settle['members']:,} samples again on the folds they were "
                f"not fitted on, round after round, until a {settle['converged']} ({settle['rounds']} rounds"
                + (f" over the probe strengths C {' then '.join(f'{c:g}' for c in settle['strengths'])}"
                   if len(settle.get("strengths", ())) > 1 else "") + "); "
                f"{settle['added']:,} samples were flagged and {settle['removed']:,} unflagged (settle)")
        elif settle and settle.get("inflated"):
            parts.notes.append(
                f"the flags of label {settle['label']} were not settled ({settle['rounds']} rounds): "
                f"{settle['reason']}; the flags stay as the earlier stages left them")
        stages = detection.diagnostics.get("flagged_by")
        if stages and sum(stages.values()):
            outside = detection.diagnostics["flagged_outside_clusters"]
            parts.notes.append(
                f"of the {sum(stages.values()):,} flagged samples"
                + (" of the clustered sample" if sampled["n_sample"] < sampled["n_rows"] else "") + ", "
                + ", ".join(f"{count:,} were flagged {FLAGGED_BY[stage]}" for stage, count in stages.items() if count)
                + f"; {outside:,} of them were in no run's clusters (a probe or their neighbours brought them in). "
                "samples.csv's flagged_by, runs_clustered and runs_voted columns say how each sample was flagged")
        if "explanation" in detection.diagnostics:
            parts.notes.append(detection.diagnostics["explanation"])
        if out_dir is None:
            return parts
        flare = self.flare_
        parts.figures.append(("Stable-subspace search", subspace_search_png(detection.diagnostics["steps"])))
        if detection.embedding is None and flare.embedding_ is not None:
            truth = None if rows.poison is None else rows.poison[self.sample_]
            parts.figures.append(("2-D embedding of the clustered sample",
                                  embedding_png(flare.embedding_, flare.flags_, truth)))
        if flare.condensed_tree_ is not None:
            d = detection.diagnostics
            marks = {d["split"]["node"]: ("#3b6fb6", "stable cluster (subspace test)")}
            if d.get("flagged_node") is not None:
                marks[d["flagged_node"]] = ("#d64545", "flagged: the more stable cluster")
            for row in d.get("other_footprints", ()):
                marks[row["node"]] = ("#e08a2c", "flagged: the footprint's other clusters")
            parts.figures.append(("Condensed tree of the chosen subspace",
                                  condensed_tree_png(flare.condensed_tree_, marks)))
        return parts
