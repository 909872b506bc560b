"""FLARE (TIFS 2025): cluster BN-aligned activation minima, find the stable subspace, flag the rest.

Stages, each a plain function composed by `Flare` (fit_once runs them under one UMAP seed; with n_seeds > 1
seed_majority flags what most of the runs that flagged anything flag):
  subspace_matrix      columns of the first L - k BN layers (per channel or per layer), sliced, never re-extracted
  search_subspace      the paper's loop: k = 0, 1, 2, ... until the condensed tree shows a large drop (past one
                       whose splits the labelling excuses as benign classes, for class_split_layers more layers;
                       where it excuses them all, they are walked again past depth into the footprint's branches)
  stability_split      paper Sec. IV-C3: split at the root, the more stable cluster is poisoned, unless it is
                       a benign class split off (class_makeup): then look at the splits one level further down
                       (into a single class only where it can hold the all-to-one footprint: holds_footprint)
  flat_labels          labelling="official": the official flat cut just before the stable cluster splits
  flags_from_clusters  official: largest cluster clean, other clusters poisoned, noise by `noise_rule`
  exclude_beside_complete ours: where a run's cluster holds an inflated label's whole excess, the runs' clusters
                       outside it are dropped and the runs that found part of it completed with it, before the vote
  recover_by_neighbours ours: also flag what sits among the flagged samples in the all-layers embeddings
  footprint_completion ours: where the flags explain only part of an inflated label's excess, a linear probe
                       flags the rest of that label's samples that sit on the flagged side (score_mixture);
                       complete_runs does it to each seed's run before the vote
  zoom_footprint       ours, opt-in (footprint_zoom; flare_zoom.py): the cluster holding the rest of the label's
                       unflagged samples embedded and clustered alone, its footprint with the attack's covers flagged
  minority_members     ours, opt-in (source_minority; flare_minority.py): the label's unflagged samples that most
                       runs' trees put as a minority inside one other class's cluster, far ahead of its other labels
  footprint_components_of ours: the label's mutual-kNN components among several classes, flagged whole
  residual_members     ours: within the label, a cross-fitted probe adds the label's samples it puts with the flags
  settle_footprint     ours (settle=True, the default): the label's samples decided again by such probes, round after
                       round on their own decisions, until they stop changing
Provenance of each default: SEED_NOTES.md section 1 (official code) and DESIGN.md section 4.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property

import numpy as np

from .. import cluster
from ..cluster.validation import integer, real
from ..engine.layout import FeatureLayout
from ..errors import InputError
from ..detection import Detection
from ..params import build_params, choices_of, param
from .flare_minority import minority_members
from .flare_zoom import zoom_footprint

REDUCTIONS = ("channel", "layer")
LABELLINGS = ("stability", "official")
NOISE_RULES = ("official", "nearest")
LEAF_RULES = ("persistence", "official")
XI_MODES = ("relative", "absolute")
FOOTPRINT_BRANCHES = ("any-label", "top-label")
SETTLE_CUTS = ("mixture", "sign", "hysteresis")
CUT_MARGIN = 1e-4  # official: cut at lambda 1e-4 before the stable cluster splits


@dataclass(frozen=True)
class FlareParams:
    reduce: str = param("channel", "paper: Eq. 3-5, one column per BN channel; 'layer' is the "
                        "official code's one column per BN layer", choices=REDUCTIONS)
    n_neighbors: int = param(40, "official code: UMAP n_neighbors")
    min_dist: float = param(0.0, "official code: UMAP min_dist")
    n_components: int = param(2, "official code: UMAP n_components")
    min_cluster_size: int = param(100, "official code: HDBSCAN min_cluster_size (min_samples the same)")
    xi: float = param(0.02, "official code: first_large_drop xi")
    # The official xi is absolute, in lambda units (1 / UMAP distance), so its meaning changes with the
    # embedding's scale (DESIGN section 4); "relative" = xi times the tree's lambda range.
    xi_mode: str = param("relative", "ours: scale-free threshold; equal flags on 15 of 16 development models and on "
                         "Blend a2a it reached the subspace where the poison splits off (RESULTS.md)",
                         choices=XI_MODES)
    depth: int = param(3, "official code: first_large_drop depth")
    footprint_levels: int = param(3, "ours: where the walk to depth passed over every stable subspace, it walks them "
                                  "again, in order, following past depth only branches that can hold the all-to-one "
                                  "footprint (stability_split) for up to this many more levels and flagging there only "
                                  "the footprint itself ('inflated'); a WaNet set's poison split off one level past "
                                  "depth 3 inside a branch of several classes, walking deeper before the later "
                                  "subspaces were tried lost 16 points of TPR on another, and a run flagged 890 clean "
                                  "samples (76% the target label) past depth (RESULTS.md, issue 17). 0 = depth only")
    # At 1% of 60k samples, under three of five UMAP seeds, the patch's poison sat inside the bags' cluster (595 of
    # the 600 in 3,681 samples, 84% bags) before it split off; a walk that skips single-class clusters never looked.
    footprint_branches: str = param("any-label", "ours: the walk follows a branch that can hold the all-to-one "
                                    "footprint (an inflated label's excess covers half its members there and at "
                                    "least min_cluster_size of them) even where another label is its largest or it "
                                    "reads as a single benign class (RESULTS.md, issue 17, session 30). 'top-label': "
                                    "the session-29 rule, by the largest label only and never into one class",
                                    choices=FOOTPRINT_BRANCHES)
    # Def. IV.1: a cluster's stability is its persistence; a leaf persists until its last point leaves. The
    # official walk compares a single point's exit lambda there ("official"), a near-zero gap.
    leaf_rule: str = param("persistence", "paper: Def. IV.1 (persistence of a leaf until its last point leaves)",
                           choices=LEAF_RULES)
    # Sec. IV-C2: the loop drops layers until benign samples of different classes stay together. A stable split
    # whose every examined split divides benign classes (class_makeup) shows the classes still apart there.
    class_split_layers: int = param(3, "ours: after a subspace whose stable split the labelling excuses whole "
                                    "(every examined split divides benign classes), the loop drops up to this many "
                                    "more layers (paper Sec. IV-C2: benign classes apart is what layers are dropped "
                                    "for); LF's poison split off 1-3 layers further on the 10k development model; "
                                    "a bound, each layer is one more UMAP fit (RESULTS.md, issue 17). 0 = flag "
                                    "nothing there, as the official code's single subspace")
    # "stability": split at the root, flag the more stable cluster, with the class make-up guard below.
    # "official": the official code's flat cut, largest cluster clean, every other cluster flagged.
    labelling: str = param("stability", "paper: Sec. IV-C3 (flag the more stable cluster), with our class make-up "
                           "guard (class_coverage)", choices=LABELLINGS)
    # A cluster holding more than this share of each of its labels' samples (member-weighted, among the
    # clustered samples of the cluster it splits from) is a benign class split off, never flagged, unless
    # its label is inflated by about its size (all-to-one relabelling). Above 1: no guard.
    class_coverage: float = param(0.5, "ours: 'most of its class'; first 0.8, lowered after benign class islands "
                                  "held 0.74-0.75 of their class on the 10k development models (RESULTS.md)")
    # A cluster of mostly one label whose label is not inflated reads as a benign sub-class island.
    island_purity: float = param(0.8, "ours: islands 84-88% one label were flagged at 1.4-4.1% FPR where the "
                                 "backdoor was weak or absent; the all-to-one poison it must not excuse is one label "
                                 "too, but inflated (class_makeup; RESULTS.md, issue 17). First 0.9")
    # The same for a few labels together: a benign island can be a look several classes share (pullover, coat and
    # shirt); all-to-all and untargeted poison spreads over every label, all-to-one poison is one inflated label.
    island_labels: int = param(3, "ours: islands of 2-3 labels (pullover / coat / shirt, dress / T-shirt) were "
                               "flagged by 1-2 of 5 runs on LF, Blend 3%, BadNets 5% and Adaptive-Patch and tied "
                               "the vote on LF under one base seed (RESULTS.md, issue 17); at most a third of the "
                               "classes count (so 1, the one-label rule, below 6 classes). 1 = one label only")
    # At 10% poisoning of ten classes the poison and the target's clean class are the same size; a class cluster
    # keeps its confusable neighbours, relabelled poison is its label alone.
    footprint_purity: float | None = param(0.9, "ours: a cluster of an inflated label holding at least half of "
                                           "that label's clean count is its clean class (benign), not the "
                                           "footprint, unless the label is at least this share of it; the clean "
                                           "T-shirt class was flagged on two WaNet retrains at label share "
                                           "0.79-0.84, poison clusters were 0.98-1.0; it also excused IAD's poison "
                                           "beside benign classes at 0.58 (RESULTS.md, issue 17, session 24). "
                                           "None = no such test")
    # A class cluster is still mostly its class; poison relabelled from several classes can sit beside several
    # of them, its label then a bare majority.
    class_purity: float = param(0.7, "ours: footprint_purity's clean class needs its label at least this share of "
                                "the cluster; the clean T-shirt clusters were 0.79-0.84 label 0, IAD's poison "
                                "beside benign classes 0.58 (RESULTS.md, issue 17, session 25); 0.5 = session 24's "
                                "rule (the label at least half)")
    # A class's neighbours are the few classes it is confused with; the poison's companions, where the attack
    # adds cover samples (a trigger kept with the true label), are drawn from every class.
    class_neighbour_share: float | None = param(0.8, "ours: footprint_purity's clean class also needs its other "
                                                "labels to be few: its top third of the other classes hold at "
                                                "least this share of its other-label members. The clean T-shirt "
                                                "clusters of the development rows had 0.87-1.00; IAD's poison "
                                                "with its cross-trigger covers, read as the clean class on two "
                                                "sets, 0.52-0.68 (RESULTS.md, issue 17, session 26). None = no "
                                                "such test")
    # A sub-island of the target's clean class is as pure as the footprint and its label as inflated; it splits
    # from the rest of its class, relabelled poison from the classes it was drawn from.
    island_rest_share: float | None = param(0.5, "ours: a cluster that reads as the footprint (inflated) is a "
                                            "sub-island of the label's clean class (benign) where the label is at "
                                            "least this share of the rest of its split; on an IAD set four runs "
                                            "flagged clean T-shirt islands (rest 0.64-0.85 label 0, 7.1% FPR), "
                                            "the flagged poison clusters of the development rows had 0.00-0.26 "
                                            "(IAD's partial clusters 0.44-0.45; one IAD run's 88 poison inside the "
                                            "T-shirt branch 0.84, now excused; RESULTS.md, issue 17, session 25). "
                                            "None = no such test")
    # Relabelled poison can split off by source class (what it looked like before the trigger), one cluster per
    # group of sources, each the same label among other classes; the walk flags one of them.
    footprint_rest_share: float | None = param(0.35, "ours: besides the walk's cluster, each other cluster of the "
                                               "run's tree that is the flagged label's footprint (inflated) among "
                                               "other labels (that label under this share of the rest of its split) "
                                               "is flagged too, its other labels dropped, and each cluster gets its "
                                               "own completion probe (complete_runs). WaNet's poison split into "
                                               "upper-body, footwear and bag clusters, a run flagged one; their "
                                               "splits' rest was 0.00-0.29 that label, the target class's own "
                                               "sub-islands' 0.46-0.99; WaNet subset seeds 0 / 1 / 3 / 4 / 5 "
                                               "95.7 / 97.4 / 69.6 / 97.5 / 65.6 -> 97.4 / 98.3 / 80.4 / 98.4 / 87.3% "
                                               "TPR (RESULTS.md, issue 17, session 25). None = the walk's cluster "
                                               "only (paper)")
    # All-to-one poison carries the target label, so a flagged cluster that is mostly one inflated label
    # (class_makeup's footprint) holds its other labels' members only because they sit near the poison.
    drop_off_label: bool = param(True, "ours: a run's flagged cluster that is one inflated label loses its "
                                 "members of other labels (21 of Blend 3%'s 25 false positives carried other "
                                 "labels; RESULTS.md, issue 17); False = the whole cluster (paper / official)")
    # The footprint can sit beside a benign class: poison relabelled from one source class next to that class's
    # clean samples, in one cluster neither label dominates.
    off_label_purity: float = param(0.5, "ours: the flagged cluster counts as the footprint (drop_off_label) where "
                                    "its largest label holds at least this share of it and that label's excess covers "
                                    "half of it; Adaptive-Blend's flagged cluster was 104 poison relabelled 0 beside "
                                    "83 clean trousers (RESULTS.md, issue 17, session 24). island_purity (0.8) = the "
                                    "session-13 rule, one inflated label only")
    noise_rule: str = param("official", "official code: HDBSCAN noise counts as clean ('nearest': a noise sample "
                            "takes its nearest clustered neighbour's label)", choices=NOISE_RULES)
    max_dropped_layers: int | None = param(None, "paper: the loop may drop up to L - 1 trailing layers (None = all)")
    random_state: int | None = param(42, "official code: UMAP random_state")
    # The search's outcome can hinge on one embedding (RESULTS.md, issue 17: the flags of 6 of 10 development
    # rows changed with the seed); more runs, each under its own seed, and a per-sample majority.
    n_seeds: int = param(5, "ours: a per-sample majority of five UMAP seeds; one seed's flags differed from the "
                         "others' on 6 of 10 development models (Blend a2a missed), the majority's did not under three "
                         "base seeds (RESULTS.md, issue 17); 1 = the official code's single embedding")
    # At low poisoning rates some runs find no stable split at all while the others flag the same cluster: with
    # every run voting, Blend at 1% was found under one base seed of three (RESULTS.md, issue 17, low rates).
    abstain: bool = param(True, "ours: a run that flags nothing abstains; a sample is flagged by a majority of the "
                          "runs that flagged, at least two of them (False: a majority of all runs)")
    # A searched subspace can leave part of the poison inside the clean cluster (Blend at 3%: 12% of it, where the
    # all-layers embedding of the same run had it beside the rest); the neighbours there bring it back.
    recover_neighbors: int | None = param(15, "ours: an unflagged sample is also flagged when, averaged over the "
                                          "runs' all-layers embeddings (the search's first subspace), at least "
                                          "recover_share of its this-many nearest neighbours are flagged; "
                                          "RESULTS.md, issue 17 (low rates). None = off (the paper and official "
                                          "code flag the chosen cluster only)")
    recover_share: float = param(0.5, "ours: a majority of the neighbours (see recover_neighbors)")
    # All-to-one relabelling inflates the target label by about the poison's size; where the flagged cluster is
    # that footprint but explains less than the excess, the rest of the relabelled poison is still unflagged.
    complete_footprint: bool = param(True, "ours: where the flags are the all-to-one footprint and the label's "
                                     "excess exceeds the flagged samples of that label by at least min_cluster_size, "
                                     "a logistic regression (flagged vs unflagged samples of other labels, all "
                                     "columns) flags the label's unflagged samples on the flagged side, at most the "
                                     "unexplained excess (RESULTS.md, issue 17: WaNet, LF, BadNets). False = clusters "
                                     "only")
    footprint_rounds: int = param(1, "ours: one probe; further rounds (refitted on what the last added, while the "
                                  "unexplained excess stays >= min_cluster_size) added most of the false positives: "
                                  "1.19% FPR on a held-out WaNet set (RESULTS.md, issue 17)")
    # The probe is fitted against the other labels, so its zero is not where the label's clean samples end; its
    # scores on the label's unflagged samples are two populations, the clean and the rest of the poison - where
    # the probe tells them apart. Where it does not, a two-component fit still splits one skewed population.
    footprint_cut: str = param("two-modes", "ours: the label's unflagged samples taken are those a two-component "
                               "Gaussian mixture of their probe scores puts in the upper component (posterior > 0.5) "
                               "where the components are apart (Ashman's D >= 2) and the mixture's density has two "
                               "modes, else those with decision > 0. On IAD (ASR 82.5%) the probe's scores had one "
                               "mode at D 2.1-2.2 and the mixture took as many clean samples as poison (RESULTS.md, "
                               "issue 17, session 24). 'mixture': two modes not needed (session 21); 'sign': "
                               "decision > 0 only (session 20)", choices=("mixture", "sign", "two-modes"))
    # Runs that each found a different part of the poison out-vote each other (WaNet: runs of 465, 206 and 480
    # samples, two of them in a majority of none); completed, each run's flags are its estimate of the whole.
    footprint_per_run: bool = param(True, "ours: each seed's run's flags are completed (complete_footprint) before "
                                    "the seeds' vote, and the voted flags are not completed again (RESULTS.md, issue "
                                    "17: WaNet). False: the voted flags are completed (session 20)")
    # The whole-set embedding can pack the rest of the poison inside a cluster of benign classes it never divides
    # (IAD subset seed 6: the clothing-source poison inside the clothing classes); alone, that cluster divides.
    footprint_zoom: bool = param(False, "ours (opt-in): where the voted flags are the all-to-one footprint and leave "
                                 "at least min_cluster_size of the label's excess unexplained, the representative "
                                 "run's cluster holding most of the label's unflagged samples (at least the "
                                 "unexplained count of them) is embedded and clustered alone, and its first cluster "
                                 "that reads as the footprint with the "
                                 "attack's cover samples (its other labels spread over many classes) gives its "
                                 "unflagged members of the label (flare_zoom). Post hoc on IAD subset seed 6 that "
                                 "cluster divided into the trigger's population (816 poison, 666 covers, 1 untouched "
                                 "sample) and the clothing classes (RESULTS.md, issue 17, session 38). On the rows of "
                                 "session 39 (one held out) its gate stayed closed. False = off")
    # A source class's relabelled poison can stay inside that class's cluster in every run's tree (IAD subset seed 9:
    # 80 samples labelled 0, all poison, among 816 trousers), where the label's excess no longer shows it missing.
    source_minority: bool = param(False, "ours (opt-in): where the flags are the all-to-one footprint, the label's "
                                  "unflagged samples that most runs' trees put in a node at least island_purity one "
                                  "other class, where the label's members outnumber every other off-label "
                                  "minority_ratio times (flare_minority). Designed on six development rows "
                                  "(RESULTS.md, issue 17, session 40). False = off")
    minority_ratio: float = param(5.0, "ours: the label's members against the next off-label in such a node; on the "
                                  "development rows the poison's minorities were 5.5-97 times it, clean label-0 "
                                  "minorities 0.3-2.3 times")
    minority_min_members: int = param(20, "ours: fewer of the label in a node are not read (a fifth of "
                                      "min_cluster_size's default)")
    # Relabelled poison drawn from classes far from the target can stay by its source classes in every embedding
    # (IAD at 60 epochs: sandals 4 of 115 flagged), where no cluster holds it and the probes fitted on what was
    # found do not reach it; in the features it still sits with the rest of the poison.
    footprint_components: int | None = param(15, "ours: where the flags are the all-to-one footprint and "
                                             "still explain less than the label's excess by min_cluster_size, the "
                                             "label's members are linked where each is among the other's this-many "
                                             "nearest neighbours (standardised columns, all samples searched), and "
                                             "each linked component of min_cluster_size to label-excess members "
                                             "whose other-label neighbours are spread (component_spread) is flagged "
                                             "whole (footprint_components_of). On IAD at 60 epochs (subset seed 0) "
                                             "15 took a 983-member component, 902 poison, and with the residual "
                                             "probe TPR went 41 -> 97%; 5 split the poison into pieces no larger "
                                             "than 168, 20 merged WaNet's with the clean class. On a held-out IAD "
                                             "row it changed nothing: at 15 poison and clean formed one component "
                                             "larger than the excess; on a second, 51 -> 98% under the base where the "
                                             "default missed (RESULTS.md, issue 17, session 35). Under session 36's "
                                             "default it took IAD subset seed 0 from 41.2 to 96.7-96.9% (the FPR "
                                             "added: covers), WaNet e20 subset 1 up under two bases, and left 15 "
                                             "other development rows as they were; four held-out rows flagged "
                                             "identically (session 37). None = off")
    # All-to-one relabelling adds no more than the label's excess to it; a run that found all of it shows which
    # of the other runs' clusters cannot be poison (IAD: a sub-island of clean T-shirts won the vote).
    footprint_exclusion: bool = param(True, "ours: (exclude_beside_complete) where a seed's run flags a cluster "
                                      "that alone holds the label's excess, clusters of any run lying mostly outside "
                                      "it are dropped and runs that found part of it are completed with it, before "
                                      "the vote. Development: IAD a2o 60 epochs subset seed 1, 56.0 / 0.77, 13.5 / "
                                      "8.72, 56.7 / 8.64 -> 98.1 / 0.82, 97.8 / 0.82, 97.9 / 0.82 (bases 42, 0, 1; "
                                      "1,217 -> 13 apart), 14 other rows identical. Held out: IAD subset seed 2, 51.1 "
                                      "-> 97.6 under base 42, the others unchanged (527 -> 2 apart); IAD subset seed "
                                      "3 and WaNet subset seed 20 identical (RESULTS.md, issue 17, session 36). A "
                                      "complete cluster may hold up to the excess x K / (K - 1) + min_cluster_size of "
                                      "the label (its own triggered samples keep it): designed post hoc on IAD subset "
                                      "seed 3 (734 -> 5 apart, 32.9 -> 97.4 under base 42), held out on IAD subset "
                                      "seed 4 with identical flags (sessions 36-37). False = the runs vote as they "
                                      "flagged")
    component_spread: float = param(0.5, "ours: a component is taken where no one other label holds this share of "
                                    "its members' neighbours of other labels (and it has some): the clean target "
                                    "class keeps the class it is confused with (T-shirt components 0.64-0.70, "
                                    "shirts first), the poison sits among its several source classes (0.18-0.41) on "
                                    "the development rows (RESULTS.md, issue 17, session 35)")
    # The completion's probe reads the other labels; a probe fitted within the label, flagged against the label's
    # unflagged samples and scored on samples it was not fitted on, ranks the last of the poison first.
    residual_probe: bool = param(True, "ours: where the final flags are the all-to-one footprint, the label's "
                                 "unflagged samples that a logistic regression (flagged vs the label's unflagged, "
                                 "cross-fitted in residual_folds folds, balanced classes) puts on the flagged side "
                                 "(decision > 0 on the fold it was not fitted on) are flagged too. On 28 development "
                                 "sets it added 273 poison, 13 cover and 60 untouched samples (30 of the clean on an "
                                 "IAD set without a learned backdoor), none lost; on a held-out WaNet set 9 poison, "
                                 "no clean (RESULTS.md, issue 17, session 27). False: off (session 26)")
    residual_folds: int = param(5, "ours: the usual k of cross-fitting; each probe sees 4/5 of the samples")
    # The flags differ with the UMAP seed at the margins (5-51 samples on the development rows, all of the target
    # label), and so does what the residual probe adds to them.
    settle: bool = param(True, "ours: where the final flags are the all-to-one footprint, the label's members are "
                         "decided again by within-label probes, flagged and unflagged alike, round after round on "
                         "their own decisions, until a round changes none (settle_footprint; the folds are fixed by "
                         "sample); kept where the rounds converge and the scores are two populations apart. It "
                         "made the three UMAP bases' flags identical on six more development rows; cut by sign it "
                         "unflagged poison the vote had found (WaNet subset seed 1 98.9 -> 97.6%), cut by the mixture "
                         "(settle_cut) it kept every hit and added six, but on a held-out WaNet set the bases reached "
                         "two fixed points 12 samples apart (99.0% TPR under each), so it was left off "
                         "(RESULTS.md, issue 17, session 31). On six retrained WaNet and LF rows it did no harm "
                         "against the default and brought the bases closer, but on an IAD row without a learned "
                         "backdoor it moved one base only (833 -> 888 apart), so it stayed off (session 32). Under "
                         "the exclusion default five more development rows reached the issue's target with it, but "
                         "on a held-out IAD row (ASR 84.4%) it raised FPR 0.99 -> 1.30%, 22 of the samples untouched "
                         "by the attack, past its reading (session 37). With settle_cut='hysteresis' it passed a "
                         "reading written before it ran on three held-out rows (IAD 98.4-98.9% TPR at FPR -0.01 to "
                         "0 points, WaNet 99.4% with the bases identical, one IAD row not settled), so it is on by "
                         "default (session 38)")
    settle_overlap: float = param(0.75, "ours: settling is kept only where the settled flags share at least this "
                                  "share of their union with the flags it started from (Jaccard); 0.82-1.00 on every "
                                  "other settled development fit, 0.65 on the IAD row with no learned backdoor, whose "
                                  "rounds had drifted to 3.8% FPR (RESULTS.md, issue 17, session 31)")
    # The rounds' balanced probes draw the boundary midway; the poison nearest the clean side (on WaNet, drawn from the
    # target class itself) falls beyond it.
    settle_cut: str = param("hysteresis", "ours: once the rounds converge, the label's members already flagged "
                            "stay where they are in the upper component of a two-component mixture of the last "
                            "scores (posterior > 0.5), and those it would add must also score positive "
                            "('hysteresis'): on IAD subsets 1-5 (with covers) the mixture's cut alone added 5-22 "
                            "samples the attack left untouched, below the probe's boundary, hysteresis 0-5, and it "
                            "passed a held-out reading (RESULTS.md, issue 17, session 38). 'mixture': the upper "
                            "component alone; on the development rows it kept the hit settling by sign lost (WaNet "
                            "subset seed 1 97.6 -> 98.3%) and six rows became hits (session 31). 'sign': a positive "
                            "score (session 31's first rule)",
                            choices=SETTLE_CUTS)
    settle_rounds: int = param(40, "ours: a bound on settle's rounds; the development rows that converged took 1-37, "
                               "Adaptive-Blend 10%, WaNet 3% and an IAD row were still changing at 40 (RESULTS.md, "
                               "issue 17, session 31)")
    settle_strengths: tuple[float, ...] = param(
        (0.01,), "ours: the inverse regularisation C of settle's probes, one stage of rounds per value, each starting "
        "from the decisions the one before settled on; (0.01,): the residual probe's C (session 31). (0.001, 0.01) "
        "made the bases identical on LF and a WaNet row, but settled another 5 points lower and missed the TPR and "
        "stability bars on a held-out WaNet set (RESULTS.md, issue 17, session 32)")
    # Speed options, measured against the default in benchmarks/bench_flare_clustering.py. None = as the
    # official code (raw columns, UMAP's own approximate neighbour search).
    pca_components: int | None = param(None, "official code: no projection before UMAP")
    knn_backend: str | None = param(None, "official code: UMAP's own NN-descent (or 'auto'|'faiss'|'torch' exact kNN)",
                                    choices=(None, "auto", "faiss", "torch"))
    umap_backend: str = param("auto", "ours: the first available backend, GPU first (cluster registry)")
    hdbscan_backend: str = param("auto", "ours: the first available backend, GPU first (cluster registry)")

    def makeup_options(self) -> dict:
        """class_makeup's keyword options under these parameters (the walk and other_footprints read clusters
        alike)."""
        return dict(island_purity=self.island_purity, island_labels=self.island_labels,
                    footprint_purity=self.footprint_purity, class_purity=self.class_purity,
                    class_neighbour_share=self.class_neighbour_share, island_rest_share=self.island_rest_share)

    def __post_init__(self):
        integer(self.n_seeds, "n_seeds", 1)
        if self.recover_neighbors is not None:
            integer(self.recover_neighbors, "recover_neighbors", 1)
        if not 0.0 < self.recover_share <= 1.0:
            raise InputError(f"recover_share must be in (0, 1], got {self.recover_share!r}")
        if not 0.5 < self.island_purity <= 1.0:
            raise InputError(f"island_purity must be in (0.5, 1], got {self.island_purity!r}")
        if self.footprint_purity is not None and not 0.5 < self.footprint_purity <= 1.0:
            raise InputError(f"footprint_purity must be None or in (0.5, 1], got {self.footprint_purity!r}")
        if not 0.5 <= self.class_purity < 1.0:
            raise InputError(f"class_purity must be in [0.5, 1), got {self.class_purity!r}")
        if self.footprint_purity is not None and self.class_purity >= self.footprint_purity:
            raise InputError(f"class_purity ({self.class_purity!r}) must be below footprint_purity "
                             f"({self.footprint_purity!r}): no cluster could read as the clean class")
        if self.class_neighbour_share is not None and not 0.0 < self.class_neighbour_share <= 1.0:
            raise InputError(f"class_neighbour_share must be None or in (0, 1], got {self.class_neighbour_share!r}")
        if self.island_rest_share is not None and not 0.0 < self.island_rest_share <= 1.0:
            raise InputError(f"island_rest_share must be None or in (0, 1], got {self.island_rest_share!r}")
        if self.footprint_rest_share is not None and not 0.0 < self.footprint_rest_share < 1.0:
            raise InputError(f"footprint_rest_share must be None or in (0, 1), got {self.footprint_rest_share!r}")
        if not 0.5 <= self.off_label_purity <= 1.0:
            raise InputError(f"off_label_purity must be in [0.5, 1], got {self.off_label_purity!r}")
        integer(self.island_labels, "island_labels", 1)
        integer(self.class_split_layers, "class_split_layers", 0)
        integer(self.footprint_rounds, "footprint_rounds", 1)
        integer(self.footprint_levels, "footprint_levels", 0)
        integer(self.residual_folds, "residual_folds", 2)
        if self.footprint_components is not None:
            integer(self.footprint_components, "footprint_components", 1)
        if not 0.0 < self.component_spread <= 1.0:
            raise InputError(f"component_spread must be in (0, 1], got {self.component_spread!r}")
        integer(self.settle_rounds, "settle_rounds", 1)
        integer(self.minority_min_members, "minority_min_members", 1)
        if real(self.minority_ratio, "minority_ratio", 1.0) == float("inf"):  # inf x 0 off-labels reads every node
            raise InputError(f"minority_ratio must be finite, got {self.minority_ratio!r}")
        if isinstance(self.settle_strengths, list):
            object.__setattr__(self, "settle_strengths", tuple(self.settle_strengths))
        strengths = self.settle_strengths
        if (not isinstance(strengths, tuple) or not strengths or
                not all(isinstance(c, (int, float)) and not isinstance(c, bool) and c > 0 for c in strengths)):
            raise InputError(f"settle_strengths must be a non-empty list of positive numbers (each stage's C), "
                             f"got {strengths!r}")
        if not 0.0 <= self.settle_overlap <= 1.0:
            raise InputError(f"settle_overlap must be in [0, 1], got {self.settle_overlap!r}")
        if self.pca_components is not None and (not isinstance(self.pca_components, int) or self.pca_components < 2):
            raise InputError(f"pca_components must be None or an integer >= 2, got {self.pca_components!r}")
        for name, allowed in choices_of(FlareParams).items():
            if getattr(self, name) not in allowed:
                raise InputError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")


@dataclass
class SubspaceStep:
    """One try of the subspace loop: which layers were dropped and what the condensed tree showed."""

    dropped_layers: int
    n_columns: int
    gaps: list = field(default_factory=list)  # lambda gap at each step of the depth-limited walk
    threshold: float = 0.0
    split: dict | None = None
    seconds: float = 0.0
    excused: bool = False  # a stable split the labelling excused whole (benign classes): the loop went on
    footprint_walk: bool = False  # excused at depth, then flagged by the walk past it (FlareParams.footprint_levels)


def subspace_matrix(features: np.ndarray, layout: FeatureLayout, dropped: int, reduce: str) -> np.ndarray:
    """Columns of the first L - dropped layers: per channel as stored, or one min per layer (official)."""
    if reduce == "layer":
        return layout.per_layer(features)[:, : layout.num_layers - dropped]
    return layout.drop_last_layers(features, dropped)


@dataclass(frozen=True)
class StableSplit:
    """Where the walk found a stable cluster: `node`, its persistence `gap`, and `cut_lambda`, a
    density level at which the node is still one cluster (the flat cut is taken there)."""

    node: int
    gap: float
    cut_lambda: float
    depth: int


def walk_for_stable_split(tree, start: int, threshold: float, depth: int, leaf_rule: str):
    """The depth-limited walk of the official first_large_drop (largest child each step), with the
    leaf case by `leaf_rule`. Returns (gaps along the walk, StableSplit or None)."""
    gaps = []
    for level, step in enumerate(cluster.lambda_gaps(tree, start, depth)):
        is_leaf = not tree.is_cluster(step.child)
        if is_leaf and leaf_rule == "persistence":
            gap = cluster.persistence(tree, step.parent)
            gaps.append(gap)
            birth = cluster.birth_lambda(tree, step.parent)
            if gap > threshold:
                return gaps, StableSplit(step.parent, gap, birth + min(CUT_MARGIN, gap / 2), level)
            return gaps, None
        gaps.append(step.gap)
        if step.gap > threshold:
            return gaps, StableSplit(step.parent, step.gap, step.lambda_val - CUT_MARGIN, level)
    return gaps, None


def reduce_dimension(X: np.ndarray, components: int | None, random_state: int | None) -> np.ndarray:
    """X projected on its first `components` principal components (randomised SVD); X itself when
    it has no more columns than that, or when components is None."""
    if components is None or X.shape[1] <= components:
        return X
    from sklearn.decomposition import PCA

    return PCA(components, svd_solver="randomized", random_state=random_state).fit_transform(X).astype(np.float32)


def _try_subspace(X: np.ndarray, params: FlareParams, stage=None):
    X = reduce_dimension(X, params.pca_components, params.random_state)
    if stage is not None:  # UMAP and HDBSCAN take minutes on large sets: the caller may say what is running
        stage("umap", X.shape)
    graph = None if params.knn_backend is None else cluster.knn(X, params.n_neighbors, backend=params.knn_backend)
    embedding = cluster.umap(X, n_neighbors=params.n_neighbors, min_dist=params.min_dist,
                             n_components=params.n_components, random_state=params.random_state,
                             backend=params.umap_backend, knn=graph)
    if stage is not None:
        stage("hdbscan", embedding.shape)
    fit = cluster.hdbscan(embedding, min_cluster_size=params.min_cluster_size, backend=params.hdbscan_backend)
    tree = fit.condensed_tree
    start = cluster.largest_first_level_cluster(tree)
    threshold = params.xi if params.xi_mode == "absolute" else params.xi * cluster.lambda_range(tree)
    if start is None:
        return embedding, fit, [], threshold, None
    gaps, split = walk_for_stable_split(tree, start, threshold, params.depth, params.leaf_rule)
    return embedding, fit, gaps, threshold, split


def search_subspace(features: np.ndarray, layout: FeatureLayout, params: FlareParams, *, progress=None,
                    stage=None, label=None, deeper=None):
    """The paper's loop: drop 0, 1, 2, ... trailing BN layers until a stable split appears.

    progress(step) is called after each subspace is tried (and once more for the step the deeper walk flags in);
    stage(name, shape) before each UMAP ("umap") and HDBSCAN ("hdbscan") fit, with the shape of the matrix it
    fits. label(fit) -> (node, verdicts) labels a subspace with a stable split (stability_split); where it flags
    no node the subspace is passed over and the loop goes on for at most params.class_split_layers more layers
    past the first stable split. Where every labelled subspace was passed over, deeper(fit) (the walk past depth,
    into the footprint's branches) labels them again in the loop's order and the first it flags in is chosen (its
    step's footprint_walk).

    Returns (steps, chosen, first) where chosen = (step, embedding, hdbscan fit, split, labelled) or None when no
    subspace shows a stable split (the official code stops after the first try and crashes then); labelled is
    label's result (None without label), and where every labelled subspace was passed over, chosen is the first
    stable one. first is the embedding of the first subspace tried (all layers).
    """
    n_layers = layout.num_layers
    last = n_layers - 1 if params.max_dropped_layers is None else min(params.max_dropped_layers, n_layers - 1)
    steps, first, passed_over = [], None, []  # passed_over[0]: the first stable subspace, the fallback
    for dropped in range(last + 1):
        if passed_over and dropped > passed_over[0][0].dropped_layers + params.class_split_layers:
            break
        t0 = time.perf_counter()
        X = subspace_matrix(features, layout, dropped, params.reduce)
        embedding, fit, gaps, threshold, split = _try_subspace(X, params, stage)
        first = embedding if first is None else first
        labelled = None if split is None or label is None else label(fit)
        step = SubspaceStep(dropped, X.shape[1], gaps, threshold, None if split is None else asdict(split),
                            time.perf_counter() - t0, excused=labelled is not None and labelled[0] is None)
        steps.append(step)
        if progress is not None:
            progress(step)
        if split is None:
            continue
        chosen = (step, embedding, fit, split, labelled)
        if not step.excused:
            return steps, chosen, first
        if deeper is not None or not passed_over:  # without the deeper walk only the fallback is read again
            passed_over.append(chosen)
    for step, embedding, fit, split, _ in passed_over if deeper is not None else ():
        labelled = deeper(fit)
        if labelled[0] is not None:
            step.excused, step.footprint_walk = False, True
            if progress is not None:  # the step again, now chosen: a long scan says what it settled on
                progress(step)
            return steps, (step, embedding, fit, split, labelled), first
    return steps, passed_over[0] if passed_over else None, first


def whole_class_share(y: np.ndarray, samples: np.ndarray, within: np.ndarray | None = None) -> float:
    """Member-weighted share of each label's samples that the group holds, counting a label's samples
    among `within` (the cluster being divided; default all): 1.0 for a union of whole classes, about
    0.5 for half of one class, about 1/K for samples spread over K classes."""
    size = int(y.max()) + 1
    counts = np.bincount(y[samples], minlength=size).astype(np.float64)
    totals = np.bincount(y if within is None else y[within], minlength=size)
    held = counts > 0
    return float((counts[held] ** 2 / totals[held]).sum() / counts.sum())


def label_excess(y: np.ndarray) -> np.ndarray:
    """Per label, how many samples it has beyond the median label count (0 when not above it): the
    footprint of all-to-one poisoning, which relabels rN samples into one class."""
    counts = np.bincount(y)
    return np.maximum(counts - np.median(counts[counts > 0]), 0)


def class_makeup(y: np.ndarray, samples: np.ndarray, within: np.ndarray, excess: np.ndarray,
                 class_coverage: float, island_purity: float = FlareParams.island_purity,
                 island_labels: int = 1, footprint_purity: float | None = None,
                 class_purity: float = 0.5, island_rest_share: float | None = None,
                 class_neighbour_share: float | None = None) -> dict:
    """Whether a cluster is a benign class (or classes, or part of one class) split off, and the evidence.

    Benign when it holds more than `class_coverage` of each of its labels' samples (whole_class_share,
    among the clustered samples of the divided node), or when it is essentially a few labels (its top
    `island_labels` labels, at most a third of the classes, hold >= island_purity) - unless its largest label
    is at least half of it and that label's excess over the median label count covers half of it too: that
    is the footprint of relabelled all-to-one poison (whose cluster holds only r / (r + (1 - r) / K) of its
    label, 0.53 at 10%, K=10), alone ("inflated": never benign) or beside a benign label. A cluster of such
    poison and most of a benign class is still a class split at its level, so the walk divides it next.
    All-to-all and untargeted poison carry labels spread over every class. A few-label part of classes that
    is not inflated can be a benign sub-class island (measured: 2,173 sandals, 35% of their class, split off
    on the clean set with UMAP seed 0; pullover, coat and shirt together on LF) or clean-label poison; it is
    treated as benign, so clean-label attacks are out of this rule's reach.

    With `footprint_purity`, a cluster whose largest label is inflated and at least half of it, and holds at
    least half of that label's clean count (its samples less its excess), reads as that label's clean class
    ("target_class": benign, not the footprint) unless that label is at least `footprint_purity` of it: at 10%
    poisoning and ten classes the poison and the target's clean class are the same size, and only the poison
    carries its label alone (every relabelled sample has it), while a class cluster keeps its neighbours.
    The label must also be at least `class_purity` of it: a class keeps a few neighbours, while poison drawn
    from several classes can sit beside several of them and leave its label a bare majority. With
    `class_neighbour_share`, those neighbours must also be few: the top third of the other classes hold at least
    that share of its other-label members ("neighbour_share"); where the attack adds cover samples (a trigger
    with the true label: IAD's cross-trigger samples), they sit with the poison and come from every class.

    With `island_rest_share`, a cluster that would read as the footprint is a sub-island of its label's clean
    class ("target_island": benign) where that label is at least that share of the rest of the split (`within`
    less the cluster): it splits from the rest of its class, relabelled poison from its source classes.
    """
    labels = y[samples]
    counts = np.bincount(labels, minlength=len(excess))
    top = int(counts.argmax())
    n = len(samples)
    purity = float(counts[top] / n)
    share = whole_class_share(y, samples, within)
    third = len(excess) // 3  # "a few labels": at most a third of the classes
    few = max(1, min(int(island_labels), third))
    few_share = float(np.sort(counts)[::-1][:few].sum() / n)
    others = np.sort(np.delete(counts, top))[::-1]
    neighbour_share = float(others[:max(1, third)].sum() / others.sum()) if others.sum() else 1.0
    excess_covers = excess[top] >= 0.5 * n  # the label's excess over the median covers half the cluster
    # the label's clean count (its samples less its excess) is counted only where the cheaper tests pass
    target_class = (footprint_purity is not None and class_purity <= purity < footprint_purity and excess_covers
                    and (class_neighbour_share is None or neighbour_share >= class_neighbour_share)
                    and counts[top] >= 0.5 * (np.count_nonzero(y == top) - excess[top]))
    rest = len(within) - n
    rest_share = float((np.count_nonzero(y[within] == top) - counts[top]) / rest) if rest > 0 else 0.0
    # the footprint unless read as the label's clean class or a sub-island of it
    footprint_like = purity >= island_purity and excess_covers and not target_class
    target_island = footprint_like and island_rest_share is not None and rest_share >= island_rest_share
    inflated = footprint_like and not target_island
    island = few_share >= island_purity and min(counts[top], excess[top]) < 0.5 * n
    one_label = purity >= island_purity and not inflated
    return {"class_share": share, "top_label": top, "purity": purity, "few_label_share": few_share,
            "label_excess": float(excess[top]), "inflated": bool(inflated), "target_class": bool(target_class),
            "neighbour_share": round(neighbour_share, 4),
            "rest_share": round(rest_share, 4), "target_island": bool(target_island),
            "benign_class_split": bool((share > class_coverage or island or target_class or target_island)
                                       and not inflated),
            "one_benign_class": bool(one_label)}


def holds_footprint(labels: np.ndarray, excess: np.ndarray, min_excess: float, top_only: bool = False) -> bool:
    """Whether a cluster (its members' labels) can hold the all-to-one footprint: a label's excess over the median
    label count is at least min_excess and covers at least half of that label's members in it, and it has at least
    min_excess such members. The label need not be the cluster's largest: a few relabelled poison can sit inside
    another class's cluster (measured: 595 of the 1% patch's 600 on 60k samples in a cluster 84% bags). top_only: the
    cluster's largest label only, with no minimum of members (session 29)."""
    counts = np.bincount(labels, minlength=len(excess))
    covered = excess >= np.maximum(min_excess, 0.5 * counts)
    if top_only:
        return bool(covered[counts.argmax()])
    return bool((covered & (counts >= max(min_excess, 1))).any())


def stability_split(tree, y: np.ndarray | None, levels: int, class_coverage: float,
                    footprint_levels: int = 0, min_excess: float = 0.0, top_label_only: bool = False, **makeup):
    """Paper Sec. IV-C3 with the class make-up guard: at the root's split, the children are taken in
    order of stability (persistence, Def. IV.1) and the first that is not a benign class split
    (`class_makeup`) is poisoned. When every child of a split is one, the splits of those children are
    examined next, level by level for at most `levels` levels, larger clusters first - all of them, not
    only the largest (measured: with another UMAP seed the poison sat in the smaller branch) - except a
    child that is a single benign class, whose own splits are within one class, unless it can hold the
    all-to-one footprint (holds_footprint). Past `levels`, the walk goes on
    for up to `footprint_levels` more levels into the children that can hold the footprint only, and flags
    there only the footprint itself (class_makeup's "inflated"): relabelled poison inside a branch of several
    classes can split off deeper than the official depth (measured: one level further on a WaNet set), and so
    can the target class's clean part beside a neighbouring class. top_label_only (FlareParams.footprint_branches
    "top-label", session 29): a single benign class is never followed, and a branch holds the footprint by its
    largest label only.
    `makeup` = class_makeup's keyword options (FlareParams.makeup_options()). Returns (flagged node or None, one
    verdict dict per examined split)."""
    excess = None if y is None else label_excess(y)
    frontier, verdicts = [tree.root], []
    for level in range(levels + footprint_levels):
        next_frontier = []
        for node in frontier:
            children = cluster.cluster_children(tree, node)
            if len(children) < 2:
                verdicts.append({"level": level, "node": int(node), "children": [], "decision": "does not divide"})
                continue
            # Shares count each label among the clustered samples of the divided node: samples that left
            # it as noise before it divided belong to neither side and would make a whole class look partial.
            groups = [cluster.members(tree, c) for c in children]
            within = np.concatenate(groups)
            rows = [{"node": int(c), "size": int(len(g)), "persistence": cluster.persistence(tree, c),
                     **({} if y is None else class_makeup(y, g, within, excess, class_coverage, **makeup))}
                    for c, g in zip(children, groups)]
            verdict = {"level": level, "node": int(node), "children": rows}
            verdicts.append(verdict)
            for row in sorted(rows, key=lambda r: -r["persistence"]):
                if row.get("inflated", False) if level >= levels else not row.get("benign_class_split", False):
                    verdict["decision"] = f"flag {row['node']}"
                    return row["node"], verdicts
            verdict["decision"] = ("no child is the footprint (past depth)" if level >= levels else
                                   "every child is a benign class split")
            # a single benign class's splits are within that class, unless the poison sits in it too
            next_frontier += [row["node"] for row, group in zip(rows, groups)
                              if (not row["one_benign_class"] and level + 1 < levels)
                              or (excess is not None and not (top_label_only and row["one_benign_class"])
                                  and holds_footprint(y[group], excess, min_excess, top_only=top_label_only))]
        frontier = next_frontier
    return None, verdicts


def other_footprints(tree, y: np.ndarray, label: int, rest_share: float, params: FlareParams,
                     flagged: int | None = None) -> list[dict]:
    """The other clusters of one tree that are `label`'s footprint out of place: class_makeup reads them as
    inflated (at the run's island and footprint purities) with that label on top, and the label is under
    `rest_share` of the other children of the split they leave. Relabelled poison that split off by source
    class sits among its source classes; a sub-island of the target's clean class splits from the rest of
    that class. Each found cluster ends the search down its branch (its children are in it), and so does
    the `flagged` node. Returns one row per cluster: node, size and its members of the label (to flag)."""
    excess, found, frontier, members = label_excess(y), [], [tree.root], cluster.all_members(tree)
    while frontier:
        node = frontier.pop()
        children = cluster.cluster_children(tree, node)
        if len(children) < 2:
            continue
        groups = [members[c] for c in children]
        within = np.concatenate(groups)
        for child, group in zip(children, groups):
            if child == flagged:
                continue
            row = class_makeup(y, group, within, excess, params.class_coverage, **params.makeup_options())
            if row["inflated"] and row["top_label"] == label and row["rest_share"] < rest_share:
                found.append({"node": int(child), "size": int(len(group)), "rest_share": row["rest_share"],
                              "members": group[y[group] == label]})
            else:
                frontier.append(child)
    return found


def flagged_makeup(flags: np.ndarray, y: np.ndarray, purity: float = FlareParams.island_purity) -> dict:
    """class_makeup of the flagged samples among all the samples: is what is flagged the all-to-one footprint
    ("inflated": its largest label at least `purity` of it), of which label ("top_label"), and that label's excess
    over the median label count."""
    return class_makeup(y, np.flatnonzero(flags), np.arange(len(y)), label_excess(y), 1.0, purity)


def off_label_members(flags: np.ndarray, y: np.ndarray, purity: float = FlareParams.off_label_purity
                      ) -> np.ndarray:
    """The flagged samples to unflag: when what is flagged holds the all-to-one footprint (class_makeup's
    "inflated" at `purity`: its largest label is at least that share of it, and that label's excess over the
    median label count covers at least half of it), its members with any other label; none otherwise
    (all-to-all, untargeted and clean-label flags)."""
    if not flags.any():
        return np.zeros(len(flags), bool)
    makeup = flagged_makeup(flags, y, purity)
    return flags & (y != makeup["top_label"]) if makeup["inflated"] else np.zeros(len(flags), bool)


def flat_labels(fit, split: StableSplit, min_cluster_size: int) -> np.ndarray:
    """Official labelling: cut the single-linkage tree at distance 1 / cut_lambda, where the stable
    cluster is still whole; components under min_cluster_size are noise (-1)."""
    return cluster.cut_single_linkage(fit.single_linkage, 1.0 / split.cut_lambda, min_cluster_size)


def assign_noise_to_nearest(labels: np.ndarray, embedding: np.ndarray) -> np.ndarray:
    from scipy.spatial import cKDTree

    noise = labels < 0
    if not noise.any() or noise.all():
        return labels
    _, nearest = cKDTree(embedding[~noise]).query(embedding[noise])
    out = labels.copy()
    out[noise] = labels[~noise][nearest]
    return out


def flags_from_clusters(labels: np.ndarray) -> np.ndarray:
    """Official rule: the largest label group (noise included in the count) is clean; every other
    non-noise cluster is poisoned; noise is clean."""
    values, counts = np.unique(labels, return_counts=True)
    largest = values[np.argmax(counts)]
    return (labels != largest) & (labels >= 0)


def cluster_table(labels: np.ndarray, flags: np.ndarray, y: np.ndarray | None, embedding: np.ndarray) -> list[dict]:
    """Per flat cluster: size, whether flagged, and its class make-up (a flagged cluster holding most
    of one class is the signature of a benign class split off, DESIGN section 4)."""
    rows = []
    for label in np.unique(labels):
        members = labels == label
        row = {"cluster": int(label), "size": int(members.sum()), "flagged": bool(flags[members].any()),
               "centre": embedding[members].mean(axis=0).round(4).tolist()}
        if y is not None:
            classes, counts = np.unique(y[members], return_counts=True)
            top = np.argsort(-counts)[:3]
            row["classes"] = {int(classes[i]): int(counts[i]) for i in top}
            row["share_of_top_class"] = float(counts[top[0]] / (y == classes[top[0]]).sum())
        rows.append(row)
    return rows


def suspicion_scores(embedding: np.ndarray, flags: np.ndarray) -> np.ndarray:
    """Distance from the clean samples' median in the embedding, in units of their median distance."""
    clean = embedding[~flags] if (~flags).any() else embedding
    centre = np.median(clean, axis=0)
    distance = np.linalg.norm(embedding - centre, axis=1)
    return distance / max(float(np.median(distance[~flags] if (~flags).any() else distance)), 1e-12)


@dataclass
class FlareRun:
    """One pass of the search and the labelling under one UMAP random_state."""

    random_state: int | None
    steps: list
    flags: np.ndarray
    labels: np.ndarray
    embedding: np.ndarray | None
    condensed_tree: object | None
    subspace: int | None
    diagnostics: dict
    full_embedding: np.ndarray | None = None  # the all-layers subspace's embedding (recover_by_neighbours)
    # the samples of each footprint cluster flagged (the walk's, then other_footprints'), where there are several
    footprints: list | None = None


def fit_once(features: np.ndarray, layout: FeatureLayout, y: np.ndarray | None, params: FlareParams,
             random_state: int | None, *, progress=None, stage=None) -> FlareRun:
    """The subspace search and the labelling (stability split or the official flat cut) under one seed."""
    if random_state != params.random_state:
        params = replace(params, random_state=random_state)
    label = deeper = None
    if params.labelling == "stability":
        def label(fit, footprint_levels=0):
            return stability_split(fit.condensed_tree, y, params.depth, params.class_coverage,
                                   footprint_levels=footprint_levels, min_excess=params.min_cluster_size,
                                   top_label_only=params.footprint_branches == "top-label",
                                   **params.makeup_options())
        if params.footprint_levels and y is not None:
            def deeper(fit):
                return label(fit, params.footprint_levels)
    steps, chosen, first = search_subspace(features, layout, params, progress=progress, stage=stage, label=label,
                                           deeper=deeper)
    n = len(features)
    diagnostics = {"n_layers": layout.num_layers, "layers": list(layout.layer_names),
                   "steps": [asdict(s) for s in steps]}
    if chosen is None:
        # Fallback (DESIGN section 4): no subspace shows a stable benign cluster -> flag nothing, say why.
        diagnostics["stable_subspace_found"] = False
        diagnostics["explanation"] = (
            f"no lambda gap exceeded the threshold in any of {len(steps)} subspaces "
            f"(largest gap {max((g for s in steps for g in s.gaps), default=0.0):.4g}); nothing flagged")
        return FlareRun(random_state, steps, np.zeros(n, bool), np.full(n, -1), None, None, None, diagnostics,
                        first)
    step, embedding, fit, split, labelled = chosen
    footprints = None
    diagnostics.update(stable_subspace_found=True, dropped_layers=step.dropped_layers, n_columns=step.n_columns,
                       split=step.split, footprint_walk=step.footprint_walk)
    if params.labelling == "official":
        labels = flat_labels(fit, split, params.min_cluster_size)
        diagnostics["n_noise_at_cut"] = int((labels < 0).sum())
        if params.noise_rule == "nearest":
            labels = assign_noise_to_nearest(labels, embedding)
        flags = flags_from_clusters(labels)
        stabilities = cluster.cluster_stabilities(fit.condensed_tree)
        diagnostics["hdbscan_stability_of_stable_node"] = stabilities.get(split.node, 0.0)
    else:
        tree = fit.condensed_tree
        flagged, verdicts = labelled
        diagnostics["verdicts"] = verdicts
        excused = [s.dropped_layers for s in steps if s.excused]
        if excused:
            diagnostics["excused_subspaces"] = excused
        # Per-sample cluster: which root child it belongs to (-1: left the root before it divided); the
        # flagged cluster, wherever the walk found it, gets the next number.
        labels = np.full(n, -1)
        root_children = cluster.cluster_children(tree, tree.root)
        for index, child in enumerate(root_children):
            labels[cluster.members(tree, child)] = index
        flags = np.zeros(n, bool)
        diagnostics["flagged_node"] = flagged
        if flagged is None:
            where = (f"in each of the {len(excused)} subspaces with a stable split (dropped layers "
                     f"{', '.join(map(str, excused))})" if len(excused) > 1 else "")
            past = (f" (then up to {params.footprint_levels} more in branches that can hold the all-to-one "
                    "footprint)" if deeper is not None else "")
            diagnostics["explanation"] = (f"the walk down the condensed tree examined {len(verdicts)} split(s) "
                                          f"in at most {params.depth} levels{past}{' ' + where if where else ''} and "
                                          "each divided whole classes (benign class splits) or did not divide; "
                                          "nothing flagged")
        else:
            flags[cluster.members(tree, flagged)] = True
            if params.drop_off_label and y is not None:
                off = off_label_members(flags, y, params.off_label_purity)
                flags &= ~off
                diagnostics["off_label_unflagged"] = int(off.sum())
            makeup = (flagged_makeup(flags, y, params.off_label_purity)
                      if params.footprint_rest_share is not None and y is not None else None)
            if makeup is not None and makeup["inflated"]:
                found = other_footprints(tree, y, makeup["top_label"], params.footprint_rest_share, params, flagged)
                before = int(flags.sum())
                if found:
                    footprints = [np.flatnonzero(flags)] + [row["members"] for row in found]
                for row in found:
                    flags[row.pop("members")] = True
                diagnostics["other_footprints"] = found
                diagnostics["other_footprints_added"] = int(flags.sum()) - before
            labels[flags] = len(root_children)
    return FlareRun(random_state, steps, flags, labels, embedding, fit.condensed_tree, step.dropped_layers,
                    diagnostics, first, footprints)


def ensemble_seeds(random_state: int | None, n_seeds: int) -> list:
    """The UMAP seeds of the runs: `random_state` first (one run = the plain fit), then seeds drawn from
    it, so that two base seeds share no other run. None: every run unseeded."""
    if random_state is None:
        return [None] * n_seeds
    return [random_state] + [int(s) for s in np.random.SeedSequence(random_state).generate_state(n_seeds - 1)]


def seed_majority(runs: list[FlareRun], abstain: bool = True) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-sample majority over the runs: (flags, votes, index of the run closest to the majority, the
    first on ties, so the base seed's run when it agrees). With `abstain`, a run that flagged nothing does not
    vote: a sample is flagged when more than half of the runs that flagged anything flag it, and at least two
    runs must have flagged (one when there is one run). When the majority flags samples the closest run is one
    that flagged some: its subspace and embedding are where the flagged samples were found."""
    votes = np.sum([run.flags for run in runs], axis=0)
    voters = sum(bool(run.flags.any()) for run in runs) if abstain else len(runs)
    flags = 2 * votes > voters
    if abstain and voters < min(2, len(runs)):
        flags = np.zeros_like(flags)
    candidates = [i for i, run in enumerate(runs) if run.flags.any() or not flags.any()]
    return flags, votes, min(candidates, key=lambda i: int((runs[i].flags != flags).sum()))


def mixture_modes(mixture) -> int:
    """How many modes a fitted two-component 1-D GaussianMixture's density has (1 or 2): 2 where the density dips
    between the component means (a mixture's modes lie between its means). A skewed single population is fitted
    by two components as well, and their D can pass 2 while the density has one mode."""
    low, high = np.sort(mixture.means_.ravel())
    density = np.exp(mixture.score_samples(np.linspace(low, high, 1001).reshape(-1, 1)))
    left, right = np.maximum.accumulate(density), np.maximum.accumulate(density[::-1])[::-1]
    return 2 if bool((density < np.minimum(left, right) * (1 - 1e-9)).any()) else 1


def score_mixture(scores: np.ndarray, min_separation: float = 2.0, need_two_modes: bool = False):
    """(upper, separation, modes): the samples a two-component 1-D Gaussian mixture of `scores` puts in its upper
    component (posterior > 0.5, above the lower component's mean: a wide upper component also claims the far
    low tail), Ashman's D of the two components, |mu1 - mu2| / sqrt((s1^2 + s2^2) / 2), and the number of modes
    of the mixture's density (mixture_modes); upper is None when D < min_separation (2: the usual bound for two
    clearly apart populations), with `need_two_modes` when the density has one mode, or with fewer than two
    distinct scores."""
    from sklearn.mixture import GaussianMixture

    scores = np.asarray(scores, np.float64).reshape(-1, 1)
    if len(np.unique(scores)) < 2:
        return None, 0.0, 1
    mixture = GaussianMixture(2, random_state=0).fit(scores)
    means, sds = mixture.means_.ravel(), np.sqrt(mixture.covariances_.ravel())
    separation = float(abs(means[0] - means[1]) / np.sqrt((sds[0] ** 2 + sds[1] ** 2) / 2))
    modes = mixture_modes(mixture)
    if separation < min_separation or (need_two_modes and modes < 2):
        return None, separation, modes
    upper = (mixture.predict_proba(scores)[:, int(np.argmax(means))] > 0.5) & (scores[:, 0] > means.min())
    return upper, separation, modes


class ColumnScale:
    """The probes' input: each column at mean 0 and standard deviation 1 over all the samples (a constant column
    stays 0). The moments are computed once, on first use, and only the rows a probe reads are scaled, so one scan's
    probes (each run's completion, the final one, the residual probe) share one pass over the matrix instead of a
    scaled copy of it each."""

    def __init__(self, features: np.ndarray):
        self.features = features

    @cached_property
    def moments(self) -> tuple[np.ndarray, np.ndarray]:
        X = np.asarray(self.features, np.float32)
        return X.mean(axis=0), X.std(axis=0) + 1e-6

    def rows(self, index: np.ndarray) -> np.ndarray:
        mean, scale = self.moments
        return (np.asarray(self.features[index], np.float32) - mean) / scale


def unexplained_excess(flags: np.ndarray, y: np.ndarray, island_purity: float) -> tuple[dict, int]:
    """(flagged_makeup of `flags`, how many of the largest label's excess over the median label count its flagged
    samples leave unexplained): the gate of the stages that complete an incomplete footprint."""
    makeup = flagged_makeup(flags, y, island_purity)
    return makeup, int(makeup["label_excess"] - (flags & (y == makeup["top_label"])).sum())


def footprint_completion(flags: np.ndarray, features: np.ndarray, y: np.ndarray, min_unexplained: int,
                         island_purity: float = FlareParams.island_purity, max_train: int = 20_000,
                         complete: bool = True, rounds: int = 1, cut: str = FlareParams.footprint_cut,
                         scale: ColumnScale | None = None):
    """(samples to add, summary or None). Applies when `flags` are the all-to-one footprint (class_makeup's
    "inflated") and the label's excess over the median label count exceeds its flagged samples by at least
    `min_unexplained`: about that many relabelled samples are still unflagged. A logistic regression on the
    standardised columns, flagged samples against unflagged samples of other labels (at most `max_train` of
    them, drawn with a fixed seed: the result depends on the flags only), scores the label's unflagged samples;
    those in the upper population of a two-component mixture of their scores (cut="mixture", score_mixture;
    decision > 0 where the two are not apart, or with cut="sign"; cut="two-modes": apart also needs the mixture's
    density to have two modes) are added, highest first, at most the unexplained count. The same can be repeated
    on the flags with what it added (`rounds`), while it adds samples and the excess left unexplained is at least
    `min_unexplained`: a probe fitted on part of the poison sees only the part of the rest that looks like it, but
    the later rounds took clean samples of the label too.
    complete=False: the summary only. scale: the features' ColumnScale, when the caller shares one."""
    add = np.zeros(len(flags), bool)
    if not flags.any():
        return add, None
    makeup, unexplained = unexplained_excess(flags, y, island_purity)
    target = makeup["top_label"]
    # "incomplete": the gate below, kept for the report (what it says depends on whether the rule was due)
    summary = {"label": int(target), "label_excess": int(makeup["label_excess"]), "inflated": makeup["inflated"],
               "unexplained": unexplained, "incomplete": bool(makeup["inflated"] and unexplained >= min_unexplained),
               "added": 0, "rounds": 0}
    if not complete or not summary["incomplete"]:
        return add, summary
    from sklearn.linear_model import LogisticRegression

    scale = scale if scale is not None else ColumnScale(features)
    others = np.flatnonzero(y != target)
    while unexplained >= min_unexplained and summary["rounds"] < rounds:
        flagged = flags | add
        positives, negatives = np.flatnonzero(flagged), others[~flagged[others]]
        if not len(negatives):  # every sample of the other labels is flagged: nothing to tell the poison from
            break
        if len(negatives) > max_train:
            negatives = np.sort(np.random.default_rng(0).choice(negatives, max_train, replace=False))
        rows = np.r_[positives, negatives]
        probe = LogisticRegression(C=0.01, max_iter=2000, class_weight="balanced")
        probe.fit(scale.rows(rows), np.r_[np.ones(len(positives)), np.zeros(len(negatives))])
        candidates = np.flatnonzero(~flagged & (y == target))
        score = probe.decision_function(scale.rows(candidates))
        taken, separation, modes = (score_mixture(score, need_two_modes=cut == "two-modes") if cut != "sign" else
                                    (None, None, None))
        summary.setdefault("separation", separation if separation is None else round(separation, 3))
        summary.setdefault("modes", modes)
        summary.setdefault("cut", "sign" if taken is None else "mixture")
        taken = score > 0 if taken is None else taken
        chosen = candidates[np.argsort(-score, kind="stable")][: min(unexplained, int(taken.sum()))]
        if not len(chosen):
            break
        add[chosen] = True
        unexplained -= len(chosen)
        summary["rounds"] += 1
    summary["added"] = int(add.sum())
    return add, summary


def complete_as_params(flags: np.ndarray, features: np.ndarray, y: np.ndarray, params: FlareParams,
                       complete: bool | None = None, scale: ColumnScale | None = None):
    """footprint_completion with FlareParams' settings (complete: params.complete_footprint unless given)."""
    return footprint_completion(flags, features, y, params.min_cluster_size, params.island_purity,
                                complete=params.complete_footprint if complete is None else complete,
                                rounds=params.footprint_rounds, cut=params.footprint_cut, scale=scale)


def run_clusters(run) -> list:
    """A run's flagged clusters: its footprint clusters where it has several, else its flags as one (none if it
    flagged nothing)."""
    if run.footprints is not None:
        return [np.asarray(members) for members in run.footprints]
    return [np.flatnonzero(run.flags)] if run.flags.any() else []


def footprint_room(relabelled: float, y: np.ndarray, min_size: int) -> float:
    """The most of a label that a cluster holding `relabelled` of its relabelled poison may hold: relabelled x K /
    (K - 1) + min_size, K labels. The footprint's cluster also holds the label's own samples that carry the trigger
    and keep their label (the poison drawn from the target class, its cover samples: about a 1 / K share of each),
    which the excess over the median label count does not see."""
    labels = int((np.bincount(y) > 0).sum())
    return relabelled * labels / max(labels - 1, 1) + min_size


def exclude_beside_complete(runs: list, y: np.ndarray, min_size: int,
                            island_purity: float = FlareParams.island_purity) -> tuple[list, dict | None]:
    """(the runs, changed where a complete footprint was found; summary or None). All-to-one relabelling puts
    at most the label's excess over the median label count into the label. Where a run's cluster is the footprint
    and alone holds that excess ("complete": its label's members at least the excess less min_size and at most
    the excess times K / (K - 1) plus min_size, K labels), a cluster of any run lying mostly outside every complete
    cluster cannot be relabelled poison as well and is dropped from its run, and a run whose clusters lie inside
    them found part of the same footprint: its flags are completed with the samples at least half of the complete
    clusters hold, instead of by the probe. Where the complete clusters disagree (of different labels, or together
    more of the label than a complete cluster may hold) or none is found, the runs are left as they are.

    The upper bound is wider than the lower (footprint_room): the label's own triggered samples keep their label."""
    excess = label_excess(y)

    def most(label):
        """The most of `label` a complete cluster (or the complete clusters together) may hold."""
        return footprint_room(excess[label], y, min_size)

    def complete_label(members):
        """The label whose excess the cluster alone holds (the footprint, complete), or None."""
        flags = np.zeros(len(y), bool)
        flags[members] = True
        makeup = flagged_makeup(flags, y, island_purity)
        label = makeup["top_label"]
        inside = int((y[members] == label).sum())
        return label if makeup["inflated"] and excess[label] - min_size <= inside <= most(label) else None

    # each run's clusters with the label each alone completes (None: not complete), read once
    read = [[(members, complete_label(members)) for members in run_clusters(run)] for run in runs]
    found = [(label, members) for clusters in read for members, label in clusters if label is not None]
    if not found:
        return runs, None
    label = found[0][0]
    counts = np.zeros(len(y), int)
    for _, members in found:
        counts[members] += 1
    region, held = counts > 0, 2 * counts >= len(found)
    summary = {"label": int(label), "complete_clusters": len(found), "complete_samples": int(held.sum())}
    if len({lab for lab, _ in found}) > 1:
        return runs, {**summary, "applied": False, "reason": "the complete clusters are of different labels"}
    if int((region & (y == label)).sum()) > most(label):
        return runs, {**summary, "applied": False,
                      "reason": "the complete clusters together hold more of the label than the excess allows"}
    kept, dropped, completed = [], [], []
    for run, clusters in zip(runs, read):
        keep = [(members, complete) for members, complete in clusters if 2 * region[members].sum() >= len(members)]
        flags = np.zeros(len(y), bool)
        for members, _ in keep:
            flags[members] = True
        whole = any(complete is not None for _, complete in keep)
        add = held & ~flags if keep and not whole else np.zeros(len(y), bool)
        dropped.append(int(run.flags.sum() - flags.sum()))
        completed.append(int(add.sum()))
        if len(keep) == len(clusters) and not add.any():
            kept.append(run)
            continue
        footprints = [members for members, _ in keep] if len(keep) > 1 and not add.any() else None
        kept.append(replace(run, flags=flags | add, footprints=footprints))
    return kept, {**summary, "applied": True, "runs_dropped": dropped, "runs_completed": completed}


def complete_runs(runs: list, features: np.ndarray, y: np.ndarray, params: FlareParams,
                  scale: ColumnScale | None = None) -> tuple[list, list]:
    """(each run with its flags completed by footprint_completion, each run's completion summary or None): the
    runs' cluster flags stay in their labels and the other fitted attributes, only the flags that vote change."""
    completed, summaries = [], []
    scale = scale if scale is not None else ColumnScale(features)
    for run in runs:
        if run.footprints is None:
            add, summary = complete_as_params(run.flags, features, y, params, scale=scale)
        else:
            # One probe per footprint cluster: poison split off by source class looks like its sources, and a
            # probe fitted on all the clusters at once took less of the rest than each cluster's did.
            add, summary = np.zeros(len(run.flags), bool), None
            for members in run.footprints:
                cluster_flags = np.zeros(len(run.flags), bool)
                cluster_flags[members] = True
                more, first = complete_as_params(cluster_flags, features, y, params, scale=scale)
                add |= more
                summary = first if summary is None else summary
            add &= ~run.flags
            if summary is not None:
                unexplained = summary["label_excess"] - int((run.flags & (y == summary["label"])).sum())
                summary = {**summary, "added": int(add.sum()), "clusters": len(run.footprints),
                           "unexplained": unexplained}
        completed.append(replace(run, flags=run.flags | add))
        summaries.append(summary)
    return completed, summaries


def footprint_components_of(flags: np.ndarray, features: np.ndarray, y: np.ndarray, k: int, min_size: int,
                            spread: float = FlareParams.component_spread,
                            island_purity: float = FlareParams.island_purity, scale: ColumnScale | None = None):
    """(samples to add, summary or None). Applies where footprint_completion's would: `flags` are the all-to-one
    footprint (flagged_makeup's "inflated") and the label's excess over the median label count exceeds its flagged
    samples by at least `min_size`. Each member of the label is linked to the members of the label among its `k`
    nearest neighbours (standardised columns, exact search over all the samples) that have it among theirs too
    (mutual neighbours), and the linked components are read one by one. A component is added whole where it has
    `min_size` to label-excess members (the poison is at most the excess, so a larger one holds clean members) and
    its members' neighbours of other labels are spread: some exist and no one label holds `spread` of them.
    Relabelled poison drawn from several classes sits with the poison that shares its trigger, among the classes
    it was drawn from; the label's clean class keeps beside it the class it is confused with."""
    add = np.zeros(len(flags), bool)
    if not flags.any():
        return add, None
    makeup, unexplained = unexplained_excess(flags, y, island_purity)
    target = makeup["top_label"]
    summary = {"label": int(target), "k": int(k), "unexplained": unexplained, "components": [], "added": 0}
    members = np.flatnonzero(y == target)
    if not makeup["inflated"] or unexplained < min_size or len(members) < 2 or len(y) <= k:
        return add, None if not makeup["inflated"] else summary
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    scale = scale if scale is not None else ColumnScale(features)
    X = scale.rows(np.arange(len(y)))
    found = cluster.knn_search(X, X[members], k + 1, index="flat")
    # each row's own index is among its k + 1 (distance 0) unless an exact duplicate took its place: drop one
    own = found == members[:, None]
    drop = np.where(own.any(axis=1), own.argmax(axis=1), k)
    neighbours = found[np.arange(k + 1)[None, :] != drop[:, None]].reshape(len(members), k)
    position = np.full(len(y), -1)
    position[members] = np.arange(len(members))
    rows, cols = np.repeat(np.arange(len(members)), k), position[neighbours.ravel()]
    linked = cols >= 0
    graph = coo_matrix((np.ones(linked.sum()), (rows[linked], cols[linked])), shape=(len(members),) * 2).tocsr()
    _, component = connected_components(graph.multiply(graph.T), directed=False)
    sizes = np.bincount(component)
    for c in np.flatnonzero(sizes >= min_size):
        inside = component == c
        others = y[neighbours[inside]]
        others = others[others != target]
        top = float(np.bincount(others).max() / len(others)) if len(others) else 1.0
        taken = sizes[c] <= makeup["label_excess"] and len(others) > 0 and top < spread
        if taken:
            add[members[inside]] = True
        summary["components"].append({"size": int(sizes[c]), "flagged": int(flags[members[inside]].sum()),
                                      "other_label_neighbours": int(len(others)), "top_share": round(top, 3),
                                      "above_excess": bool(sizes[c] > makeup["label_excess"]), "taken": bool(taken)})
    add &= ~flags
    summary["added"] = int(add.sum())
    return add, summary


def cross_fitted_scores(X: np.ndarray, positive: np.ndarray, splits, C: float = 0.01) -> np.ndarray:
    """The within-label probe's out-of-fold decision scores: per (fit_on, score_on) split, a logistic regression
    (inverse regularisation C, balanced classes) fitted on fit_on's rows scores score_on's. residual_members and
    settle_footprint share it; each split's fit_on rows must hold both classes."""
    from sklearn.linear_model import LogisticRegression

    scores = np.zeros(len(X))
    for fit_on, score_on in splits:
        probe = LogisticRegression(C=C, max_iter=3000, class_weight="balanced")
        probe.fit(X[fit_on], positive[fit_on])
        scores[score_on] = probe.decision_function(X[score_on])
    return scores


def residual_members(flags: np.ndarray, features: np.ndarray, y: np.ndarray, folds: int = FlareParams.residual_folds,
                     island_purity: float = FlareParams.island_purity, scale: ColumnScale | None = None):
    """(samples to add, summary or None). Where `flags` are the all-to-one footprint (flagged_makeup's
    "inflated"), a logistic regression (C 0.01, balanced classes, standardised columns) is fitted with the flagged
    samples against the label's unflagged samples, cross-fitted in `folds` stratified folds (fixed seed); a label's
    unflagged sample is added where the probe of the folds it was left out of puts it on the flagged side
    (decision > 0). Fitted within the label, the probe reads the trigger and not the label's look (the completion's
    probe, fitted against the other labels, also ranks the label's clean samples high); scored out of fold, the
    few poison samples among its negatives do not pull their own scores down."""
    add = np.zeros(len(flags), bool)
    if not flags.any():
        return add, None
    makeup = flagged_makeup(flags, y, island_purity)
    target = makeup["top_label"]
    candidates = np.flatnonzero(~flags & (y == target))
    summary = {"label": int(target), "inflated": makeup["inflated"], "candidates": len(candidates), "added": 0}
    if not makeup["inflated"] or len(candidates) < folds:
        return add, summary
    from sklearn.model_selection import StratifiedKFold

    rows = np.r_[np.flatnonzero(flags), candidates]
    X = (scale if scale is not None else ColumnScale(features)).rows(rows)
    positive = np.r_[np.ones(int(flags.sum())), np.zeros(len(candidates))]
    splits = StratifiedKFold(folds, shuffle=True, random_state=0).split(rows, positive)
    decision = cross_fitted_scores(X, positive, splits)
    add[candidates[decision[len(rows) - len(candidates):] > 0]] = True
    summary["added"] = int(add.sum())
    return add, summary


def settle_footprint(flags: np.ndarray, features: np.ndarray, y: np.ndarray, folds: int = FlareParams.residual_folds,
                     max_rounds: int = FlareParams.settle_rounds, min_overlap: float = FlareParams.settle_overlap,
                     island_purity: float = FlareParams.island_purity, scale: ColumnScale | None = None,
                     cut: str = FlareParams.settle_cut, strengths: tuple = FlareParams.settle_strengths):
    """(settled flags or None, summary or None). Where `flags` are the all-to-one footprint (flagged_makeup's
    "inflated"), every member of the label is decided again, flagged or not, by logistic regressions fitted within the
    label (C 0.01 by default, balanced classes, standardised columns), flagged against unflagged and cross-fitted: a
    member is flagged where the probe of the fold it was left out of puts it on the flagged side. The decisions are the
    next round's labels, until a round changes none (a fixed point) or brings back the decisions of the round before
    last (a two-round cycle: the members both rounds flag are kept). The folds are drawn from the label's members with a
    fixed seed, never from the flags, so flags that differ at the margins (another UMAP seed's) meet the same probes and
    can reach the same fixed point. The settled flags are returned where the rounds converged within `max_rounds`, the
    last round's scores are two populations apart (score_mixture with two modes) and the settled flags share at least
    `min_overlap` of their union with `flags` (Jaccard); else None: where the backdoor is weak or absent the rounds
    drift, each taking more of the label's clean samples beside the flagged ones, and settling is meant to decide the
    margins of what the clustering found, not to draw another set. Other labels' flags are left as they are.
    cut="mixture": once converged, the label's members flagged are those in the upper component of the two-component
    mixture of the last round's scores (score_mixture; in a two-round cycle, of the two rounds' mean scores) instead of
    those with a positive score: the rounds' balanced probes put the boundary between the two populations' centres, and
    poison nearest the clean side (on WaNet, poison drawn from the target class) falls on the clean side of it.
    cut="hysteresis": the mixture's cut for the members `flags` held; a member they did not hold is added only where the
    last round's probe also puts it on the flagged side (score > 0). The upper component is wide where the poison's
    trigger shows at many strengths, and below the probe's boundary it reaches the label's clean members that look
    most like the poison: settling keeps the margins of what was found and adds only what the probe itself claims.
    strengths: the probes' inverse regularisation C, one stage of rounds per value, each stage starting from the
    decisions the one before reached (max_rounds bounds each stage); the guards and the cut read the last stage."""
    if not flags.any():
        return None, None
    makeup = flagged_makeup(flags, y, island_purity)
    target = makeup["top_label"]
    members = np.flatnonzero(y == target)
    decided = flags[members].copy()
    summary = {"label": int(target), "inflated": makeup["inflated"], "members": len(members), "rounds": 0,
               "converged": None, "settled": False, "strengths": [float(c) for c in strengths]}
    if not makeup["inflated"]:
        return None, {**summary, "reason": "the flags are not one inflated label"}
    if min(decided.sum(), (~decided).sum()) < folds:
        return None, {**summary, "reason": f"the label has fewer than {folds} flagged or unflagged samples"}
    X = (scale if scale is not None else ColumnScale(features)).rows(members)
    fold = np.empty(len(members), int)
    fold[np.random.default_rng(0).permutation(len(members))] = np.arange(len(members)) % folds
    splits = [(fold != k, fold == k) for k in range(folds)]
    scores = np.zeros(len(members))
    for C in strengths:  # each strength's rounds start from the decisions the one before settled on
        before, rounds, summary["converged"] = None, 0, None
        while rounds < max_rounds:
            if any(decided[fit_on].all() or not decided[fit_on].any() for fit_on, _ in splits):
                return None, {**summary, "reason": "the rounds left one side empty"}
            previous, scores = scores, cross_fitted_scores(X, decided, splits, C)
            rounds += 1
            summary["rounds"] += 1
            last, decided = decided, scores > 0
            if np.array_equal(decided, last):
                summary["converged"] = "fixed point"
                break
            if before is not None and np.array_equal(decided, before):
                summary["converged"] = "two-round cycle"
                decided = decided & last
                if cut != "sign":  # the cycle's two rounds alike, whichever came last
                    scores = (scores + previous) / 2
                break
            before = last
        if summary["converged"] is None:
            break
    upper, separation, modes = score_mixture(scores, need_two_modes=True)
    summary.update(separation=round(separation, 3), modes=modes)
    if summary["converged"] is None:
        return None, {**summary, "reason": f"the decisions still changed after {max_rounds} rounds"
                                           + (f" at C {C:g}" if len(strengths) > 1 else "")}
    if upper is None or not decided.any():
        return None, {**summary, "reason": "the last round's scores were not two populations apart"}
    if cut == "mixture":
        decided = upper
    elif cut == "hysteresis":
        decided = upper & (flags[members] | (scores > 0))
    settled = flags.copy()
    settled[members] = decided
    overlap = float((settled & flags).sum() / (settled | flags).sum())
    summary["overlap"] = round(overlap, 3)
    if overlap < min_overlap:
        return None, {**summary, "reason": f"the settled flags share {overlap:.2f} of their union with the flags "
                                           f"they started from (under settle_overlap={min_overlap})"}
    summary.update(settled=True, added=int((settled & ~flags).sum()), removed=int((flags & ~settled).sum()))
    return settled, summary


def recover_by_neighbours(flags: np.ndarray, embeddings: list, k: int, share: float) -> np.ndarray:
    """The unflagged samples of which, averaged over `embeddings`, at least `share` of the `k` nearest
    neighbours (the sample itself excluded) are flagged. Nothing when nothing is flagged."""
    from scipy.spatial import cKDTree

    embeddings = [e for e in embeddings if e is not None]
    if not flags.any() or not embeddings or len(flags) <= k:
        return np.zeros(len(flags), bool)
    flagged_share = np.zeros(len(flags))
    for embedding in embeddings:
        _, neighbours = cKDTree(embedding).query(embedding, k=k + 1)
        flagged_share += flags[neighbours[:, 1:]].mean(axis=1)
    return ~flags & (flagged_share / len(embeddings) >= share)


# The stages that flag a sample, in Flare.fit's order, with the report's words for them: the runs' majority, the
# neighbours in the runs' all-layers embeddings, the voted flags' footprint completion, the zoom (footprint_zoom), the
# label's linked components (footprint_components), the residual probe, the settled footprint (settle=True; it also
# unflags samples).
FLAGGED_BY = {"vote": "by the runs' vote", "neighbours": "by their neighbours",
              "completion": "by the footprint completion", "zoom": "by zooming into their cluster",
              "minority": "as the label's minority in a source class",
              "components": "as linked components",
              "residual": "by the residual probe", "settle": "by settling the footprint"}


class Flare:
    """FLARE as an estimator on precomputed BN-minima features (cuML/sklearn style).

        detection = Flare(xi=0.02).fit(features, layout, y=labels)
        detection.flags, flare.subspace_, flare.steps_

    With n_seeds > 1 the search runs once per UMAP seed and a sample is flagged when most runs flag it;
    the fitted attributes are then those of the run closest to the majority (`runs_` lists every run).
    """

    name = "flare"

    def __init__(self, **params):
        self.params = build_params(FlareParams, params, "flare")

    def fit(self, features: np.ndarray, layout: FeatureLayout, y: np.ndarray | None = None,
            *, progress=None, stage=None) -> Detection:
        """features: N x layout.num_columns per-channel BN minima (engine.extract_features); progress and
        stage: search_subspace's callbacks (stage("run", (k, n_seeds, random_state)) before each seed's run
        when n_seeds > 1)."""
        features = np.asarray(features, dtype=np.float32)
        if features.ndim != 2 or features.shape[1] != layout.num_columns:
            raise InputError(f"features: expected N x {layout.num_columns} BN-minima columns matching the "
                             f"layer layout, got shape {features.shape}")
        if not np.isfinite(features).all():
            raise InputError("features contain NaN or infinite values (a layer's activations overflowed?)")
        if len(features) < self.params.min_cluster_size:
            raise InputError(f"FLARE needs at least min_cluster_size={self.params.min_cluster_size} samples, "
                             f"got {len(features)}")
        seeds = ensemble_seeds(self.params.random_state, self.params.n_seeds)
        runs = []
        for k, seed in enumerate(seeds):
            if stage is not None and len(seeds) > 1:
                stage("run", (k + 1, len(seeds), seed))
            runs.append(fit_once(features, layout, y, self.params, seed, progress=progress, stage=stage))
        per_run = y is not None and self.params.footprint_per_run
        scale = ColumnScale(features)  # the probes' scaling, shared: computed only if a probe runs
        voters = runs
        exclusion = None
        if self.params.footprint_exclusion and y is not None:
            voters, exclusion = exclude_beside_complete(runs, np.asarray(y), self.params.min_cluster_size,
                                                        self.params.island_purity)
        voting, run_footprints = (complete_runs(voters, features, np.asarray(y), self.params, scale) if per_run else
                                  (voters, []))
        flags, votes, chosen = seed_majority(voting, self.params.abstain)
        run = runs[chosen]
        diagnostics = dict(run.diagnostics)
        if exclusion is not None:
            diagnostics["exclusion"] = exclusion
        flagged_by = np.where(flags, "vote", "").astype(object)  # each flag's stage; the stages add disjoint sets
        if self.params.recover_neighbors is not None:
            recovered = recover_by_neighbours(flags, [r.full_embedding for r in runs], self.params.recover_neighbors,
                                              self.params.recover_share)
            if self.params.drop_off_label and y is not None:
                recovered &= ~off_label_members(flags | recovered, np.asarray(y), self.params.off_label_purity)
            flags = flags | recovered
            flagged_by[recovered] = "neighbours"
            diagnostics["recovered_by_neighbours"] = int(recovered.sum())
        if y is not None:
            # With per-run completion the voted flags are not completed again: that would be a second round.
            completed, footprint = complete_as_params(flags, features, np.asarray(y), self.params,
                                                      complete=self.params.complete_footprint and not per_run,
                                                      scale=scale)
            if per_run and run_footprints[chosen] is not None:
                # what the representative run's completion found and did, and what each run's added
                footprint = {**run_footprints[chosen], "per_run": True,
                             "runs_added": [0 if f is None else f["added"] for f in run_footprints]}
            if footprint is not None:
                diagnostics["footprint"] = footprint
            flags = flags | completed
            flagged_by[completed] = "completion"
            if self.params.footprint_zoom:
                zoomed, summary = zoom_footprint(flags, features, layout, np.asarray(y), run, self.params,
                                                 stage=stage)
                if summary is not None:
                    diagnostics["zoom"] = summary
                flags = flags | zoomed
                flagged_by[zoomed] = "zoom"
            if self.params.source_minority:
                minority, summary = minority_members(flags, runs, np.asarray(y), self.params)
                if summary is not None:
                    diagnostics["minority"] = summary
                flags = flags | minority
                flagged_by[minority] = "minority"
            if self.params.footprint_components is not None:
                linked, summary = footprint_components_of(flags, features, np.asarray(y),
                                                          self.params.footprint_components,
                                                          self.params.min_cluster_size, self.params.component_spread,
                                                          self.params.island_purity, scale)
                if summary is not None:
                    diagnostics["components"] = summary
                flags = flags | linked
                flagged_by[linked] = "components"
            if self.params.residual_probe:
                residual, summary = residual_members(flags, features, np.asarray(y), self.params.residual_folds,
                                                     self.params.island_purity, scale)
                if summary is not None:
                    diagnostics["residual"] = summary
                flags = flags | residual
                flagged_by[residual] = "residual"
            if self.params.settle:
                settled, summary = settle_footprint(flags, features, np.asarray(y),
                                                    folds=self.params.residual_folds,
                                                    max_rounds=self.params.settle_rounds,
                                                    min_overlap=self.params.settle_overlap,
                                                    island_purity=self.params.island_purity, scale=scale,
                                                    cut=self.params.settle_cut,
                                                    strengths=self.params.settle_strengths)
                if summary is not None:
                    diagnostics["settle"] = summary
                if settled is not None:
                    flagged_by[settled & ~flags] = "settle"
                    flagged_by[flags & ~settled] = ""
                    flags = settled
        if len(runs) > 1:
            diagnostics["seed_runs"] = [
                {"random_state": r.random_state, "dropped_layers": r.subspace, "n_flagged": int(r.flags.sum()),
                 "flagged_node": r.diagnostics.get("flagged_node"),
                 "footprint_walk": bool(r.diagnostics.get("footprint_walk", False)),
                 "other_footprints_added": r.diagnostics.get("other_footprints_added", 0),
                 "n_voted": int(v.flags.sum()),
                 "differs_from_majority": int((v.flags != flags).sum())} for r, v in zip(runs, voting)]
            diagnostics["representative_run"] = chosen
            diagnostics["votes_histogram"] = np.bincount(votes, minlength=len(runs) + 1).tolist()
            if not flags.any() and votes.any():
                among = "the runs that flagged (at least two must agree)" if self.params.abstain else "the runs"
                diagnostics["explanation"] = (f"{sum(bool(r.flags.any()) for r in runs)} of "
                                              f"{len(runs)} UMAP seeds flagged samples, none of them in a majority "
                                              f"of {among}; nothing flagged")
            elif flags.any():
                diagnostics.pop("explanation", None)
        self.runs_, self.votes_ = runs, votes
        self.steps_, self.subspace_, self.embedding_ = run.steps, run.subspace, run.embedding
        self.labels_, self.condensed_tree_, self.flags_ = run.labels, run.condensed_tree, flags
        # Per sample, for samples.csv: which stage flagged it, how many runs' clusters flagged it and how many
        # runs' flags (completed, with footprint_per_run) voted for it.
        clustered = np.sum([r.flags for r in runs], axis=0)
        columns = {"flagged_by": flagged_by, "runs_clustered": clustered, "runs_voted": votes}
        diagnostics["flagged_by"] = {stage: int((flagged_by == stage).sum()) for stage in FLAGGED_BY}
        diagnostics["flagged_outside_clusters"] = int((flags & (clustered == 0)).sum())
        if run.embedding is None:
            return Detection(self.name, flags, params=asdict(self.params), diagnostics=diagnostics, columns=columns)
        labels = run.labels.copy()
        extra = flags & ~run.flags
        if extra.any():  # flagged by the majority, not by the representative run: one more cluster
            labels[extra] = labels.max() + 1
        diagnostics["clusters"] = cluster_table(labels, flags, y, run.embedding)
        scores = suspicion_scores(run.embedding, flags)
        if len(runs) > 1:
            # The share of runs that flagged the sample first (an embedding where the poison did not split off
            # ranks it anywhere); among equal shares, the farther from the clean samples' centre ranks higher.
            # A sample a later stage flagged (neighbours, completion, residual probe) counts as a majority of all
            # the runs, more votes than any unflagged sample has, so flagged samples rank first.
            counted = np.where(flags & (flagged_by != "vote"), len(runs) // 2 + 1, votes)
            scores = (counted + scores / (1.0 + scores)) / (len(runs) + 1.0)
        return Detection(self.name, flags, params=asdict(self.params), scores=scores, clusters=labels,
                         embedding=run.embedding, diagnostics=diagnostics, columns=columns)
