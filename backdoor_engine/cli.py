"""`backdoor-engine` command line: poison | train | eval | scan | triggers | purify | extract | bench | demo.

How the engine is put together, and how to add a detector or a repair: docs/architecture.md."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

from .errors import InputError

LINKS_HELP = ("image folders and tar shards: follow symbolic links that lead outside the --data folder (refused "
              "and listed as skipped by default: a dataset under scan is untrusted, and a link may point anywhere)")

DATA_HELP = ("dataset: an npz file (x uint8 NxHxWxC, y int64, optional ids, poison), an image folder with class "
             "sub-folders, a CIFAR-10 binary folder, or a bundled name: fashion-mnist, fashion-mnist:test, "
             "cifar10-samples")


def _method_choice(methods: list[str]):
    """argparse type for scan --method: one registered name, several separated by commas, or 'all'."""

    def check(text: str) -> str:
        names = [name.strip() for name in text.split(",")]
        unknown = [name for name in names if name not in methods and not (name == "all" and len(names) == 1)]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown method(s) {', '.join(map(repr, unknown))}; registered: "
                                             f"{', '.join(methods)} (several separated by commas, or all)")
        return ",".join(names)

    return check


def _parse_param(text: str):
    """`key=value`; the value is read as JSON when it parses (numbers, lists), else kept as a string."""
    if "=" not in text:
        raise InputError(f"--param expects key=value, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key.strip(), json.loads(value)
    except ValueError:
        return key.strip(), value


def _check_out(path, *, kind: str, suffix: str | None = None, flag: str = "--out") -> None:
    """Refuse an output location before any work (a traceback after minutes of training is the alternative):
    `kind` "file" (its folder must exist; `suffix` its ending) or "dir" (made later; may exist, as a folder).
    Writability is probed with an unnamed temporary file, which also catches read-only mounts and leaves
    nothing behind."""
    text = os.fspath(path)
    target = Path(text)
    if kind == "file":
        if suffix and not text.endswith(suffix):
            raise InputError(f"{flag} must name a {suffix} file, got {text!r}")
        if target.is_dir():
            raise InputError(f"{flag} {text} is a directory; expected a {suffix or 'file'} path")
        folder = target.parent
        if not folder.is_dir():
            raise InputError(f"{flag} {text}: directory {folder} does not exist")
    else:
        if target.exists() and not target.is_dir():
            raise InputError(f"{flag} {text} names an existing file; expected a folder (new or existing)")
        folder = next(a for a in (target, *target.absolute().parents) if a.exists())
        if not folder.is_dir():
            raise InputError(f"{flag} {text}: {folder} is a file, so the folder cannot be made")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise InputError(f"{flag} {text}: cannot write in {folder} ({error.strerror or error})") from None


def _check_counts(args, *names: str, minimum: int = 1) -> None:
    """Integer options checked before anything is read or made: --workers -1 used to leave OUT/features."""
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < minimum:
            raise InputError(f"--{name.replace('_', '-')} must be >= {minimum}, got {value}")


def _check_positive_number(flag: str, value) -> None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise InputError(f"{flag} must be a finite number > 0, got {value}")


def _check_labels_fit(y, meta: dict, spec) -> None:
    """Labels within the model's classes before any work (a label of 10^12 sized a bincount after the pass)."""
    from .data.dataset import check_labels

    check_labels(y, meta["num_classes"], f"--data {spec} (against the model's {meta['num_classes']} classes)")


def _spec_from_args(args):
    from .data.attacks.harness import PoisonSpec

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


MODEL_HELP = ("the model: a checkpoint .pt written by `train`, or torchvision:NAME / timm:NAME (any classifier of "
              "those libraries, e.g. torchvision:resnet50, torchvision:mobilenet_v2; built without downloading "
              "anything) with --weights. FLARE reads BatchNorm2d statistics: LayerNorm models (ConvNeXt, ViT, Swin) "
              "cannot be scanned by it")


def _add_model_args(p: argparse.ArgumentParser, *, required: bool) -> None:
    """--model plus what a torchvision/timm model needs besides its architecture name."""
    p.add_argument("--model", required=required, help=MODEL_HELP)
    p.add_argument("--weights", help="state dict of a torchvision:/timm: model: .safetensors, or .pt/.pth saved from "
                                     "model.state_dict() (plain or under 'state_dict'; never unpickled); the number "
                                     "of classes is read from it")
    p.add_argument("--input-size", type=int, help="torchvision:/timm: model input side in pixels; images are "
                                                  "resized to it [224; timm: the model's default]")
    p.add_argument("--mean", type=float, nargs="+", metavar="M",
                   help="torchvision:/timm: per-channel mean on the [0, 1] pixel scale [ImageNet 0.485 0.456 0.406]")
    p.add_argument("--std", type=float, nargs="+", metavar="S",
                   help="torchvision:/timm: per-channel std on the [0, 1] pixel scale [ImageNet 0.229 0.224 0.225]")


def _model_from_args(args, *, allow_random: bool = False):
    """(model, meta) from the `_add_model_args` flags; meta as models.foreign.load_model returns it.
    allow_random: a torchvision:/timm: model without --weights is randomly initialised (bench only)."""
    from .models.foreign import is_foreign_spec, load_model

    weights = getattr(args, "weights", None)
    if is_foreign_spec(args.model) and weights is None and not allow_random:
        raise InputError(f"--model {args.model} needs --weights FILE: the state dict of the model you trained "
                         "(.safetensors or .pt)")
    return load_model(args.model, weights=weights, input_size=getattr(args, "input_size", None),
                      mean=getattr(args, "mean", None), std=getattr(args, "std", None))


def cmd_poison(args) -> int:
    from .data.attacks.harness import manifest_path, poison, prepare_spec, save_poisoned, trigger_file_path
    from .data.open import open_dataset

    _check_out(args.out, kind="file", suffix=".npz")
    if not 0.0 < args.rate < 1.0:
        raise InputError(f"--rate must be in (0, 1), got {args.rate}")
    spec = _spec_from_args(args)
    dataset = open_dataset(args.data)
    clean_model = None
    if args.adv_model:
        from .models.checkpoint import load_checkpoint

        model, meta = load_checkpoint(args.adv_model)
        clean_model = (model, meta["normalisation"])
    # An attack storing a built trigger (lf, iad, siba, issba) without --param FILE: built here, written to
    # OUT.<attack>-trigger.npz and recorded in the manifest.
    spec = prepare_spec(dataset, spec, clean_model=clean_model, trigger_path=trigger_file_path(args.out, spec.attack),
                        budget=args.build_budget, settings=dict(_parse_param(p) for p in args.build_param),
                        progress=lambda message: print(message, file=sys.stderr))
    poisoned, result = poison(dataset, spec, clean_model=clean_model)
    manifest = save_poisoned(poisoned, result, spec, args.out, source=str(args.data))
    print(json.dumps({"out": args.out, "manifest": str(manifest_path(args.out)),
                      "n_samples": len(poisoned), "n_poisoned": manifest["n_poisoned"],
                      "n_cover": manifest["n_cover"]}))
    return 0


def _spec_beside(data_path: str, explicit_manifest: str | None):
    """The attack manifest named explicitly, else the one `poison` wrote beside an npz, else None."""
    from .data.attacks.harness import PoisonSpec, manifest_path

    if explicit_manifest:
        return PoisonSpec.load(explicit_manifest)
    guess = manifest_path(data_path)
    return PoisonSpec.load(guess) if data_path.endswith(".npz") and guess.exists() else None


def _spec_recorded_in(meta: dict):
    """The attack a checkpoint's training data carried (recorded by `train`), or None for a clean model."""
    from .data.attacks.harness import PoisonSpec

    return PoisonSpec.from_dict(meta["attack"]) if isinstance(meta.get("attack"), dict) else None


def cmd_train(args) -> int:
    from .api import train
    from .models.provenance import save_trained
    from .data.open import open_dataset
    from .models.provenance import training_record
    from .models.train import TrainConfig

    _check_out(args.out, kind="file", suffix=".pt")
    _check_counts(args, "epochs", "batch_size")
    _check_positive_number("--lr", args.lr)
    image_size = None if args.image_size is None else tuple(args.image_size)
    if image_size is not None:
        from .models.registry import image_size_pair

        image_size_pair(image_size)
    # A defense's settings and its report folder are checked before the data are read.
    defense = _trap_settings(args) if args.defense == "trap" else None
    if defense is None and args.param:
        raise InputError("--param sets the parameters of a --defense; train alone takes none")
    dataset = open_dataset(args.data, **_links(args), **({} if image_size is None else {"image_size": image_size}))
    spec = _spec_beside(str(args.data), args.poison_manifest)
    eval_data = open_dataset(args.eval_data) if args.eval_data else None  # a bad path fails before training
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
                         augment=not args.no_augment, **({"lr": args.lr} if args.lr is not None else {}))
    if defense is not None:
        return _train_with_trap(args, dataset, config, spec, eval_data, *defense)
    trained = train(dataset, arch=args.arch, config=config)
    record = training_record(config, trained.history, data=str(args.data), n_samples=len(dataset))
    metrics = save_trained(args.out, trained.model, trained.normalisation, arch=args.arch, trained_on=dataset,
                           extra={"train": record}, attack=spec, eval_data=eval_data,
                           eval_source=args.eval_data and str(args.eval_data))
    print(json.dumps({"out": args.out, "arch": args.arch, "epochs": args.epochs, "train_seconds": record["seconds"],
                      **metrics}))
    return 0


def _trap_settings(args):
    """`train --defense trap`'s checked settings: TRAP's params, backdoor hiding's options (--param hiding_*),
    the strategy and the isolation report folder (OUT with .trap)."""
    from .methods.trap import TrapParams
    from .params import build_params
    from .purify import get_repair

    given = dict(_parse_param(p) for p in args.param)
    hiding = {k[len("hiding_"):]: given.pop(k) for k in list(given) if k.startswith("hiding_")}
    trap_params = build_params(TrapParams, {"train_epochs": args.epochs, "seed": args.seed, **given},
                               "train --defense trap")
    strategy = get_repair("backdoor-hiding")
    strategy.params(hiding)
    report_dir = Path(args.out).with_suffix(".trap")
    _check_out(str(report_dir), kind="dir", flag="the isolation report folder")
    return trap_params, hiding, strategy, report_dir


def _train_with_trap(args, dataset, config, spec, eval_data, trap_params, hiding, strategy, report_dir) -> int:
    """TRAP end to end: isolation in the first E_d epochs (the trainer's callback), standard training to E_t =
    --epochs, then backdoor hiding with the isolated samples; the isolation report goes beside the model."""
    from .api import train
    from .methods.trap import Isolation, TrapParams, isolation_report
    from .models.preprocess import fit_normalisation
    from .models.provenance import save_trained, training_record
    from .params import provenance_of
    from .report import write_report

    normalisation = fit_normalisation(dataset.x)
    isolation = Isolation(dataset, normalisation, trap_params, progress=True)
    t0 = time.perf_counter()
    trained = train(dataset, arch=args.arch, config=config, normalisation=normalisation, callback=isolation)
    train_s = time.perf_counter() - t0
    detection = isolation.detection(params=dataclasses.asdict(trap_params))
    parts = isolation_report(isolation, dataset)
    write_report(report_dir, detection, dataset, timings_s=detection.diagnostics["timings_s"],
                 figures=parts.figures, notes=parts.notes, extra={"data": {"source": str(args.data)}})
    # The model before hiding is the undefended one (standard training to E_t): its BA / ASR is the reference
    # the hiding is judged against, measured here so that no second training run is needed.
    undefended = {}
    if eval_data is not None:
        from .models.evaluate import evaluate_model

        undefended = evaluate_model(trained.model, normalisation, eval_data, spec, num_classes=dataset.num_classes)
    t0 = time.perf_counter()
    hidden = strategy.apply(trained.model, normalisation, dataset, detection.flags, params=hiding, progress=True)
    hiding_s = time.perf_counter() - t0
    record = training_record(config, trained.history, data=str(args.data), n_samples=len(dataset))
    defense = {"name": "trap", "report": str(report_dir), "n_isolated": detection.n_flagged,
               "isolation": dataclasses.asdict(trap_params), "isolation_provenance": provenance_of(TrapParams),
               "per_epoch_flagged": [int(r.flags.sum()) for r in isolation.results_],
               "hiding": hidden.config, "hiding_history": hidden.history,
               "hiding_provenance": provenance_of(strategy.Params), "train_seconds_with_isolation": round(train_s, 1),
               "hiding_seconds": round(hiding_s, 1), **({"undefended": undefended} if undefended else {})}
    metrics = save_trained(args.out, hidden.model, normalisation, arch=args.arch, trained_on=dataset,
                           extra={"train": record, "defense": defense}, attack=spec, eval_data=eval_data,
                           eval_source=args.eval_data and str(args.eval_data),
                           dummy_class=hidden.config["dummy_class"])
    print(json.dumps({"out": args.out, "arch": args.arch, "epochs": args.epochs, "defense": "trap",
                      "n_isolated": detection.n_flagged, "report": str(report_dir), **metrics,
                      **({"undefended": undefended} if undefended else {})}))
    return 0


def cmd_eval(args) -> int:
    from .api import evaluate
    from .data.open import open_dataset

    model, meta = _model_from_args(args)
    if args.attack:
        spec = _spec_from_args(args)
    elif args.poison_manifest:
        from .data.attacks.harness import PoisonSpec

        spec = PoisonSpec.load(args.poison_manifest)
    else:
        spec = _spec_recorded_in(meta)
    data = open_dataset(args.data)
    dummy = meta.get("dummy_class")  # a backdoor-hiding model: its last output is the dummy class
    metrics = evaluate(model, meta["normalisation"], data, spec, num_classes=meta["num_classes"],
                       progress=not args.json, dummy_class=dummy)
    out = {"model": args.model, "data": str(args.data), **metrics}
    if spec is not None:
        out["attack"] = spec.to_dict()
    print(json.dumps(out, indent=None if args.json else 2))
    return 0


def cmd_scan(args) -> int:
    from .api import check_reference, scan
    from .data.dataset import ArraySource
    from .data.open import open_source
    from .methods import available_detectors, get_detector, make_detector
    from .methods.consensus import method_list

    _check_out(args.out, kind="dir")
    if args.store:
        _check_out(args.store, kind="dir", flag="--store")
    _check_counts(args, "batch_size", "actors")
    _check_counts(args, "workers", minimum=0)
    params = dict(_parse_param(p) for p in args.param)
    members = method_list(args.method, available_detectors(), have_reference=bool(args.clean))
    if args.seed is not None:
        seeded = {name: get_detector(name).seed_param for name in (members or [args.method])}
        if not any(seeded.values()):
            raise InputError(f"--seed: method {args.method!r} draws nothing at random")
        for name, key in seeded.items():
            if key is not None:
                params[key if members is None else f"{name}.{key}"] = args.seed
    # parameters checked before the model and the data are read
    detector = make_detector(args.method, params, have_reference=bool(args.clean))
    check_reference(detector, args.method, given=bool(args.clean))
    model = meta = None
    if detector.needs_model():
        if not args.model:
            raise InputError(f"--method {args.method} reads the suspect model: --model is required")
        model, meta = _model_from_args(args)
        if args.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise InputError("--device cuda: no CUDA device is available here")
            model = model.cuda()
    elif args.model:
        print(f"backdoor-engine scan: note: --method {args.method} needs no suspect model; --model is not used",
              file=sys.stderr)
    if args.executor == "ray" and (meta is None or ":" in str(args.model)):
        raise InputError("--executor ray runs the suspect model's pass on actors that load our checkpoint file: "
                         f"it serves methods that read a model ({args.method!r} does not) and .pt checkpoints only")
    # Image folders and tar shards stream from disk (at the model's input shape when there is a model); a
    # feature store (default OUT/features) keeps memory bounded and lets an interrupted scan resume.
    data = open_source(args.data, image_size=None if meta is None else tuple(meta["input_size"]),
                       channels=None if meta is None else meta["in_channels"], **_links(args))
    if meta is not None:
        _check_labels_fit(data.y, meta, args.data)
    clean = None
    if args.clean:
        clean = open_source(args.clean, image_size=None if meta is None else tuple(meta["input_size"]),
                            channels=None if meta is None else meta["in_channels"], **_links(args))
        if meta is not None:
            _check_labels_fit(clean.y, meta, args.clean)
        clean = clean.dataset if isinstance(clean, ArraySource) else clean
    streamed = not isinstance(data, ArraySource)
    data = data if streamed else data.dataset
    store = args.store or (os.path.join(args.out, "features") if meta is not None
                           and (streamed or args.executor == "ray") else None)
    if streamed and not args.json:
        print(f"scan: streaming {len(data):,} samples from {args.data}"
              + (f"; features stored in {store}" if store else ""), file=sys.stderr)
    if store and not args.json:
        _say_if_resuming(store, "scan")
    result = scan(data, model, None if meta is None else meta["normalisation"], method=args.method,
                  out_dir=args.out, batch_size=args.batch_size, store=store, workers=args.workers, dtype=args.dtype,
                  executor=args.executor, checkpoint=args.model, actors=args.actors,
                  head="head" if meta is None else meta.get("head", "head"), progress=not args.json,
                  data_name=str(args.data), model_info=_model_info(args, model, meta), clean=clean, **params)
    _print_scan_result(result, args)
    return 0


def _links(args) -> dict:
    """follow_links_outside for the data openers, when the command has --allow-outside-links."""
    allowed = getattr(args, "allow_outside_links", None)
    return {} if allowed is None else {"follow_links_outside": allowed}


def _model_info(args, model, meta) -> dict | None:
    """What report.json and report.html say about the scanned model (plain types)."""
    if meta is None:
        return None
    from .engine.fingerprint import model_fingerprint

    info = {"arch": meta["arch"], "num_classes": meta["num_classes"], "input_size": list(meta["input_size"]),
            "fingerprint": model_fingerprint(model)}
    if ":" in str(args.model) and getattr(args, "weights", None):
        info["weights"] = str(args.weights)
    else:
        info["path"] = str(args.model)
    return info


def _say_if_resuming(store, command: str) -> None:
    """One line when the feature store already holds finished chunks: the run resumes instead of starting over
    (the store's header is checked against this run by the extraction itself; an unreadable one says nothing
    here)."""
    from .engine.feature_store import FeatureStore

    if not (Path(store) / "manifest.json").is_file():
        return
    try:
        existing = FeatureStore.open(store)
        done = sum(stop - start for start, stop in map(existing.chunk_rows, existing.finished_chunks))
        total, chunks = existing.n_samples, existing.num_chunks
    except Exception:
        return
    if existing.finished_chunks:
        print(f"{command}: resuming from {store}: {done:,} of {total:,} samples already extracted "
              f"({len(existing.finished_chunks)} of {chunks} chunks)", file=sys.stderr)


def cmd_triggers(args) -> int:
    from .api import extract_triggers
    from .data.open import open_source

    _check_out(args.out, kind="dir")
    params = dict(_parse_param(p) for p in args.param)
    params.update(seed=args.seed)
    from .methods import get_detector

    get_detector("vbd")(**params)  # parameters checked before the data are read
    data = open_source(args.data, **_links(args))
    result = extract_triggers(data.dataset if hasattr(data, "dataset") else data, out_dir=args.out,
                              progress=not args.json, data_name=str(args.data), **params)
    _print_scan_result(result, args)
    return 0


def _print_scan_result(result, args) -> None:
    if args.json:
        print(json.dumps(result.report))
    else:
        summary = {k: result.report[k] for k in ("method", "n_samples", "n_flagged", "timings_s")}
        summary.update({k: result.report[k] for k in ("metrics",) if k in result.report})
        # A detector that names suspect classes (VBD) gets them in the summary.
        summary.update({k: result.report["diagnostics"][k] for k in ("poisoned_classes",)
                        if k in result.report["diagnostics"]})
        print(json.dumps(summary, indent=2))
        verdict = result.report.get("verdict") or {}
        if verdict.get("headline"):
            print(verdict["headline"])
        if "explanation" in result.report["diagnostics"]:
            print(result.report["diagnostics"]["explanation"])
        if (verdict.get("next") or {}).get("command"):
            print(f"next: {verdict['next']['command']}")
        print(f"report: {args.out}/report.html")


def _purify_params(args) -> dict:
    """--param KEY=VALUE plus the shorthands --epochs / --lr / --seed; each name may be given once."""
    params = {}
    for text in args.param:
        key, value = _parse_param(text)
        if key in params:
            raise InputError(f"--param {key} is given twice")
        params[key] = value
    for key in ("epochs", "lr", "seed"):
        value = getattr(args, key)
        if value is not None:
            if key in params:
                raise InputError(f"{key} is given both as --{key} and as --param {key}=...")
            params[key] = value
    return params


def cmd_purify(args) -> int:
    from .api import purify
    from .data.open import open_dataset
    from .models.checkpoint import load_checkpoint
    from .models.provenance import repair_record, save_trained
    from .params import provenance_of
    from .detection import POISONED
    from .purify import UNUSED, get_repair
    from .report.reading import flags_from_report, split_from_report

    _check_out(args.out, kind="file", suffix=".pt")
    # Strategy, options and declared inputs are checked before any dataset or model is read.
    strategy = get_repair(args.strategy)
    params = _purify_params(args)
    strategy.params(params)
    if args.clean_fraction is not None and args.report is None:
        raise InputError("--clean-fraction selects the clean part from a scan's scores: give --report")
    if args.calibrate and (args.aux is None or args.model is None):
        raise InputError("--calibrate calibrates the --aux set to the suspect --model (GIC): give both")
    if args.gic_param and not args.calibrate:
        raise InputError("--gic-param sets GIC's calibration: add --calibrate")
    strategy.check_declared(has_flags=args.report is not None, has_aux=args.aux is not None, has_arch=True,
                            has_model=args.model is not None)
    if args.model is None and not args.arch:
        raise InputError(f"purify strategy {args.strategy!r} trains from scratch: without --model, name the "
                         "architecture with --arch")
    if args.arch is not None:
        from .models.registry import available_archs

        if args.arch not in available_archs():
            raise InputError(f"--arch {args.arch!r} is not a registered architecture: {', '.join(available_archs())}")
    if args.data is None and strategy.uses_flags != UNUSED:
        raise InputError(f"purify strategy {args.strategy!r} works on the scanned set: give --data")
    aux = None if args.aux is None else open_dataset(args.aux)
    data = None if args.data is None else open_dataset(args.data)
    flags = None
    if args.report is not None:  # check_declared above: a strategy using flags has --data
        flags = (split_from_report(data, args.report, clean_fraction=args.clean_fraction)
                 if strategy.uses_split or args.clean_fraction is not None else flags_from_report(data, args.report))
    eval_data = None if args.eval_data is None else open_dataset(args.eval_data)
    model, meta = (None, None) if args.model is None else load_checkpoint(args.model)
    num_classes = (data if data is not None else aux).num_classes if meta is None else meta["num_classes"]
    arch = args.arch or meta["arch"]
    for given, source in ((data, args.data), (aux, args.aux)):
        if given is not None:
            _check_labels_fit(given.y, {"num_classes": num_classes}, source)
    calibration = None
    if args.calibrate:
        from .auxiliary.gic import GicParams, calibrate
        from .params import build_params

        gic = build_params(GicParams, dict(_parse_param(p) for p in args.gic_param), "purify --calibrate")
        result = calibrate(model, meta["normalisation"], aux, gic, progress=True)
        aux, calibration = result.dataset, result.summary()
        if calibration["warning"]:
            print(f"purify --calibrate: warning: {calibration['warning']}", file=sys.stderr)
    # A strategy that tunes on the auxiliary set alone needs no scanned set: the (calibrated) aux set stands in.
    dataset = data if data is not None else aux
    t0 = time.perf_counter()
    repaired = purify(model, None if meta is None else meta["normalisation"], dataset, flags, strategy=args.strategy,
                      aux=aux, arch=arch, **params)
    seconds = time.perf_counter() - t0
    n_flagged = 0 if flags is None else int((flags == POISONED).sum() if flags.dtype != bool else flags.sum())
    record = repair_record(repaired, strategy=args.strategy, data=None if args.data is None else str(args.data),
                           report=args.report, model=None if args.model is None else str(args.model), n_flagged=n_flagged,
                           seconds=seconds, provenance=provenance_of(strategy.Params), aux=args.aux)
    if args.clean_fraction is not None:
        record["clean_fraction"] = args.clean_fraction
    if calibration is not None:
        record["gic"] = calibration
    if args.aux is not None:
        from .auxiliary.sets import aux_description

        described = aux_description(args.aux)
        record["aux_set"] = {"source": str(args.aux), "n_samples": len(aux), "kind": described["kind"],
                             "calibrated": calibration is not None or described["calibrated"]}
    # The attack to measure ASR with: the suspect model's record, else the manifest beside the data.
    attack = _spec_recorded_in(meta) if meta is not None else _spec_beside(str(args.data), None)
    before = {}
    if eval_data is not None and model is not None:  # the suspect model on the same test set, for the change
        from .models.evaluate import evaluate_model

        before = evaluate_model(model, meta["normalisation"], eval_data, attack, num_classes=num_classes,
                                dummy_class=meta.get("dummy_class"))
        record["before"] = before
    metrics = save_trained(args.out, repaired.model, repaired.normalisation, arch=arch, trained_on=dataset,
                           extra={"purify": record}, attack=attack, eval_data=eval_data,
                           eval_source=args.eval_data, dummy_class=repaired.config.get("dummy_class"))
    # Strategies that choose among their epochs (unlearn-relearn, d-br) say which one came back and why.
    returned = [entry for entry in repaired.history if entry.get("returned")]
    chosen = {} if not returned else {"epoch_returned": returned[0]["epoch"], **{
        key: returned[0][key] for key in ("holdout_flagged_acc", "holdout_clean_acc") if key in returned[0]}}
    aux_set = record.get("aux_set") or {}
    print(json.dumps({"out": args.out, "strategy": args.strategy, "n_flagged": n_flagged,
                      **({"aux_kind": aux_set["kind"], "n_aux": aux_set["n_samples"],
                          "aux_calibrated": aux_set["calibrated"]} if aux_set else {}),
                      "seconds": round(seconds, 1), **chosen, **{f"{k}_before": v for k, v in before.items()},
                      **metrics}))
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    _check_out(args.out, kind="dir")
    _check_counts(args, "epochs")
    run_demo(Path(args.out), epochs=args.epochs, seed=args.seed)
    return 0


def _device_from_args(name: str):
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available here")
    return torch.device(name)


def cmd_extract(args) -> int:
    from .data.dataset import ArraySource
    from .data.open import open_source
    from .engine import extract_features
    from .engine.export import write_capture_npz

    _check_out(args.out, kind="dir")
    _check_counts(args, "batch_size")
    _check_counts(args, "workers", minimum=0)
    capture = tuple(name.strip() for name in args.capture.split(",") if name.strip())
    model, meta = _model_from_args(args)
    model = model.to(_device_from_args(args.device))
    data = open_source(args.data, image_size=tuple(meta["input_size"]), channels=meta["in_channels"],
                       **_links(args))
    _check_labels_fit(data.y, meta, args.data)
    if isinstance(data, ArraySource):
        data = data.dataset
    store = os.path.join(args.out, "features")
    if not args.json:
        print(f"extract: {len(data):,} samples from {args.data}; features stored in {store}", file=sys.stderr)
        _say_if_resuming(store, "extract")
    features = extract_features(model, data, meta["normalisation"], batch_size=args.batch_size, capture=capture,
                                store=store, head=meta["head"], workers=args.workers, dtype=args.dtype,
                                progress=not args.json)
    files = write_capture_npz(features, args.out)
    seconds = features.metadata.get("extract_seconds")
    print(json.dumps({"out": args.out, "store": store, "files": files, "n_samples": len(features),
                      "skipped": len(features.metadata.get("skipped", [])),
                      "columns": {name: int(getattr(features, name).shape[1]) for name in features.captured},
                      "extract_seconds": None if seconds is None else round(seconds, 2),
                      "images_per_second": features.metadata.get("images_per_second")},
                     indent=None if args.json else 2))
    return 0


def cmd_aux(args) -> int:
    import numpy as np

    from .atomic import write_json_atomic
    from .auxiliary.sets import make_aux, sidecar_path
    from .data.dataset import save_npz
    from .data.open import open_dataset

    _check_out(args.out, kind="file", suffix=".npz")
    train = open_dataset(args.train, **_links(args))
    pool = open_dataset(args.pool, **_links(args)) if args.pool else None
    aux = make_aux(args.kind, train, pool, size=args.size, ratio=args.ratio, seed=args.seed)
    info = {"out": args.out, "kind": args.kind, "n_samples": len(aux),
            "per_class": np.bincount(aux.y, minlength=train.num_classes).tolist(),
            "train": str(args.train), "pool": args.pool, "seed": args.seed}
    # The description first: the set, what later steps read, appears last and whole.
    write_json_atomic(sidecar_path(args.out, ".aux.json"), info)
    save_npz(aux, args.out)
    print(json.dumps(info))
    return 0


def cmd_calibrate(args) -> int:
    from .atomic import atomic_write, write_json_atomic
    from .auxiliary.gic import GicParams, calibrate, calibration_page
    from .auxiliary.sets import aux_description, sidecar_path
    from .data.dataset import ArraySource, read_all, save_npz
    from .data.open import open_source
    from .params import build_params

    _check_out(args.out, kind="file", suffix=".npz")
    params = build_params(GicParams, dict(_parse_param(p) for p in args.param), "calibrate")
    model, meta = _model_from_args(args)
    source = open_source(args.aux, image_size=tuple(meta["input_size"]), channels=meta["in_channels"],
                         **_links(args))
    aux = source.dataset if isinstance(source, ArraySource) else read_all(source)
    _check_labels_fit(aux.y, meta, args.aux)
    device = _device_from_args(args.device)
    result = calibrate(model.to(device), meta["normalisation"], aux, params, device=device, progress=not args.json)
    # The summary's name is the one `purify` reads back beside the calibrated set (auxiliary.sets.sidecar_path).
    summary_path, page_path = sidecar_path(args.out, ".gic.json"), sidecar_path(args.out, ".html")
    summary = {"out": args.out, "summary": summary_path, "page": page_path, "aux": str(args.aux),
               "aux_kind": aux_description(args.aux)["kind"], "model": str(args.model), **result.summary()}
    # The page and the summary first: the calibrated set, what later steps read, appears last and whole.
    with atomic_write(page_path, "w") as f:
        f.write(calibration_page(result, aux, source=str(args.aux), model=str(args.model)))
    write_json_atomic(summary_path, summary)
    save_npz(result.dataset, args.out)
    print(json.dumps(summary, indent=None if args.json else 2))
    if summary["warning"]:
        print(f"calibrate: warning: {summary['warning']}", file=sys.stderr)
    return 0


def cmd_bench(args) -> int:
    import torch

    from .bench import device_description, reference_input_shape, run_benchmark, synthetic_images
    from .report import versions

    if (args.arch is None) == (args.model is None):
        raise InputError("give one of --arch NAME (a registered architecture, random weights) or --model M")
    for flag, value in (("--images", args.images), ("--repeats", args.repeats), ("--batch-size", args.batch_size)):
        if value < 1:
            raise InputError(f"{flag} must be >= 1, got {value}")
    device = _device_from_args(args.device)
    if args.arch is not None:
        from .models.registry import build_model

        if args.weights or args.mean or args.std:
            raise InputError("--weights, --mean and --std apply to --model; --arch benchmarks random weights")
        channels, side = reference_input_shape(args.arch)
        side = args.input_size or side
        with torch.random.fork_rng(devices=[]):  # the same random model every run, the caller's RNG untouched
            torch.manual_seed(0)
            model = build_model(args.arch, num_classes=10, in_channels=channels, input_size=side)
        meta = {"in_channels": channels, "input_size": [side, side], "head": "head", "normalisation": None}
    else:
        model, meta = _model_from_args(args, allow_random=True)
    height, width = meta["input_size"]
    if args.data:
        from .data.open import open_source

        source = open_source(args.data, image_size=(height, width), channels=meta["in_channels"])
        images = source.read(0, min(args.images, len(source))).x
        if not len(images):
            raise InputError(f"--data {args.data}: none of its first {args.images} images could be read")
    else:
        images = synthetic_images(args.images, height, width, meta["in_channels"], seed=0)
    normalisation = meta["normalisation"]
    if normalisation is None:
        from .models.preprocess import fit_normalisation

        normalisation = fit_normalisation(images)
    model = model.to(device).eval()
    result = run_benchmark(model, normalisation, images, batch_size=args.batch_size, repeats=args.repeats,
                           head=meta["head"], cluster_rows=args.cluster_rows)
    rates = result["images_per_s"]
    out = {"model": args.arch or args.model, "weights": args.weights, "device": device_description(device),
           "threads": torch.get_num_threads(), "batch_size": args.batch_size, "images": len(images),
           "repeats": args.repeats, "input_size": [height, width], "in_channels": meta["in_channels"],
           "data": args.data or "synthetic",
           "plain_images_per_s": round(rates["plain"], 2), "engine_images_per_s": round(rates["engine"], 2),
           "official_style_images_per_s": round(rates["official"], 2),
           "engine_vs_plain": round(result["engine_vs_plain"], 4),
           "engine_vs_official": round(result["engine_vs_official"], 4),
           "seconds": {name: [round(t, 4) for t in times] for name, times in result["seconds"].items()}}
    if "cluster_seconds" in result:
        out.update(cluster_rows=result["cluster_rows"], cluster_seconds=round(result["cluster_seconds"], 2),
                   cluster_stages_s={k: round(v, 2) for k, v in result["cluster_stages_s"].items()})
    out["versions"] = {**versions(), **_model_library_versions(args.model)}
    print(json.dumps(out, indent=None if args.json else 2))
    return 0


def _model_library_versions(spec) -> dict:
    import importlib.metadata

    library = str(spec).partition(":")[0] if spec and ":" in str(spec) else None
    try:
        return {library: importlib.metadata.version(library)} if library in ("torchvision", "timm") else {}
    except importlib.metadata.PackageNotFoundError:
        return {}


def build_parser() -> argparse.ArgumentParser:
    from .auxiliary.gic import GicParams
    from .auxiliary.sets import KINDS as AUX_KINDS, describe_kinds
    from .engine.prefetch import default_workers
    from .params import provenance_of

    parser = argparse.ArgumentParser(prog="backdoor-engine", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("poison", help="poison a dataset with a backdoor attack (for evaluation)",
                       description="Write a poisoned copy of a dataset (npz with a ground-truth `poison` column) "
                                   "and OUT.attack.json describing the trigger.")
    p.add_argument("--data", required=True, help=DATA_HELP)
    _add_attack_args(p, required=True)
    p.add_argument("--rate", type=float, default=0.1, help="fraction of the dataset poisoned [0.1]")
    p.add_argument("--seed", type=int, default=0, help="seed of the trigger and of the poisoned-sample choice [0]")
    p.add_argument("--adv-model", help="clean checkpoint for label_consistent's PGD step and for building lf's "
                                       "perturbation (written to OUT.lf-trigger.npz), iad's generators and siba's "
                                       "trigger (OUT.iad-trigger.npz, OUT.siba-trigger.npz)")
    p.add_argument("--build-budget", choices=("paper", "cpu"), default="paper",
                   help="iad / siba / issba built here (no --param generator=FILE): the paper's training budget, or "
                        "a small one a CPU finishes in minutes (see each attack's module docstring) [paper]")
    p.add_argument("--build-param", action="append", default=[], metavar="KEY=VALUE",
                   help="setting of that build, repeatable, over the budget's (e.g. epochs=5, max_samples=4000)")
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
    p.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"),
                   help="image folders and tar shards: resize every image to H x W (needed when their sizes differ) "
                        "[the images' own size]")
    p.add_argument("--eval-data", help="clean test set: report BA (and ASR when the data has an attack manifest)")
    p.add_argument("--poison-manifest", help="attack manifest for ASR [DATA's .attack.json when present]")
    p.add_argument("--defense", choices=["trap"],
                   help="train with a defense: trap = TRAP's isolation in the first detect_epochs epochs (t-SNE + "
                        "DBSCAN of the penultimate features), then backdoor hiding (a dummy class, the head "
                        "retrained); the isolation report goes to OUT with .trap instead of .pt")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="--defense trap parameter (scan --help lists trap's: detect_epochs, eps, min_samples, rule, "
                        "...), or hiding_KEY=VALUE for backdoor hiding's (purify --help)")
    p.add_argument("--out", required=True, help="output checkpoint .pt")
    p.add_argument("--allow-outside-links", action="store_true", help=LINKS_HELP)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="benign accuracy (BA) and attack success rate (ASR) of a checkpoint")
    _add_model_args(p, required=True)
    p.add_argument("--data", default="fashion-mnist:test", help="clean test set [fashion-mnist:test]; " + DATA_HELP)
    _add_attack_args(p, required=False)
    p.add_argument("--seed", type=int, default=0, help="attack seed (must match the poisoning run) [0]")
    p.add_argument("--poison-manifest", help="attack manifest (.attack.json) instead of --attack flags "
                                             "[the checkpoint's own record of its training data's attack]")
    p.add_argument("--json", action="store_true", help="one-line JSON, no progress bar")
    p.set_defaults(func=cmd_eval)

    from .methods import available_detectors, get_detector

    methods = available_detectors()
    p = sub.add_parser("scan", help="scan a dataset for poisoned samples with any registered detector",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Run a detector over a dataset: what it reads from the suspect model is "
                                   "extracted in one pass (streamed for image folders and tar shards), then it "
                                   "fits. Writes OUT/report.json, OUT/samples.csv and OUT/report.html (plus the "
                                   "method's own files). Architecture: docs/architecture.md.",
                       epilog="Registered methods, with every parameter (--param KEY=VALUE), its default and "
                              "where that default comes from:\n\n"
                              + "\n\n".join(get_detector(name).describe() for name in methods))
    p.add_argument("--data", required=True, help=DATA_HELP)
    _add_model_args(p, required=False)
    p.add_argument("--method", default="flare", type=_method_choice(methods), metavar="METHOD[,METHOD...]|all",
                   help=f"registered detector ({', '.join(methods)}), several separated by commas, or 'all': "
                        "every method runs from one pass and the report gives each one's flags, their agreement "
                        "and a combined verdict (--param METHOD.KEY=VALUE sets one method's parameter) [flare]")
    p.add_argument("--clean", help="a small clean reference set you vouch for, for the methods that need one "
                   "(SCAn, STRIP): " + DATA_HELP)
    p.add_argument("--out", required=True, help="output folder for the report")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the forward pass runs [cpu]")
    p.add_argument("--seed", type=int, default=None,
                   help="the method's seed parameter (flare: UMAP random_state, official 42; vbd: seed, official 0)")
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
                   help="detector parameter, repeatable, checked against the method's parameters (listed below), "
                        "e.g. reduce=layer, xi=0.02, min_cluster_size=100, sample_size=50000")
    p.add_argument("--json", action="store_true", help="print the whole report.json, no progress output")
    p.add_argument("--allow-outside-links", action="store_true", help=LINKS_HELP)
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
    p.add_argument("--allow-outside-links", action="store_true", help=LINKS_HELP)
    p.set_defaults(func=cmd_triggers)

    from .purify import available_repairs, broken_repairs, get_repair

    repairs, broken = available_repairs(), broken_repairs()
    p = sub.add_parser("purify", help="repair after a scan with any registered strategy (retrain, unlearn-relearn, ...)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Repair a suspect model from the scan's flags (--report), a small clean auxiliary\n"
                                   "set (--aux) or neither, as the strategy declares. The last epoch is kept; no test\n"
                                   "data picks it. The checkpoint records the strategy, its settings and where each\n"
                                   "default comes from.",
                       epilog="Registered strategies, with every parameter (--param KEY=VALUE), its default and "
                              "where that default comes from:\n\n"
                              + "\n\n".join(get_repair(name).describe() for name in repairs)
                              + "".join(f"\n\n{name}: plugin failed to load ({why})" for name, why in broken.items()))
    p.add_argument("--data", help="the scanned dataset (not needed by strategies that tune on --aux alone, e.g. "
                                  "ft); " + DATA_HELP)
    p.add_argument("--model", help="the suspect checkpoint that was scanned (not needed by strategies that train "
                                   "from scratch, e.g. d-st)")
    p.add_argument("--arch", help="architecture of a model trained from scratch [the suspect model's]")
    p.add_argument("--report", help="the scan's report.json (or its folder); for strategies that use flags")
    p.add_argument("--clean-fraction", type=float, default=None, metavar="F",
                   help="take as the clean part only the fraction F of all samples that the scan scored lowest "
                        "(the rest of the unflagged become uncertain; for d-br / d-st after any detector)")
    # A broken plugin stays a valid choice so that asking for it names its load error.
    p.add_argument("--strategy", default="retrain", choices=[*repairs, *broken],
                   help="registered repair strategy (listed below) [retrain]")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="strategy parameter, repeatable, checked against the strategy's parameters (listed below)")
    p.add_argument("--epochs", type=int, default=None, help="shorthand for --param epochs=E [the strategy's default]")
    p.add_argument("--lr", type=float, default=None, help="shorthand for --param lr=LR [the strategy's default]")
    p.add_argument("--seed", type=int, default=None, help="shorthand for --param seed=S [the strategy's default, 0]")
    p.add_argument("--aux", help="small clean auxiliary set, for strategies that take one; " + DATA_HELP)
    p.add_argument("--calibrate", action="store_true",
                   help="calibrate the --aux set to the suspect model with GIC first (see `calibrate --help`)")
    p.add_argument("--gic-param", action="append", default=[], metavar="KEY=VALUE",
                   help="GIC setting with --calibrate: radius, lr, steps, mode, batch_size, fit_warning_acc")
    p.add_argument("--eval-data", help="clean test set: report BA (and ASR from the model's attack record)")
    p.add_argument("--out", required=True, help="output checkpoint .pt")
    p.set_defaults(func=cmd_purify)

    p = sub.add_parser("demo", help="poison Fashion-MNIST, train, (scan,) report: the embedded default job")
    p.add_argument("--out", default="runs/demo", help="output folder [runs/demo]")
    p.add_argument("--epochs", type=int, default=None, help="training epochs [demo default]")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("extract", help="the single pass's features (BN minima, penultimate, logits) for other tools",
                       description="Run the dataset through the model once and write what the detectors read: the "
                                   "feature store OUT/features (chunked, resumable: rerun to finish an interrupted "
                                   "run) and one numpy file per capture, OUT/bn_minima.npz (ids, y, bn_minima, "
                                   "layer_names, layer_channels), OUT/penultimate.npz and OUT/logits.npz (ids, y "
                                   "and the matrix), readable with np.load(allow_pickle=False).")
    p.add_argument("--data", required=True, help=DATA_HELP)
    _add_model_args(p, required=True)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--capture", default="bn_minima,penultimate,logits",
                   help="comma-separated captures; a model without BatchNorm2d has no bn_minima "
                        "[bn_minima,penultimate,logits]")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"], help="where the pass runs [cpu]")
    p.add_argument("--batch-size", type=int, default=256, help="batch size [256]")
    p.add_argument("--workers", type=int, default=default_workers(),
                   help=f"processes decoding images ahead of the model (image folders, tar shards) "
                        f"[{default_workers()} here]")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"],
                   help="feature store precision [float32]")
    p.add_argument("--json", action="store_true", help="one-line JSON summary, no progress output")
    p.add_argument("--allow-outside-links", action="store_true", help=LINKS_HELP)
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("aux", help="build an auxiliary set for the purifiers: seen, reserved, or shifted",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="A small labelled clean set, stratified by class, 5% of the training set by default "
                                   "(BackdoorBenchER's ratio).\n\n" + describe_kinds())
    p.add_argument("--kind", required=True, choices=AUX_KINDS, help="which auxiliary set (above)")
    p.add_argument("--train", required=True, help="the victim's training set (its ids are never drawn for the "
                                                  "reserved kinds; seen draws its clean part); " + DATA_HELP)
    p.add_argument("--pool", help="clean images of the training distribution to reserve from (every kind but "
                                  "seen), e.g. fashion-mnist; " + DATA_HELP)
    p.add_argument("--size", type=int, help="number of images [ratio x the training set]")
    p.add_argument("--ratio", type=float, default=0.05, help="size relative to the training set [0.05]")
    p.add_argument("--seed", type=int, default=0, help="seed of the draw [0]")
    p.add_argument("--out", required=True, help="output .npz")
    p.add_argument("--allow-outside-links", action="store_true", help=LINKS_HELP)
    p.set_defaults(func=cmd_aux)

    p = sub.add_parser("calibrate", help="GIC: calibrate a small auxiliary set to the victim model before a purifier",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Guided Input Calibration: learn g(x) = clip(x + delta, 0, 1) that minimises the "
                                   "victim model's cross-entropy\non the auxiliary labels within ||delta||_inf <= "
                                   "radius (eval mode, the model unchanged). Writes OUT.npz\n(the calibrated set, "
                                   "uint8), OUT.gic.json (settings, loss / accuracy before and after, delta\n"
                                   "statistics) and OUT.html (original, calibrated and perturbation images).",
                       epilog="Parameters (--param KEY=VALUE), defaults and provenance:\n"
                              + "\n".join(f"  {name}={value!r} ({provenance_of(GicParams)[name]})"
                                          for name, value in dataclasses.asdict(GicParams()).items()))
    _add_model_args(p, required=True)
    p.add_argument("--aux", required=True, help="the auxiliary set (images with labels); " + DATA_HELP)
    p.add_argument("--out", required=True, help="the calibrated set, .npz")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="radius, lr, steps, mode (per_sample|universal), batch_size, fit_warning_acc")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"], help="where it runs [cpu]")
    p.add_argument("--json", action="store_true", help="one-line JSON summary, no progress output")
    p.add_argument("--allow-outside-links", action="store_true", help=LINKS_HELP)
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("bench", help="extraction throughput on this machine: plain forward vs engine vs official-style",
                       description="Time, in one process and interleaved (median of --repeats), a plain forward "
                                   "pass, the engine's single-pass extraction and the official FLARE code's "
                                   "extractor (a model copy whose BatchNorm2d layers compute the full log-density) "
                                   "on the same images; optionally the clustering stages. Prints one JSON object: "
                                   "model, device, threads, batch_size, plain_images_per_s, engine_images_per_s, "
                                   "official_style_images_per_s, engine_vs_plain, engine_vs_official, versions, ...")
    p.add_argument("--arch", help="a registered architecture with random weights, at the input it was built for "
                                  "(small_resnet 1x28x28, the others 3x32x32; --input-size overrides)")
    _add_model_args(p, required=False)
    p.add_argument("--data", help="real images (" + DATA_HELP + "), the first --images of them [synthetic, seeded]")
    p.add_argument("--images", type=int, default=512, help="images per timed run [512]")
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions per variant; the median is reported [5]")
    p.add_argument("--batch-size", type=int, default=128, help="batch size [128]")
    p.add_argument("--cluster-rows", type=int, help="also time UMAP + HDBSCAN (official settings) on this many rows "
                                                    "of the engine's features, repeated with noise if fewer")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="[auto: cuda when present]")
    p.add_argument("--json", action="store_true", help="compact one-line JSON (else indented)")
    p.set_defaults(func=cmd_bench)
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
