"""TRAP's isolation per epoch (the paper's Table V form) and its t-SNE cost cuts, on one training run per set.

For each checkpoint of train_attacks.py, only its attack record is used: the poisoned training set is rebuilt
(bench_flare_detection.scanned_set) and TRAP trains its OWN model on it (TrapParams: the paper's E_d = 10 epochs of
an E_t = 100 schedule). After each epoch the penultimate features are extracted once and every --variants setting
isolates on those same features (`Isolation.observe`), so the variants differ only in the embedding:
    full    the paper: a fresh t-SNE of every row every epoch
    warm    every row, each epoch after the first continuing from the previous embedding (tsne_warm_start)
    sample  t-SNE + DBSCAN on --sample rows (fixed), the rest placed by their nearest embedded rows
    fast    sample + warm
Per (set, variant, epoch): flags, recall and precision against the ground truth, agreement with `full` on the same
epoch (share of rows with the same flag, and the Jaccard index of the two flagged sets), stage seconds; the union
over the epochs the same way; the training time of each epoch for the comparison the issue asks (isolation cost
<= training cost). One JSON line per (set, variant) to --out; ground truth is only read to score. Each variant's
union and per-epoch flags go to --cache/<stem>/<variant>.npz, for a repair (`--stages hiding`: TRAP's backdoor
hiding on the checkpoint itself with the `full` union, BA / ASR on the Fashion-MNIST test set before and after).

    python benchmarks/bench_trap.py --models runs/attacks/badnets-a2o-10000-e6.pt --out benchmarks/results/trap.jsonl
    python benchmarks/bench_trap.py --models runs/attacks/badnets-a2o-10000-e6.pt --stages hiding \
        --out benchmarks/results/trap.jsonl
    python benchmarks/bench_trap.py --out benchmarks/results/trap.jsonl --table
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from backdoor_engine.methods.trap import Isolation, TrapParams, epoch_features, train_config
from backdoor_engine.models.checkpoint import load_checkpoint
from backdoor_engine.models.preprocess import fit_normalisation
from backdoor_engine.models.registry import default_arch
from backdoor_engine.models.train import train_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_flare_detection import SEED_HELP, scanned_set  # noqa: E402


def variant_params(name: str, sample: int, base: dict) -> TrapParams:
    options = {"full": {}, "warm": {"tsne_warm_start": True}, "sample": {"tsne_sample": sample},
               "fast": {"tsne_sample": sample, "tsne_warm_start": True}}[name]
    return TrapParams(**{**base, **options})


def scores(flags: np.ndarray, truth: np.ndarray, reference: np.ndarray | None) -> dict:
    out = {"n_flagged": int(flags.sum()), "recall": float((flags & truth).sum() / max(truth.sum(), 1)),
           "precision": float((flags & truth).sum() / flags.sum()) if flags.any() else None}
    if reference is not None:
        union = (flags | reference).sum()
        out["agreement"] = float((flags == reference).mean())
        out["jaccard"] = float((flags & reference).sum() / union) if union else 1.0
    return out


def hiding(args):
    """TRAP's backdoor hiding on the checkpoint with each cached variant's union: BA / ASR before and after, the
    share of triggered images sent to the dummy class, and of clean images lost to it."""
    from backdoor_engine import api
    from backdoor_engine.data.attacks import harness
    from backdoor_engine.data.fashion_mnist import load_fashion_mnist

    out = Path(args.out)
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    done = {(r["model"], r["variant"]) for r in rows if r.get("stage") == "hiding"}
    test = load_fashion_mnist("test")
    for model_path in args.models:
        model, meta = load_checkpoint(model_path)
        dataset, (attack, mode) = scanned_set(meta, args.seed)
        spec = harness.PoisonSpec.from_dict(meta["attack"])
        before = api.evaluate(model, meta["normalisation"], test, spec, num_classes=dataset.num_classes)
        for variant in args.variants:
            path = Path(args.cache) / Path(model_path).stem / f"{variant}.npz"
            if (str(model_path), variant) in done or not path.exists():
                continue
            flags = np.load(path)["union"]
            t0 = time.perf_counter()
            repaired = api.purify(model, meta["normalisation"], dataset, flags, strategy="backdoor-hiding",
                                  progress=False)
            seconds = time.perf_counter() - t0
            dummy = repaired.config["dummy_class"]
            after = api.evaluate(repaired.model, repaired.normalisation, test, spec,
                                 num_classes=dataset.num_classes, dummy_class=dummy)
            row = {"model": str(model_path), "attack": attack, "mode": mode, "stage": "hiding", "variant": variant,
                   "n_relabelled": int(flags.sum()), "ba_before": before["ba"], "asr_before": before["asr"],
                   "after": after, "seconds": round(seconds, 1), "config": repaired.config}
            print(json.dumps(row), flush=True)
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")


def training_sets(args):
    """(key, poisoned training set, (attack, mode)) for every --models checkpoint (its subset rebuilt) and every
    --data set (an npz as `poison` writes it, its attack from the .attack.json beside it; none = a clean set).
    Sets are built lazily, one at a time."""
    from backdoor_engine.data.attacks.harness import PoisonSpec
    from backdoor_engine.data.open import open_dataset

    for model_path in args.models:
        _, meta = load_checkpoint(model_path)
        yield (str(model_path), *scanned_set(meta, args.seed))
    for data_path in args.data:
        manifest = Path(data_path).with_suffix(".attack.json")
        spec = PoisonSpec.load(manifest) if manifest.exists() else None
        yield str(data_path), open_dataset(data_path), (spec.attack, spec.mode) if spec else ("clean", "-")


def run(args):
    out = Path(args.out)
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    done = {(r["model"], r["variant"]) for r in rows if r.get("stage", "isolation") == "isolation"}
    base = dict(json.loads(args.params)) if args.params else {}
    for model_path, dataset, (attack, mode) in training_sets(args):
        if all((model_path, v) in done for v in args.variants):
            continue
        truth = dataset.poison.astype(bool) if dataset.poison is not None else np.zeros(len(dataset), bool)
        normalisation = fit_normalisation(dataset.x)
        isolations = {v: Isolation(dataset, normalisation, variant_params(v, args.sample, base))
                      for v in args.variants}
        params = next(iter(isolations.values())).params
        epoch_log, clock = [], [time.perf_counter()]
        rule_flags_of = {name: [] for name in isolations}

        def callback(epoch, model):
            training_s = time.perf_counter() - clock[0]
            t0 = time.perf_counter()
            features = epoch_features(model, dataset, normalisation)
            features_s = time.perf_counter() - t0
            entry = {"epoch": epoch, "training_s": round(training_s, 1), "features_s": round(features_s, 1)}
            observed = {name: isolation for name, isolation in isolations.items()
                        if name != "full" or not args.full_epochs or epoch in args.full_epochs}
            for name, isolation in observed.items():
                result = isolation.observe(epoch, features, features_s)
                entry[name] = {"seconds": {k: round(v, 1) for k, v in result.seconds.items() if k != "features"},
                               "eps": result.eps, "n_clusters": len(result.table)}
            reference = observed["full"].results_[-1].flags if "full" in observed else None
            for name, isolation in observed.items():
                entry[name].update(scores(isolation.results_[-1].flags, truth, reference))
                # the paper's rule alone on the same clusters (before the class make-up guard)
                result = isolation.results_[-1]
                rule_flags = np.isin(result.clusters, [c.label for c in result.table if c.rule_suspicious])
                rule_flags_of[name].append(rule_flags)
                entry[name]["paper_rule"] = scores(rule_flags, truth, None)
            epoch_log.append(entry)
            print(json.dumps({"model": Path(model_path).stem, **entry}), flush=True)
            clock[0] = time.perf_counter()

        train_model(dataset.x, dataset.y, arch=params.arch or default_arch(dataset.image_shape),
                    num_classes=dataset.num_classes, config=train_config(params, progress=False),
                    normalisation=normalisation, callback=callback, stop_after=params.detect_epochs)
        # with --full-epochs the full fit's union covers only those epochs: no union agreement then
        reference = isolations["full"].flags_ if "full" in isolations and not args.full_epochs else None
        cache = Path(args.cache) / Path(model_path).stem
        cache.mkdir(parents=True, exist_ok=True)
        for name, isolation in isolations.items():
            rule_counts = np.sum(rule_flags_of[name], axis=0)
            np.savez(cache / f"{name}.npz", union=isolation.flags_,
                     per_epoch=np.array([r.flags for r in isolation.results_]),
                     paper_rule_per_epoch=np.array(rule_flags_of[name]))
            row = {"model": model_path, "attack": attack, "mode": mode, "stage": "isolation", "n": len(dataset),
                   "poisoned": int(truth.sum()), "variant": name, "params": dataclasses.asdict(isolation.params),
                   "union": scores(isolation.flags_, truth, reference),
                   # union_min_epochs = k for every k, from the same per-epoch flags (k = 1 is the paper's union)
                   "min_epochs": [{"k": k, **scores(isolation.counts_ >= k, truth, None)}
                                  for k in range(1, len(isolation.results_) + 1)],
                   "paper_rule_min_epochs": [{"k": k, **scores(rule_counts >= k, truth, None)}
                                             for k in range(1, len(isolation.results_) + 1)],
                   "epochs": [{"epoch": e["epoch"], "training_s": e["training_s"], "features_s": e["features_s"],
                               **e[name]} for e in epoch_log if name in e],
                   "versions": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                                "python": platform.python_version()}}
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")


def _pct(value):
    return "-" if value is None else f"{100 * value:.1f}%"


def table(args):
    rows = [json.loads(line) for line in Path(args.out).read_text().splitlines()]
    hidings = [r for r in rows if r.get("stage") == "hiding"]
    rows = [r for r in rows if r.get("stage", "isolation") == "isolation"]
    print("| attack | mode | variant | per epoch: flagged / recall / precision (agreement with full) | union: recall "
          "/ precision (agreement, Jaccard) | t-SNE + DBSCAN s per epoch (median) | training s per epoch (median) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        per_epoch = "; ".join(
            f"e{e['epoch']} {e['n_flagged']} / {_pct(e['recall'])} / {_pct(e['precision'])}"
            + (f" ({_pct(e['agreement'])})" if "agreement" in e else "") for e in r["epochs"])
        u = r["union"]
        cost = np.median([sum(e["seconds"].values()) for e in r["epochs"]])
        train = np.median([e["training_s"] for e in r["epochs"]])
        agree = f" ({_pct(u['agreement'])}, {u['jaccard']:.3f})" if "agreement" in u else ""
        print(f"| {r['attack']} | {r['mode']} | {r['variant']} | {per_epoch} | {_pct(u['recall'])} / "
              f"{_pct(u['precision'])}{agree} | {cost:.1f} | {train:.1f} |")
    with_k = [r for r in rows if "min_epochs" in r]
    if with_k:
        print("\nFlagged in at least k of the isolation epochs (union_min_epochs = k; k = 1 is the paper's union): "
              "flagged / recall / precision")
        print("\n| attack | mode | variant | " + " | ".join(f"k = {e['k']}" for e in with_k[0]["min_epochs"]) + " |")
        print("|---|---|---|" + "---|" * len(with_k[0]["min_epochs"]))
        for r in with_k:
            cells = " | ".join(f"{e['n_flagged']} / {_pct(e['recall'])} / {_pct(e['precision'])}"
                               for e in r["min_epochs"])
            print(f"| {r['attack']} | {r['mode']} | {r['variant']} | {cells} |")
    if hidings:
        print("\n| attack | mode | flags of | relabelled | BA before | ASR before | BA after | ASR after | "
              "triggered to dummy | clean to dummy | s |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in hidings:
            a = r["after"]
            print(f"| {r['attack']} | {r['mode']} | {r['variant']} | {r['n_relabelled']} | {_pct(r['ba_before'])} | "
                  f"{_pct(r['asr_before'])} | {_pct(a['ba'])} | {_pct(a['asr'])} | "
                  f"{_pct(a.get('dummy_rate_triggered'))} "
                  f"| {_pct(a.get('dummy_rate_clean'))} | {r['seconds']} |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=[], help="train_attacks.py checkpoints (their attack records)")
    p.add_argument("--data", nargs="*", default=[], help="npz training sets (poison's output, or a clean set) to "
                   "isolate on, without a checkpoint (no hiding stage)")
    p.add_argument("--out", required=True)
    p.add_argument("--variants", nargs="+", default=["full", "warm", "fast"],
                   choices=["full", "warm", "sample", "fast"])
    p.add_argument("--full-epochs", type=int, nargs="+", help="run the `full` variant only on these epochs (the "
                   "reference for agreement where ten full fits cost too much, e.g. at 60k)")
    p.add_argument("--sample", type=int, default=5000, help="rows t-SNE embeds in the sample / fast variants")
    p.add_argument("--params", help="TrapParams overrides for every variant, as JSON")
    p.add_argument("--seed", type=int, default=None, help=SEED_HELP)
    p.add_argument("--cache", default="runs/trap", help="where each variant's flags are kept")
    p.add_argument("--stages", nargs="+", default=["isolation"], choices=["isolation", "hiding"])
    p.add_argument("--table", action="store_true")
    args = p.parse_args()
    if args.table:
        return table(args)
    if "isolation" in args.stages:
        run(args)
    if "hiding" in args.stages:
        hiding(args)


if __name__ == "__main__":
    main()
