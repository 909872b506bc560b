"""FCT's tau options on one SD model: does the choice of transformation change how well FCT ranks the poison?

Reads the SD model bench_fct_dbr.py cached for a checkpoint (--cache/<stem>/sd_model.pt, trained once), rebuilds the
poisoned training set from the checkpoint's attack record, and for each tau setting computes FCT's values on the
whole set (the engine's two passes), then the AUROC against the ground truth and the precision of the rank split.
Beside it, whether the trigger survives tau: the SD model's (and the suspect's) attack success on --survival-images
triggered non-target test images, before and after the same tau. FCT can only rank a poisoned sample high when tau
breaks its trigger. Nothing is chosen here: it measures the official code's other tau options (its trans1..trans6).

    python benchmarks/fct_transforms.py --model runs/attacks/blend-a2o-10000-e6.pt --cache runs/fct \
        --transforms rotate,affine rotate affine flip crop blur erase
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from backdoor_engine.data.attacks import harness
from backdoor_engine.data.fashion_mnist import load_fashion_mnist
from backdoor_engine.detection import score_auroc, split_metrics
from backdoor_engine.methods.fct import FctParams, apply_tau, draw_tau, fct_values, split_by_rank
from backdoor_engine.models.checkpoint import load_checkpoint
from backdoor_engine.models.evaluate import predict
from backdoor_engine.models.preprocess import fit_normalisation

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_fct_dbr import sd_model  # noqa: E402
from bench_flare_detection import SEED_HELP, scanned_set  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the checkpoint whose attack record rebuilds the poisoned set")
    p.add_argument("--cache", default="runs/fct")
    p.add_argument("--transforms", nargs="+", default=["rotate,affine"], help="comma-separated tau op lists")
    p.add_argument("--out", help="JSON lines, appended")
    p.add_argument("--seed", type=int, default=None, help=SEED_HELP)
    p.add_argument("--survival-images", type=int, default=2000, help="triggered test images for the survival check")
    args = p.parse_args()
    suspect, meta = load_checkpoint(args.model)
    dataset, case = scanned_set(meta, args.seed)
    cache = Path(args.cache) / Path(args.model).stem
    if not (cache / "sd_model.pt").exists():
        sys.exit(f"{cache / 'sd_model.pt'} is missing: run bench_fct_dbr.py --stages fct on {args.model} first")
    model = sd_model(dataset, cache, FctParams())  # the weights are the same for every tau
    truth = dataset.poison.astype(bool)
    normalisation = fit_normalisation(dataset.x)
    triggered = harness.triggered_test(load_fashion_mnist("test"), harness.PoisonSpec.from_dict(meta["attack"]),
                                       num_classes=dataset.num_classes)
    trig_x, trig_y = triggered.x[:args.survival_images], triggered.y_attack[:args.survival_images]
    for ops in args.transforms:
        params = FctParams(transforms=tuple(ops.split(",")))
        t0 = time.perf_counter()
        values, _ = fct_values(model, dataset, normalisation, params)
        parts = split_metrics(split_by_rank(values, params.clean_ratio, params.poison_ratio), truth)
        seconds = time.perf_counter() - t0
        draws = draw_tau(len(trig_x), trig_x.shape[1:], params)
        moved = apply_tau(trig_x, draws, np.arange(len(trig_x)), params.transforms)
        survival = {}
        for name, net, norm in (("sd", model, normalisation), ("suspect", suspect, meta["normalisation"])):
            survival[f"{name}_asr"] = round(float(np.mean(predict(net, trig_x, norm) == trig_y)), 4)
            survival[f"{name}_asr_after_tau"] = round(float(np.mean(predict(net, moved, norm) == trig_y)), 4)
        row = {"model": args.model, "attack": case[0], "mode": case[1], "transforms": ops,
               "auroc": round(score_auroc(values, truth), 4), "poisoned_precision": parts["poisoned_precision"],
               "clean_poison_share": parts["clean_poison_share"], **survival, "seconds": round(seconds, 1),
               "threads": torch.get_num_threads(), "torch": torch.__version__}
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
