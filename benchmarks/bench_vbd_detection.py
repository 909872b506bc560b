"""VBD detection quality (F1, TPR, FPR) and trigger extraction (mask IoU) on real Fashion-MNIST,
next to the VBD paper's Tables 1-3 (CIFAR-10), with per-stage wall time.

Each case poisons a seeded subset of the Fashion-MNIST training set with a BadNets patch (square, grid =
checkerboard, or random 3x3), all-to-one at a fixed position or all-to-all at class-specific positions,
at blending factor alpha (1 = BadNets, < 1 = the paper's Blended setting), runs the whole VBD pipeline
(no suspect model: VBD trains its own simple models) and appends one JSON line to --out, so an
interrupted sweep resumes.

    python benchmarks/bench_vbd_detection.py --train-size 20000 --out benchmarks/results/vbd_detection_20k.jsonl
    python benchmarks/bench_vbd_detection.py --out benchmarks/results/vbd_detection_20k.jsonl --table
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

from backdoor_engine.cli import _parse_param
from backdoor_engine.data.attacks import harness
from backdoor_engine.data.attacks.badnets import class_slot_origin, patch_origin
from backdoor_engine.data.fashion_mnist import load_fashion_mnist
from backdoor_engine.detection import detection_metrics
from backdoor_engine.methods.vbd import Vbd

# (pattern, mode, position, alpha): BadNets a2o at several positions, a2a at class slots, Blended a2o.
CASES = {
    "badnets-square-br": ("square", "a2o", "bottom-right", 1.0),
    "badnets-grid-br": ("checkerboard", "a2o", "bottom-right", 1.0),
    "badnets-random-br": ("random", "a2o", "bottom-right", 1.0),
    "badnets-square-tl": ("square", "a2o", "top-left", 1.0),
    "badnets-grid-center": ("checkerboard", "a2o", "center", 1.0),
    "badnets-random-tr": ("random", "a2o", "top-right", 1.0),
    "blend0.1-square": ("square", "a2o", "bottom-right", 0.1),
    "blend0.2-square": ("square", "a2o", "bottom-right", 0.2),
    "blend0.5-square": ("square", "a2o", "bottom-right", 0.5),
    "blend0.1-grid": ("checkerboard", "a2o", "bottom-right", 0.1),
    "blend0.2-grid": ("checkerboard", "a2o", "bottom-right", 0.2),
    "blend0.5-grid": ("checkerboard", "a2o", "bottom-right", 0.5),
    "badnets-a2a-square": ("square", "a2a", "per-class", 1.0),
    "badnets-a2a-grid": ("checkerboard", "a2a", "per-class", 1.0),
}
# VBD paper, CIFAR-10 F1 % (mean over 5 seeds): Table 1 (BadNets a2o) per pattern, Table 2 (a2a), Table 3 (Blended
# a2o, mean over its 6 triggers). Closest pattern: "grid" ~ white grid, "square" ~ white square.
PAPER_F1 = {
    "badnets-square": 97.46, "badnets-grid": 99.65, "badnets-random": 99.58,  # random ~ color grid
    "blend0.1": 93.34, "blend0.2": 96.85, "blend0.5": 98.68,
    "badnets-a2a-square": 93.51, "badnets-a2a-grid": 95.64,
}


def paper_f1(case: str) -> float | None:
    for prefix, value in sorted(PAPER_F1.items(), key=lambda kv: -len(kv[0])):
        if case.startswith(prefix):
            return value
    return None


def true_mask(label: int, mode: str, position: str, target: int, image_shape, num_classes: int) -> np.ndarray:
    """Where the trigger of the samples labelled `label` sits."""
    height, width, _ = image_shape
    if mode == "a2a":
        row, col = class_slot_origin((label - 1) % num_classes, 3, height, width)
    else:
        row, col = patch_origin(position, 3, height, width)
    mask = np.zeros((height, width), bool)
    mask[row:row + 3, col:col + 3] = True
    return mask


def iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return float((a & b).sum() / max((a | b).sum(), 1))


def subset(dataset, size: int, seed: int):
    if size >= len(dataset):
        return dataset
    return dataset.subset(np.sort(np.random.default_rng(seed).choice(len(dataset), size, replace=False)))


def case_spec(name: str, rate: float, target: int, seed: int) -> harness.PoisonSpec:
    pattern, mode, position, alpha = CASES[name]
    return harness.PoisonSpec(attack="badnets", mode=mode, rate=rate, target=target, seed=seed,
                              params={"pattern": pattern, "position": position, "alpha": alpha})


def run_case(name: str, train, args) -> dict:
    pattern, mode, position, alpha = CASES[name]
    poisoned, _ = harness.poison(train, case_spec(name, args.rate, args.target, args.seed))
    t0, cpu0 = time.perf_counter(), time.process_time()
    vbd = Vbd(seed=args.seed, **args.params)
    detection = vbd.fit(poisoned.x, poisoned.y, num_classes=10)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    metrics = detection_metrics(detection.flags, poisoned.poison)
    poisoned_labels = sorted(set(np.unique(poisoned.y[poisoned.poison.astype(bool)]).tolist()))
    # IoU of the chosen trigger of every truly poisoned class that was found; false classes are counted apart.
    ious = {label: iou(t.mask, true_mask(label, mode, position, args.target, train.image_shape, 10))
            for label, t in vbd.triggers_.items() if label in poisoned_labels}
    return {"case": name, "params": args.params, "pattern": pattern, "mode": mode, "position": position, "alpha": alpha,
            "train_size": len(train), "rate": args.rate, "seed": args.seed,
            "n_poisoned": int(poisoned.poison.sum()), "poisoned_classes": poisoned_labels,
            "detected_classes": detection.diagnostics["poisoned_classes"],
            "false_classes": sorted(set(detection.diagnostics["poisoned_classes"]) - set(poisoned_labels)),
            **{k: round(v, 5) if isinstance(v, float) else v for k, v in metrics.items()},
            "mask_iou": {str(k): round(v, 3) for k, v in ious.items()},
            "mean_iou": round(float(np.mean(list(ious.values()))), 3) if ious else None,
            "triggers": detection.diagnostics["triggers"],
            "models": detection.diagnostics["models"],
            "stage_s": {k: round(v, 1) for k, v in detection.diagnostics["timings_s"].items()},
            "wall_s": round(wall, 1), "cpu_min": round(cpu / 60, 2), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def print_table(rows):
    print("| case | pattern | mode | position | alpha | train size | F1 | TPR | FPR | detected classes | "
          "mask IoU (mean over true classes) | paper F1 (CIFAR-10) | wall min |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        paper = paper_f1(r["case"])
        detected = (f"{len(r['detected_classes']) - len(r['false_classes'])}/{len(r['poisoned_classes'])} true"
                    + (f", false: {','.join(map(str, r['false_classes']))}" if r["false_classes"] else ""))
        iou_text = "-" if r["mean_iou"] is None else f"{r['mean_iou']:.2f}"
        case = r["case"] + "".join(f" {k}={v}" for k, v in r.get("params", {}).items())
        print(f"| {case} | {r['pattern']} | {r['mode']} | {r['position']} | {r['alpha']} | {r['train_size']} "
              f"| {100 * r['f1']:.2f}% | {100 * r['tpr']:.2f}% | {100 * r['fpr']:.2f}% | {detected} | {iou_text} "
              f"| {'-' if paper is None else f'{paper:.2f}%'} | {r['wall_s'] / 60:.1f} |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--table", action="store_true")
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--train-size", type=int, default=20000)
    p.add_argument("--rate", type=float, default=0.1)
    p.add_argument("--target", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="a VBD parameter (JSON value), e.g. rank_accuracy=0.8; rows of other parameters stay apart")
    args = p.parse_args()
    args.params = dict(_parse_param(item) for item in args.param)

    out = Path(args.out)
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    if args.table:
        print_table(rows)
        return
    done = {(r["case"], r["train_size"], r["rate"], r["seed"], json.dumps(r.get("params", {}), sort_keys=True))
            for r in rows}
    train = subset(load_fashion_mnist("train"), args.train_size, args.seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.cases:
        if (name, len(train), args.rate, args.seed, json.dumps(args.params, sort_keys=True)) in done:
            continue
        row = run_case(name, train, args)
        print(json.dumps({k: row[k] for k in ("case", "f1", "tpr", "fpr", "detected_classes", "mean_iou", "wall_s")}),
              flush=True)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
