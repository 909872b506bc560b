"""FLARE at scale: flags fit on a sample and assigned by kNN vote, against FLARE on every row; and a
1.28M-row clustering on this machine.

    # agreement with the exact path on real stored features (every config in a fresh process)
    python benchmarks/bench_scalable_clustering.py agreement --store runs/features/badnets6 --data badnets.npz \
        --out benchmarks/results/scalable_agreement60k.jsonl
    # 1.28M rows: the stored rows replicated with noise into a float16 memory-mapped matrix, then clustered
    python benchmarks/bench_scalable_clustering.py million --store runs/features/badnets6 --data badnets.npz \
        --rows 1280000 --work runs/million --out benchmarks/results/scalable_million.jsonl

Each configuration runs in its own subprocess, so its wall time includes umap-learn's numba JIT (as a
scan's would) and its peak RSS (ru_maxrss of that process) is its own. Ground truth (the npz's `poison`)
is used only to report TPR/FPR, never by the detector.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CONFIGS = {
    "exact": {"exact_max_samples": 10**9},
    "s10k-pca": {"exact_max_samples": 0, "sample_size": 10_000},
    "s20k-pca": {"exact_max_samples": 0, "sample_size": 20_000},
    "s30k-pca": {"exact_max_samples": 0, "sample_size": 30_000},
    "s20k-random": {"exact_max_samples": 0, "sample_size": 20_000, "projection": "random"},
    "s20k-pca-ivf": {"exact_max_samples": 0, "sample_size": 20_000, "knn_index": "ivf"},
    "s20k-pca-k5": {"exact_max_samples": 0, "sample_size": 20_000, "assign_k": 5},
    "s50k-pca": {"exact_max_samples": 0, "sample_size": 50_000},
    "s50k-pca-ivf": {"exact_max_samples": 0, "sample_size": 50_000, "knn_index": "ivf"},
    "s50k-random-ivf": {"exact_max_samples": 0, "sample_size": 50_000, "knn_index": "ivf", "projection": "random"},
}


def run_one(matrix: str, labels: str, truth: str, config: str, layout: str) -> dict:
    """One configuration on a .npy feature matrix (memory-mapped), in this process."""
    import torch

    from backdoor_engine.engine.layout import FeatureLayout
    from backdoor_engine.detection import detection_metrics
    from backdoor_engine.methods.flare_sampled import SampledFlare

    features = np.load(matrix, mmap_mode="r")
    y, poison = np.load(labels), np.load(truth)
    began = time.perf_counter()
    detector = SampledFlare(**CONFIGS[config])
    detection = detector.fit(features, FeatureLayout.from_dict(json.loads(layout)), y=y)
    seconds = time.perf_counter() - began
    sampled = detection.diagnostics["sampled"]
    return {"config": config, "params": CONFIGS[config], "n": len(features), "dtype": str(features.dtype),
            "seconds": round(seconds, 1), "stage_seconds": {k: round(v, 1) for k, v in sampled["timings_s"].items()},
            "n_sample": sampled["n_sample"], "index": sampled.get("index"), "dropped_layers":
            detection.diagnostics.get("dropped_layers"), "n_flagged": detection.n_flagged,
            "metrics": detection_metrics(detection.flags, poison),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "cpu": platform.machine(), "python": platform.python_version(),
            "_flags": np.packbits(detection.flags).tobytes().hex()}


def stored_inputs(store: str, data: str, work: Path) -> tuple[Path, Path, Path, str]:
    """The store's bn_minima matrix (memory-mapped), labels and ground truth as .npy files in work."""
    from backdoor_engine.data.dataset import load_npz
    from backdoor_engine.engine.feature_store import FeatureStore

    feature_store = FeatureStore.open(store)
    dataset = load_npz(data)
    ids = feature_store.matrix("ids")
    if not np.array_equal(ids, dataset.ids):
        raise SystemExit(f"{store} was not extracted from {data}: the sample ids differ")
    work.mkdir(parents=True, exist_ok=True)
    np.save(work / "y.npy", dataset.y)
    np.save(work / "poison.npy", dataset.poison)
    matrix = feature_store.directory / "all.bn_minima.npy"
    feature_store.matrix("bn_minima")
    return matrix, work / "y.npy", work / "poison.npy", json.dumps(feature_store.layout.to_dict())


def replicate(store: str, data: str, rows: int, noise: float, work: Path, seed: int = 0):
    """float16 [rows, D] built chunk by chunk: row i is stored row (i mod N) plus Gaussian noise of
    `noise` times each column's standard deviation (so copies are near, not identical, points)."""
    matrix, labels, truth, layout = stored_inputs(store, data, work)
    source = np.load(matrix, mmap_mode="r")
    y, poison = np.load(labels), np.load(truth)
    n, dimension = source.shape
    scale = (np.asarray(source, dtype=np.float32).std(axis=0) * noise).astype(np.float32)
    target = work / f"replicated{rows}.npy"
    if not target.exists():
        rng = np.random.default_rng(seed)
        out = np.lib.format.open_memmap(work / "partial.npy", mode="w+", dtype=np.float16, shape=(rows, dimension))
        for start in range(0, rows, n):
            stop = min(start + n, rows)
            copy = np.asarray(source[: stop - start], dtype=np.float32)
            out[start:stop] = copy + rng.standard_normal(copy.shape, dtype=np.float32) * scale
        out.flush()
        del out
        (work / "partial.npy").rename(target)
    repeat = -(-rows // n)
    np.save(work / f"y{rows}.npy", np.tile(y, repeat)[:rows])
    np.save(work / f"poison{rows}.npy", np.tile(poison, repeat)[:rows])
    return target, work / f"y{rows}.npy", work / f"poison{rows}.npy", layout


def in_subprocess(inputs, config: str) -> dict:
    matrix, labels, truth, layout = inputs
    code = ("import json, sys; sys.path.insert(0, %r); from bench_scalable_clustering import run_one; "
            "print('RESULT ' + json.dumps(run_one(*sys.argv[1:])))" % str(Path(__file__).parent))
    done = subprocess.run([sys.executable, "-c", code, str(matrix), str(labels), str(truth), config, layout],
                          capture_output=True, text=True, check=True)
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["agreement", "million"])
    p.add_argument("--store", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--work", default="runs/scalable")
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS))
    p.add_argument("--rows", type=int, default=1_280_000)
    p.add_argument("--noise", type=float, default=0.1)
    args = p.parse_args()

    work = Path(args.work)
    if args.mode == "agreement":
        inputs = stored_inputs(args.store, args.data, work)
        configs = args.configs or ["exact", "s10k-pca", "s20k-pca", "s30k-pca", "s20k-random", "s20k-pca-ivf",
                                   "s20k-pca-k5"]
    else:
        began = time.perf_counter()
        inputs = replicate(args.store, args.data, args.rows, args.noise, work)
        print(f"replicated matrix ready in {time.perf_counter() - began:.0f} s: {inputs[0]}", flush=True)
        configs = args.configs or ["s50k-pca-ivf"]
    out = Path(args.out)
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    exact = next((r for r in rows if r["config"] == "exact" and r["n"] == len(np.load(inputs[1]))), None)
    if exact is not None and (work / "exact_flags.npy").exists():
        exact["flags"] = np.load(work / "exact_flags.npy")
    for config in configs:
        if any(r["config"] == config and r["n"] == len(np.load(inputs[1])) for r in rows):
            continue
        row = in_subprocess(inputs, config)
        flags = np.unpackbits(np.frombuffer(bytes.fromhex(row.pop("_flags")), np.uint8))[: row["n"]].astype(bool)
        if config == "exact":
            exact = {**row, "flags": flags}
            np.save(work / "exact_flags.npy", flags)
        if exact is not None and "flags" in exact and config != "exact":
            row["agreement_with_exact"] = float((flags == exact["flags"]).mean())
            row["seconds_saved_vs_exact"] = round(exact["seconds"] - row["seconds"], 1)
            row["rss_saved_mb_vs_exact"] = exact["peak_rss_mb"] - row["peak_rss_mb"]
        row.update(store=args.store, noise=args.noise if args.mode == "million" else None)
        print(json.dumps(row), flush=True)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
