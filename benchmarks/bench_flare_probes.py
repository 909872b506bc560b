"""What FLARE's linear probes cost in memory and time at the exact path's scale: one scan's probe calls (each seed's
completion, then the residual probe) on planted features, with the column scaling shared by the calls or made by
each call itself; prints one JSON object.

    python benchmarks/bench_flare_probes.py --n 100000 --columns 1000 --reps 3

Planted data: labels uniform over 10 classes, 10% of the samples relabelled 0 with a shift in 20 columns (the
all-to-one footprint), 90% of them flagged; each of the --runs completion calls sees the flags with a different 1%
of them dropped (the seeds' runs differ), the residual probe sees the last. Memory is tracemalloc's peak above the
features (numpy reports its buffers to it), time the median of --reps. Run from an older checkout (before
ColumnScale) the script measures its per-call scaling only: `git worktree add /tmp/old COMMIT` and
`PYTHONPATH=/tmp/old python benchmarks/bench_flare_probes.py ...`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import tracemalloc

import numpy as np
import sklearn

from backdoor_engine.methods import flare


def planted(n: int, columns: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, columns)).astype(np.float32)
    y = rng.integers(0, 10, n)
    poison = rng.random(n) < 0.1
    y[poison] = 0
    X[np.ix_(np.flatnonzero(poison), np.arange(20))] += 1.5
    flags = poison & (rng.random(n) < 0.9)
    return X, y, flags


def probe_calls(X, y, flags, runs: int, shared: bool):
    scale = flare.ColumnScale(X) if shared else None
    extra = {} if scale is None else {"scale": scale}
    rng = np.random.default_rng(1)
    added = 0
    for _ in range(runs):
        run_flags = flags & (rng.random(len(flags)) >= 0.01)
        add, _ = flare.footprint_completion(run_flags, X, y, min_unexplained=5, **extra)
        added += int(add.sum())
    add, _ = flare.residual_members(flags, X, y, **extra)
    return added + int(add.sum())


def measure(X, y, flags, runs: int, shared: bool, reps: int) -> dict:
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    added = probe_calls(X, y, flags, runs, shared)
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        probe_calls(X, y, flags, runs, shared)
        times.append(time.perf_counter() - start)
    return {"peak_mb": round(peak / 2**20, 1), "median_s": round(statistics.median(times), 2),
            "times_s": [round(t, 2) for t in times], "added": added}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--columns", type=int, default=1000)
    p.add_argument("--runs", type=int, default=5, help="completion calls, one per seed's run (n_seeds)")
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    X, y, flags = planted(args.n, args.columns)
    modes = {"per_call": False, **({"shared": True} if hasattr(flare, "ColumnScale") else {})}
    result = {"n": args.n, "columns": args.columns, "features_mb": round(X.nbytes / 2**20, 1), "runs": args.runs,
              **{name: measure(X, y, flags, args.runs, shared, args.reps) for name, shared in modes.items()},
              "numpy": np.__version__, "sklearn": sklearn.__version__, "cpus": os.cpu_count(),
              "omp_threads": os.environ.get("OMP_NUM_THREADS"), "cpu": platform.processor() or platform.machine()}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
