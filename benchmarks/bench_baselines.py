"""Activation Clustering and Spectral Signatures next to FLARE, on the same single extraction pass.

For each checkpoint written by `train_attacks.py --models-dir` (or `backdoor-engine train`), the poisoned
training set is rebuilt from the attack record the checkpoint carries (bench_flare_detection.scanned_set), BN
minima and penultimate features are extracted ONCE (cached in a feature store under --cache/<stem>), and each
method runs through the registry's estimator call on those features:
    ac        get_detector("ac")().fit(features.penultimate, y)
    spectral  get_detector("spectral")(expected_rate=...).fit(features.penultimate, y)
    flare     get_detector("flare")().fit(features.bn_minima, features.layout, y=y)
A checkpoint without an attack record is a clean run: every flag is a false positive. One JSON line per
(model, method) is appended to --out, so an interrupted run resumes (the feature store resumes too).

Spectral Signatures removes round(1.5 x rate x n) of every class. Without --spectral-rate the detector assumes
BackdoorBench's 10% (percentile 85), and the row says so (`spectral_rate_assumed`); the attack record's rate is
never passed (no threshold is chosen with ground truth). An all-to-one attack at 10% of the set poisons about
half of the target class, far above 1.5 x 10%: read Spectral's TPR with that in mind.

    python benchmarks/bench_baselines.py --models /work/runs/attacks/*.pt --cache /work/runs/feat \
        --out benchmarks/results/baselines.jsonl
    python benchmarks/bench_baselines.py --out benchmarks/results/baselines.jsonl --table
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

from backdoor_engine.detection import detection_metrics
from backdoor_engine.engine import extract_features
from backdoor_engine.methods import get_detector
from backdoor_engine.models.checkpoint import load_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_flare_detection import SEED_HELP, scanned_set  # noqa: E402  (the same rebuilt training set as the FLARE bench)

METHODS = ("ac", "spectral", "flare")


def versions() -> dict:
    import sklearn

    import backdoor_engine

    return {"torch": torch.__version__, "numpy": np.__version__, "sklearn": sklearn.__version__,
            "backdoor_engine": getattr(backdoor_engine, "__version__", "dev"), "python": platform.python_version()}


def detect(method: str, features, y: np.ndarray, args):
    """The method's estimator call on the shared features."""
    seed = {} if args.seed_detector is None else {"random_state": args.seed_detector}
    if method == "flare":
        return get_detector("flare")(**seed).fit(features.bn_minima, features.layout, y=y)
    if method == "spectral":
        params = {} if args.spectral_rate is None else {"expected_rate": args.spectral_rate}
        return get_detector("spectral")(**params).fit(features.penultimate, y)
    return get_detector("ac")(**seed).fit(features.penultimate, y)


def run(args):
    out = Path(args.out)
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    done = {(r["model"], r["method"]) for r in rows}
    for model_path in args.models:
        todo = [m for m in args.methods if (str(model_path), m) not in done]
        if not todo:
            continue
        model, meta = load_checkpoint(model_path)
        dataset, case = scanned_set(meta, args.seed)
        truth = dataset.poison if dataset.poison is not None else np.zeros(len(dataset), np.int64)
        t0 = time.perf_counter()
        features = extract_features(model, dataset, meta["normalisation"], capture=("bn_minima", "penultimate"),
                                    store=Path(args.cache) / Path(model_path).stem, progress=False)
        extract_s = time.perf_counter() - t0
        y = np.asarray(features.y)
        if len(features) != len(dataset):  # unreadable samples were skipped: keep the truth of the others
            truth = truth[np.isin(dataset.ids, features.ids)]
        for method in todo:
            t0 = time.perf_counter()
            detection = detect(method, features, y, args)
            detect_s = time.perf_counter() - t0
            metrics = detection_metrics(detection.flags, truth)
            d = detection.diagnostics
            row = {"model": str(model_path), "method": method, "attack": case[0], "mode": case[1],
                   "n": len(features), "n_poison": int(truth.sum()),
                   "asr": meta.get("eval", {}).get("asr"), "ba": meta.get("eval", {}).get("ba"),
                   "tpr": metrics["tpr"], "fpr": metrics["fpr"], "precision": metrics["precision"],
                   "n_flagged": detection.n_flagged, "params": detection.params,
                   "explanation": d.get("explanation"),
                   "extract_s": round(extract_s, 2), "detect_s": round(detect_s, 2),
                   "threads": torch.get_num_threads(), "versions": versions(),
                   "cpu": platform.processor() or platform.machine()}
            if method == "spectral":
                row.update(spectral_rate=d["expected_rate"], spectral_rate_assumed=d["rate_assumed"])
            if method == "ac":
                row.update(flagged_classes=d["flagged_classes"], skipped_classes=d["skipped_classes"])
            print(json.dumps({k: row[k] for k in ("attack", "mode", "method", "tpr", "fpr", "n_flagged",
                                                  "detect_s")}), flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")


def print_table(rows):
    """One row per scanned set, TPR / FPR / detect seconds of each method side by side."""
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    methods += [m for m in dict.fromkeys(r["method"] for r in rows) if m not in methods]
    cases = {}
    for r in rows:
        cases.setdefault(r["model"], {})[r["method"]] = r
    print("| attack | mode | n | poisoned | ASR | " + " | ".join(f"{m} TPR / FPR / s" for m in methods) + " |")
    print("|---" * (5 + len(methods)) + "|")
    for by_method in cases.values():
        r = next(iter(by_method.values()))
        asr = "-" if r["asr"] is None else f"{100 * r['asr']:.1f}%"
        cells = [f"{100 * by_method[m]['tpr']:.1f}% / {100 * by_method[m]['fpr']:.2f}% / {by_method[m]['detect_s']:.1f}"
                 if m in by_method else "-" for m in methods]
        print(f"| {r['attack']} | {r['mode']} | {r['n']} | {r['n_poison']} | {asr} | " + " | ".join(cells) + " |")
    spectral = [r for r in rows if r["method"] == "spectral"]
    if spectral:
        rates = sorted({(r["spectral_rate"], r["spectral_rate_assumed"]) for r in spectral})
        print("\nSpectral removes 1.5 x rate of every class; rate " + ", ".join(
            f"{rate:g}" + (" (assumed: BackdoorBench's default)" if assumed else " (given)")
            for rate, assumed in rates) + ".")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON lines, appended (resumable)")
    p.add_argument("--table", action="store_true", help="print the markdown table of what --out holds")
    p.add_argument("--models", nargs="*", default=[])
    p.add_argument("--cache", default="runs/features", help="feature stores, one per model")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--spectral-rate", type=float, default=None,
                   help="Spectral's expected_rate [unset: the detector's assumed 10%%, recorded in each row]")
    p.add_argument("--seed", type=int, default=None, help=SEED_HELP)
    p.add_argument("--seed-detector", type=int, default=None,
                   help="random_state of AC (FastICA, k-means) and FLARE (UMAP) [each detector's default]")
    args = p.parse_args()
    if args.table:
        print_table([json.loads(line) for line in Path(args.out).read_text().splitlines()])
        return
    run(args)


if __name__ == "__main__":
    main()
