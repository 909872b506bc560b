"""FLARE feature extraction throughput vs a plain forward and vs the official code's extractor; one JSON object.

    python benchmarks/bench_extraction.py --arch small_resnet --n 4096 --reps 5
    python benchmarks/bench_extraction.py --arch resnet18 --n 1024 --reps 3

Variants, timed in one process, interleaved rep by rep (median reported), same batches and threads:
  plain      model(x) on the normalised batch: the inference forward the extraction rides on
  engine     extract_features(...): probes on every BN input, compiled kernel ("auto" backend)
  engine_torch  the same with the torch closed-form backend
  official   the official FLARE way: a model copy whose BatchNorm2d modules compute the full
             per-element log-density tensor, then the min (per channel here, same output as ours)
Peak RSS of each variant: the rise of the high-water mark over the setup's, in a fresh subprocess (--only VARIANT).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
import torch
from torch import nn

from backdoor_engine.data import load_fashion_mnist, load_foolbox_cifar10_samples, make_dataset
from backdoor_engine.engine import extract_features
from backdoor_engine.kernels import bn_minima_reference
from backdoor_engine.models import build_model, fit_normalisation, to_model_input

VARIANTS = ("plain", "engine", "engine_torch", "official")


class OfficialLogLikelihoodBN(nn.BatchNorm2d):
    """The official extractor's swapped BN: full log-density tensor of its input, min kept, then normal BN."""

    def forward(self, x):
        with torch.no_grad():
            self.captured.append(bn_minima_reference(x, self.running_mean, self.running_var, self.eps,
                                                     dtype=torch.float32))
        return super().forward(x)


def official_copy(model: nn.Module) -> tuple[nn.Module, list]:
    """Deep copy with every BatchNorm2d swapped (recursively through named_children), as the official code does."""
    clone = copy.deepcopy(model)
    captured: list = []

    def swap(module):
        for name, child in module.named_children():
            if isinstance(child, nn.BatchNorm2d):
                new = OfficialLogLikelihoodBN(child.num_features, eps=child.eps)
                new.load_state_dict(child.state_dict())
                new.captured = captured
                new.eval()
                setattr(module, name, new)
            else:
                swap(child)

    swap(clone)
    return clone.eval(), captured


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


def make_runner(variant, model, dataset, norm, batch_size):
    batches = [dataset.x[i:i + batch_size] for i in range(0, len(dataset), batch_size)]
    if variant == "plain":
        cl = model.to(memory_format=torch.channels_last)

        def run():
            with torch.no_grad():
                for b in batches:
                    cl(to_model_input(b, norm).contiguous(memory_format=torch.channels_last))
        return run
    if variant in ("engine", "engine_torch"):
        backend = "auto" if variant == "engine" else "torch"
        return lambda: extract_features(model, dataset, norm, batch_size=batch_size, backend=backend, progress=False)
    official, captured = official_copy(model)

    def run():
        with torch.no_grad():
            for b in batches:
                captured.clear()
                official(to_model_input(b, norm))
    return run


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
    for run in runners.values():  # warm-up
        run()
    times = {v: [] for v in VARIANTS}
    for rep in range(args.reps):
        order = VARIANTS[rep % len(VARIANTS):] + VARIANTS[:rep % len(VARIANTS)]
        for v in order:
            t0 = time.perf_counter()
            runners[v]()
            times[v].append(time.perf_counter() - t0)
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
