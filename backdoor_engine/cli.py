"""`backdoor-engine` command line: poison | train | eval | scan | triggers | purify | demo (DESIGN.md section 3)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from .errors import InputError

DATA_HELP = ("dataset: an npz file (x uint8 NxHxWxC, y int64, optional ids, poison), an image folder with class "
             "sub-folders, a CIFAR-10 binary folder, or a bundled name: fashion-mnist, fashion-mnist:test, "
             "cifar10-samples")


def _parse_param(text: str):
    """`key=value`; the value is read as JSON when it parses (numbers, lists), else kept as a string."""
    if "=" not in text:
        raise InputError(f"--param expects key=value, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key.strip(), json.loads(value)
    except ValueError:
        return key.strip(), value


def _spec_from_args(args):
    from .api import PoisonSpec

    # `eval` has no --rate: the rate does not change the trigger.
    rate = getattr(args, "rate", PoisonSpec.rate)
    return PoisonSpec(attack=args.attack, mode=args.mode, rate=rate, target=args.target, seed=args.seed,
                      params=dict(_parse_param(p) for p in args.param))


def _add_attack_args(p: argparse.ArgumentParser, *, required: bool) -> None:
    from .data.attacks import ATTACKS, MODES

    p.add_argument("--attack", choices=sorted(ATTACKS), required=required, help="attack to apply")
    p.add_argument("--mode", choices=MODES, default="a2o",
                   help="label mode: a2o (all to target), a2a ((y+1) mod K), ut (random wrong label) [a2o]")
    p.add_argument("--target", type=int, default=0, help="target class for a2o and clean-label attacks [0]")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="attack parameter, repeatable (e.g. patch_size=4, alpha=0.1); see the README's attack table")


def cmd_poison(args) -> int:
    from .api import manifest_path, poison, save_poisoned
    from .data.sources import open_dataset

    if not args.out.endswith(".npz"):
        raise InputError(f"--out must name an .npz file, got {args.out!r}")
    if not 0.0 < args.rate < 1.0:
        raise InputError(f"--rate must be in (0, 1), got {args.rate}")
    spec = _spec_from_args(args)
    dataset = open_dataset(args.data)
    clean_model = None
    if args.adv_model:
        from .models.checkpoint import load_checkpoint

        model, meta = load_checkpoint(args.adv_model)
        clean_model = (model, meta["normalisation"])
    poisoned, result = poison(dataset, spec, clean_model=clean_model)
    manifest = save_poisoned(poisoned, result, spec, args.out, source=str(args.data))
    print(json.dumps({"out": args.out, "manifest": str(manifest_path(args.out)),
                      "n_samples": len(poisoned), "n_poisoned": manifest["n_poisoned"],
                      "n_cover": manifest["n_cover"]}))
    return 0


def _spec_beside(data_path: str, explicit_manifest: str | None):
    """The attack manifest named explicitly, else the one `poison` wrote beside an npz, else None."""
    from .api import PoisonSpec, manifest_path

    if explicit_manifest:
        return PoisonSpec.load(explicit_manifest)
    guess = manifest_path(data_path)
    return PoisonSpec.load(guess) if data_path.endswith(".npz") and guess.exists() else None


def _spec_recorded_in(meta: dict):
    """The attack a checkpoint's training data carried (recorded by `train`), or None for a clean model."""
    from .api import PoisonSpec

    return PoisonSpec.from_dict(meta["attack"]) if isinstance(meta.get("attack"), dict) else None


def cmd_train(args) -> int:
    from .api import evaluate, save_trained
    from .data.sources import open_dataset
    from .models.train import TrainConfig, train_model

    if not args.out.endswith(".pt"):
        raise InputError(f"--out must name a .pt checkpoint, got {args.out!r}")
    dataset = open_dataset(args.data)
    spec = _spec_beside(str(args.data), args.poison_manifest)
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
                         augment=not args.no_augment, **({"lr": args.lr} if args.lr is not None else {}))
    t0 = time.perf_counter()
    trained = train_model(dataset.x, dataset.y, arch=args.arch, num_classes=dataset.num_classes, config=config)
    seconds = time.perf_counter() - t0
    extra = {"train": {"data": str(args.data), "n_samples": len(dataset), "seconds": round(seconds, 1),
                       "config": dataclasses.asdict(config),
                       "history": trained.history}}
    if spec is not None:
        extra["attack"] = spec.to_dict()
    summary = {"out": args.out, "arch": args.arch, "epochs": args.epochs, "train_seconds": round(seconds, 1)}
    if args.eval_data:
        metrics = evaluate(trained.model, trained.normalisation, open_dataset(args.eval_data), spec,
                           num_classes=dataset.num_classes)
        extra["eval"] = {"data": str(args.eval_data), **metrics}
        summary.update(metrics)
    save_trained(args.out, trained.model, trained.normalisation, arch=args.arch, trained_on=dataset, extra=extra)
    print(json.dumps(summary))
    return 0


def cmd_eval(args) -> int:
    from .api import evaluate
    from .data.sources import open_dataset
    from .models.checkpoint import load_checkpoint

    model, meta = load_checkpoint(args.model)
    if args.attack:
        spec = _spec_from_args(args)
    elif args.poison_manifest:
        from .api import PoisonSpec

        spec = PoisonSpec.load(args.poison_manifest)
    else:
        spec = _spec_recorded_in(meta)
    data = open_dataset(args.data)
    metrics = evaluate(model, meta["normalisation"], data, spec, num_classes=meta["num_classes"],
                       progress=not args.json)
    out = {"model": args.model, "data": str(args.data), **metrics}
    if spec is not None:
        out["attack"] = spec.to_dict()
    print(json.dumps(out, indent=None if args.json else 2))
    return 0


def cmd_scan(args) -> int:
    from .api import scan
    from .data.source import ArraySource
    from .data.sources import open_dataset, open_source
    from .models.checkpoint import load_checkpoint

    params = dict(_parse_param(p) for p in args.param)
    model = normalisation = None
    if args.method == "vbd":
        if args.model:
            print("backdoor-engine scan: note: --method vbd trains its own simple models; --model is not used",
                  file=sys.stderr)
        params.update(seed=0 if args.seed is None else args.seed)
    else:
        if not args.model:
            raise InputError("--method flare scans with the suspect model: --model MODEL.pt is required")
        model, meta = load_checkpoint(args.model)
        normalisation = meta["normalisation"]
        if args.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise InputError("--device cuda: no CUDA device is available here")
            model = model.cuda()
        params.update(reduce=args.reduce, random_state=42 if args.seed is None else args.seed)
    if args.method == "vbd":
        data, store = open_dataset(args.data), args.store
    else:
        # Image folders and tar shards stream from disk at the model's input shape; a feature store
        # (default OUT/features) keeps memory bounded and lets an interrupted scan resume.
        data = open_source(args.data, image_size=tuple(meta["input_size"]), channels=meta["in_channels"])
        streamed = not isinstance(data, ArraySource)
        data = data if streamed else data.dataset
        store = args.store or (os.path.join(args.out, "features") if streamed else None)
        if streamed and not args.json:
            print(f"scan: streaming {len(data):,} samples from {args.data}; features stored in {store}",
                  file=sys.stderr)
    if args.executor == "ray":
        if args.method != "flare":
            raise InputError("--executor ray runs FLARE's extraction; vbd trains its own models locally")
        store = store or os.path.join(args.out, "features")
    result = scan(data, model, normalisation, method=args.method, out_dir=args.out, batch_size=args.batch_size,
                  store=store, workers=args.workers, dtype=args.dtype, executor=args.executor,
                  checkpoint=args.model, actors=args.actors, progress=not args.json, **params)
    _print_scan_result(result, args)
    return 0


def cmd_triggers(args) -> int:
    from .api import extract_triggers
    from .data.sources import open_dataset

    params = dict(_parse_param(p) for p in args.param)
    params.update(seed=args.seed)
    dataset = open_dataset(args.data)
    result = extract_triggers(dataset, out_dir=args.out, progress=not args.json, **params)
    _print_scan_result(result, args)
    return 0


def _print_scan_result(result, args) -> None:
    if args.json:
        print(json.dumps(result.report))
    else:
        summary = {k: result.report[k] for k in ("method", "n_samples", "n_flagged", "timings_s")}
        summary.update({k: result.report[k] for k in ("metrics",) if k in result.report})
        if result.report["method"] == "vbd":
            summary["poisoned_classes"] = result.report["diagnostics"]["poisoned_classes"]
        print(json.dumps(summary, indent=2))
        if "explanation" in result.report["diagnostics"]:
            print(result.report["diagnostics"]["explanation"])
        print(f"report: {args.out}/report.html")


def cmd_purify(args) -> int:
    from .api import evaluate, flags_from_report, save_trained
    from .data.sources import open_dataset
    from .models.checkpoint import load_checkpoint
    from .models.train import TrainConfig
    from .purify import retrain_on_kept, unlearn_relearn, unlearn_relearn_config

    if not args.out.endswith(".pt"):
        raise InputError(f"--out must name a .pt checkpoint, got {args.out!r}")
    dataset = open_dataset(args.data)
    flags = flags_from_report(dataset, args.report)
    model, meta = load_checkpoint(args.model)
    options = {"seed": args.seed, **({"epochs": args.epochs} if args.epochs is not None else {}),
               **({"lr": args.lr} if args.lr is not None else {})}
    t0 = time.perf_counter()
    if args.strategy == "retrain":
        config = TrainConfig(**options)
        result = retrain_on_kept(dataset, flags, arch=meta["arch"], config=config)
        repaired, normalisation, history = result.model, result.normalisation, result.history
    else:
        config = unlearn_relearn_config(**options)
        repaired, history = unlearn_relearn(model, meta["normalisation"], dataset, flags, config)
        normalisation = meta["normalisation"]
    seconds = time.perf_counter() - t0
    extra = {"purify": {"strategy": args.strategy, "data": str(args.data), "report": str(args.report),
                        "model": str(args.model), "n_removed_or_unlearned": int(flags.sum()),
                        "seconds": round(seconds, 1), "config": dataclasses.asdict(config), "history": history}}
    if isinstance(meta.get("attack"), dict):
        extra["attack"] = meta["attack"]
    summary = {"out": args.out, "strategy": args.strategy, "n_flagged": int(flags.sum()),
               "seconds": round(seconds, 1)}
    if args.eval_data:
        metrics = evaluate(repaired, normalisation, open_dataset(args.eval_data), _spec_recorded_in(meta),
                           num_classes=meta["num_classes"])
        extra["eval"] = {"data": str(args.eval_data), **metrics}
        summary.update(metrics)
    save_trained(args.out, repaired, normalisation, arch=meta["arch"], trained_on=dataset, extra=extra)
    print(json.dumps(summary))
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(Path(args.out), epochs=args.epochs, seed=args.seed)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .engine.prefetch import default_workers

    parser = argparse.ArgumentParser(prog="backdoor-engine", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("poison", help="poison a dataset with a backdoor attack (for evaluation)",
                       description="Write a poisoned copy of a dataset (npz with a ground-truth `poison` column) "
                                   "and OUT.attack.json describing the trigger.")
    p.add_argument("--data", required=True, help=DATA_HELP)
    _add_attack_args(p, required=True)
    p.add_argument("--rate", type=float, default=0.1, help="fraction of the dataset poisoned [0.1]")
    p.add_argument("--seed", type=int, default=0, help="seed of the trigger and of the poisoned-sample choice [0]")
    p.add_argument("--adv-model", help="clean checkpoint for label_consistent's PGD step")
    p.add_argument("--out", required=True, help="output .npz")
    p.set_defaults(func=cmd_poison)

    p = sub.add_parser("train", help="train a reference model (seeded SGD, standard augmentation)")
    p.add_argument("--data", required=True, help=DATA_HELP)
    p.add_argument("--arch", default="small_resnet",
                   help="resnet18 | preact_resnet18 | small_resnet | vgg16_bn | mobilenetv2 [small_resnet]")
    p.add_argument("--epochs", type=int, default=10, help="training epochs [10]")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation, shuffling, augmentation [0]")
    p.add_argument("--batch-size", type=int, default=128, help="batch size [128]")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate [trainer default]")
    p.add_argument("--no-augment", action="store_true", help="train without crop/flip augmentation")
    p.add_argument("--eval-data", help="clean test set: report BA (and ASR when the data has an attack manifest)")
    p.add_argument("--poison-manifest", help="attack manifest for ASR [DATA's .attack.json when present]")
    p.add_argument("--out", required=True, help="output checkpoint .pt")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="benign accuracy (BA) and attack success rate (ASR) of a checkpoint")
    p.add_argument("--model", required=True, help="checkpoint .pt written by `train`")
    p.add_argument("--data", default="fashion-mnist:test", help="clean test set [fashion-mnist:test]; " + DATA_HELP)
    _add_attack_args(p, required=False)
    p.add_argument("--seed", type=int, default=0, help="attack seed (must match the poisoning run) [0]")
    p.add_argument("--poison-manifest", help="attack manifest (.attack.json) instead of --attack flags "
                                             "[the checkpoint's own record of its training data's attack]")
    p.add_argument("--json", action="store_true", help="one-line JSON, no progress bar")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("scan", help="scan a dataset for poisoned samples",
                       description="flare: extract BN-minima of every sample with the suspect model in one pass, "
                                   "cluster, detect. vbd: train simple models, extract triggers, detect (no suspect "
                                   "model). Writes OUT/report.json, OUT/samples.csv and OUT/report.html.")
    p.add_argument("--data", required=True, help=DATA_HELP)
    p.add_argument("--model", help="checkpoint .pt written by `train` (the suspect model; flare only)")
    p.add_argument("--method", default="flare", choices=["flare", "vbd"], help="detector [flare]")
    p.add_argument("--out", required=True, help="output folder for the report")
    p.add_argument("--reduce", default="channel", choices=["channel", "layer"],
                   help="FLARE features: one column per BN channel (paper) or per BN layer (official code) [channel]")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the forward pass runs [cpu]")
    p.add_argument("--seed", type=int, default=None,
                   help="flare: UMAP random state [official 42]; vbd: seed of splits and training [official 0]")
    p.add_argument("--batch-size", type=int, default=256, help="extraction batch size [256]")
    p.add_argument("--store", help="feature store folder: an interrupted scan resumes from its last finished chunk "
                                   "[OUT/features for image folders and tar shards, none for in-memory sets]")
    p.add_argument("--workers", type=int, default=default_workers(),
                   help=f"processes decoding images ahead of the model (image folders, tar shards) "
                        f"[{default_workers()} here: one per core beyond the first, at most 8]")
    p.add_argument("--executor", default="local", choices=["local", "ray"],
                   help="where extraction runs: this process, or Ray Data actors on the cluster `ray` connects to "
                        "(RAY_ADDRESS; a local one otherwise; needs the ray extra) [local]")
    p.add_argument("--actors", type=int, default=2, help="Ray actors, one model each (--executor ray) [2]")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"],
                   help="feature store precision; float16 halves its size [float32]")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="detector parameter, repeatable (e.g. xi=0.02, min_cluster_size=100, noise_rule=nearest, "
                        "exact_max_samples=100000, sample_size=50000)")
    p.add_argument("--json", action="store_true", help="print the whole report.json, no progress output")
    p.set_defaults(func=cmd_scan)

    p = sub.add_parser("triggers", help="VBD: find poisoned classes, extract their triggers, flag the samples",
                       description="The variance-based defense: needs no suspect model and no clean data (it trains "
                                   "its own simple models). Writes OUT/report.json (with each trigger's mask, "
                                   "pattern, KS p-value, ASR and chosen model), OUT/samples.csv, OUT/report.html, "
                                   "OUT/trigger_class<c>.png, OUT/mask_class<c>.png and OUT/triggers.npz.")
    p.add_argument("--data", required=True, help=DATA_HELP)
    p.add_argument("--out", required=True, help="output folder for the report")
    p.add_argument("--seed", type=int, default=0, help="seed of the splits, training and detector alphas [0]")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="VBD parameter, repeatable (e.g. poison_epochs=20, detector_epochs=20, "
                        "poison_archs='[\"64P\"]'); see the README")
    p.add_argument("--json", action="store_true", help="print the whole report.json, no progress output")
    p.set_defaults(func=cmd_triggers)

    p = sub.add_parser("purify", help="repair after a scan: retrain without the flagged samples, or unlearn/relearn",
                       description="FLARE(P) `retrain`: a fresh model of the suspect model's architecture trained "
                                   "on the samples the scan kept. FLARE(R) `unlearn-relearn`: each epoch, gradient "
                                   "ascent on the flagged samples then cross-entropy on the kept ones, starting "
                                   "from the suspect model. The last epoch is kept; no test data picks it.")
    p.add_argument("--data", required=True, help="the scanned dataset; " + DATA_HELP)
    p.add_argument("--model", required=True, help="the suspect checkpoint that was scanned")
    p.add_argument("--report", required=True, help="the scan's report.json (or its folder)")
    p.add_argument("--strategy", default="retrain", choices=["retrain", "unlearn-relearn"], help="[retrain]")
    p.add_argument("--epochs", type=int, default=None, help="epochs [retrain 10, unlearn-relearn 20]")
    p.add_argument("--lr", type=float, default=None, help="learning rate [retrain 0.05 cosine, unlearn-relearn 1e-4]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-data", help="clean test set: report BA (and ASR from the model's attack record)")
    p.add_argument("--out", required=True, help="output checkpoint .pt")
    p.set_defaults(func=cmd_purify)

    p = sub.add_parser("demo", help="poison Fashion-MNIST, train, (scan,) report: the embedded default job")
    p.add_argument("--out", default="runs/demo", help="output folder [runs/demo]")
    p.add_argument("--epochs", type=int, default=None, help="training epochs [demo default]")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except InputError as e:
        print(f"backdoor-engine {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
