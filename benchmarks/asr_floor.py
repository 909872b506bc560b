"""The attack success rate a model with no backdoor already has: the floor under every ASR target.

An a2o ASR counts triggered non-target test images predicted as the target; a clean model confuses some images into
the target class anyway (on Fashion-MNIST, shirts and pullovers into class 0, T-shirt/top), so a repaired model
cannot be expected to go below that share. This trains a model on the clean subset train_attacks.py draws (same
size, seed, arch, epochs) and evaluates every --attacks x --modes trigger on it, one JSON line each.

    python benchmarks/asr_floor.py --train-size 10000 --epochs 6 --attacks badnets blend trojan sig --modes a2o \
        --out benchmarks/results/asr_floor.jsonl
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from backdoor_engine import api
from backdoor_engine.data.attacks import harness
from backdoor_engine.data.fashion_mnist import load_fashion_mnist
from backdoor_engine.models.provenance import save_trained
from backdoor_engine.models.train import TrainConfig, train_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_attacks import subset, sweep_cases  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON lines, appended")
    p.add_argument("--attacks", nargs="+", default=["badnets", "blend", "trojan"])
    p.add_argument("--modes", nargs="+", default=["a2o"])
    p.add_argument("--train-size", type=int, default=10000)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--arch", default="small_resnet")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", help="also keep the clean model here (a checkpoint)")
    args = p.parse_args()
    train = subset(load_fashion_mnist("train"), args.train_size, args.seed)
    test = load_fashion_mnist("test")
    t0 = time.perf_counter()
    trained = train_model(train.x, train.y, arch=args.arch, num_classes=10,
                          config=TrainConfig(epochs=args.epochs, seed=args.seed, progress=False))
    train_s = time.perf_counter() - t0
    if args.save:
        save_trained(args.save, trained.model, trained.normalisation, arch=args.arch, trained_on=train,
                     extra={"train_size": len(train)})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for attack, mode in sweep_cases(args.attacks, args.modes):
        spec = harness.PoisonSpec(attack=attack, mode=mode, rate=0.1, target=0, seed=args.seed)
        metrics = api.evaluate(trained.model, trained.normalisation, test, spec, num_classes=10)
        row = {"attack": attack, "mode": mode, "train_size": len(train), "epochs": args.epochs, "arch": args.arch,
               "clean_model_ba": metrics["ba"], "clean_model_asr": metrics["asr"],
               "n_triggered": metrics["n_triggered"],
               "train_s": round(train_s, 1), "seed": args.seed, "threads": torch.get_num_threads(),
               "torch": torch.__version__, "cpu": platform.processor() or platform.machine()}
        print(json.dumps(row), flush=True)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
