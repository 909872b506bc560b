"""Every detector side by side from one pass (issue 16): one consensus scan per model, each method's TPR / FPR,
the consensus under every vote count, and the time per method.

For each checkpoint of train_attacks.py (or `backdoor-engine train`), the poisoned training set is rebuilt from
the checkpoint's attack record (bench_flare_detection.scanned_set) and scanned ONCE with
`api.scan(method=[...], clean=reference)`: the union of the captures in one pass, plus the extra passes STRIP,
SCALE-UP and IBD-PSC make by definition. The clean reference set is `make_aux("reserved")`: 5% of the set's size
in Fashion-MNIST training images the model never saw (stratified, seed 0), what a defender holding a little
clean data has. Ground truth is only read to score. One JSON line per model to --out (resumable): per method
TPR / FPR / F1 / n_flagged / seconds, the consensus at every min_votes and under the Dawid-Skene rule (the
members' error rates fitted to their flags without labels), the number of passes over the data.

    python benchmarks/bench_detectors.py --models runs/attacks/badnets-a2o-10000-e6.pt --out benchmarks/results/detectors.jsonl
    python benchmarks/bench_detectors.py --out benchmarks/results/detectors.jsonl --table
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from backdoor_engine import api
from backdoor_engine.auxiliary.sets import make_aux
from backdoor_engine.data.fashion_mnist import load_fashion_mnist
from backdoor_engine.detection import detection_metrics
from backdoor_engine.methods.consensus import dawid_skene
from backdoor_engine.models.checkpoint import load_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_flare_detection import scanned_set  # noqa: E402

METHODS = ("flare", "ac", "spectral", "spectre", "scan", "strip", "scale_up", "ibd_psc")


def f1(m: dict) -> float:
    return 0.0 if not m["tp"] else 2 * m["tp"] / (2 * m["tp"] + m["fp"] + m["fn"])


def run(args):
    out = Path(args.out)
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    done = {r["model"] for r in rows}
    pool = load_fashion_mnist("train")
    params = json.loads(args.params) if args.params else {}
    for model_path in args.models:
        if str(model_path) in done:
            continue
        model, meta = load_checkpoint(model_path)
        dataset, (attack, mode) = scanned_set(meta, args.seed)
        reference = make_aux("reserved", dataset, pool, ratio=args.reference_ratio, seed=args.seed)
        truth = dataset.poison.astype(bool) if dataset.poison is not None else np.zeros(len(dataset), bool)
        t0 = time.perf_counter()
        result = api.scan(dataset, model, meta["normalisation"], method=list(args.methods), clean=reference,
                          progress=False, **params)
        total_s = time.perf_counter() - t0
        d = result.detection
        methods = {}
        for name in args.methods:
            if name in d.diagnostics["failed"]:
                methods[name] = {"failed": d.diagnostics["failed"][name]}
                continue
            flags = d.columns[f"flagged_{name}"].astype(bool)
            m = detection_metrics(flags, truth)
            methods[name] = {"tpr": m["tpr"], "fpr": m["fpr"], "f1": f1(m), "n_flagged": int(flags.sum()),
                             "seconds": round(d.diagnostics["per_method"][name]["time_s"], 2)}
        votes = np.asarray(d.columns["votes"])
        # Per-sample flags and scores of every method, to judge other combination rules without rescanning.
        cache = Path(args.cache)
        cache.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(cache / f"{Path(model_path).stem}.npz", truth=truth,
                            **{key: np.asarray(value) for key, value in d.columns.items()})
        consensus = {}
        for k in range(1, len(d.diagnostics["methods"]) + 1):
            m = detection_metrics(votes >= k, truth)
            consensus[str(k)] = {"tpr": m["tpr"], "fpr": m["fpr"], "f1": f1(m), "n_flagged": int((votes >= k).sum())}
        # The other combination rule from the same flags (consensus.dawid_skene, no labels; truth only scores it).
        ran = d.diagnostics["methods"]
        fit = dawid_skene(np.stack([d.columns[f"flagged_{name}"].astype(bool) for name in ran], axis=1))
        m = detection_metrics(fit["posterior"] > 0.5, truth)
        rules = {"dawid-skene": {"tpr": m["tpr"], "fpr": m["fpr"], "f1": f1(m),
                                 "n_flagged": int((fit["posterior"] > 0.5).sum()), "prior": fit["prior"],
                                 "estimated": {name: [round(float(t), 4), round(float(f), 4)]
                                               for name, t, f in zip(ran, fit["tpr"], fit["fpr"])}}}
        row = {"model": str(model_path), "attack": attack, "mode": mode, "n": len(dataset), "n_poison": int(truth.sum()),
               "asr": meta.get("eval", {}).get("asr"), "ba": meta.get("eval", {}).get("ba"),
               "n_reference": len(reference), "methods": methods, "consensus": consensus, "rules": rules,
               "default_min_votes": d.diagnostics["min_votes"], "jaccard": d.diagnostics["jaccard"],
               "timings_s": {k: round(float(v), 2) for k, v in result.report["timings_s"].items()},
               "total_s": round(total_s, 1), "params": params,
               "versions": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                            "python": platform.python_version()}}
        print(json.dumps({"attack": attack, "mode": mode, **{k: (v["tpr"], v["fpr"]) for k, v in methods.items()}}),
              flush=True)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")


def table(args):
    rows = [json.loads(line) for line in Path(args.out).read_text().splitlines()]
    methods = [m for m in METHODS if any(m in r["methods"] for r in rows)]
    k_max = max(len(r["methods"]) for r in rows)
    print("| attack | mode | ASR | " + " | ".join(methods) + " | " + " | ".join(f">= {k} votes" for k in range(1, k_max + 1))
          + " | Dawid-Skene |")
    print("|---" * (4 + len(methods) + k_max) + "|")
    fmt = lambda c: "-" if c is None or "tpr" not in c else f"{100 * c['tpr']:.1f} / {100 * c['fpr']:.2f}"  # noqa: E731
    for r in rows:
        asr = "-" if r["asr"] is None else f"{100 * r['asr']:.1f}%"
        print(f"| {r['attack']} | {r['mode']} | {asr} | " + " | ".join(fmt(r["methods"].get(m)) for m in methods)
              + " | " + " | ".join(fmt(r["consensus"].get(str(k))) for k in range(1, k_max + 1))
              + f" | {fmt(r.get('rules', {}).get('dawid-skene'))} |")
    print("\nseconds per method: " + "; ".join(
        f"{r['attack']} {r['mode']}: " + ", ".join(f"{m} {v.get('seconds', 'failed')}" for m, v in r["methods"].items())
        + f", extract {r['timings_s'].get('extract')}" for r in rows))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=[])
    p.add_argument("--out", required=True)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--params", help="scan parameters as JSON, e.g. {\"strip.n_superimpose\": 20} (the CPU budget)")
    p.add_argument("--reference-ratio", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0, help="the subset seed of train_attacks.py")
    p.add_argument("--cache", default="runs/detectors", help="per-sample flags and scores, one .npz per model")
    p.add_argument("--table", action="store_true")
    args = p.parse_args()
    table(args) if args.table else run(args)


if __name__ == "__main__":
    main()
