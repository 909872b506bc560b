"""Extraction scaled out on Ray Data: chunks of the source go to `map_batches` actors, one model each.

The local executor (`extract_features`) stays the default; Ray is the optional extra
`pip install 'backdoor-engine[ray]'`. Each actor loads the checkpoint once (weights only, never
unpickled), extracts whole store chunks and hands back each chunk's arrays as npz bytes (no
pickle; they travel through Ray's object store, so no shared disk is needed); the driver alone
writes them into the feature store, with the same manifest, fingerprints and chunking as the
local executor. A store begun by either executor is resumed by either, skipping finished chunks.
GPU actors (one GPU each) when the Ray cluster has GPUs.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable

import numpy as np
from tqdm import tqdm

from backdoor_engine.data import Dataset
from backdoor_engine.data.dataset import as_source
from backdoor_engine.data.source import Source, SourceRange
from backdoor_engine.engine.extract import extract_features, open_store
from backdoor_engine.engine.feature_set import FeatureSet
from backdoor_engine.engine.feature_store import DEFAULT_CHUNK_SIZE, FeatureStore, check_feature_dtype
from backdoor_engine.errors import InputError

_FIRST_ROWS = 256  # rows the driver extracts itself to learn the store's columns and layout


def extract_features_ray(checkpoint: str | os.PathLike, data: Dataset | Source, *, store: str | os.PathLike,
                         actors: int = 2, cpus_per_actor: float = 1, batch_size: int = 256,
                         chunk_size: int = DEFAULT_CHUNK_SIZE, capture: Iterable[str] = ("bn_minima",),
                         head: str = "head", backend: str = "auto", dtype: str = "float32", use_gpu: bool | None = None,
                         memory_map: bool = True, progress: bool = True) -> FeatureSet:
    """`extract_features` of the model in `checkpoint` over `data`, the chunks extracted by `actors`
    Ray actors (on the cluster `ray.init` connected to; a local one is started when none is).
    use_gpu None: one GPU per actor when the cluster has GPUs. Returns the stored features."""
    import ray

    from backdoor_engine.models.checkpoint import load_checkpoint

    source = as_source(data)
    check_feature_dtype(dtype)
    if isinstance(actors, bool) or not isinstance(actors, int) or actors < 1:
        raise InputError(f"actors must be an integer >= 1, got {actors!r}")
    model, meta = load_checkpoint(checkpoint)
    normalisation = meta["normalisation"]
    settings = {"batch_size": batch_size, "capture": tuple(capture), "head": head, "backend": backend}
    first = extract_features(model, SourceRange(source, 0, min(len(source), _FIRST_ROWS)), normalisation,
                             progress=False, **settings)
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = progress  # our own bar counts chunks
    context.print_on_execution_start = progress
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    columns = {name: getattr(first, name).shape[1] for name in first.captured}
    # The first rows' metadata carries the model's fingerprint and settings; the dataset is the whole source.
    metadata = {**first.metadata, "dataset_fingerprint": source.fingerprint()}
    with open_store(store, source, columns, first.layout, metadata, chunk_size, dtype) as feature_store:
        pending = [index for index in range(feature_store.num_chunks) if index not in feature_store.finished_chunks]
        if pending:
            items = [{"index": index} for index in pending]
            chunks = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
                ChunkExtractor, batch_size=1, concurrency=min(actors, len(pending)),
                num_cpus=cpus_per_actor, num_gpus=1 if use_gpu else 0,
                fn_constructor_kwargs={"checkpoint": os.fspath(checkpoint), "source": source,
                                       "chunk_size": chunk_size, "threads": max(1, int(cpus_per_actor)),
                                       "use_gpu": use_gpu, "settings": settings})
            with tqdm(total=len(pending), disable=not progress, desc="extract (ray)", unit="chunk") as bar:
                for row in chunks.iter_rows():
                    _store_chunk(feature_store, int(row["index"]), row["payload"])
                    bar.update(1)
        stored = feature_store.load(memory_map=memory_map)
    stored.metadata.update(executor="ray", actors=actors, use_gpu=bool(use_gpu))
    return stored


class ChunkExtractor:
    """A Ray Data actor: loads the model once, then turns {"index": [i]} into chunk i's features."""

    def __init__(self, checkpoint: str, source: Source, chunk_size: int, threads: int, use_gpu: bool,
                 settings: dict):
        import torch

        from backdoor_engine.models.checkpoint import load_checkpoint

        torch.set_num_threads(threads)
        self.model, meta = load_checkpoint(checkpoint)
        if use_gpu:
            self.model = self.model.cuda()
        self.normalisation, self.source, self.chunk_size, self.settings = meta["normalisation"], source, chunk_size, settings

    def __call__(self, batch: dict) -> dict:
        index = int(batch["index"][0])
        start = index * self.chunk_size
        rows = SourceRange(self.source, start, min(start + self.chunk_size, len(self.source)))
        features = extract_features(self.model, rows, self.normalisation, progress=False, **self.settings)
        skipped = features.metadata["skipped"]
        buffer = io.BytesIO()
        np.savez(buffer, ids=features.ids, y=features.y,
                 skipped_ids=np.array([s for s, _ in skipped], dtype=str),
                 skipped_reasons=np.array([r for _, r in skipped], dtype=str),
                 **{name: getattr(features, name) for name in features.captured})
        return {"index": np.array([index]), "payload": np.array([buffer.getvalue()], dtype=object)}


def _store_chunk(feature_store: FeatureStore, index: int, payload: bytes) -> None:
    with np.load(io.BytesIO(payload), allow_pickle=False) as arrays:
        skipped = list(zip(arrays["skipped_ids"].tolist(), arrays["skipped_reasons"].tolist()))
        feature_store.write_chunk(index, arrays["ids"], arrays["y"],
                                  {name: arrays[name] for name in feature_store.columns}, skipped=skipped)
