"""VBD speed: ours vs the straightforward way, measured in the same run (median of --reps).

  gradients  margin gradient maps of each simple model: one backward pass per batch (ours) vs one forward and
             backward per sample (the straightforward reference), and with BatchNorm folded (ours) vs not
  training   the three simple models trained on the same batches in one pass (ours) vs one after another
  end2end    the whole of Vbd.fit on --n real Fashion-MNIST samples (BadNets a2o): ours vs the same pipeline
             with every gradient map computed one sample at a time; the flags must agree

    python benchmarks/bench_vbd_speed.py --n 5000 --reps 5 --out benchmarks/results/vbd_speed.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from backdoor_engine.data.attacks import harness
from backdoor_engine.data.fashion_mnist import load_fashion_mnist
from backdoor_engine.engine.input_gradients import margin_gradients_per_sample
from backdoor_engine.methods import vbd as vbd_module
from backdoor_engine.detection import detection_metrics
from backdoor_engine.models.preprocess import fit_normalisation
from backdoor_engine.models.simple_cnn import DEFAULT_POISON_ARCHS, poison_model


def median_seconds(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_gradients(inputs: vbd_module.Inputs, n: int, reps: int) -> list[dict]:
    rows = []
    x = inputs(np.arange(n))
    for arch in DEFAULT_POISON_ARCHS:
        torch.manual_seed(0)
        model = poison_model(arch, in_channels=1, input_size=(28, 28), num_classes=10)
        model = model.to(memory_format=torch.channels_last).eval()
        folded = model.folded().to(memory_format=torch.channels_last)
        batched = median_seconds(lambda: vbd_module.chunked_gradients(folded, x, 0), reps)
        unfolded = median_seconds(lambda: vbd_module.chunked_gradients(model, x, 0), reps)
        per_sample = median_seconds(lambda: margin_gradients_per_sample(folded, x, 0), max(1, reps // 2))
        rows.append({"arch": arch, "n_maps": n, "batched_folded_maps_per_s": round(n / batched),
                     "batched_unfolded_maps_per_s": round(n / unfolded), "per_sample_maps_per_s": round(n / per_sample),
                     "batched_vs_per_sample": round(per_sample / batched, 1),
                     "folded_vs_unfolded": round(unfolded / batched, 2)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def bench_training(inputs: vbd_module.Inputs, y: np.ndarray, steps: int, reps: int) -> dict:
    labels = torch.from_numpy(y.astype(np.int64))
    batches = [np.arange(s * 256, (s + 1) * 256) for s in range(steps)]

    def fresh():
        torch.manual_seed(0)
        models = [poison_model(a, in_channels=1, input_size=(28, 28), num_classes=10)
                  .to(memory_format=torch.channels_last).train() for a in DEFAULT_POISON_ARCHS]
        return models, [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for m in models]

    def step(model, optimiser, x, target):
        loss = nn.functional.cross_entropy(model(x), target)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    def one_pass():
        models, optimisers = fresh()
        for batch in batches:
            x, target = inputs(batch), labels[batch]
            for model, optimiser in zip(models, optimisers):
                step(model, optimiser, x, target)

    def one_after_another():
        models, optimisers = fresh()
        for model, optimiser in zip(models, optimisers):
            for batch in batches:
                step(model, optimiser, inputs(batch), labels[batch])

    together = median_seconds(one_pass, reps)
    apart = median_seconds(one_after_another, reps)
    row = {"steps": steps, "batch": 256, "one_pass_s": round(together, 2), "one_after_another_s": round(apart, 2),
           "one_pass_vs_sequential": round(apart / together, 2)}
    print(json.dumps(row), flush=True)
    return row


def bench_end_to_end(n: int) -> dict:
    train = load_fashion_mnist("train").subset(np.arange(n))
    spec = harness.PoisonSpec(attack="badnets", mode="a2o", rate=0.1, target=0, seed=0, params={"pattern": "square"})
    poisoned, _ = harness.poison(train, spec)
    results = {}
    for name in ("ours", "per_sample_gradients"):
        original = vbd_module.margin_gradients
        if name == "per_sample_gradients":
            vbd_module.margin_gradients = margin_gradients_per_sample
        try:
            t0 = time.perf_counter()
            detection = vbd_module.Vbd().fit(poisoned.x, poisoned.y, num_classes=10)
            wall = time.perf_counter() - t0
        finally:
            vbd_module.margin_gradients = original
        results[name] = {"wall_s": round(wall, 1), "stage_s": {k: round(v, 1) for k, v in
                                                                detection.diagnostics["timings_s"].items()},
                         "f1": round(detection_metrics(detection.flags, poisoned.poison)["f1"], 5),
                         "flags": detection.flags}
        print(name, json.dumps({k: v for k, v in results[name].items() if k != "flags"}), flush=True)
    agree = float((results["ours"]["flags"] == results["per_sample_gradients"]["flags"]).mean())
    row = {"n": n, **{k: {kk: vv for kk, vv in v.items() if kk != "flags"} for k, v in results.items()},
           "flag_agreement": agree,
           "speedup": round(results["per_sample_gradients"]["wall_s"] / results["ours"]["wall_s"], 2)}
    print(json.dumps(row), flush=True)
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=5000, help="samples of the end-to-end comparison")
    p.add_argument("--maps", type=int, default=2048, help="gradient maps per timing")
    p.add_argument("--steps", type=int, default=30, help="training steps per timing")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--parts", nargs="+", default=["gradients", "training", "end2end"])
    p.add_argument("--out", required=True)
    args = p.parse_args()
    train = load_fashion_mnist("train").subset(np.arange(max(args.maps, args.steps * 256)))
    inputs = vbd_module.Inputs(train.x, fit_normalisation(train.x))
    out = {"threads": torch.get_num_threads(), "torch": torch.__version__,
           "cpu": platform.processor() or platform.machine(), "reps": args.reps}
    if "gradients" in args.parts:
        out["gradients"] = bench_gradients(inputs, args.maps, args.reps)
    if "training" in args.parts:
        out["training"] = bench_training(inputs, train.y, args.steps, args.reps)
    if "end2end" in args.parts:
        out["end2end"] = bench_end_to_end(args.n)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
