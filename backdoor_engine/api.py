"""The thin public face: poison a dataset, train a model on it, measure BA and ASR.

Each function works on in-memory objects; the CLI adds file I/O around them.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .data.dataset import Dataset, make_dataset
from .errors import InputError


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


def _build_attack(spec: PoisonSpec, image_shape, clean_model=None):
    from .data.attacks import make_attack

    params = dict(spec.params)
    if spec.attack == "label_consistent":
        if clean_model is None:
            raise InputError("attack 'label_consistent' needs a clean model for its PGD step (--adv-model CLEAN.pt)")
        from .models.preprocess import Normalisation

        model, normalisation = clean_model
        if isinstance(normalisation, Normalisation):
            normalisation = normalisation.to_dict()
        params.update(model=model, normalisation=normalisation)
    return make_attack(spec.attack, image_shape, seed=spec.seed, **params)


def poison(dataset: Dataset, spec: PoisonSpec, *, clean_model=None):
    """Poison `dataset` by `spec`; returns (poisoned Dataset with ground truth, PoisonResult)."""
    from .data.attacks import poison_dataset

    attack = _build_attack(spec, dataset.image_shape, clean_model)
    result = poison_dataset(
        dataset.x, dataset.y, attack, mode=spec.mode, rate=spec.rate, target=spec.target,
        num_classes=dataset.num_classes, seed=spec.seed,
    )
    poisoned = make_dataset(result.x, result.y, ids=dataset.ids, poison=result.mask.astype(np.uint8),
                            num_classes=dataset.num_classes)
    return poisoned, result


def save_poisoned(poisoned: Dataset, result, spec: PoisonSpec, path: str | os.PathLike, *, source: str) -> dict:
    """Write the poisoned npz and its attack manifest beside it; returns the manifest."""
    from .atomic import write_json_atomic
    from .data.dataset import save_npz

    save_npz(poisoned, path)
    manifest = {**spec.to_dict(), "source": source, "n_samples": len(poisoned),
                "n_poisoned": int(result.mask.sum()), "n_cover": int(result.cover.sum()),
                "num_classes": poisoned.num_classes, "attack_params": result.params}
    write_json_atomic(manifest_path(path), manifest)
    return manifest


def save_trained(path: str | os.PathLike, model, normalisation, *, arch: str, trained_on: Dataset,
                 extra: dict | None = None) -> None:
    """Checkpoint a model with the shape metadata of the dataset it was trained on."""
    from .models.checkpoint import save_checkpoint

    h, w, c = trained_on.image_shape
    save_checkpoint(path, model, arch=arch, num_classes=trained_on.num_classes, in_channels=c, input_size=[h, w],
                    normalisation=normalisation, extra=extra)


def triggered_test(dataset: Dataset, spec: PoisonSpec, *, num_classes: int):
    """The triggered copy of a clean test set used for ASR (target class left out for a2o)."""
    from .data.attacks import make_attack, triggered_test_set

    attack = make_attack(spec.attack, dataset.image_shape, seed=spec.seed, **spec.params)
    return triggered_test_set(dataset.x, dataset.y, attack, mode=spec.mode, target=spec.target,
                              num_classes=num_classes, seed=spec.seed)


def evaluate(model, normalisation, clean: Dataset, spec: PoisonSpec | None = None, *,
             num_classes: int | None = None, batch_size: int = 256, progress: bool = False) -> dict:
    """Benign accuracy on `clean`, and the attack success rate of `spec`'s trigger on it when given."""
    from .models.evaluate import accuracy, attack_success_rate, predict

    num_classes = num_classes or clean.num_classes
    pred = predict(model, clean.x, normalisation, batch_size=batch_size, progress=progress)
    out = {"ba": float(accuracy(pred, clean.y)), "n_clean": int(len(clean))}
    if spec is not None:
        trig = triggered_test(clean, spec, num_classes=num_classes)
        pred_t = predict(model, trig.x, normalisation, batch_size=batch_size, progress=progress)
        out["asr"] = float(attack_success_rate(pred_t, trig.y_attack, trig.y_true, spec.mode))
        out["n_triggered"] = int(len(trig.y_attack))
    return out


@dataclass
class ScanReport:
    """What `scan` found: the report dict (report.json), the Detection and the extracted features."""

    report: dict
    detection: object
    features: object


METHODS = ("flare", "vbd")


def scan(dataset, model=None, normalisation=None, *, method: str = "flare", out_dir=None,
         batch_size: int = 256, store=None, kernel_backend: str = "auto", workers: int = 0, dtype: str = "float32",
         executor: str = "local", checkpoint=None, actors: int = 2, progress: bool = True, **params) -> ScanReport:
    """Run a detector over `dataset` (a Dataset, or a Source streamed from disk) and write the report
    to out_dir (when given).

    "flare": extract every sample's BN minima from the suspect `model` in one pass (`workers`
    processes decode ahead; with `store`, features go to disk in `dtype` and are memory-mapped back),
    then cluster: every row up to `exact_max_samples`, beyond that a stratified sample with the rest
    assigned by kNN vote (methods.flare_sampled). Unreadable images are skipped and listed.
    executor="ray": the extraction runs on `actors` Ray Data actors, each loading `checkpoint` (the
    file `model` was loaded from) into the feature store `store` (required); clustering stays here.
    "vbd": needs no suspect model (it trains its own simple models): the same as `extract_triggers`.
    """
    import time

    from .data.source import Source, SourceRows, as_source
    from .engine import extract_features
    from .methods.flare_sampled import SampledFlare
    from .report import build_report, write_report
    from .report.figures import condensed_tree_png, embedding_png, subspace_search_png

    if method not in METHODS:
        raise InputError(f"method: expected one of {METHODS}, got {method!r}")
    if method == "vbd":
        if isinstance(dataset, Source):
            from .data.sources import read_all

            dataset = read_all(dataset)
        return extract_triggers(dataset, out_dir=out_dir, progress=progress, **params)
    if model is None or normalisation is None:
        raise InputError("method 'flare' scans with the suspect model: pass the model and its normalisation")
    detector = SampledFlare(**params)  # parameters checked before the long extraction
    source = as_source(dataset)
    timings = {}
    t0 = time.perf_counter()
    if executor == "ray":
        from .engine.ray_executor import extract_features_ray

        if checkpoint is None or store is None:
            raise InputError("executor 'ray': give the checkpoint file (each actor loads it) and a feature store")
        features = extract_features_ray(checkpoint, source, store=store, actors=actors, batch_size=batch_size,
                                        backend=kernel_backend, dtype=dtype, progress=progress)
    elif executor == "local":
        features = extract_features(model, source, normalisation, batch_size=batch_size, store=store,
                                    backend=kernel_backend, workers=workers, dtype=dtype,
                                    memory_map=store is not None, progress=progress)
    else:
        raise InputError(f"executor: expected 'local' or 'ray', got {executor!r}")
    timings["extract"] = time.perf_counter() - t0
    skipped = [*source.listing_skipped, *features.metadata["skipped"]]
    skipped_ids = {sample_id for sample_id, _ in features.metadata["skipped"]}
    kept = np.arange(len(source)) if not skipped_ids else np.flatnonzero(~np.isin(source.ids, list(skipped_ids)))
    rows = dataset if isinstance(dataset, Dataset) and not skipped_ids else SourceRows(source, kept)

    def report_step(step):
        if progress:
            found = "stable split" if step.split else "no stable split"
            print(f"flare: {step.dropped_layers} trailing layer(s) dropped, {step.n_columns} columns: {found} "
                  f"(largest gap {max(step.gaps, default=0.0):.4g}, threshold {step.threshold:.4g}, "
                  f"{step.seconds:.1f} s)", flush=True)

    t0 = time.perf_counter()
    detection = detector.fit(features.bn_minima, features.layout, y=features.y, progress=report_step)
    timings["detect"] = time.perf_counter() - t0
    notes = []
    if skipped:
        shown = "; ".join(f"{sample_id}: {reason}" for sample_id, reason in skipped[:5])
        notes.append(f"{len(skipped)} file(s) or sample(s) could not be read and were skipped (all listed in "
                     f"report.json under skipped): {shown}{' ...' if len(skipped) > 5 else ''}")
    sampled = detection.diagnostics["sampled"]
    if sampled["n_sample"] < sampled["n_rows"]:
        notes.append(f"FLARE clustered a stratified sample of {sampled['n_sample']:,} of the {sampled['n_rows']:,} "
                     f"samples; every other sample took the flag of most of its {sampled['assign_k']} nearest "
                     "sample rows (score = the flagged share)")
    if out_dir is None:
        report = build_report(detection, rows, timings_s=timings)
        report["skipped"] = [{"id": sample_id, "reason": reason} for sample_id, reason in skipped]
        return ScanReport(report, detection, features)
    flare = detector.flare_
    figures = [("Stable-subspace search", subspace_search_png(detection.diagnostics["steps"]))]
    if detection.embedding is None and flare.embedding_ is not None:
        truth = None if rows.poison is None else rows.poison[detector.sample_]
        figures.append(("2-D embedding of the clustered sample", embedding_png(flare.embedding_, flare.flags_, truth)))
    if flare.condensed_tree_ is not None:
        d = detection.diagnostics
        marks = {d["split"]["node"]: ("#3b6fb6", "stable cluster (subspace test)")}
        if d.get("flagged_node") is not None:
            marks[d["flagged_node"]] = ("#d64545", "flagged: the more stable cluster")
        figures.append(("Condensed tree of the chosen subspace", condensed_tree_png(flare.condensed_tree_, marks)))
    report = write_report(out_dir, detection, rows, timings_s=timings, figures=figures, notes=notes,
                          extra={"skipped": [{"id": sample_id, "reason": reason} for sample_id, reason in skipped]})
    return ScanReport(report, detection, features)


def extract_triggers(dataset: Dataset, *, out_dir=None, progress: bool = True, **params) -> ScanReport:
    """VBD: find the poisoned classes with no clean data and no suspect model, extract each class's trigger
    (mask and pattern), flag the samples carrying it. With out_dir: report.json / samples.csv / report.html
    plus trigger_class<c>.png and mask_class<c>.png per trigger and triggers.npz (label, mask, pattern)."""
    from .methods.vbd import Vbd
    from .report import build_report, write_report

    vbd = Vbd(**params)
    detection = vbd.fit(dataset.x, dataset.y, num_classes=dataset.num_classes, progress=progress)
    timings = dict(detection.diagnostics["timings_s"])
    if out_dir is None:
        return ScanReport(build_report(detection, dataset, timings_s=timings), detection, None)
    figures = _write_trigger_files(out_dir, vbd, detection, dataset)
    notes = [detection.diagnostics["explanation"]] if "explanation" in detection.diagnostics else []
    report = write_report(out_dir, detection, dataset, timings_s=timings, figures=figures, notes=notes)
    return ScanReport(report, detection, None)


def _write_trigger_files(out_dir, vbd, detection, dataset: Dataset) -> list[tuple[str, bytes]]:
    """Per kept trigger: its PNGs and a panel for the HTML (pattern, mask, flagged samples outlined); all
    triggers' arrays in triggers.npz. Returns the HTML figures."""
    from .atomic import atomic_write
    from .report.figures import mask_png, trigger_panel_png, trigger_png

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures, arrays = [], {}
    for label, trigger in sorted(vbd.triggers_.items()):
        for name, png in ((f"trigger_class{label}.png", trigger_png(trigger.pixels, trigger.mask)),
                          (f"mask_class{label}.png", mask_png(trigger.mask))):
            with atomic_write(out_dir / name) as f:
                f.write(png)
        arrays.update({f"mask_{label}": trigger.mask.astype(np.uint8), f"pattern_{label}": trigger.pattern,
                       f"pixels_{label}": trigger.pixels})
        shown = np.flatnonzero(detection.flags & (dataset.y == label))
        shown = shown[np.argsort(-detection.scores[shown], kind="stable")][:14]
        titles = [f"{dataset.ids[i]} p={detection.scores[i]:.2f}" for i in shown]
        state = "detector kept" if trigger.detector_kept else "detector dropped (training accuracy below the bar)"
        title = (f"Trigger of class {label}: model {trigger.arch}, KS p={trigger.p_value:.2g}, "
                 f"ASR {100 * trigger.asr:.0f}%, {state}, {trigger.n_flagged} flagged")
        figures.append((title, trigger_panel_png(trigger.pixels, trigger.mask, dataset.x[shown], titles)))
    if arrays:
        with atomic_write(out_dir / "triggers.npz") as f:
            np.savez(f, **arrays)
    return figures


def flags_from_report(dataset: Dataset, report_path: str | os.PathLike) -> np.ndarray:
    """One bool per sample of `dataset`: True where the scan report (report.json) flagged its id."""
    path = Path(report_path)
    if path.is_dir():
        path = path / "report.json"
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise InputError(f"cannot read the scan report {path}: {error}") from None
    if not isinstance(report, dict) or not isinstance(report.get("flagged"), list):
        raise InputError(f"{path} is not a scan report (no 'flagged' list)")
    if report.get("n_samples") != len(dataset):
        raise InputError(f"{path} covers {report.get('n_samples')} samples but the dataset has {len(dataset)}: "
                         "it is the report of another dataset")
    position = {str(i): k for k, i in enumerate(dataset.ids.tolist())}
    unknown = [i for i in report["flagged"] if str(i) not in position]
    if unknown:
        raise InputError(f"{path} flags {len(unknown)} id(s) the dataset does not have, e.g. {unknown[:3]}")
    flags = np.zeros(len(dataset), bool)
    flags[[position[str(i)] for i in report["flagged"]]] = True
    return flags
