"""Settle flags that bench_flare_detection.py kept, without re-running the scan.

`settle` (FlareParams) is FLARE's last stage: it starts from the flags every earlier stage produced, so applying
`settle_footprint` to a default scan's kept flags gives what `Flare(settle=True)` flags on the same features and
embeddings (checked on two rows: RESULTS.md, session 31). That makes the comparison cheap where the scans were kept:

    python benchmarks/settle_kept_flags.py --models runs/attacks/wanet-a2o-10000-e20.pt \
        --cache runs/features --keep-flags runs/flareflags --variants default seed0 seed1 --out runs/settle.jsonl

One row per (model, variant): TPR / FPR / flagged before and after, and settle's summary; then one row per model
with how many samples the variants' flags differ on (flagged by some, not all), before and after.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np

from bench_flare_detection import SEED_HELP, poisoned_with_cover, scanned_subset, subset_seed
from backdoor_engine.engine.feature_store import FeatureStore
from backdoor_engine.methods.flare import SETTLE_CUTS, ColumnScale, FlareParams, settle_footprint
from backdoor_engine.models.checkpoint import load_checkpoint


def rates(flags: np.ndarray, truth: np.ndarray, cover: np.ndarray) -> dict:
    return {"tpr": float(flags[truth].mean()) if truth.any() else 0.0, "fpr": float(flags[~truth].mean()),
            "n_flagged": int(flags.sum()), "cover_flagged": int(flags[cover].sum())}


def apart(flag_sets: list) -> int:
    stacked = np.array(flag_sets)
    return int((stacked.any(axis=0) & ~stacked.all(axis=0)).sum())


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", required=True)
    p.add_argument("--seed", type=int, default=None, help=SEED_HELP)
    p.add_argument("--cache", required=True, help="the bench's --cache: one feature store per model")
    p.add_argument("--keep-flags", required=True, help="the bench's --keep-flags directory")
    p.add_argument("--variants", nargs="+", default=["default", "seed0", "seed1"])
    p.add_argument("--cut", default=FlareParams.settle_cut, choices=SETTLE_CUTS, help="settle_cut")
    p.add_argument("--strengths", nargs="+", type=float, default=list(FlareParams.settle_strengths),
                   help="settle_strengths: the probes' C, one stage of rounds per value")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    with open(args.out, "a") as out:
        for model_path in args.models:
            stem = Path(model_path).stem
            kept = {v: Path(args.keep_flags) / f"{stem}--{v}.npy" for v in args.variants}
            kept = {v: path for v, path in kept.items() if path.exists()}
            if not kept:
                print(f"{stem}: no kept flags for {args.variants}, skipped", flush=True)
                continue
            _, meta = load_checkpoint(model_path)
            seed = subset_seed(meta, args.seed)
            dataset, _, cover = poisoned_with_cover(scanned_subset(meta, seed), meta)
            truth = (dataset.poison if dataset.poison is not None else np.zeros(len(dataset))).astype(bool)
            store = FeatureStore.open(Path(args.cache) / stem)
            features = np.asarray(store.matrix("bn_minima"), np.float32)
            scale, y = ColumnScale(features), np.asarray(dataset.y)
            before, after = [], []
            for variant, path in kept.items():
                flags = np.zeros(len(y), bool)
                flags[np.load(path)] = True
                t0 = time.perf_counter()
                settled, summary = settle_footprint(flags, features, y, scale=scale, cut=args.cut,
                                                     strengths=tuple(args.strengths))
                settled = flags if settled is None else settled
                before.append(flags)
                after.append(settled)
                row = {"model": str(model_path), "variant": variant, "subset_seed": seed, "cut": args.cut,
                       "strengths": args.strengths,
                       "before": rates(flags, truth, cover), "after": rates(settled, truth, cover), "settle": summary,
                       "settle_s": round(time.perf_counter() - t0, 2)}
                out.write(json.dumps(row) + "\n")
                out.flush()
                print(json.dumps(row), flush=True)
            if len(kept) > 1:
                row = {"model": str(model_path), "variants": list(kept), "apart_before": apart(before),
                       "apart_after": apart(after)}
                out.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
