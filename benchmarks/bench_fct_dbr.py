"""FCT's split, D-BR / FLARE(R) / D-ST repairs, and FCT's pass speed, on the checkpoints of train_attacks.py.

For each checkpoint (`train_attacks.py --models-dir` or `backdoor-engine train`), the poisoned training set is
rebuilt from its attack record (bench_flare_detection.scanned_set) and, per stage:
  fct      Fct(**params).fit(x, y): precision of the poisoned part, poison share of the clean part, AUROC of the
           FCT values, time; the split and values cached in --cache/<stem>/fct.npz for the repairs
  speed    the SD model's plain forward vs FCT's two passes (plain + transformed), interleaved, median of
           --repeats, on --speed-images images: images/s and the ratio
  d-br     purify d-br with FCT's split, for each --unlearn setting of the unlearning pass (UNLEARN_VARIANTS):
           BA / ASR on the Fashion-MNIST test set before and after, and the training-split criterion
           (flagged_acc: eval-mode accuracy on the un-augmented poisoned part) of the last epoch
  flare-r  purify unlearn-relearn with FLARE's flags (FLARE re-run on the cached single-pass features of
           bench_baselines.py under --feature-cache), the same settings
  d-st     purify d-st with FCT's split at a CPU budget (--dst-param), BA / ASR, and a model trained normally on
           the same data with the same arch for the comparison the issue asks (BA within 3 points)
One JSON line per (model, stage, variant) is appended to --out (resumable). No threshold or epoch is chosen with
test data: test BA / ASR are only reported.

    python benchmarks/bench_fct_dbr.py --models runs/attacks/badnets-a2o-10000-e6.pt --stages fct speed d-br \
        --cache runs/fct --out benchmarks/results/fct_dbr.jsonl
    python benchmarks/bench_fct_dbr.py --out benchmarks/results/fct_dbr.jsonl --table
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
from backdoor_engine.cli import _parse_param
from backdoor_engine.data.attacks import harness
from backdoor_engine.data.fashion_mnist import load_fashion_mnist
from backdoor_engine.detection import score_auroc, split_metrics
from backdoor_engine.methods import get_detector
from backdoor_engine.models.checkpoint import load_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_flare_detection import SEED_HELP, scanned_set  # noqa: E402

STAGES = ("fct", "speed", "d-br", "flare-r", "d-st")
# The unlearning pass's settings compared (d-br, flare-r): the default (the margin loss, un-augmented, BatchNorm
# statistics frozen, the epoch chosen on held-out parts of the training split), the official code's (cross-entropy
# ascent, augmented, BatchNorm in train mode; the last epoch here, since its own choice reads test ASR), and the
# steps between them.
UNLEARN_VARIANTS = {
    "margin, frozen BN, held-out epoch": {"unlearn_augment": False, "unlearn_loss": "margin",
                                          "unlearn_frozen_bn": True, "select": "holdout"},
    "margin, frozen BN": {"unlearn_augment": False, "unlearn_loss": "margin", "unlearn_frozen_bn": True,
                          "select": "last"},
    "ce, frozen BN": {"unlearn_augment": False, "unlearn_loss": "ce", "unlearn_frozen_bn": True, "select": "last"},
    "ce, BN train mode": {"unlearn_augment": False, "unlearn_loss": "ce", "unlearn_frozen_bn": False,
                          "select": "last"},
    "ce, BN train mode, held-out epoch": {"unlearn_augment": False, "unlearn_loss": "ce", "unlearn_frozen_bn": False,
                                          "select": "holdout"},
    "ce, augmented, BN train mode": {"unlearn_augment": True, "unlearn_loss": "ce", "unlearn_frozen_bn": False,
                                     "select": "last"},
}


def _parse(values) -> dict:
    """--fct-param / --dst-param KEY=VALUE pairs, read as the CLI's --param is."""
    return dict(_parse_param(text) for text in values or [])


def _versions() -> dict:
    return {"torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine()}


def poison_truth(dataset) -> np.ndarray:
    """The ground-truth poison mask; all False on a clean set (no poison column): the split's parts are then FPR."""
    return np.zeros(len(dataset), bool) if dataset.poison is None else dataset.poison.astype(bool)


def fct_stage(dataset, cache: Path, params: dict) -> dict:
    path = cache / "fct.npz"
    t0 = time.perf_counter()
    detector = get_detector("fct")(**params)
    detection = detector.fit(dataset.x, dataset.y, num_classes=dataset.num_classes)
    seconds = time.perf_counter() - t0
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, split=detection.split, values=detection.scores)
    torch.save(detector.model_.state_dict(), cache / "sd_model.pt")
    truth = poison_truth(dataset)
    parts = split_metrics(detection.split, truth)
    return {"poisoned_precision": parts["poisoned_precision"], "clean_poison_share": parts["clean_poison_share"],
            "split": {k: parts[k] for k in ("clean", "uncertain", "poisoned")},
            "auroc": score_auroc(detection.scores, truth), "seconds": round(seconds, 1),
            "timings_s": {k: round(v, 2) for k, v in detection.diagnostics["timings_s"].items()},
            "sd_history": detection.diagnostics["sd_history"], "params": detection.params}


def sd_model(dataset, cache: Path, params):
    """The SD model fct_stage kept in `cache` (fresh weights when none was kept), in eval mode."""
    from backdoor_engine.models.registry import build_model, default_arch

    model = build_model(params.arch or default_arch(dataset.image_shape), num_classes=dataset.num_classes,
                        in_channels=dataset.image_shape[-1], input_size=dataset.image_shape[:2])
    state = cache / "sd_model.pt"
    if state.exists():
        model.load_state_dict(torch.load(state, weights_only=True))
    return model.eval()


def speed_stage(dataset, cache: Path, params: dict, images: int, repeats: int) -> dict:
    """Plain forward of the SD model vs FCT's two passes, interleaved, median of `repeats`."""
    from backdoor_engine.data.dataset import Dataset
    from backdoor_engine.methods.fct import FctParams, fct_values
    from backdoor_engine.models.preprocess import fit_normalisation, to_model_input

    fct_params = FctParams(**params)
    model = sd_model(dataset, cache, fct_params)
    subset = Dataset(dataset.x[:images], dataset.y[:images])
    normalisation = fit_normalisation(dataset.x)
    batch = fct_params.pass_batch_size

    def plain():
        t0 = time.perf_counter()
        with torch.no_grad():
            for start in range(0, len(subset), batch):
                inputs = to_model_input(subset.x[start:start + batch], normalisation)
                model(inputs.contiguous(memory_format=torch.channels_last))
        return time.perf_counter() - t0

    def two_passes():
        t0 = time.perf_counter()
        fct_values(model, subset, normalisation, fct_params)
        return time.perf_counter() - t0

    model.to(memory_format=torch.channels_last)
    plain()  # warm-up
    plain_s, fct_s = [], []
    for _ in range(repeats):
        plain_s.append(plain())
        fct_s.append(two_passes())
    plain_rate = images / float(np.median(plain_s))
    pass_rate = 2 * images / float(np.median(fct_s))  # images through the model per second, both passes
    return {"images": images, "repeats": repeats, "plain_images_per_s": round(plain_rate, 1),
            "fct_pass_images_per_s": round(pass_rate, 1), "ratio": round(pass_rate / plain_rate, 3)}


def repair_stage(strategy, model, meta, dataset, flags, params: dict, test) -> dict:
    spec = harness.PoisonSpec.from_dict(meta["attack"])
    before = api.evaluate(model, meta["normalisation"], test, spec, num_classes=dataset.num_classes)
    t0 = time.perf_counter()
    repaired = api.purify(model, meta["normalisation"], dataset, flags, strategy=strategy, arch=meta["arch"],
                          progress=False, **params)
    seconds = time.perf_counter() - t0
    after = api.evaluate(repaired.model, repaired.normalisation, test, spec, num_classes=dataset.num_classes)
    returned = [h for h in repaired.history if h.get("returned")] or repaired.history[-1:]
    return {"ba_before": before["ba"], "asr_before": before["asr"], "ba_after": after["ba"], "asr_after": after["asr"],
            "seconds": round(seconds, 1), "last_epoch": repaired.history[-1], "returned_epoch": returned[0],
            "history": repaired.history, "params": params,
            "config": {k: v for k, v in repaired.config.items() if k != "progress"}}


def flare_flags(model, meta, dataset, feature_cache: Path):
    from backdoor_engine.engine import extract_features

    features = extract_features(model, dataset, meta["normalisation"], capture=("bn_minima", "penultimate"),
                                store=feature_cache, progress=False)
    return get_detector("flare")().fit(features.bn_minima, features.layout, y=np.asarray(features.y)).flags


def run(args):
    out = Path(args.out)
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    done = {(r["model"], r["stage"], r.get("variant", "")) for r in rows}
    test = load_fashion_mnist("test")
    fct_params = _parse(args.fct_param)
    for model_path in args.models:
        model, meta = load_checkpoint(model_path)
        dataset, case = scanned_set(meta, args.seed)
        cache = Path(args.cache) / Path(model_path).stem

        def emit(stage, variant, result):
            row = {"model": str(model_path), "attack": case[0], "mode": case[1], "n": len(dataset),
                   "n_poison": int(poison_truth(dataset).sum()),
                   "stage": stage, "variant": variant, **result, "versions": _versions()}
            print(json.dumps({k: v for k, v in row.items() if k not in ("sd_history", "params", "config",
                                                                        "versions")}), flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")

        todo = lambda stage, variant="": stage in args.stages and (str(model_path), stage, variant) not in done  # noqa: E731
        if todo("fct") or (not (cache / "fct.npz").exists() and {"d-br", "d-st"} & set(args.stages)):
            emit("fct", "", fct_stage(dataset, cache, fct_params))
        if todo("speed"):
            emit("speed", "", speed_stage(dataset, cache, fct_params, args.speed_images, args.repeats))
        split = np.load(cache / "fct.npz")["split"] if (cache / "fct.npz").exists() else None
        for name in args.unlearn:
            settings = UNLEARN_VARIANTS[name]
            variant = f"unlearn {name}"
            if todo("d-br", variant):
                emit("d-br", variant, repair_stage("d-br", model, meta, dataset, split, settings, test))
            if todo("flare-r", variant):
                flags = flare_flags(model, meta, dataset, Path(args.feature_cache) / Path(model_path).stem)
                result = repair_stage("unlearn-relearn", model, meta, dataset, flags, settings, test)
                truth = poison_truth(dataset)
                emit("flare-r", variant, {**result, "n_flagged": int(flags.sum()),
                                          "flag_tpr": float((flags & truth).sum() / max(truth.sum(), 1))})
        dst_params = _parse(args.dst_param)
        dst_variant = ", ".join(f"{k}={v}" for k, v in sorted(dst_params.items()) if k != "encoder_path")
        if todo("d-st", dst_variant):
            result = repair_stage("d-st", model, meta, dataset, split, dst_params, test)
            reference = normal_reference(meta, dataset, cache, args.normal_epochs, test)
            emit("d-st", dst_variant, {**result, **reference})


def normal_reference(meta, dataset, cache: Path, epochs: int, test) -> dict:
    """BA / ASR of a model trained normally on the same poisoned set with the same arch (D-ST's comparison), trained
    once per checkpoint and kept in the cache."""
    from backdoor_engine.models.train import TrainConfig

    path = cache / f"normal-e{epochs}.json"
    if path.exists():
        return json.loads(path.read_text())
    normal = api.train(dataset, arch=meta["arch"], config=TrainConfig(epochs=epochs, progress=False))
    spec = harness.PoisonSpec.from_dict(meta["attack"])
    reference = api.evaluate(normal.model, normal.normalisation, test, spec, num_classes=dataset.num_classes)
    out = {"normal_ba": reference["ba"], "normal_asr": reference["asr"], "normal_epochs": epochs}
    cache.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out))
    return out


def print_table(rows):
    fct = [r for r in rows if r["stage"] == "fct"]
    if fct:
        print("| attack | mode | n | poison | poisoned part precision | clean part poison share | AUROC | SD model s "
              "| passes s |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in fct:
            t = r["timings_s"]
            print(f"| {r['attack']} | {r['mode']} | {r['n']} | {r['n_poison']} | {100 * r['poisoned_precision']:.1f}% "
                  f"| {100 * r['clean_poison_share']:.2f}% | {r['auroc']:.4f} | {t['sd_model']:.0f} "
                  f"| {t['plain_pass'] + t['transformed_pass']:.1f} |")
    for r in (r for r in rows if r["stage"] == "speed"):
        print(f"\nFCT passes on {r['attack']} {r['mode']}: plain forward {r['plain_images_per_s']} img/s, FCT's two "
              f"passes {r['fct_pass_images_per_s']} img/s, ratio {r['ratio']} (median of {r['repeats']}, "
              f"{r['images']} images, {r['versions']['threads']} threads)")
    repairs = [r for r in rows if r["stage"] in ("d-br", "flare-r", "d-st")]
    if repairs:
        print("\n| repair | attack | mode | variant | BA before | ASR before | BA after | ASR after | epoch returned "
              "| flagged_acc | held-out flagged / clean acc | s |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
        for r in repairs:
            chosen = r.get("returned_epoch", r.get("last_epoch", {}))
            held = (f"{pct(chosen['holdout_flagged_acc'])} / {pct(chosen['holdout_clean_acc'])}"
                    if "holdout_score" in chosen else "-")
            print(f"| {r['stage']} | {r['attack']} | {r['mode']} | {r['variant']} | {100 * r['ba_before']:.2f}% "
                  f"| {100 * r['asr_before']:.2f}% | {100 * r['ba_after']:.2f}% | {100 * r['asr_after']:.2f}% "
                  f"| {chosen.get('epoch', '-')} | {pct(chosen.get('flagged_acc'))} | {held} | {r['seconds']:.0f} |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON lines, appended (resumable)")
    p.add_argument("--table", action="store_true")
    p.add_argument("--models", nargs="*", default=[])
    p.add_argument("--stages", nargs="+", default=["fct", "speed", "d-br"], choices=STAGES)
    p.add_argument("--cache", default="runs/fct", help="FCT splits and SD models, one folder per model")
    p.add_argument("--feature-cache", default="runs/feat", help="bench_baselines.py's feature stores (flare-r)")
    p.add_argument("--fct-param", action="append", help="FCT parameter KEY=VALUE (JSON values)")
    p.add_argument("--dst-param", action="append", help="D-ST parameter KEY=VALUE, the CPU budget (each setting is "
                   "its own row; encoder_path=P keeps stage 1 so rows that differ in stage 2 share it)")
    p.add_argument("--unlearn", nargs="+", default=["margin, frozen BN, held-out epoch"],
                   choices=list(UNLEARN_VARIANTS),
                   help="d-br / flare-r: the unlearning pass's settings to run [the default's]")
    p.add_argument("--normal-epochs", type=int, default=6, help="epochs of the normally trained reference (d-st)")
    p.add_argument("--speed-images", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=None, help=SEED_HELP)
    args = p.parse_args()
    if args.table:
        print_table([json.loads(line) for line in Path(args.out).read_text().splitlines()])
        return
    run(args)


if __name__ == "__main__":
    main()
