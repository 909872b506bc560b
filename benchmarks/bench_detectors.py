"""Every detector side by side from one pass (issue 16): one consensus scan per model, each method's TPR / FPR,
the consensus under every vote count, and the time per method.

For each checkpoint of train_attacks.py (or `backdoor-engine train`), the poisoned training set is rebuilt from
the checkpoint's attack record (bench_flare_detection.scanned_set) and scanned ONCE with
`api.scan(method=[...], clean=reference)`: the union of the captures in one pass, plus the extra passes STRIP,
SCALE-UP and IBD-PSC make by definition. The clean reference set is `make_aux("reserved")`: 5% of the set's size
in Fashion-MNIST training images the model never saw (stratified, seed 0), what a defender holding a little
clean data has. Ground truth is only read to score. One JSON line per model to --out (resumable): per method
TPR / FPR / F1 / n_flagged / seconds, the consensus of the `--method all` members (VBD is scanned beside them,
not voting) under every rule: the vote at every min_votes, Dawid-Skene (the members' error rates fitted to their
flags without labels) and presence (the union of FLARE's and SCAn's flags), the number of passes over the data.
--table adds FCT's and TRAP's rows from their own benchmarks' files on the same sets.

    python benchmarks/bench_detectors.py --models runs/attacks/badnets-a2o-10000-e6.pt \
        --out benchmarks/results/detectors_all.jsonl
    python benchmarks/bench_detectors.py --out benchmarks/results/detectors_all.jsonl --table
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

from backdoor_engine import api
from backdoor_engine.auxiliary.sets import make_aux
from backdoor_engine.data.fashion_mnist import load_fashion_mnist
from backdoor_engine.detection import detection_metrics
from backdoor_engine.methods import available_detectors, get_detector
from backdoor_engine.methods.consensus import dawid_skene, flags_of_fit, method_list, presence_flags
from backdoor_engine.models.checkpoint import load_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_flare_detection import SEED_HELP, scanned_set, subset_seed  # noqa: E402

METHODS = ("flare", "ac", "spectral", "spectre", "scan", "strip", "scale_up", "ibd_psc", "vbd")
# FCT and TRAP train a model of their own on the suspect set (6-21 min per 10k set here); their rows come from
# their own benchmarks' files on the same sets (--fct, --trap), never from this scan unless asked (--methods).
EXTRA = ("fct", "trap")


def f1(m: dict) -> float:
    return 0.0 if not m["tp"] else 2 * m["tp"] / (2 * m["tp"] + m["fp"] + m["fn"])


def scan_model(model_path, args, pool, params: dict):
    """One `api.scan` of --methods over the set the checkpoint saw: (meta, (attack, mode), dataset, reference,
    truth, result, per-method metrics, seconds). One method alone runs as itself (a consensus needs two)."""
    model, meta = load_checkpoint(model_path)
    seed = subset_seed(meta, args.seed)
    dataset, (attack, mode) = scanned_set(meta, seed)
    reference = make_aux("reserved", dataset, pool, ratio=args.reference_ratio, seed=seed)
    truth = dataset.poison.astype(bool) if dataset.poison is not None else np.zeros(len(dataset), bool)
    t0 = time.perf_counter()
    single = len(args.methods) == 1
    # A method run alone gets the reference only if it reads one (the scan refuses it otherwise).
    clean = None if single and not get_detector(args.methods[0]).needs_reference() else reference
    result = api.scan(dataset, model, meta["normalisation"], method=args.methods[0] if single else list(args.methods),
                      clean=clean, progress=False, **params)
    total_s = time.perf_counter() - t0
    d = result.detection
    if single:  # the consensus' per-member columns and timings, for the one member
        d.columns.update({f"flagged_{args.methods[0]}": d.flags,
                          **({} if d.scores is None else {f"score_{args.methods[0]}": d.scores})})
    methods = {}
    for name in args.methods:
        if not single and name in d.diagnostics["failed"]:
            methods[name] = {"failed": d.diagnostics["failed"][name]}
            continue
        flags = np.asarray(d.columns[f"flagged_{name}"]).astype(bool)
        m = detection_metrics(flags, truth)
        seconds = result.report["timings_s"].get("detect") if single else d.diagnostics["per_method"][name]["time_s"]
        methods[name] = {"tpr": m["tpr"], "fpr": m["fpr"], "f1": f1(m), "n_flagged": int(flags.sum()),
                         "seconds": None if seconds is None else round(seconds, 2)}
    return meta, (attack, mode), dataset, reference, truth, result, methods, total_s


def ran_methods(cached) -> list:
    """The methods whose per-sample flags a cache file (or dict) holds."""
    return [key[len("flagged_"):] for key in cached if key.startswith("flagged_")]


def versions() -> dict:
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version()}


def write_rows(out: Path, rows: list) -> None:
    tmp = out.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tmp.replace(out)


def run(args):
    if len(args.methods) < 2:  # a row holds the consensus of its members; one method alone has none
        raise SystemExit("a new row needs two --methods or more; --update re-runs one method on rows already scanned")
    out = Path(args.out)
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    done = {r["model"] for r in rows}
    pool = load_fashion_mnist("train")
    params = json.loads(args.params) if args.params else {}
    for model_path in args.models:
        if str(model_path) in done:
            continue
        meta, (attack, mode), dataset, reference, truth, result, methods, total_s = scan_model(
            model_path, args, pool, params)
        d = result.detection
        # Per-sample flags and scores of every method, to judge other combination rules without rescanning.
        cache = Path(args.cache)
        cache.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(cache / f"{Path(model_path).stem}.npz", truth=truth,
                            **{key: np.asarray(value) for key, value in d.columns.items()})
        row = {"model": str(model_path), "attack": attack, "mode": mode, "n": len(dataset),
               "n_poison": int(truth.sum()),
               "asr": meta.get("eval", {}).get("asr"), "ba": meta.get("eval", {}).get("ba"),
               "n_reference": len(reference), "methods": methods,
               **combined(d.columns, d.diagnostics["methods"], truth), "jaccard": d.diagnostics["jaccard"],
               "timings_s": {k: round(float(v), 2) for k, v in result.report["timings_s"].items()},
               "total_s": round(total_s, 1), "params": params, "versions": versions()}
        print(json.dumps({"attack": attack, "mode": mode, **{k: (v["tpr"], v["fpr"]) for k, v in methods.items()}}),
              flush=True)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")


def combined(columns, ran, truth: np.ndarray) -> dict:
    """The flags of the methods that ran and that `--method all` (with a reference) includes, combined under every
    rule and scored against truth: the row's "members", "consensus" (the vote at every min_votes),
    "default_min_votes" and "rules" ({"dawid-skene": ..., "presence": ...}). A detector that trains its own models
    (VBD here) is a column beside the consensus, not a vote in it. The rules see only the flags (consensus.py);
    truth only scores them."""
    members = [name for name in method_list("all", available_detectors(), have_reference=True) if name in ran]

    def score(verdict):
        m = detection_metrics(verdict, truth)
        return {"tpr": m["tpr"], "fpr": m["fpr"], "f1": f1(m), "n_flagged": int(verdict.sum())}

    flags = {name: np.asarray(columns[f"flagged_{name}"]).astype(bool) for name in members}
    votes = np.sum(list(flags.values()), axis=0)
    consensus = {str(k): score(votes >= k) for k in range(1, len(members) + 1)}
    fit = dawid_skene(np.stack(list(flags.values()), axis=1))
    rules = {"dawid-skene": {**score(flags_of_fit(fit)), "prior": fit["prior"],
                             "estimated": {name: [round(float(t), 4), round(float(f), 4)]
                                           for name, t, f in zip(members, fit["tpr"], fit["fpr"])}}}
    testers = [name for name in members if get_detector(name).presence_test]
    if testers:
        rules["presence"] = {**score(presence_flags(flags, testers)), "testers": testers}
    return {"members": members, "consensus": consensus, "default_min_votes": (len(members) + 1) // 2, "rules": rules}


def rescore(args):
    """Recompute every row's combined columns from the cached per-sample flags (after a rule is added)."""
    out = Path(args.out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    for row in rows:
        cached = np.load(Path(args.cache) / f"{Path(row['model']).stem}.npz")
        ran = ran_methods(cached.files)
        row.update(combined(cached, ran, cached["truth"].astype(bool)))
    write_rows(out, rows)


def update(args):
    """Re-run --methods on --models already in --out and put their columns in place of the old ones, in the row
    and in the cache, then recompute the combined columns (after a method's default changed: the other methods'
    columns stay those of the original scan). The row's "updated" records what was re-run, when and how."""
    out = Path(args.out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    by_model = {row["model"]: row for row in rows}
    missing = [str(m) for m in args.models if str(m) not in by_model]
    if missing:
        raise SystemExit(f"not in {out}, scan them first: {', '.join(missing)}")
    pool = load_fashion_mnist("train")
    params = json.loads(args.params) if args.params else {}
    for model_path in args.models:
        row = by_model[str(model_path)]
        *_, truth, result, methods, _ = scan_model(model_path, args, pool, params)
        path = Path(args.cache) / f"{Path(model_path).stem}.npz"
        cached = dict(np.load(path))
        if not np.array_equal(cached["truth"].astype(bool), truth):
            raise SystemExit(f"{path}: the cached ground truth is not this set's (another --seed?)")
        for name in args.methods:
            for key in (f"flagged_{name}", f"score_{name}"):
                if key in result.detection.columns:
                    cached[key] = np.asarray(result.detection.columns[key])
        ran = ran_methods(cached)
        cached["votes"] = np.sum([cached[f"flagged_{name}"].astype(bool) for name in ran
                                  if name in row.get("members", ran)], axis=0)
        tmp = path.with_name(path.stem + ".tmp.npz")
        np.savez_compressed(tmp, **cached)
        tmp.replace(path)
        row["methods"].update(methods)
        row.update(combined(cached, ran, truth))
        row.setdefault("updated", []).append({"methods": list(args.methods), "params": params,
                                              "date": time.strftime("%Y-%m-%d"), "versions": versions()})
        print(json.dumps({"updated": row["model"], **{k: (v.get("tpr"), v.get("fpr")) for k, v in methods.items()}}),
              flush=True)
        write_rows(out, rows)


def own_file_rows(args) -> dict:
    """FCT's and TRAP's TPR / FPR per (attack, mode, n) from their own benchmarks' files (bench_fct_dbr.py,
    bench_trap.py): they train on the suspect set itself, so their rows on the same set apply to any model of it.
    FCT flags its poisoned part (the top poison_ratio by FCT value); TRAP the union over its epochs (full variant)."""
    found = {}
    for path, method in ((args.fct, "fct"), (args.trap, "trap")):
        if not path or not Path(path).exists():
            continue
        for line in Path(path).read_text().splitlines():
            r = json.loads(line)
            key = (r["attack"], r["mode"], r["n"])
            if method == "fct" and r.get("stage") == "fct":
                total = sum(part["n_poison"] for part in r["split"].values())
                part = r["split"]["poisoned"]
                found[key + (method,)] = {"tpr": part["n_poison"] / max(total, 1),
                                          "fpr": (part["n"] - part["n_poison"]) / (r["n"] - total)}
            elif method == "trap" and r.get("stage") == "isolation" and r.get("variant") == "full":
                union, total = r["union"], r["poisoned"]
                tp = round(union["recall"] * total)
                found[key + (method,)] = {"tpr": union["recall"], "fpr": (union["n_flagged"] - tp) / (r["n"] - total)}
    return found


def table(args):
    rows = [json.loads(line) for line in Path(args.out).read_text().splitlines()]
    methods = [m for m in METHODS + EXTRA if any(m in r["methods"] for r in rows)]
    own = own_file_rows(args)
    extra = [m for m in EXTRA if m not in methods and any(key[-1] == m for key in own)]
    fmt = lambda c: "-" if c is None or "tpr" not in c else f"{100 * c['tpr']:.1f} / {100 * c['fpr']:.2f}"  # noqa: E731
    print("| attack | mode | epochs | ASR | " + " | ".join(methods + [f"{m} (own run)" for m in extra])
          + " | vote (>= half) | Dawid-Skene | presence | best single F1 | vote F1 | presence F1 |")
    print("|---" * (10 + len(methods) + len(extra)) + "|")
    for r in rows:
        asr = "-" if r["asr"] is None else f"{100 * r['asr']:.1f}%"
        default = r["consensus"].get(str(r["default_min_votes"]))
        presence = r.get("rules", {}).get("presence")
        singles = [v["f1"] for name, v in r["methods"].items() if "f1" in v and name in r.get("members", METHODS)]
        epochs = re.search(r"-e(\d+)$", Path(r["model"]).stem)  # train_attacks.py's checkpoint names end so
        print(f"| {r['attack']} | {r['mode']} | {epochs[1] if epochs else '-'} | {asr} | "
              + " | ".join(fmt(r["methods"].get(m)) for m in methods)
              + "".join(f" | {fmt(own.get((r['attack'], r['mode'], r['n'], m)))}" for m in extra)
              + f" | {fmt(default)} | {fmt(r.get('rules', {}).get('dawid-skene'))} | {fmt(presence)}"
              + f" | {100 * max(singles, default=0):.1f} | {100 * default['f1']:.1f} | "
              + ("-" if presence is None else f"{100 * presence['f1']:.1f}") + " |")
    print("\nconsensus at every vote count: " + "; ".join(
        f"{r['attack']} {r['mode']}: " + ", ".join(f">={k} {fmt(c)}" for k, c in r["consensus"].items()) for r in rows))
    print("\nseconds per method: " + "; ".join(
        f"{r['attack']} {r['mode']}: " + ", ".join(f"{m} {v.get('seconds', 'failed')}" for m, v in r["methods"].items())
        + f", extract {r['timings_s'].get('extract')}" for r in rows))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=[])
    p.add_argument("--out", required=True)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS + EXTRA))
    p.add_argument("--params", help="scan parameters as JSON, e.g. {\"strip.n_superimpose\": 20} (the CPU budget)")
    p.add_argument("--reference-ratio", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=None, help=SEED_HELP)
    p.add_argument("--cache", default="runs/detectors", help="per-sample flags and scores, one .npz per model")
    p.add_argument("--table", action="store_true")
    p.add_argument("--rescore", action="store_true", help="recompute the combined columns of --out from --cache")
    p.add_argument("--update", action="store_true",
                   help="re-run --methods on --models already in --out, replacing their columns (row and cache)")
    p.add_argument("--fct", default="benchmarks/results/fct_dbr.jsonl", help="FCT rows (bench_fct_dbr.py), for --table")
    p.add_argument("--trap", default="benchmarks/results/trap.jsonl", help="TRAP's rows (bench_trap.py), for --table")
    args = p.parse_args()
    table(args) if args.table else rescore(args) if args.rescore else update(args) if args.update else run(args)


if __name__ == "__main__":
    main()
