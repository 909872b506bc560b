#!/usr/bin/env python
"""GIC calibration speed (issue 15): the engine's batched per-sample calibration (every image's delta optimised
together, one forward / backward per batch and step) against one-image-at-a-time optimisation (a fresh Adam per
image, the loop a straightforward implementation writes), same settings (100 steps, Adam lr 0.1, radius 0.1), on
the same real Fashion-MNIST test images and the same victim checkpoint. Interleaved, median of --repeats; the
one-at-a-time path runs on --single images and is compared per image. Prints one JSON object.

    python benchmarks/bench_gic.py --model runs/attacks/badnets-a2o-10000-e6.pt --images 256 --single 16 --repeats 3
"""
import argparse
import json
import platform
import time

import numpy as np
import torch

from backdoor_engine.auxiliary.gic import GicParams, calibrate
from backdoor_engine.data.fashion_mnist import load_fashion_mnist
from backdoor_engine.models.checkpoint import load_checkpoint

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--model", required=True)
p.add_argument("--images", type=int, default=256)
p.add_argument("--single", type=int, default=16)
p.add_argument("--steps", type=int, default=100)
p.add_argument("--repeats", type=int, default=3)
args = p.parse_args()

model, meta = load_checkpoint(args.model)
test = load_fashion_mnist("test")
aux = test.subset(np.arange(args.images))
single = test.subset(np.arange(args.single))
batched_s, single_s = [], []
for _ in range(args.repeats):
    t0 = time.perf_counter()
    batched = calibrate(model, meta["normalisation"], aux, GicParams(steps=args.steps, batch_size=args.images))
    batched_s.append((time.perf_counter() - t0) / args.images)
    t0 = time.perf_counter()
    alone = calibrate(model, meta["normalisation"], single, GicParams(steps=args.steps, batch_size=1))
    single_s.append((time.perf_counter() - t0) / args.single)
same = np.abs(batched.delta[:args.single] - alone.delta).max()
print(json.dumps({"model": args.model, "images": args.images, "single_images": args.single, "steps": args.steps,
                  "batched_ms_per_image": round(1000 * float(np.median(batched_s)), 2),
                  "single_ms_per_image": round(1000 * float(np.median(single_s)), 2),
                  "speedup": round(float(np.median(single_s) / np.median(batched_s)), 1),
                  "max_delta_difference": float(same), "loss_before": batched.before["loss"],
                  "loss_after": batched.after["loss"], "acc_before": batched.before["acc"],
                  "acc_after": batched.after["acc"], "threads": torch.get_num_threads(), "torch": torch.__version__,
                  "python": platform.python_version(), "repeats": args.repeats}))
