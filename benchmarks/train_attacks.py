"""BA / ASR of the small ResNet trained on poisoned Fashion-MNIST, for every attack and label mode.

Each finished run appends one JSON line to --out, so an interrupted sweep resumes where it stopped.
`--table` prints the markdown table of what --out holds.

    python benchmarks/train_attacks.py --train-size 20000 --epochs 4 --out benchmarks/results/attacks.jsonl
    python benchmarks/train_attacks.py --out benchmarks/results/attacks.jsonl --table
    python benchmarks/train_attacks.py --fit-of runs/attacks/*.pt      # the training fit of saved models
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

from backdoor_engine import api
from backdoor_engine.cli import _parse_param
from backdoor_engine.data.attacks import harness
from backdoor_engine.models.checkpoint import load_checkpoint
from backdoor_engine.models.provenance import save_trained
from backdoor_engine.data.attacks import ATTACKS, CLEAN_LABEL_ATTACKS, MODES
from backdoor_engine.data.fashion_mnist import load_fashion_mnist
from backdoor_engine.models.evaluate import accuracy, predict
from backdoor_engine.models.train import TrainConfig, train_model


def sweep_cases(attacks, modes):
    for attack in attacks:
        for mode in modes:
            if attack in CLEAN_LABEL_ATTACKS and mode != "a2o":
                continue
            yield attack, mode


def subset(dataset, size: int, seed: int):
    if size >= len(dataset):
        return dataset
    index = np.sort(np.random.default_rng(seed).choice(len(dataset), size, replace=False))
    return dataset.subset(index)


def training_fit(model, normalisation, poisoned, poison_mask) -> dict:
    """How well the model fits the set it was trained on: the share of its clean and of its poisoned training images
    predicted as their (training) label. ASR is measured on test images; a poison share well under 1 says the
    budget has not taught the model its own poison, which detectors that read the backdoor's features then miss."""
    pred, y = predict(model, poisoned.x, normalisation), np.asarray(poisoned.y)
    poison_mask = np.asarray(poison_mask, bool)
    return {"fit_clean": round(accuracy(pred[~poison_mask], y[~poison_mask]), 4),
            "fit_poison": round(accuracy(pred[poison_mask], y[poison_mask]), 4) if poison_mask.any() else None}


def fit_of_checkpoints(paths):
    """training_fit of checkpoints this script saved: each one's training set rebuilt from the attack record it
    carries (subset and poisoning seeded by the record's seed, as run_case drew them). One JSON line each."""
    train = load_fashion_mnist("train")
    for path in paths:
        model, meta = load_checkpoint(path)
        if not isinstance(meta.get("attack"), dict) or "train_size" not in meta:
            raise SystemExit(f"{path}: no attack record or train_size (not saved by this script)")
        spec = harness.PoisonSpec.from_dict(meta["attack"])
        poisoned, result = harness.poison(subset(train, meta["train_size"], spec.seed), spec)
        fit = training_fit(model, meta["normalisation"], poisoned, result.mask)
        print(json.dumps({"model": str(path), **meta.get("eval", {}), **fit}), flush=True)


def case_params(attack: str, args) -> dict:
    """The attack parameters of one case: label_consistent's PGD steps, then every --param."""
    params = dict(steps=args.lc_steps) if attack == "label_consistent" else {}
    params.update(_parse_param(text) for text in args.param or [])
    return params


def run_case(attack, mode, params, train, test, args, clean_model, clean_path=None):
    settings = build_settings(args)
    spec = harness.PoisonSpec(attack=attack, mode=mode, rate=args.rate, target=0, seed=args.seed, params=params)
    t0 = time.perf_counter()
    if ATTACKS[attack].trigger_file_param:
        # lf / iad / siba / issba: the trigger is built here (its time counts as poisoning time) and kept beside the
        # results (or the models), recorded in the spec of the row and of the checkpoint.
        where = Path(args.models_dir) if args.models_dir else Path(args.out).parent
        spec = harness.prepare_spec(
            train, spec, clean_model=clean_model, budget=args.build_budget, settings=settings,
            trigger_path=where / (f"{attack}-{mode}{_tag(args)}-trigger-{len(train)}-{args.build_budget}"
                                  f"-s{args.seed}.npz"))
    poisoned, result = harness.poison(train, spec, clean_model=clean_model)
    poison_s = time.perf_counter() - t0
    t0, cpu0 = time.perf_counter(), time.process_time()
    trained = train_model(poisoned.x, poisoned.y, arch=args.arch, num_classes=10,
                          config=TrainConfig(epochs=args.epochs, seed=args.seed, progress=False))
    train_s = time.perf_counter() - t0
    train_cpu_s = time.process_time() - cpu0
    metrics = api.evaluate(trained.model, trained.normalisation, test, spec, num_classes=10)
    metrics.update(training_fit(trained.model, trained.normalisation, poisoned, result.mask))
    if args.models_dir:
        # Kept for the detectors' benchmarks: the same spec rebuilds the poisoned set.
        name = f"{attack}-{mode}{_tag(args)}-{len(train)}-e{args.epochs}.pt"
        extra = {"attack": spec.to_dict(), "eval": metrics, "train_size": len(train)}
        if harness.needs_clean_model(spec.attack, spec.params):  # label_consistent: its PGD step needs it again
            extra["clean_model"] = str(clean_path)
        save_trained(Path(args.models_dir) / name, trained.model, trained.normalisation, arch=args.arch,
                     trained_on=poisoned, extra=extra)
    return {"attack": attack, "mode": mode, "tag": args.tag or "", "rate": args.rate, "arch": args.arch,
            "epochs": args.epochs,
            "train_size": len(train), "n_poisoned": int(result.mask.sum()), "n_cover": int(result.cover.sum()),
            "poison_s": round(poison_s, 1), "train_s": round(train_s, 1),
            "train_cpu_min": round(train_cpu_s / 60, 2),
            **{k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()},
            "params": spec.params, "build_settings": settings, "seed": args.seed,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def build_settings(args) -> dict:
    return dict(_parse_param(text) for text in args.build_setting or [])


def _tag(args) -> str:
    return f"-{args.tag}" if args.tag else ""


def print_table(rows):
    print("| attack | mode | train size | epochs | poisoned | BA | ASR | fit clean / poison | train wall min "
          "| train CPU min |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        mode = f"{r['mode']} ({r['tag']})" if r.get("tag") else r["mode"]
        print(f"| {r['attack']} | {mode} | {r['train_size']} | {r['epochs']} | {r['n_poisoned']} "
              f"| {100 * r['ba']:.2f}% | {100 * r['asr']:.2f}% | {_fit(r)} | {r['train_s'] / 60:.1f} "
              f"| {r['train_cpu_min']:.1f} |")


def _fit(row) -> str:
    if "fit_clean" not in row:  # rows written before the fit was recorded
        return "-"
    poison = "-" if row["fit_poison"] is None else f"{100 * row['fit_poison']:.1f}%"
    return f"{100 * row['fit_clean']:.1f}% / {poison}"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out")
    p.add_argument("--table", action="store_true")
    p.add_argument("--fit-of", nargs="+", metavar="CHECKPOINT",
                   help="print the training fit of checkpoints saved with --models-dir, and stop")
    p.add_argument("--attacks", nargs="+", default=list(ATTACKS))
    p.add_argument("--modes", nargs="+", default=list(MODES))
    p.add_argument("--train-size", type=int, default=60000)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--rate", type=float, default=0.1)
    p.add_argument("--arch", default="small_resnet")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--models-dir", help="also save each trained checkpoint here")
    p.add_argument("--lc-steps", type=int, default=100, help="PGD steps of label_consistent")
    p.add_argument("--build-budget", choices=("paper", "cpu"), default="cpu",
                   help="training budget of the iad / siba / issba trigger builders [cpu; paper: days on a CPU]")
    p.add_argument("--build-setting", action="append",
                   help="trigger builder setting KEY=VALUE over --build-budget (JSON values), e.g. epochs=20 for iad")
    p.add_argument("--param", action="append", help="attack parameter KEY=VALUE (JSON values), e.g. pattern_path=P")
    p.add_argument("--tag", help="a name for this variant, in the checkpoint's file name and the row (needed with "
                   "--param, so that rows and models of different parameters stay apart)")
    args = p.parse_args()
    if args.fit_of:
        fit_of_checkpoints(args.fit_of)
        return
    if not args.out:
        p.error("--out is required (except with --fit-of)")
    if (args.param or args.build_setting) and not args.tag:
        p.error("--param and --build-setting need --tag, so the variant's rows, checkpoints and trigger files do not "
                "overwrite the default's")

    out = Path(args.out)
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    if args.table:
        print_table(rows)
        return
    done = {(r["attack"], r["mode"], r.get("tag", ""), r["train_size"], r["epochs"], r["rate"]) for r in rows}
    train = subset(load_fashion_mnist("train"), args.train_size, args.seed)
    test = load_fashion_mnist("test")
    clean_model = clean_path = None
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.models_dir:
        Path(args.models_dir).mkdir(parents=True, exist_ok=True)
    for attack, mode in sweep_cases(args.attacks, args.modes):
        if (attack, mode, args.tag or "", len(train), args.epochs, args.rate) in done:
            continue
        params = case_params(attack, args)
        if harness.needs_clean_model(attack, params) and clean_model is None:
            # LC's PGD, LF's perturbation, IAD's classifier and SIBA's surrogate need a clean model of the same
            # data, trained with the same budget.
            clean = train_model(train.x, train.y, arch=args.arch, num_classes=10,
                                config=TrainConfig(epochs=args.epochs, seed=args.seed, progress=False))
            clean_model = (clean.model, clean.normalisation)
            if args.models_dir:  # kept, so that the benchmarks can rebuild label_consistent's poisoned set
                clean_path = Path(args.models_dir) / f"clean-{len(train)}-e{args.epochs}-s{args.seed}.pt"
                save_trained(clean_path, clean.model, clean.normalisation, arch=args.arch, trained_on=train,
                             extra={"train_size": len(train)})
        row = run_case(attack, mode, params, train, test, args, clean_model, clean_path)
        print(json.dumps(row), flush=True)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
