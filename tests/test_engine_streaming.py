"""Extraction from streaming sources: decode workers, skipped samples, float16 stores, kills at random points."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from backdoor_engine.data import ImageFolderSource, TarShardSource, load_fashion_mnist, write_image_folder
from backdoor_engine.data import write_tar_shards
from backdoor_engine.engine import FeatureStore, extract_features
from backdoor_engine.errors import InputError

sys.path.insert(0, str(Path(__file__).parent))
from test_engine_feature_store import CAPTURE, NORMALISATION, finished_chunks, tiny_setup  # noqa: E402

SETTINGS = {"batch_size": 5, "chunk_size": 16, "capture": CAPTURE, "progress": False}


def real_subset(n):
    data = load_fashion_mnist("train").subset(np.arange(n))
    return type(data)(data.x, data.y, np.array([f"img{i:03d}" for i in range(n)]))


def test_a_streamed_folder_with_a_corrupt_file_gives_the_in_memory_features_of_the_readable_ones(tmp_path):
    data = real_subset(50)
    write_image_folder(data, tmp_path / "folder")
    (tmp_path / "folder" / "2" / "zz_broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    model, _ = tiny_setup()
    source = ImageFolderSource(tmp_path / "folder")
    expected = extract_features(model, data, NORMALISATION, **SETTINGS)
    order = np.argsort(expected.ids)  # the folder lists by class, then name

    streamed = extract_features(model, source, NORMALISATION, workers=2, store=tmp_path / "s", dtype="float16",
                                memory_map=True, **SETTINGS)
    assert [sample_id for sample_id, _ in streamed.metadata["skipped"]] == ["2/zz_broken.jpg"]
    assert len(streamed) == 50 and streamed.bn_minima.dtype == np.float16
    assert isinstance(streamed.bn_minima, np.memmap)
    by_id = {sample_id: row for row, sample_id in enumerate(expected.ids)}
    rows = [by_id[sample_id.split("/")[1][:-4]] for sample_id in streamed.ids]
    assert sorted(rows) == list(order) or sorted(rows) == sorted(order)
    for name in CAPTURE:
        # float16 storage rounds each value once: the nearest float16 of the float32 feature.
        assert np.array_equal(getattr(streamed, name), getattr(expected, name)[rows].astype(np.float16)), name
    assert np.array_equal(streamed.y, expected.y[rows])
    store = FeatureStore.open(tmp_path / "s")
    assert store.skipped == streamed.metadata["skipped"] and store.n_stored == 50
    # In memory, without workers, the same samples are kept and skipped.
    plain = extract_features(model, source, NORMALISATION, **SETTINGS)
    assert np.array_equal(plain.ids, streamed.ids) and plain.metadata["skipped"] == streamed.metadata["skipped"]


def test_float16_and_memory_map_need_a_store_and_a_wrong_dtype_is_named(tmp_path):
    model, dataset = tiny_setup(n=10)
    with pytest.raises(InputError, match="give store"):
        extract_features(model, dataset, NORMALISATION, dtype="float16", **SETTINGS)
    with pytest.raises(InputError, match="feature dtype"):
        extract_features(model, dataset, NORMALISATION, store=tmp_path / "s", dtype="float64", **SETTINGS)
    extract_features(model, dataset, NORMALISATION, store=tmp_path / "s", **SETTINGS)
    with pytest.raises(InputError, match="another feature dtype"):
        extract_features(model, dataset, NORMALISATION, store=tmp_path / "s", dtype="float16", **SETTINGS)


# The child streams tar shards through two decode workers into the store, every batch slowed down.
CHILD = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    from test_engine_streaming import SETTINGS
    from test_engine_feature_store import NORMALISATION, tiny_setup
    from backdoor_engine.data import TarShardSource
    from backdoor_engine.engine import extract_features
    model, _ = tiny_setup()
    model.register_forward_pre_hook(lambda module, args: time.sleep(0.03))
    extract_features(model, TarShardSource({shards!r}), NORMALISATION, store={store!r}, workers=2, **SETTINGS)
""")


def process_stat(pid):
    """(ppid, start time, state) of a process from /proc/<pid>/stat, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
    return int(fields[1]), int(fields[19]), fields[0]


def children_of(pid):
    """(pid, start time) of the live children of `pid`."""
    found = []
    for entry in os.listdir("/proc"):
        stat = process_stat(entry) if entry.isdigit() else None
        if stat is not None and stat[0] == pid:
            found.append((int(entry), stat[1]))
    return found


def alive(worker):
    pid, started = worker
    stat = process_stat(pid)
    return stat is not None and stat[1] == started and stat[2] != "Z"


def test_a_streaming_scan_killed_at_random_points_finishes_every_sample_once_and_leaves_no_worker(tmp_path):
    data = real_subset(160)
    write_tar_shards(data, tmp_path / "shards", shard_size=45)
    store = tmp_path / "store"
    script = CHILD.format(tests=str(Path(__file__).parent), shards=str(tmp_path / "shards"), store=str(store))
    rng = np.random.default_rng(0)
    kills = 0
    for _ in range(4):
        child = subprocess.Popen([sys.executable, "-c", script])
        try:
            # Each run gets past its first new chunk, then dies at a random moment (mid-batch, mid-write, ...).
            before = len(finished_chunks(store))
            deadline = time.monotonic() + 60
            while len(finished_chunks(store)) == before and child.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.4))
            if child.poll() is None:
                workers = children_of(child.pid)
                os.kill(child.pid, signal.SIGKILL)
                kills += 1
                child.wait()
                # Decode workers die with the scan instead of living on under init (~165 MB each).
                deadline = time.monotonic() + 5
                while any(alive(worker) for worker in workers) and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert workers and not [worker for worker in workers if alive(worker)]
        finally:
            child.kill()
            child.wait()
    assert kills >= 2, "the scan finished before it could be killed twice: slow the child down"
    model, _ = tiny_setup()
    source = TarShardSource(tmp_path / "shards")
    resumed = extract_features(model, source, NORMALISATION, store=store, workers=2, **SETTINGS)
    fresh = extract_features(model, source, NORMALISATION, store=tmp_path / "fresh", **SETTINGS)
    assert np.array_equal(resumed.ids, source.ids) and len(set(resumed.ids.tolist())) == 160
    for name in CAPTURE:
        assert np.array_equal(getattr(resumed, name), getattr(fresh, name)), name
    assert not list(store.glob(".*.tmp"))


def test_a_float16_store_saturates_values_beyond_its_range_instead_of_storing_infinities(tmp_path):
    model, dataset = tiny_setup(n=12)
    header = {"n_samples": 12, "chunk_size": 12, "columns": {"bn_minima": 2}, "ids_dtype": dataset.ids.dtype,
              "layout": None, "normalisation": {}, "head": None, "model_fingerprint": "m", "dataset_fingerprint": "d"}
    with FeatureStore.create_or_resume(tmp_path / "s", dtype="float16", **header) as store:
        values = np.zeros((12, 2), np.float32)
        values[0] = (-1e6, 70000.0)
        values[1] = (-123.456, 0.5)
        store.write_chunk(0, dataset.ids, dataset.y, {"bn_minima": values})
    stored = FeatureStore.open(tmp_path / "s").read_chunk(0, "bn_minima")
    assert stored.dtype == np.float16 and np.isfinite(stored).all()
    assert stored[0].tolist() == [-65504.0, 65504.0] and stored[1].tolist() == [np.float16(-123.456), 0.5]
