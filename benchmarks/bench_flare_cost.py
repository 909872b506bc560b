"""What a FLARE option costs in wall time: the whole fit on stored features, per configuration, repeated with the
configurations interleaved (so that a slower stretch of the machine hits each alike), median reported.

    python benchmarks/bench_flare_cost.py --store runs/features/clean-10000-e6 --repeat 3 \
        --config default: --config session19:class_split_layers=0 --param n_seeds=1 \
        --out benchmarks/results/flare_cost.jsonl

A configuration is NAME:KEY=VALUE,KEY=VALUE (JSON values, empty for the defaults); --param applies to all of them.
Each fit counts its UMAP fits (one per subspace tried, per seed's run). Labels are the stored ones (y).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import time

import numpy as np
import torch

from backdoor_engine.cli import _parse_param
from backdoor_engine.engine.feature_store import FeatureStore
from backdoor_engine.methods.flare import Flare


def parse_params(text: str) -> dict:
    """KEY=VALUE,KEY=VALUE, each item read as the CLI's --param reads one."""
    return dict(_parse_param(item) for item in filter(None, text.split(",")))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", required=True)
    p.add_argument("--config", action="append", required=True, help="NAME:KEY=VALUE,... (see above)")
    p.add_argument("--param", default="", help="KEY=VALUE,... for every configuration")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    features = FeatureStore.open(args.store).load()
    common = parse_params(args.param)
    configs = {name: {**common, **parse_params(rest)} for name, _, rest in (c.partition(":") for c in args.config)}
    seconds = {name: [] for name in configs}
    results = {}
    for _ in range(args.repeat):
        for name, params in configs.items():
            flare = Flare(**params)
            began = time.perf_counter()
            detection = flare.fit(features.bn_minima, features.layout, y=np.asarray(features.y))
            seconds[name].append(time.perf_counter() - began)
            results[name] = (detection.n_flagged, sum(len(run.steps) for run in flare.runs_))
    with open(args.out, "a") as out:
        for name, params in configs.items():
            row = {"store": args.store, "config": name, "params": params, "n": len(features.bn_minima),
                   "seconds": [round(s, 2) for s in seconds[name]],
                   "median_s": round(statistics.median(seconds[name]), 2),
                   "n_flagged": results[name][0], "umap_fits": results[name][1], "threads": torch.get_num_threads(),
                   "numba_threads": os.environ.get("NUMBA_NUM_THREADS", "all cores"),
                   "umap_learn": importlib.metadata.version("umap-learn"),
                   "hdbscan": importlib.metadata.version("hdbscan"),
                   "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine()}
            out.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
