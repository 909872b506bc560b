"""The thin public face: scan, purify, extract_triggers, train, evaluate (docs/architecture.md).

Each function works on in-memory objects; the CLI adds file I/O around them. The evaluation harness
(poisoning, manifests, triggered test sets) is data.attacks.harness; saving with provenance is
models.provenance.save_trained; reading a report's flags is report.reading.flags_from_report.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data.dataset import Dataset
from .errors import InputError


def train(dataset: Dataset, *, arch: str, config=None, normalisation=None, callback=None):
    """A fresh `arch` trained on `dataset` with the seeded trainer (models.train.TrainConfig, defaults when
    None); returns TrainResult(model, normalisation, history)."""
    from .models.train import TrainConfig, train_model

    return train_model(dataset.x, dataset.y, arch=arch, num_classes=dataset.num_classes,
                       config=TrainConfig() if config is None else config, normalisation=normalisation,
                       callback=callback)


def evaluate(model, normalisation, clean: Dataset, spec=None, *, num_classes: int | None = None,
             batch_size: int = 256, progress: bool = False, dummy_class: int | None = None) -> dict:
    """Benign accuracy on `clean`, and the attack success rate of `spec`'s trigger (a data.attacks.harness
    PoisonSpec) on it when given; with `dummy_class` (a backdoor-hiding model's extra output) how often clean
    and triggered images land in it."""
    from .models.evaluate import evaluate_model

    return evaluate_model(model, normalisation, clean, spec, num_classes=num_classes, batch_size=batch_size,
                          progress=progress, dummy_class=dummy_class)


def purify(model, normalisation, dataset: Dataset, flags: np.ndarray | None = None, *, strategy: str = "retrain",
           aux: Dataset | None = None, arch: str | None = None, progress: bool = True, **params):
    """Repair a suspect model with a registered strategy (purify.available_repairs()); returns
    purify.Repaired(model, normalisation, history, config).

    flags: the scan's per-sample bools (strategies that use them); aux: a small clean auxiliary set
    (strategies that take one); arch: the suspect's architecture name (strategies that train a fresh
    model). `params` are the strategy's options (e.g. epochs=5, lr=1e-3), checked against its Params.
    """
    from .purify import get_repair

    return get_repair(strategy).apply(model, normalisation, dataset, flags, aux, params=params, arch=arch,
                                      progress=progress)


@dataclass
class ScanReport:
    """What `scan` found: the report dict (report.json), the Detection and the extracted features."""

    report: dict
    detection: object
    features: object


def scan(dataset, model=None, normalisation=None, *, method: str = "flare", out_dir=None,
         batch_size: int = 256, store=None, kernel_backend: str = "auto", workers: int = 0, dtype: str = "float32",
         executor: str = "local", checkpoint=None, actors: int = 2, head: str = "head", pixel_cache=None,
         progress: bool = True, data_name: str | None = None, model_info: dict | None = None, clean=None,
         **params) -> ScanReport:
    """Run the registered detector `method` over `dataset` (a Dataset, or a Source streamed from disk) and
    write the report to out_dir (report.json, samples.csv, report.html and the detector's own files).

    1. the detector is made from `params` (checked before any work: unknown names, types, choices);
    2. what it needs is extracted in ONE pass of the suspect `model` (methods.base: BN minima, penultimate
       features, logits; `head` names the classifier module): `workers` processes decode ahead; with `store`,
       features go to disk in `dtype` and are memory-mapped back; executor="ray" runs the pass on `actors`
       Ray Data actors, each loading `checkpoint` (the file `model` came from) into `store` (required).
       A detector that trains its own models (needs "pixels") gets the decoded images instead: a streamed
       source is decoded once into a memory-mapped file under `pixel_cache` (default OUT/pixels);
    3. fit, then report. Unreadable images are skipped and listed in the report.
    A detector that needs a clean reference set (SCAn, STRIP) reads `clean` (a Dataset or Source the user
    vouches for), extracted the same way in a pass of its own; a detector that needs the model itself (extra
    passes by definition) gets it with its normalisation.

    The report names what was scanned: `data` {source: data_name or the source's description, fingerprint,
    fingerprint_of} (purify refuses flags of another dataset by it) and `model` (`model_info`, the caller's
    plain-typed description of the suspect model: arch, path, ...), when given.
    """
    import time

    from .data.dataset import as_source, read_all
    from .data.source import SourceRows
    from .methods import PIXELS, ScanData, make_detector
    from .report import build_report, write_report
    from .report.verdict import build_verdict

    detector = make_detector(method, params, have_reference=clean is not None)
    source = as_source(dataset)
    timings, features, pixels = {}, None, None
    skipped = list(source.listing_skipped)
    kept = np.arange(len(source))
    if detector.needs_model() and (model is None or normalisation is None):
        raise InputError(f"method {method!r} reads the suspect model: pass the model and its normalisation")
    check_reference(detector, method, given=clean is not None)
    if detector.captures():
        t0 = time.perf_counter()
        features = _extract(detector.captures(), model, source, normalisation, batch_size=batch_size, store=store,
                            kernel_backend=kernel_backend, workers=workers, dtype=dtype, executor=executor,
                            checkpoint=checkpoint, actors=actors, head=head, progress=progress)
        timings["extract"] = time.perf_counter() - t0
        skipped += features.metadata["skipped"]
        skipped_ids = {sample_id for sample_id, _ in features.metadata["skipped"]}
        if skipped_ids:
            kept = np.flatnonzero(~np.isin(source.ids, list(skipped_ids)))
    if PIXELS in detector.needs:
        t0 = time.perf_counter()
        if isinstance(dataset, Dataset):
            pixels = dataset
        else:  # decoded once; into a memory-mapped file when there is a place for it (bounded memory at any N)
            failures = []
            cache = pixel_cache or (None if out_dir is None else Path(out_dir) / "pixels")
            pixels = read_all(source, into=cache, skipped=failures)
            timings["decode"] = time.perf_counter() - t0
            skipped += failures
            kept = np.flatnonzero(np.isin(source.ids, pixels.ids))
    reference = None
    if clean is not None:
        t0 = time.perf_counter()
        reference = _reference(detector, clean, model, normalisation, num_classes=source.num_classes,
                               batch_size=batch_size, kernel_backend=kernel_backend, workers=workers)
        timings["reference"] = time.perf_counter() - t0
    rows = dataset if isinstance(dataset, Dataset) and len(kept) == len(source) else SourceRows(source, kept)
    data = ScanData(ids=source.ids[kept], y=source.y[kept], num_classes=source.num_classes, features=features,
                    pixels=pixels, progress=progress, reference=reference,
                    **({"model": model, "normalisation": normalisation} if detector.needs_model() else {}))
    t0 = time.perf_counter()
    detection = detector.fit_scan(data)
    timings["detect"] = time.perf_counter() - t0
    timings.update(detection.diagnostics.get("timings_s", {}))
    skipped_field = {"skipped": [{"id": sample_id, "reason": reason} for sample_id, reason in skipped]}
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    parts = detector.report(detection, rows, out_dir)
    notes = list(parts.notes)
    if skipped:
        shown = "; ".join(f"{sample_id}: {reason}" for sample_id, reason in skipped[:5])
        notes.insert(0, f"{len(skipped)} file(s) or sample(s) could not be read and were skipped (all listed in "
                        f"report.json under skipped): {shown}{' ...' if len(skipped) > 5 else ''}")
    scanned = {"source": data_name or source.description, "fingerprint": source.fingerprint(),
               "fingerprint_of": type(source).__name__}
    extra = {**skipped_field, "data": scanned, **({} if model_info is None else {"model": model_info}),
             **parts.extra}
    verdict, verdict_figures = build_verdict(detection, rows, extra, num_classes=source.num_classes,
                                             class_names=getattr(source, "class_names", ()), out_dir=out_dir)
    extra["verdict"] = verdict
    if out_dir is None:
        return ScanReport({**build_report(detection, rows, timings_s=timings), **extra}, detection, features)
    report = write_report(out_dir, detection, rows, timings_s=timings, figures=verdict_figures + parts.figures,
                          notes=notes, extra=extra)
    return ScanReport(report, detection, features)


def check_reference(detector, method, *, given: bool) -> None:
    """A clean reference set is given exactly when the detector reads one (CLI and API, before any work)."""
    if detector.needs_reference() and not given:
        raise InputError(f"method {method!r} needs a small clean reference set that you vouch for (CLI: --clean "
                         "DIR_OR_FILE; API: clean=Dataset); without one it cannot run")
    if given and not detector.needs_reference():
        raise InputError(f"method {method!r} does not read a clean reference set; drop clean= / --clean")


def _reference(detector, clean, model, normalisation, *, num_classes: int, **settings):
    """The clean reference set as a ScanData: the same captures as the suspect set (in memory: it is small), and
    its decoded images when the detector reads pixels."""
    from .data.dataset import as_source, read_all
    from .methods import PIXELS, ScanData

    source = as_source(clean)
    if len(source) == 0:
        raise InputError("the clean reference set is empty")
    if source.num_classes != num_classes:
        raise InputError(f"the clean reference set has {source.num_classes} classes, the scanned set {num_classes}: "
                         "they must share one label space")
    features, kept = None, np.arange(len(source))
    if detector.captures():
        features = _extract(detector.captures(), model, source, normalisation, executor="local", checkpoint=None,
                            store=None, actors=1, progress=False, **settings)
        skipped_ids = {sample_id for sample_id, _ in features.metadata["skipped"]}
        if skipped_ids:
            kept = np.flatnonzero(~np.isin(source.ids, list(skipped_ids)))
    pixels = None
    if PIXELS in detector.needs:
        pixels = clean if isinstance(clean, Dataset) else read_all(source)
        kept = np.flatnonzero(np.isin(source.ids, pixels.ids))
    return ScanData(ids=source.ids[kept], y=source.y[kept], num_classes=num_classes, features=features,
                    pixels=pixels)


def _extract(capture, model, source, normalisation, *, executor: str, checkpoint, store, actors: int,
             kernel_backend: str, **settings):
    from .engine import extract_features

    if executor == "ray":
        from .engine.ray_executor import extract_features_ray

        if checkpoint is None or store is None:
            raise InputError("executor 'ray': give the checkpoint file (each actor loads it) and a feature store")
        return extract_features_ray(checkpoint, source, store=store, actors=actors, capture=capture,
                                    backend=kernel_backend, **settings)
    if executor != "local":
        raise InputError(f"executor: expected 'local' or 'ray', got {executor!r}")
    return extract_features(model, source, normalisation, capture=capture, store=store, backend=kernel_backend,
                            memory_map=store is not None, **settings)


def extract_triggers(dataset, *, out_dir=None, progress: bool = True, **params) -> ScanReport:
    """VBD: find the poisoned classes with no clean data and no suspect model, extract each class's trigger
    (mask and pattern), flag the samples carrying it. With out_dir: report.json / samples.csv / report.html
    plus trigger_class<c>.png and mask_class<c>.png per trigger and triggers.npz (label, mask, pattern)."""
    return scan(dataset, method="vbd", out_dir=out_dir, progress=progress, **params)


