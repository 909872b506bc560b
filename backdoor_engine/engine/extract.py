"""Single-pass extraction: one forward pass over the dataset with probes attached.

Everything the detectors read per sample (BN minima, penultimate features, logits) comes from this
one pass; the FLARE subspace loop slices its columns instead of re-running the model. The pass is
deterministic: eval mode, no gradients, the model's own normalisation and no augmentation (the
BackdoorBox FLARE test extracts through random flips without normalisation; SEED_NOTES 1.1).
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Iterable
from contextlib import closing, contextmanager

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from backdoor_engine import __version__
from backdoor_engine.data import Dataset
from backdoor_engine.data.dataset import ArraySource, as_source
from backdoor_engine.data.source import Source
from backdoor_engine.engine.feature_set import FeatureSet
from backdoor_engine.engine.feature_store import (
    DEFAULT_CHUNK_SIZE,
    FeatureStore,
    check_chunk_size,
    check_feature_dtype,
)
from backdoor_engine.engine.fingerprint import model_fingerprint
from backdoor_engine.engine.prefetch import read_ahead
from backdoor_engine.engine.probes import ActivationProbes
from backdoor_engine.errors import InputError
from backdoor_engine.models import Normalisation, to_model_input

_PROBE_RANGE = 64  # samples read at a time while looking for the first readable one


def extract_features(model: nn.Module, data: Dataset | Source, normalisation: Normalisation, *,
                     batch_size: int = 256, capture: Iterable[str] = ("bn_minima",),
                     store: str | os.PathLike | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
                     backend: str = "auto", head: str = "head", channels_last: bool = True, workers: int = 0,
                     dtype: str = "float32", memory_map: bool = False, progress: bool = True) -> FeatureSet:
    """Run `data` (a Dataset, or a Source streamed range by range) through `model` once and return
    the captured features, one row per readable sample in source order.

    capture: any of "bn_minima", "penultimate", "logits". backend: the bn_minima kernel ("auto",
    "cpp", "torch"). head: the module whose input/output are the penultimate features/logits.
    The data is processed in chunks of `chunk_size` rows, batches of `batch_size` within each;
    `workers` processes decode the batches ahead of the model (0: decode in this process; an
    in-memory Dataset has nothing to decode and never uses them).
    A sample its source cannot decode is left out and listed in metadata["skipped"] (id, reason).
    With `store` (a directory), every finished chunk is written there in `dtype` ("float32" or
    "float16") and a rerun with the same model, data and settings skips the finished chunks
    (resume); the features then come back from the store, concatenated into memory, or with
    `memory_map` memory-mapped from one file per array (bounded memory at any N).
    channels_last: run convolutions in the channels_last memory format (measured on one CPU thread:
    +10% images/s for ResNet-18 at 32x32, +2% for small_resnet at 28x28); the model's parameters
    take that format during the pass and get their own tensors back afterwards, as the model gets
    back its train/eval mode.
    """
    source = as_source(data)
    if not isinstance(normalisation, Normalisation):
        raise InputError(f"normalisation must be a Normalisation, got {type(normalisation).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    check_chunk_size(chunk_size)
    check_feature_dtype(dtype)
    if store is None and (dtype != "float32" or memory_map):
        raise InputError("dtype float16 and memory_map apply to features kept in a store: give store")
    probes = ActivationProbes(model, capture=capture, head=head, backend=backend)
    device = _device_of(model)
    reads_head = bool({"penultimate", "logits"} & set(probes.capture))
    metadata = {"model_fingerprint": model_fingerprint(model), "dataset_fingerprint": source.fingerprint(),
                "n_samples": len(source), "normalisation": normalisation.to_dict(), "head": head if reads_head else None,
                "capture": list(probes.capture), "backend": backend, "batch_size": batch_size,
                "chunk_size": chunk_size, "channels_last": channels_last, "device": str(device),
                "workers": workers, "dtype": dtype, "engine_version": __version__}

    def run_batch(images: np.ndarray) -> dict[str, torch.Tensor]:
        inputs = to_model_input(torch.from_numpy(np.ascontiguousarray(images)).to(device), normalisation)
        if channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        model(inputs)
        return probes.collect()

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _memory_format(model, channels_last), probes:
            columns = _columns_of_one_sample(run_batch, source)
            run = functools.partial(_run_chunks, run_batch, source, batch_size=batch_size,
                                    workers=0 if isinstance(source, ArraySource) else workers, progress=progress)
            if store is None:
                return _extract_in_memory(run, source, columns, probes.layout, chunk_size, metadata)
            return _extract_into_store(run, source, columns, probes.layout, chunk_size, metadata, store, dtype,
                                       memory_map)
    finally:
        model.train(was_training)


def _extract_in_memory(run, source: Source, columns: dict[str, int], layout, chunk_size: int,
                       metadata: dict) -> FeatureSet:
    arrays = {name: np.empty((len(source), count), np.float32) for name, count in columns.items()}
    readable = np.zeros(len(source), bool)
    skipped = []

    def views_of_arrays(start: int, stop: int) -> dict[str, np.ndarray]:
        return {name: values[start:stop] for name, values in arrays.items()}

    def chunk_done(index: int, start: int, stop: int, buffers, kept: np.ndarray, failures) -> None:
        readable[start:stop] = kept
        skipped.extend(failures)

    metadata.update(run(_chunks(len(source), chunk_size, skip=()), views_of_arrays, chunk_done), skipped=skipped)
    if not readable.all():
        arrays = {name: values[readable] for name, values in arrays.items()}
    return FeatureSet(source.ids[readable], source.y[readable], layout, metadata=metadata, **arrays)


def _extract_into_store(run, source: Source, columns: dict[str, int], layout, chunk_size: int, metadata: dict,
                        store: str | os.PathLike, dtype: str, memory_map: bool) -> FeatureSet:
    with open_store(store, source, columns, layout, metadata, chunk_size, dtype) as feature_store:

        def new_buffers(start: int, stop: int) -> dict[str, np.ndarray]:
            return {name: np.empty((stop - start, count), np.float32) for name, count in columns.items()}

        def write_chunk(index: int, start: int, stop: int, buffers, kept: np.ndarray, failures) -> None:
            feature_store.write_chunk(index, source.ids[start:stop][kept], source.y[start:stop][kept],
                                      {name: values[kept] for name, values in buffers.items()}, skipped=failures)

        chunks = _chunks(len(source), chunk_size, skip=feature_store.finished_chunks)
        metadata.update(run(chunks, new_buffers, write_chunk), store=str(feature_store.directory))
        stored = feature_store.load(memory_map=memory_map)
    metadata["skipped"] = stored.metadata["skipped"]
    return FeatureSet(stored.ids, stored.y, stored.layout, stored.bn_minima, stored.penultimate, stored.logits,
                      metadata)


def open_store(store: str | os.PathLike, source: Source, columns: dict[str, int], layout, metadata: dict,
               chunk_size: int, dtype: str) -> FeatureStore:
    """The feature store for extracting `source`, new or resumed, its header taken from the extraction's
    `metadata` (normalisation, head, model and dataset fingerprints): every executor writes the same
    header, so a store begun by one is resumed by another."""
    return FeatureStore.create_or_resume(
        store, n_samples=len(source), chunk_size=chunk_size, columns=columns, ids_dtype=source.ids.dtype,
        layout=layout, normalisation=metadata["normalisation"], head=metadata["head"],
        model_fingerprint=metadata["model_fingerprint"], dataset_fingerprint=metadata["dataset_fingerprint"],
        dtype=dtype)


def _chunks(n_samples: int, chunk_size: int, skip: Iterable[int]) -> list[tuple[int, int, int]]:
    """(index, start, stop) of every chunk not in `skip`."""
    finished = set(skip)
    return [(index, start, min(start + chunk_size, n_samples))
            for index, start in enumerate(range(0, n_samples, chunk_size)) if index not in finished]


def _run_chunks(run_batch, source: Source, chunks, buffers_for, chunk_done, *, batch_size: int, workers: int,
                progress: bool) -> dict:
    """Fill each chunk's buffers (from buffers_for(start, stop)) batch by batch with the readable
    samples' features, then hand them to chunk_done(index, start, stop, buffers, kept, failures),
    `kept` the chunk's readable rows (bool) and `failures` its unreadable samples (id, reason).
    Batches never straddle chunks; decoding runs ahead across chunk boundaries. Returns counts and
    timing for the metadata."""
    ranges = [(batch_start, min(batch_start + batch_size, stop))
              for _, start, stop in chunks for batch_start in range(start, stop, batch_size)]
    batches = read_ahead(source, ranges, workers=workers)
    rows = sum(stop - start for _, start, stop in chunks)
    began = time.perf_counter()
    # closing() stops the decode workers however the loop ends (a model error, a KeyboardInterrupt).
    with closing(batches), tqdm(total=rows, disable=not progress, desc="extract", unit="img") as bar:
        for index, start, stop in chunks:
            buffers = buffers_for(start, stop)
            kept = np.zeros(stop - start, bool)
            failures = []
            for _ in range(start, stop, batch_size):
                batch = next(batches)
                failures.extend(batch.failures)
                if len(batch.kept):
                    rows_in_chunk = batch.kept - start
                    kept[rows_in_chunk] = True
                    for name, values in run_batch(batch.x).items():
                        buffers[name][rows_in_chunk] = values.cpu().numpy()
                bar.update(len(batch.kept) + len(batch.failures))
            chunk_done(index, start, stop, buffers, kept, failures)
    seconds = time.perf_counter() - began
    return {"extracted_samples": rows, "extract_seconds": seconds,
            "images_per_second": rows / seconds if rows else None}


def _columns_of_one_sample(run_batch, source: Source) -> dict[str, int]:
    """Run the first readable sample alone: its output widths size the buffers and the store, and a
    model that cannot take these images fails here, before anything is written."""
    for start in range(0, len(source), _PROBE_RANGE):
        batch = source.read(start, min(start + _PROBE_RANGE, len(source)))
        if len(batch.kept):
            break
    else:
        raise InputError(f"none of the {len(source)} samples of {source.description} can be read")
    try:
        captured = run_batch(batch.x[:1])
    except InputError:
        raise
    except RuntimeError as error:
        raise InputError(f"the model cannot run on this dataset's images: {error}") from None
    return {name: int(values.shape[1]) for name, values in captured.items()}


def _device_of(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return torch.device("cpu") if parameter is None else parameter.device


@contextmanager
def _memory_format(model: nn.Module, channels_last: bool):
    """Conv weights in channels_last for the pass; each parameter gets its own tensor back after."""
    if not channels_last:
        yield
        return
    originals = {parameter: parameter.data for parameter in model.parameters() if parameter.ndim == 4}
    for parameter, values in originals.items():
        parameter.data = values.contiguous(memory_format=torch.channels_last)
    try:
        yield
    finally:
        for parameter, values in originals.items():
            parameter.data = values

