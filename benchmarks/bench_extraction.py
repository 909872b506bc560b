"""FLARE feature extraction throughput vs a plain forward and vs the official code's extractor; one JSON object.

    python benchmarks/bench_extraction.py --arch small_resnet --n 4096 --reps 5
    python benchmarks/bench_extraction.py --arch resnet18 --n 1024 --reps 3

A thin caller of backdoor_engine.bench (also behind `backdoor-engine bench`, which users run on their own
hardware). Variants, timed in one process, interleaved rep by rep (median reported), same batches and threads:
  plain      model(x) on the normalised batch: the inference forward the extraction rides on
  engine     extract_features(...): probes on every BN input, compiled kernel ("auto" backend)
  engine_torch  the same with the torch closed-form backend
  official   the official FLARE way: a model copy whose BatchNorm2d modules compute the full
             per-element log-density tensor, then the min (per channel here, same output as ours)
Peak RSS of each variant: the rise of the high-water mark over the setup's, in a fresh subprocess (--only VARIANT).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys

import numpy as np
import torch

from backdoor_engine.bench import VARIANTS, make_runner, time_interleaved
from backdoor_engine.data import load_fashion_mnist, load_foolbox_cifar10_samples, make_dataset
from backdoor_engine.models import build_model, fit_normalisation


def bench_dataset(arch: str, n: int):
    if arch == "small_resnet":
        data = load_fashion_mnist("train")
        return data.subset(np.arange(n)), (1, 28)
    # 32x32x3 models: the 20 real CIFAR-10 images from the foolbox wheel, tiled to n (throughput does not
    # depend on pixel values).
    samples = load_foolbox_cifar10_samples()
    reps = -(-n // len(samples))
    x = np.tile(samples.x, (reps, 1, 1, 1))[:n]
    return make_dataset(x, np.tile(samples.y, reps)[:n]), (3, 32)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="small_resnet")
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--only", choices=VARIANTS, help="run one variant once and print its peak RSS (MB)")
    args = p.parse_args()

    dataset, (channels, size) = bench_dataset(args.arch, args.n)
    torch.manual_seed(0)
    model = build_model(args.arch, num_classes=10, in_channels=channels, input_size=size).eval()
    norm = fit_normalisation(dataset.x)
    if args.only:
        runner = make_runner(args.only, model, dataset, norm, args.batch_size)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        runner()
        # The rise of the high-water mark above what loading the data and model already took.
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
        return
    runners = {v: make_runner(v, model, dataset, norm, args.batch_size) for v in VARIANTS}
    times = time_interleaved(runners, args.reps, device=torch.device("cpu"))
    median = {v: statistics.median(t) for v, t in times.items()}
    peak = {}
    for v in VARIANTS:
        out = subprocess.run([sys.executable, __file__, "--arch", args.arch, "--n", str(args.n),
                              "--batch-size", str(args.batch_size), "--only", v],
                             capture_output=True, text=True, check=True)
        peak[v] = round(float(out.stdout.strip().splitlines()[-1]))
    print(json.dumps({
        "arch": args.arch, "n": args.n, "batch_size": args.batch_size, "reps": args.reps,
        "images_per_s": {v: round(args.n / median[v], 1) for v in VARIANTS},
        "engine_vs_plain": round(median["plain"] / median["engine"], 3),
        "engine_torch_vs_plain": round(median["plain"] / median["engine_torch"], 3),
        "engine_speedup_vs_official": round(median["official"] / median["engine"], 2),
        "peak_rss_rise_mb": peak, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "python": platform.python_version(), "cpu": platform.machine(),
    }))


if __name__ == "__main__":
    main()
