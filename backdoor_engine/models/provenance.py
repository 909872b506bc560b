"""What a checkpoint records about how its model came to be, beyond the shape keys a scan needs.

The checkpoint meta holds one record per producer: "train" (`train`, the demo) or "purify" (`purify`),
plus "attack" (the PoisonSpec its training data carried, so `eval` needs no attack flags) and "eval"
(BA/ASR measured before saving, with the data they were measured on). The builders live here so the
three writers cannot drift apart in field names.
"""

from __future__ import annotations

import dataclasses
import os


def _settings(config) -> dict:
    """A config dataclass (or dict) as plain values, without the display-only `progress` switch."""
    values = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    values.pop("progress", None)
    return values


def training_record(config, history: list[dict], *, data: str, n_samples: int) -> dict:
    """The "train" record: data, size, the full TrainConfig, per-epoch history and the epochs' total seconds."""
    seconds = sum(epoch.get("seconds", 0.0) for epoch in history)
    return {"data": data, "n_samples": int(n_samples), "seconds": round(seconds, 1), "config": _settings(config),
            "history": history}


def repair_record(repaired, *, strategy: str, data: str, report: str | None, model: str, n_flagged: int,
                  seconds: float, provenance: dict[str, str], aux: str | None = None) -> dict:
    """The "purify" record: inputs, the settings used, where each default came from, the history."""
    return {"strategy": strategy, "data": data, "report": report, "aux": aux, "model": model,
            "n_removed_or_unlearned": int(n_flagged), "seconds": round(seconds, 1), "config": _settings(repaired.config),
            "param_provenance": dict(provenance), "history": repaired.history}


def evaluation_record(metrics: dict, *, data: str | None) -> dict:
    """The "eval" record: the metrics and the data they were measured on."""
    return {"data": data, **metrics}


def save_trained(path: str | os.PathLike, model, normalisation, *, arch: str, trained_on,
                 extra: dict | None = None, attack=None, eval_data=None,
                 eval_source: str | None = None, progress: bool = False, dummy_class: int | None = None) -> dict:
    """Checkpoint a model with the shape metadata of the dataset it was trained on and its provenance.

    extra: the producer's record ({"train": ...} or {"purify": ...}, see models.provenance). attack: the
    attack its training data carried, recorded so `eval` needs no flags. eval_data: a clean test set on
    which BA (and `attack`'s ASR) is measured before saving and recorded under "eval" with `eval_source`.
    Returns those metrics ({} without eval_data). The one place train, purify and the demo save through.
    dummy_class: the model has one output more than the data's classes, this one (backdoor hiding); recorded
    in the checkpoint so that `eval` reads it.
    """
    from .checkpoint import save_checkpoint
    from .evaluate import evaluate_model

    extra = dict(extra or {})
    if attack is not None:
        extra["attack"] = attack.to_dict()
    num_classes = trained_on.num_classes
    if dummy_class is not None:
        extra["dummy_class"] = int(dummy_class)
        num_classes = int(dummy_class) + 1
    metrics = {}
    if eval_data is not None:
        metrics = evaluate_model(model, normalisation, eval_data, attack, num_classes=trained_on.num_classes,
                                 progress=progress, dummy_class=dummy_class)
        extra["eval"] = evaluation_record(metrics, data=eval_source)
    h, w, c = trained_on.image_shape
    save_checkpoint(path, model, arch=arch, num_classes=num_classes, in_channels=c, input_size=[h, w],
                    normalisation=normalisation, extra=extra)
    return metrics
