"""The embedded default job: poison Fashion-MNIST with BadNets, train the small ResNet, measure BA/ASR, scan."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from . import api
from .data.attacks import harness
from .models.provenance import save_trained
from .atomic import write_json_atomic
from .errors import InputError

DEMO_SPEC = harness.PoisonSpec(attack="badnets", mode="a2o", rate=0.1, target=0, seed=0)
DEMO_ARCH = "small_resnet"
# Measured in benchmarks/RESULTS.md: enough for BA >= 90% and ASR >= 95% on this spec.
DEMO_EPOCHS = 6


def run_demo(out: Path, *, epochs: int | None = None, seed: int = 0) -> dict:
    from .data.fashion_mnist import load_fashion_mnist
    from .models.provenance import training_record
    from .models.train import TrainConfig

    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1):
        raise InputError(f"epochs must be an integer >= 1, got {epochs!r}")  # before anything is written
    epochs = epochs or DEMO_EPOCHS
    out.mkdir(parents=True, exist_ok=True)
    spec = dataclasses.replace(DEMO_SPEC, seed=seed)
    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")

    print(f"[1/4] poisoning Fashion-MNIST: {spec.attack} {spec.mode} rate {spec.rate} target {spec.target}")
    poisoned, result = harness.poison(train, spec)
    data_path = out / "poisoned.npz"
    harness.save_poisoned(poisoned, result, spec, data_path, source="fashion-mnist")

    print(f"[2/4] training {DEMO_ARCH} for {epochs} epochs on {len(poisoned)} images")
    config = TrainConfig(epochs=epochs, seed=seed)
    trained = api.train(poisoned, arch=DEMO_ARCH, config=config)
    record = training_record(config, trained.history, data=str(data_path), n_samples=len(poisoned))

    print("[3/4] measuring benign accuracy and attack success rate on Fashion-MNIST test")
    metrics = save_trained(out / "model.pt", trained.model, trained.normalisation, arch=DEMO_ARCH,
                               trained_on=poisoned, extra={"train": record}, attack=spec, eval_data=test,
                               eval_source="fashion-mnist:test")
    summary = {"data": str(data_path), "model": str(out / "model.pt"), "arch": DEMO_ARCH, "epochs": epochs,
               "train_seconds": record["seconds"], **metrics}
    write_json_atomic(out / "summary.json", summary)
    print(json.dumps(summary, indent=2))

    print("[4/4] scanning the poisoned training set with FLARE")
    result = api.scan(poisoned, trained.model, trained.normalisation, out_dir=out / "scan", data_name=str(data_path),
                      model_info={"arch": DEMO_ARCH, "path": str(out / "model.pt")})
    summary["scan"] = {k: result.report[k] for k in ("n_flagged", "timings_s", "metrics") if k in result.report}
    write_json_atomic(out / "summary.json", summary)
    print(json.dumps(summary["scan"], indent=2))
    print(f"Report: {out / 'scan' / 'report.html'}")
    return summary
