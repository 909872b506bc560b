"""The aux-set purifiers with and without GIC (issue 15): defences x auxiliary-set kinds x {without, with GIC}.

For each checkpoint of train_attacks.py (a model trained on a 10k subset of Fashion-MNIST's training set), the
auxiliary sets are built as `backdoor-engine aux` builds them (auxiliary/sets.py): `seen` from the rebuilt poisoned
training set (the oracle), the reserved kinds from the other 50k Fashion-MNIST training images (never seen by the
model), 5% of the training set, stratified. With GIC the set is calibrated to the suspect model first (the paper's
settings). Each defence runs through the repair registry with the --budget settings (JSON per strategy; the
official budgets are the defaults of each strategy's params and are recorded beside). BA / ASR on the Fashion-MNIST
test set (10,000 clean, the triggered non-target images) before and after. One JSON line per (model, defence,
kind, gic) to --out, resumable; no choice reads test data.

    python benchmarks/bench_purifiers.py --models runs/attacks/badnets-a2o-10000-e6.pt \
        --defences ft ft-sam anp npd fst sau --kinds reserved bright inverted --out benchmarks/results/purifiers.jsonl
    python benchmarks/bench_purifiers.py --out benchmarks/results/purifiers.jsonl --table
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import torch

from backdoor_engine import api
from backdoor_engine.auxiliary.gic import calibrate
from backdoor_engine.auxiliary.sets import make_aux
from backdoor_engine.data.attacks import harness
from backdoor_engine.data.fashion_mnist import load_fashion_mnist
from backdoor_engine.models.checkpoint import load_checkpoint
from backdoor_engine.purify import get_repair

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_flare_detection import SEED_HELP, scanned_set, subset_seed  # noqa: E402

# A CPU budget per defence (documented in RESULTS.md beside the official one): the same optimiser settings, fewer
# passes over the 500-image auxiliary set.
CPU_BUDGET = {"ft": {"epochs": 20}, "ft-sam": {"epochs": 20}, "fst": {"epochs": 20}, "anp": {"iterations": 200},
              "sau": {"epochs": 10}, "npd": {"epochs": 10, "warm_epochs": 2}}


def official(defence: str) -> dict:
    return dataclasses.asdict(get_repair(defence).Params())


def budget_tag(budget: dict, official_params: dict) -> str:
    """'official' where every budget value is the strategy's default, else the values that differ."""
    changed = {k: v for k, v in sorted(budget.items()) if official_params.get(k) != v}
    return ", ".join(f"{k} {v}" for k, v in changed.items()) or "official"


def run(args):
    out = Path(args.out)
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    # a row is one (model, defence, kind, GIC, budget): the same cell at another budget is a new row
    done = {(r["model"], r["defence"], r["kind"], r["gic"], budget_tag(r["budget"], r["official"])) for r in rows}
    budget = {**CPU_BUDGET, **(json.loads(args.budget) if args.budget else {})}
    test = load_fashion_mnist("test")
    pool = load_fashion_mnist("train")
    for model_path in args.models:
        model, meta = load_checkpoint(model_path)
        seed = subset_seed(meta, args.seed)
        train, (attack, mode) = scanned_set(meta, seed)
        spec = harness.PoisonSpec.from_dict(meta["attack"])
        before = api.evaluate(model, meta["normalisation"], test, spec, num_classes=train.num_classes)
        for kind in args.kinds:
            aux = make_aux(kind, train, pool, ratio=args.ratio, seed=seed)
            calibrated = None
            for gic in args.gic:
                todo = [d for d in args.defences
                        if (str(model_path), d, kind, gic, budget_tag(budget.get(d, {}), official(d))) not in done]
                if not todo:
                    continue
                used, gic_summary = aux, None
                if gic:
                    if calibrated is None:
                        calibrated = calibrate(model, meta["normalisation"], aux)
                    used, gic_summary = calibrated.dataset, calibrated.summary()
                for defence in todo:
                    params = budget.get(defence, {})
                    t0 = time.perf_counter()
                    repaired = api.purify(model, meta["normalisation"], used, None, strategy=defence, aux=used,
                                          progress=False, **params)
                    seconds = time.perf_counter() - t0
                    after = api.evaluate(repaired.model, repaired.normalisation, test, spec,
                                         num_classes=train.num_classes)
                    row = {"model": str(model_path), "attack": attack, "mode": mode, "defence": defence, "kind": kind,
                           "gic": gic, "n_aux": len(used), "ba_before": before["ba"], "asr_before": before["asr"],
                           "ba_after": after["ba"], "asr_after": after["asr"], "seconds": round(seconds, 1),
                           "budget": params, "official": official(defence), "gic_summary": gic_summary,
                           "config": repaired.config, "last": repaired.history[-1] if repaired.history else None,
                           "versions": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                                        "python": platform.python_version()}}
                    print(json.dumps({k: row[k] for k in ("attack", "defence", "kind", "gic", "ba_after",
                                                          "asr_after", "seconds")}), flush=True)
                    with out.open("a") as f:
                        f.write(json.dumps(row) + "\n")


def table(args):
    rows = [json.loads(line) for line in Path(args.out).read_text().splitlines()]
    print("| attack | defence | budget | aux kind | BA / ASR before | without GIC: BA / ASR | with GIC: BA / ASR | s |")
    print("|---|---|---|---|---|---|---|---|")
    cells = {}
    for r in rows:
        tag = budget_tag(r["budget"], r["official"])
        cells.setdefault((r["attack"], r["mode"], r["defence"], tag, r["kind"]), {})[r["gic"]] = r
    for (attack, mode, defence, tag, kind), pair in cells.items():
        any_row = next(iter(pair.values()))
        fmt = lambda r: "-" if r is None else f"{100 * r['ba_after']:.2f}% / {100 * r['asr_after']:.2f}%"  # noqa: E731
        print(f"| {attack} {mode} | {defence} | {tag} | {kind} | {100 * any_row['ba_before']:.2f}% / "
              f"{100 * any_row['asr_before']:.2f}% | {fmt(pair.get(False))} | {fmt(pair.get(True))} | "
              f"{' / '.join(str(r['seconds']) for r in pair.values())} |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=[])
    p.add_argument("--out", required=True)
    p.add_argument("--defences", nargs="+", default=["ft", "ft-sam", "anp", "npd", "fst", "sau"])
    p.add_argument("--kinds", nargs="+", default=["reserved", "bright", "dark", "inverted", "seen"])
    p.add_argument("--gic", nargs="+", type=lambda t: t.lower() in ("1", "true", "yes", "with"),
                   default=[False, True], help="without / with GIC: false true")
    p.add_argument("--budget", help="JSON {defence: {param: value}} over the CPU budget")
    p.add_argument("--ratio", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=None, help=SEED_HELP)
    p.add_argument("--table", action="store_true")
    args = p.parse_args()
    table(args) if args.table else run(args)


if __name__ == "__main__":
    main()
