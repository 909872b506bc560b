"""FLARE detection quality (TPR / FPR) on real Fashion-MNIST, next to the paper's Table I (CIFAR-10).

For each checkpoint written by `train_attacks.py --models-dir` (or `backdoor-engine train`), the poisoned
training set is rebuilt from the attack record the checkpoint carries, BN minima are extracted once (cached
in a feature store under --cache) and every labelling variant runs on the same features. A checkpoint
without an attack record is a clean run: every flag is a false positive. One JSON line per (model,
variant) is appended to --out, so an interrupted run resumes.

    python benchmarks/bench_flare_detection.py --models /work/runs/attacks/*.pt --cache /work/runs/feat \
        --out benchmarks/results/flare_detection.jsonl
    python benchmarks/bench_flare_detection.py --out benchmarks/results/flare_detection.jsonl --table
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from backdoor_engine.data.attacks import harness
from backdoor_engine.data.fashion_mnist import load_fashion_mnist
from backdoor_engine.engine import extract_features
from backdoor_engine.errors import InputError
from backdoor_engine.detection import detection_metrics
from backdoor_engine.methods.flare import FLAGGED_BY, Flare
from backdoor_engine.models.checkpoint import load_checkpoint

# FLARE paper, Table I (CIFAR-10, ResNet-18, 10% poisoning): (TPR %, FPR %). SIG and Adaptive-Blend are not in it.
PAPER_TABLE_I = {
    ("clean", "-"): (None, 0.01),
    ("badnets", "a2o"): (100.00, 0.00), ("blend", "a2o"): (100.00, 0.02), ("trojan", "a2o"): (100.00, 0.00),
    ("wanet", "a2o"): (98.14, 0.00), ("label_consistent", "a2o"): (100.00, 0.00),
    ("badnets", "a2a"): (100.00, 0.00), ("blend", "a2a"): (99.58, 0.00), ("trojan", "a2a"): (100.00, 0.00),
    ("wanet", "a2a"): (95.76, 0.00),
    ("badnets", "ut"): (100.00, 0.00), ("blend", "ut"): (99.44, 0.03), ("trojan", "ut"): (100.00, 0.00),
    ("wanet", "ut"): (80.52, 0.10),
    ("iad", "a2o"): (100.00, 0.00), ("issba", "a2o"): (99.98, 0.01), ("siba", "a2o"): (100.00, 0.00),
    ("iad", "a2a"): (99.98, 0.00), ("issba", "a2a"): (99.70, 0.27), ("siba", "a2a"): (99.74, 0.00),
    ("iad", "ut"): (99.44, 0.03), ("issba", "ut"): (98.56, 0.01), ("siba", "ut"): (97.94, 0.00),
}

# Labelling variants compared on the same features (DESIGN section 4 asks for each).
VARIANTS = {
    "official": dict(labelling="official", leaf_rule="official", xi_mode="absolute"),
    "stability": dict(labelling="stability", xi_mode="absolute"),
    "stability-relative-xi": dict(labelling="stability", xi_mode="relative"),
    "default": dict(),  # the engine's defaults as they stand
    "seed0": dict(random_state=0),  # the default under other UMAP seeds: do the flags depend on the embedding?
    "seed1": dict(random_state=1),
    # The per-sample majority of five runs (n_seeds), under three base seeds: are its flags the same?
    "seeds5": dict(n_seeds=5),
    "seeds5-base0": dict(n_seeds=5, random_state=0),
    "seeds5-base1": dict(n_seeds=5, random_state=1),
    # Three runs: the first three of the five above (the drawn seeds of a base are a prefix of each other).
    "seeds3": dict(n_seeds=3),
    "seeds3-base0": dict(n_seeds=3, random_state=0),
    "seeds3-base1": dict(n_seeds=3, random_state=1),
    # A cluster of >= 80% one (not inflated) label read as a benign island (0.9: the default).
    "p80": dict(island_purity=0.8),
    "seeds5-p80": dict(n_seeds=5, island_purity=0.8),
    "seeds5-base0-p80": dict(n_seeds=5, random_state=0, island_purity=0.8),
    "seeds5-base1-p80": dict(n_seeds=5, random_state=1, island_purity=0.8),
    # Session 12's two rules one at a time: "session11" = every run votes, no neighbours' recovery (the defaults
    # before); "norecover" = runs that flag nothing abstain, no recovery; "default" = both.
    "session11": dict(abstain=False, recover_neighbors=None),
    "norecover": dict(recover_neighbors=None),
    # Session 13's two rules: "session12" = neither (the defaults before); "islands1" = only the off-label members
    # dropped (a benign island must still be one label); "keepoff" = only few-label islands (the whole flagged
    # cluster kept); "default" = both.
    "session12": dict(island_labels=1, drop_off_label=False),
    "islands1": dict(island_labels=1),
    "keepoff": dict(drop_off_label=False),
    # Session 20: the loop passes over a stable split of benign classes (class_split_layers); "session19" = it
    # stops there and flags nothing (the default before).
    "session19": dict(class_split_layers=0),
    # Session 20's second rule: the footprint's unexplained excess completed by a linear probe (complete_footprint);
    # "clusters" = without it.
    "clusters": dict(complete_footprint=False),
    "rounds10": dict(footprint_rounds=10),  # the rounds version, measured before the one-round default
    # Session 21: the probe's cut at a two-component mixture of the label's scores (footprint_cut); "sign" = at
    # decision > 0 (session 20).
    "sign": dict(footprint_cut="sign"),
    # Session 21's second rule: each seed's run completed before the vote (footprint_per_run); "voted" = the voted
    # flags completed (session 20's order).
    "voted": dict(footprint_per_run=False),
    # Session 22: past depth, the walk follows the branches that can hold the footprint (footprint_levels);
    # "depth3" = the official depth only (session 21).
    "depth3": dict(footprint_levels=0),
    # Session 24: a class-sized cluster of the inflated label that is not label-pure reads as its clean class
    # (footprint_purity), the off-label drop reaches a footprint beside a benign class (off_label_purity), and the
    # completion's cut needs two modes (footprint_cut); "session23" = none of the three (the defaults before),
    # "mixture-cut" = the first two with session 21's cut.
    "session23": dict(footprint_purity=None, off_label_purity=0.8, footprint_cut="mixture"),
    "mixture-cut": dict(footprint_cut="mixture"),
    # Session 25: footprint_purity's clean class also needs its label at least class_purity of the cluster, and
    # the footprint's other clusters among other labels are flagged too, each with its own completion probe
    # (footprint_rest_share); "session24" = neither (the defaults before), "one-footprint" = the first only.
    "session24": dict(class_purity=0.5, footprint_rest_share=None, island_rest_share=None),
    "one-footprint": dict(footprint_rest_share=None, island_rest_share=None),
    # Session 25, later: a footprint-like cluster whose split's rest is mostly its label is a sub-island of the
    # target's clean class (island_rest_share); "no-target-island" = without that test.
    "no-target-island": dict(island_rest_share=None),
    # Session 26: the clean-class reading also needs the cluster's other labels to be a few classes
    # (class_neighbour_share); "session25" = without that test (the defaults before).
    "session25": dict(class_neighbour_share=None),
    # Session 27: the final footprint's last members by a cross-fitted probe within the label (residual_probe);
    # "session26" = without it (the defaults before).
    "session26": dict(residual_probe=False),
    # Session 30: the walk also follows a cluster that can hold the footprint where another label is its largest
    # or it reads as one benign class (footprint_branches); "session29" = the rule before, under the three bases.
    "session29": dict(footprint_branches="top-label"),
    "session29-seed0": dict(footprint_branches="top-label", random_state=0),
    "session29-seed1": dict(footprint_branches="top-label", random_state=1),
    # Session 31: the final footprint settled by within-label probes refitted on their own decisions (settle, off
    # by default), under the three bases: by the sign of the last scores (the first rule) and by their mixture.
    "settle": dict(settle=True, settle_cut="sign"),
    "settle-seed0": dict(settle=True, settle_cut="sign", random_state=0),
    "settle-seed1": dict(settle=True, settle_cut="sign", random_state=1),
    "settle-mixture": dict(settle=True, settle_cut="mixture"),
    "settle-mixture-seed0": dict(settle=True, settle_cut="mixture", random_state=0),
    "settle-mixture-seed1": dict(settle=True, settle_cut="mixture", random_state=1),
    # Session 38: the mixture's cut for what was flagged, the sign too for what settling would add; the default
    # since session 38, so these equal default / seed0 / seed1 (kept for the commands in RESULTS.md).
    "settle-hysteresis": dict(settle=True, settle_cut="hysteresis"),
    "settle-hysteresis-seed0": dict(settle=True, settle_cut="hysteresis", random_state=0),
    "settle-hysteresis-seed1": dict(settle=True, settle_cut="hysteresis", random_state=1),
    # Session 39: the cluster holding the label's unflagged samples embedded and read alone (footprint_zoom).
    "zoom": dict(footprint_zoom=True),
    "zoom-seed0": dict(footprint_zoom=True, random_state=0),
    "zoom-seed1": dict(footprint_zoom=True, random_state=1),
    # Session 40: the label's minority inside one source class's cluster (source_minority).
    "minority": dict(source_minority=True),
    "minority-seed0": dict(source_minority=True, random_state=0),
    "minority-seed1": dict(source_minority=True, random_state=1),
    # Session 32: the rounds' probes at C 0.001 first, then at C 0.01 from where those settled (settle_strengths).
    "settle-path": dict(settle=True, settle_cut="mixture", settle_strengths=(0.001, 0.01)),
    "settle-path-seed0": dict(settle=True, settle_cut="mixture", settle_strengths=(0.001, 0.01), random_state=0),
    "settle-path-seed1": dict(settle=True, settle_cut="mixture", settle_strengths=(0.001, 0.01), random_state=1),
    # Session 35: the label's linked components (footprint_components), alone and before settle. The default since
    # session 37, so "components" and its seeds equal "default" and its seeds: kept so the commands still run.
    "components": dict(footprint_components=15),
    "components-seed0": dict(footprint_components=15, random_state=0),
    "components-seed1": dict(footprint_components=15, random_state=1),
    "components-settle": dict(footprint_components=15, settle=True),
    "components-settle-seed0": dict(footprint_components=15, settle=True, random_state=0),
    "components-settle-seed1": dict(footprint_components=15, settle=True, random_state=1),
    # Session 36: clusters beside a run's complete footprint dropped, partial runs completed with it (opt-in when
    # measured, the default since: these variants now equal default / seed0 / seed1).
    "exclusion": dict(footprint_exclusion=True),
    "exclusion-seed0": dict(footprint_exclusion=True, random_state=0),
    "exclusion-seed1": dict(footprint_exclusion=True, random_state=1),
}


def share_embeddings_between_variants(keep: str | None = None):
    """Variants that differ only in labelling or in the number of seeds embed the same subspaces: compute each
    UMAP once (keyed by the matrix's bytes and the UMAP arguments), in this process or, with `keep`, in any
    run that kept it there. detect_s then counts a reused embedding as free."""
    import hashlib

    from backdoor_engine import cluster

    fit, cache = cluster.umap, {}

    def umap(X, **kwargs):
        key = hashlib.blake2b(repr((hashlib.blake2b(np.ascontiguousarray(X).tobytes()).hexdigest(), X.shape,
                                    sorted((k, v if k != "knn" else v is not None) for k, v in kwargs.items()))
                                   ).encode(), digest_size=16).hexdigest()
        path = None if keep is None else Path(keep) / f"{key}.npy"
        if key not in cache:
            if path is not None and path.exists():
                cache[key] = np.load(path)
            else:
                cache[key] = fit(X, **kwargs)
                if path is not None:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    np.save(path, cache[key])
        return cache[key]

    cluster.umap = umap


def stage_counts(detection, truth: np.ndarray) -> dict | None:
    """{stage: [flagged, of them poison]} by FLARE's flagged_by column; None without it."""
    stage = detection.columns.get("flagged_by")
    if stage is None:
        return None
    return {name: [int((stage == name).sum()), int(((stage == name) & truth).sum())] for name in FLAGGED_BY}


SEED_HELP = ("seed of the training subset (train_attacks.py --seed); default: the seed the checkpoint's attack "
             "record carries, and another is refused")


def subset_seed(meta: dict, given: int | None = None) -> int:
    """The seed the checkpoint's training subset was drawn with: the one its attack record carries (train_attacks.py
    draws the subset and the poison with one seed), else `given`, else 0. A given seed that is not the recorded one
    is refused: the scan would read images the model never trained on, poisoned at other indices."""
    recorded = meta["attack"].get("seed") if isinstance(meta.get("attack"), dict) else None
    if given is not None and recorded is not None and given != recorded:
        raise SystemExit(f"--seed {given}: this checkpoint's training subset was drawn with seed {recorded} (its "
                         "attack record); another seed would scan images it never trained on")
    return given if given is not None else recorded if recorded is not None else 0


def scanned_subset(meta: dict, seed: int | None = None):
    """The clean Fashion-MNIST training images the checkpoint's training set was drawn from (its subset; the seed
    as subset_seed resolves it)."""
    seed = subset_seed(meta, seed)
    train = load_fashion_mnist("train")
    size = meta.get("train_size") or meta.get("train", {}).get("n_samples") or len(train)
    if size < len(train):
        train = train.subset(np.sort(np.random.default_rng(seed).choice(len(train), size, replace=False)))
    return train


def scanned_set(meta: dict, seed: int | None = None):
    """The training set the checkpoint saw: the same subset and the same poisoning."""
    return poisoned_as_recorded(scanned_subset(meta, seed), meta)


def poisoned_as_recorded(train, meta: dict):
    """`train` poisoned as the checkpoint's attack record says, and (attack, mode); clean when it has none."""
    poisoned, case, _ = poisoned_with_cover(train, meta)
    return poisoned, case


def poisoned_with_cover(train, meta: dict):
    """As poisoned_as_recorded, and the attack's cover samples (a trigger kept with the true label: WaNet's
    noise mode, IAD's cross-trigger, the adaptive attacks' covers) as a mask; none on a clean set."""
    if not isinstance(meta.get("attack"), dict):
        return train, ("clean", "-"), np.zeros(len(train), bool)
    spec = harness.PoisonSpec.from_dict(meta["attack"])
    clean_model = None
    if harness.needs_clean_model(spec.attack, spec.params):  # label_consistent's PGD step, on the clean model kept
        if not meta.get("clean_model"):
            raise InputError(f"attack {spec.attack!r}: the checkpoint records no clean model to rebuild its poisoned "
                             "set with (train it again with train_attacks.py --models-dir, which keeps one)")
        model, clean_meta = load_checkpoint(meta["clean_model"])
        clean_model = (model, clean_meta["normalisation"])
    poisoned, result = harness.poison(train, spec, clean_model=clean_model)
    return poisoned, (spec.attack, spec.mode), np.asarray(result.cover, bool)


def run(args):
    out = Path(args.out)
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    done = {(r["model"], r["variant"]) for r in rows}
    variants = {name: VARIANTS[name] for name in args.variants}
    for model_path in args.models:
        todo = [v for v in variants if (str(model_path), v) not in done]
        if not todo:
            continue
        model, meta = load_checkpoint(model_path)
        source = scanned_subset(meta, args.seed)
        dataset, case, cover = poisoned_with_cover(source, meta)
        truth = dataset.poison if dataset.poison is not None else np.zeros(len(dataset), np.int64)
        # The cover samples count as clean in the FPR (as backdoor-toolbox's cleanser.py counts them); they carry a
        # trigger, so the FPR over the untouched samples alone is kept beside it.
        untouched = ~truth.astype(bool) & ~cover
        # All-to-one poison drawn from the target class keeps its label (about a tenth of it): how much of the
        # poison whose label the attack changed was found, beside the TPR over all of it.
        relabelled = truth.astype(bool) & (dataset.y != source.y)
        # The two groups no detector can tell apart where the covers carry the poison's own trigger (cover_floor.py):
        # the target class's own poison (label kept, counted as poison) and the target label's covers (clean).
        own, target_covers = np.zeros(len(dataset), bool), np.zeros(len(dataset), bool)
        if case[1] == "a2o":
            own = truth.astype(bool) & ~relabelled
            target_covers = cover & (dataset.y == meta["attack"].get("target", 0))
        t0 = time.perf_counter()
        features = extract_features(model, dataset, meta["normalisation"], progress=False,
                                    store=Path(args.cache) / Path(model_path).stem)
        extract_s = time.perf_counter() - t0
        for variant in todo:
            t0 = time.perf_counter()
            flare = Flare(**variants[variant], reduce=args.reduce)
            detection = flare.fit(features.bn_minima, features.layout, y=dataset.y)
            metrics = detection_metrics(detection.flags, truth)
            if args.keep_flags:
                kept = Path(args.keep_flags)
                kept.mkdir(parents=True, exist_ok=True)
                np.save(kept / f"{Path(model_path).stem}--{variant}.npy", np.flatnonzero(detection.flags))
                # Each seed's run too (one row of packed bits per run): the table's boundary count pools them.
                np.save(kept / f"{Path(model_path).stem}--{variant}--runs.npy",
                        np.packbits(np.stack([r.flags for r in flare.runs_]), axis=1))
            d = detection.diagnostics
            row = {"model": str(model_path), "variant": variant, "attack": case[0], "mode": case[1],
                   "n": len(dataset), "n_poison": int(truth.sum()), "reduce": args.reduce,
                   "asr": meta.get("eval", {}).get("asr"), "ba": meta.get("eval", {}).get("ba"),
                   "tpr": metrics["tpr"], "fpr": metrics["fpr"], "n_flagged": detection.n_flagged,
                   "n_relabelled": int(relabelled.sum()),
                   "n_cover": int(cover.sum()), "cover_flagged": int(detection.flags[cover].sum()),
                   "fpr_untouched": float(detection.flags[untouched].mean()) if untouched.any() else 0.0,
                   "tpr_relabelled": float(detection.flags[relabelled].mean()) if relabelled.any() else None,
                   "own_flagged": [int(detection.flags[own].sum()), int(own.sum())],
                   "target_covers_flagged": [int(detection.flags[target_covers].sum()), int(target_covers.sum())],
                   "flags_digest": hashlib.blake2b(np.flatnonzero(detection.flags).tobytes(),
                                                   digest_size=8).hexdigest(),
                   "paper_tpr_fpr": PAPER_TABLE_I.get(case),
                   "dropped_layers": d.get("dropped_layers"), "n_steps": len(d["steps"]),
                   "explanation": d.get("explanation"), "verdicts": d.get("verdicts"),
                   "seed_runs": d.get("seed_runs"), "votes_histogram": d.get("votes_histogram"),
                   "flagged_by": stage_counts(detection, truth),
                   "flagged_outside_clusters": d.get("flagged_outside_clusters"), "zoom": d.get("zoom"),
                   "minority": {k: v for k, v in d["minority"].items() if k != "nodes"} if d.get("minority") else None,
                   "extract_s": round(extract_s, 1), "detect_s": round(time.perf_counter() - t0, 1),
                   "threads": torch.get_num_threads(), "torch": torch.__version__,
                   "cpu": platform.processor() or platform.machine()}
            print(json.dumps({k: row[k] for k in ("attack", "mode", "variant", "tpr", "fpr", "n_flagged",
                                                  "dropped_layers", "detect_s")}), flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")


def differing(model: str, variants: list[str], kept: Path) -> str:
    """The most samples on which two of the variants' flags differ (from --keep-flags), '?' if not kept."""
    paths = [kept / f"{Path(model).stem}--{v}.npy" for v in variants]
    if not all(path.exists() for path in paths):
        return "?"
    flagged = [set(np.load(path).tolist()) for path in paths]
    return str(max(len(a ^ b) for i, a in enumerate(flagged) for b in flagged[i + 1:]))


def boundary(model: str, variants: list[str], kept: Path, n: int, low: float = 0.2) -> str:
    """How many samples the flagging runs of all `variants` together (each seed's run, from --keep-flags)
    flag in between `low` and 1 - `low` of the runs: where a majority of five runs can go either way under
    another base seed. '?' if not kept."""
    paths = [kept / f"{Path(model).stem}--{v}--runs.npy" for v in variants]
    if not all(path.exists() for path in paths):
        return "?"
    runs = np.vstack([np.unpackbits(np.load(path), axis=1, count=n).astype(bool) for path in paths])
    runs = runs[runs.any(axis=1)]
    if len(runs) < 2:
        return "0"
    share = runs.mean(axis=0)
    return str(int(((share >= low) & (share <= 1 - low)).sum()))


def cell(row: dict) -> str:
    """TPR / FPR; where the attack has cover samples, the FPR over the untouched samples and the covers flagged
    too (rows from before they were recorded show neither)."""
    text = f"{100 * row['tpr']:.1f}% / {100 * row['fpr']:.2f}%"
    if row.get("n_cover"):
        text += f" (untouched {100 * row['fpr_untouched']:.2f}%, covers {row['cover_flagged']}/{row['n_cover']})"
    return text


def print_table(rows, variants=None, same=None, kept=None):
    """One row per scanned set, TPR / FPR of each variant side by side, the paper's beside them; with
    `same` (variant names), whether those variants flagged the same samples, on how many they differ, and
    how many samples their runs pooled leave undecided (boundary)."""
    variants = variants or list(dict.fromkeys(r["variant"] for r in rows))
    rows = [r for r in rows if r["variant"] in variants]
    cases = {}
    for r in rows:
        cases.setdefault(r["model"], {})[r["variant"]] = r
    same_head = f" same flags ({', '.join(same)}) | samples differing | boundary samples |" if same else ""
    print("| attack | mode | n | poisoned | ASR | " + " | ".join(f"{v} TPR / FPR" for v in variants)
          + " | paper TPR / FPR (CIFAR-10) |" + same_head)
    print("|---" * (6 + len(variants) + (3 if same else 0)) + "|")
    for by_variant in cases.values():
        r = next(iter(by_variant.values()))
        paper = r["paper_tpr_fpr"]
        paper = "-" if paper is None else f"{'-' if paper[0] is None else paper[0]} / {paper[1]}"
        asr = "-" if r["asr"] is None else f"{100 * r['asr']:.1f}%"
        cells = [cell(by_variant[v]) if v in by_variant else "-" for v in variants]
        tail = ""
        if same:
            digests = {by_variant[v]["flags_digest"] for v in same if v in by_variant}
            agree = "-" if not all(v in by_variant for v in same) else ("yes" if len(digests) == 1 else "no")
            tail = (f" {agree} | {differing(r['model'], same, Path(kept)) if kept else '?'} |"
                    f" {boundary(r['model'], same, Path(kept), r['n']) if kept else '?'} |")
        print(f"| {r['attack']} | {r['mode']} | {r['n']} | {r['n_poison']} | {asr} | " + " | ".join(cells)
              + f" | {paper} |" + tail)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--table", action="store_true")
    p.add_argument("--models", nargs="*", default=[])
    p.add_argument("--cache", default="runs/features", help="feature stores, one per model")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--reduce", default="channel", choices=["channel", "layer"])
    p.add_argument("--seed", type=int, default=None, help=SEED_HELP)
    p.add_argument("--keep-flags", help="save each variant's flagged indices here (the table counts differences)")
    p.add_argument("--umap-cache", help="keep every UMAP embedding here and reuse it in later runs")
    p.add_argument("--same", nargs="+", help="with --table: do these variants flag the same samples?")
    args = p.parse_args()
    if args.table:
        print_table([json.loads(line) for line in Path(args.out).read_text().splitlines()],
                    variants=args.variants if "--variants" in sys.argv else None, same=args.same,
                    kept=args.keep_flags)
        return
    share_embeddings_between_variants(args.umap_cache)
    run(args)


if __name__ == "__main__":
    main()
