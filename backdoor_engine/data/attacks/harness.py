"""The evaluation harness: a poisoning run as a spec (the same spec rebuilds the same trigger), the poisoned
set and its manifest on disk, and the triggered test set that ASR is measured on."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ...errors import InputError
from ..dataset import Dataset, make_dataset


@dataclass(frozen=True)
class PoisonSpec:
    """Everything needed to rebuild an attack's trigger: the same spec gives the same trigger."""

    attack: str
    mode: str = "a2o"
    rate: float = 0.1
    target: int = 0
    seed: int = 0
    params: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PoisonSpec":
        known = {"attack", "mode", "rate", "target", "seed", "params"}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PoisonSpec":
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise InputError(f"cannot read poison manifest {path}: {e}") from None
        if not isinstance(d, dict) or "attack" not in d:
            raise InputError(f"poison manifest {path} has no 'attack' field")
        return cls.from_dict(d)


def manifest_path(npz_path: str | os.PathLike) -> Path:
    """Where `poison` writes the attack manifest beside its npz (the npz contract allows no extra fields)."""
    p = Path(npz_path)
    return p.with_name(p.name[: -len(".npz")] + ".attack.json" if p.name.endswith(".npz") else p.name + ".attack.json")


def build_attack(spec: PoisonSpec, image_shape, clean_model=None):
    from . import make_attack

    params = dict(spec.params)
    if spec.attack == "label_consistent":
        if clean_model is None:
            raise InputError("attack 'label_consistent' needs a clean model for its PGD step (--adv-model CLEAN.pt)")
        from ...models.preprocess import Normalisation

        model, normalisation = clean_model
        if isinstance(normalisation, Normalisation):
            normalisation = normalisation.to_dict()
        params.update(model=model, normalisation=normalisation)
    return make_attack(spec.attack, image_shape, seed=spec.seed, **params)


def trigger_file_path(npz_path: str | os.PathLike, attack: str) -> Path:
    """Where `poison` writes an attack's built trigger beside its output npz: OUT.<attack>-trigger.npz."""
    p = Path(npz_path)
    return p.with_name(f"{p.name.removesuffix('.npz')}.{attack}-trigger.npz")


def needs_clean_model(attack: str, params: dict) -> bool:
    """Whether poisoning with `attack` and `params` needs a clean model of the data: to build its trigger (lf, iad
    and siba, unless `params` names a built trigger file) or to poison (label_consistent's PGD step). Callers that
    train the clean model themselves ask this first: training one costs as long as the poisoned model."""
    from . import _attack_class

    cls = _attack_class(attack)
    return cls.needs_clean_model and (cls.trigger_file_param is None or cls.trigger_file_param not in params)


def prepare_spec(dataset: Dataset, spec: PoisonSpec, *, clean_model=None, trigger_path=None, budget: str = "paper",
                 settings: dict | None = None, progress=None) -> PoisonSpec:
    """The spec itself, unless its attack stores a built trigger (an attack class with a `trigger_file_param`:
    lf, iad, siba, issba) and the spec names no file: then the trigger is built on `dataset` (from `clean_model`
    = (model, normalisation) where the attack needs one) with the builder's `budget` ("paper" or "cpu") and
    `settings` overrides, written to `trigger_path`, and the returned spec records that file (absolute path, and
    its sha256 where the attack checks it), so `triggered_test` and `eval` rebuild the same trigger."""
    from . import _attack_class, attack_param_names

    attack = _attack_class(spec.attack)
    param = attack.trigger_file_param
    if param is None or param in spec.params:
        if settings:
            raise InputError(f"build settings {sorted(settings)} apply only when a trigger file is built (an "
                             f"attack storing its trigger, without --param {param or 'generator'}=...)")
        return spec
    unknown = sorted(set(spec.params) - set(attack_param_names(spec.attack)))
    if unknown:  # before the build, which takes a while
        raise InputError(f"{spec.attack}: unknown parameter(s) {unknown}; "
                         f"valid: {sorted(attack_param_names(spec.attack))}")
    if needs_clean_model(spec.attack, spec.params) and clean_model is None:
        raise InputError(f"attack {spec.attack!r} needs a clean model to build its trigger (--adv-model CLEAN.pt), "
                         f"or a built trigger file (--param {param}=FILE.npz)")
    if trigger_path is None:
        raise InputError(f"attack {spec.attack!r}: no path given to write its trigger file to")
    added = attack.build_trigger(dataset, spec, Path(trigger_path).resolve(), clean_model=clean_model,
                                 budget=budget, settings=dict(settings or {}), progress=progress)
    return PoisonSpec(**{**spec.to_dict(), "params": {**spec.params, **added}})


def poison(dataset: Dataset, spec: PoisonSpec, *, clean_model=None):
    """Poison `dataset` by `spec`; returns (poisoned Dataset with ground truth, PoisonResult)."""
    from . import poison_dataset

    # poison_dataset poisons int(N * rate) samples: a rate that rounds to none would write an unpoisoned copy
    # and report success (checked before the attack is built: label_consistent's PGD step takes a while).
    if not len(dataset) * spec.rate >= 1:  # also false for NaN
        raise InputError(f"rate: {spec.rate} of {len(dataset)} samples rounds to 0 poisoned samples; "
                         f"give a rate >= {1 / max(len(dataset), 1):.3g}")
    attack = build_attack(spec, dataset.image_shape, clean_model)
    result = poison_dataset(
        dataset.x, dataset.y, attack, mode=spec.mode, rate=spec.rate, target=spec.target,
        num_classes=dataset.num_classes, seed=spec.seed,
    )
    poisoned = make_dataset(result.x, result.y, ids=dataset.ids, poison=result.mask.astype(np.uint8),
                            num_classes=dataset.num_classes)
    return poisoned, result


def save_poisoned(poisoned: Dataset, result, spec: PoisonSpec, path: str | os.PathLike, *, source: str) -> dict:
    """Write the poisoned npz and its attack manifest beside it; returns the manifest."""
    from ...atomic import write_json_atomic
    from ..dataset import save_npz

    save_npz(poisoned, path)
    manifest = {**spec.to_dict(), "source": source, "n_samples": len(poisoned),
                "n_poisoned": int(result.mask.sum()), "n_cover": int(result.cover.sum()),
                "num_classes": poisoned.num_classes, "attack_params": result.params}
    write_json_atomic(manifest_path(path), manifest)
    return manifest


def triggered_test(dataset: Dataset, spec: PoisonSpec, *, num_classes: int):
    """The triggered copy of a clean test set used for ASR (target class left out for a2o)."""
    from . import make_attack, triggered_test_set

    attack = make_attack(spec.attack, dataset.image_shape, seed=spec.seed, **spec.params)
    return triggered_test_set(dataset.x, dataset.y, attack, mode=spec.mode, target=spec.target,
                              num_classes=num_classes, seed=spec.seed)
