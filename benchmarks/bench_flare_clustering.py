"""Wall time of FLARE's whole subspace search (UMAP + HDBSCAN + walk + labelling) on stored features, for
each backend choice, and whether the flags change: agreement with the default configuration's flags.

    python benchmarks/bench_flare_clustering.py --store runs/features/badnets6 --data poisoned.npz \
        --out benchmarks/results/flare_clustering.jsonl

Configurations, each run once (a run is minutes at 60k samples on 2 cores; repetitions would be hours):
  default        per-channel columns, umap-learn's own NN-descent, seeded (single-threaded): the official setup
  exact-knn      the kNN graph from cluster.knn (faiss on the CPU) fed to UMAP
  pca50          columns projected on 50 principal components first
  pca50-knn      both
  unseeded       random_state=None: umap-learn runs on all cores, runs are not repeatable
  per-layer      reduce="layer": one column per BN layer (the official feature)
  seed0, seed1   the default with other UMAP seeds: how much the flags depend on the embedding's randomness
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

import numpy as np
import torch

from backdoor_engine.data.dataset import load_npz
from backdoor_engine.engine.feature_store import FeatureStore
from backdoor_engine.detection import detection_metrics
from backdoor_engine.methods.flare import Flare

CONFIGS = {
    "default": {},
    "exact-knn": {"knn_backend": "auto"},
    "pca50": {"pca_components": 50},
    "pca50-knn": {"pca_components": 50, "knn_backend": "auto"},
    "unseeded": {"random_state": None},
    "per-layer": {"reduce": "layer"},
    "seed0": {"random_state": 0},
    "seed1": {"random_state": 1},
}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", required=True, help="a complete feature store (scan --store, or the detection bench)")
    p.add_argument("--data", required=True, help="the dataset the store was extracted from (labels, ground truth)")
    p.add_argument("--out", required=True)
    p.add_argument("--configs", nargs="+", default=[c for c in CONFIGS if not c.startswith("seed")],
                   choices=list(CONFIGS))
    args = p.parse_args()

    features = FeatureStore.open(args.store).load()
    dataset = load_npz(args.data)
    if not np.array_equal(features.ids, dataset.ids):
        raise SystemExit(f"{args.store} was not extracted from {args.data}: the sample ids differ")
    out = Path(args.out)
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    done = {(r["store"], r["config"]) for r in rows}
    reference = next((np.array(r["flags"], bool) for r in rows if r["store"] == args.store and r["config"] == "default"),
                     None)
    for name in args.configs:
        if (args.store, name) in done:
            continue
        t0 = time.perf_counter()
        detection = Flare(**CONFIGS[name]).fit(features.bn_minima, features.layout, y=dataset.y)
        seconds = time.perf_counter() - t0
        if name == "default":
            reference = detection.flags
        row = {"store": args.store, "config": name, "params": CONFIGS[name], "n": len(dataset),
               "seconds": round(seconds, 1), "n_subspaces": len(detection.diagnostics["steps"]),
               "step_seconds": [round(s["seconds"], 1) for s in detection.diagnostics["steps"]],
               "n_flagged": detection.n_flagged, "dropped_layers": detection.diagnostics.get("dropped_layers"),
               "explanation": detection.diagnostics.get("explanation"),
               "verdicts": detection.diagnostics.get("verdicts"),
               "agreement_with_default": None if reference is None else float((detection.flags == reference).mean()),
               "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
               "threads": torch.get_num_threads(), "torch": torch.__version__, "cpu": platform.machine(),
               "flags": detection.flags.astype(int).tolist() if name == "default" else None}
        if dataset.poison is not None:
            m = detection_metrics(detection.flags, dataset.poison)
            row.update(tpr=m["tpr"], fpr=m["fpr"])
        print(json.dumps({k: v for k, v in row.items() if k != "flags"}), flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
