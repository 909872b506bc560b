"""Feature store: a real SIGKILL mid-extraction, then a resume that loses and duplicates nothing."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from backdoor_engine.data import Dataset
from backdoor_engine.engine import FeatureStore, extract_features
from backdoor_engine.errors import InputError
from backdoor_engine.models import Normalisation

CAPTURE = ("bn_minima", "logits")
NORMALISATION = Normalisation((0.5,), (0.25,))
SETTINGS = {"batch_size": 4, "chunk_size": 8, "capture": CAPTURE, "progress": False}


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        x = torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
        return self.head(x.mean(dim=(2, 3)))


def tiny_setup(n=60):
    """The same model and dataset in every process (seeded)."""
    torch.manual_seed(0)
    model = TinyNet()
    for norm in (model.bn1, model.bn2):
        norm.running_mean.normal_(0, 0.3)
        norm.running_var.uniform_(0.5, 2.0)
    rng = np.random.default_rng(0)
    ids = np.array([f"sample-{i}" for i in rng.permutation(n)])
    return model, Dataset(rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8), rng.integers(0, 3, n), ids)


def finished_chunks(store):
    try:
        return json.loads((store / "manifest.json").read_text())["finished_chunks"]
    except (FileNotFoundError, json.JSONDecodeError):
        return []


# The child slows every batch down so the parent can kill it between the first and the last chunk.
CHILD = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    from test_engine_feature_store import NORMALISATION, SETTINGS, tiny_setup
    from backdoor_engine.engine import extract_features
    model, dataset = tiny_setup()
    model.register_forward_pre_hook(lambda module, args: time.sleep(0.15))
    extract_features(model, dataset, NORMALISATION, store={store!r}, **SETTINGS)
""")


def test_an_extraction_killed_midway_resumes_without_losing_or_repeating_a_sample(tmp_path):
    store = tmp_path / "store"
    child = subprocess.Popen([sys.executable, "-c", CHILD.format(tests=str(Path(__file__).parent), store=str(store))])
    try:
        deadline = time.monotonic() + 60
        while not finished_chunks(store) and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert child.poll() is None, f"the child ended (rc {child.returncode}) before it could be killed"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    done_when_killed = finished_chunks(store)
    assert 1 <= len(done_when_killed) < 8, done_when_killed

    model, dataset = tiny_setup()
    resumed = extract_features(model, dataset, NORMALISATION, store=store, **SETTINGS)
    assert resumed.metadata["extracted_samples"] == len(dataset) - 8 * len(done_when_killed)
    uninterrupted = extract_features(model, dataset, NORMALISATION, store=tmp_path / "fresh", **SETTINGS)
    # Dataset ids are unique, so equal id columns mean every sample exactly once, in dataset order.
    assert np.array_equal(resumed.ids, dataset.ids) and np.array_equal(resumed.y, dataset.y)
    for name in CAPTURE:
        assert np.array_equal(getattr(resumed, name), getattr(uninterrupted, name)), name
    assert not list(store.glob(".*.tmp"))


def test_stored_features_equal_in_memory_ones_and_read_back_as_plain_memory_mapped_npy(tmp_path):
    model, dataset = tiny_setup(n=20)
    in_memory = extract_features(model, dataset, NORMALISATION, **SETTINGS)
    stored = extract_features(model, dataset, NORMALISATION, store=tmp_path / "s", **SETTINGS)
    for name in CAPTURE:
        assert np.array_equal(getattr(stored, name), getattr(in_memory, name))
    reader = FeatureStore.open(tmp_path / "s")
    assert reader.is_complete and reader.num_chunks == 3 and reader.columns == {"bn_minima": 10, "logits": 3}
    last = reader.read_chunk(2, "bn_minima")
    assert isinstance(last, np.memmap) and np.array_equal(last, in_memory.bn_minima[16:20])
    assert np.array_equal(np.load(tmp_path / "s" / "ids.000001.npy", allow_pickle=False), dataset.ids[8:16])
    assert np.array_equal(np.concatenate(list(reader.iter_chunks("y"))), dataset.y)
    assert reader.load().layout == in_memory.layout


def test_a_resume_against_another_model_or_dataset_or_chunking_is_refused(tmp_path):
    model, dataset = tiny_setup(n=20)
    extract_features(model, dataset, NORMALISATION, store=tmp_path / "s", **SETTINGS)
    with torch.no_grad():
        model.conv1.weight[0, 0, 0, 0] += 1e-3
    with pytest.raises(InputError, match="holds features of a different model"):
        extract_features(model, dataset, NORMALISATION, store=tmp_path / "s", **SETTINGS)
    model, dataset = tiny_setup(n=20)
    pixels = dataset.x.copy()
    pixels[7, 3, 3, 0] ^= 1
    with pytest.raises(InputError, match="different dataset"):
        extract_features(model, Dataset(pixels, dataset.y, dataset.ids), NORMALISATION, store=tmp_path / "s",
                         **SETTINGS)
    with pytest.raises(InputError, match="different chunk_size: stored 8, now 5"):
        extract_features(model, dataset, NORMALISATION, store=tmp_path / "s", **{**SETTINGS, "chunk_size": 5})
    with pytest.raises(InputError, match="different input normalisation"):
        extract_features(model, dataset, Normalisation((0.5,), (0.3,)), store=tmp_path / "s", **SETTINGS)


def test_an_incomplete_store_is_not_loaded_and_stale_temp_files_go_on_resume(tmp_path):
    model, dataset = tiny_setup(n=20)
    extract_features(model, dataset, NORMALISATION, store=tmp_path / "s", **SETTINGS)
    manifest_path = tmp_path / "s" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "finished_chunks": [0, 2]}))
    (tmp_path / "s" / ".bn_minima.000001.npy.abcd.tmp").write_bytes(b"half a chunk")
    with pytest.raises(InputError, match="incomplete: 2 of 3 chunks finished"):
        FeatureStore.open(tmp_path / "s").load()
    with pytest.raises(InputError, match="chunk 1 .* is not finished"):
        FeatureStore.open(tmp_path / "s").read_chunk(1, "ids")
    resumed = extract_features(model, dataset, NORMALISATION, store=tmp_path / "s", **SETTINGS)
    assert resumed.metadata["extracted_samples"] == 8 and not list((tmp_path / "s").glob(".*.tmp"))


def test_corrupt_or_foreign_directories_are_refused_by_name(tmp_path):
    model, dataset = tiny_setup(n=20)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not empty and holds no manifest.json"):
        extract_features(model, dataset, NORMALISATION, store=tmp_path / "other", **SETTINGS)
    with pytest.raises(InputError, match="not a feature store: manifest.json not found"):
        FeatureStore.open(tmp_path / "other")
    extract_features(model, dataset, NORMALISATION, store=tmp_path / "s", **SETTINGS)
    chunk = tmp_path / "s" / "logits.000000.npy"
    chunk.write_bytes(chunk.read_bytes()[:-12])
    with pytest.raises(InputError, match="logits.000000.npy is corrupt"):
        FeatureStore.open(tmp_path / "s").load()


def test_a_second_writer_is_refused_while_the_first_holds_the_store(tmp_path):
    model, dataset = tiny_setup(n=20)
    extract_features(model, dataset, NORMALISATION, store=tmp_path / "s", **SETTINGS)
    reader = FeatureStore.open(tmp_path / "s")
    header = {"n_samples": 20, "chunk_size": 8, "columns": reader.columns, "ids_dtype": dataset.ids.dtype,
              "layout": reader.layout, **reader.provenance}
    with FeatureStore.create_or_resume(tmp_path / "s", **header):
        with pytest.raises(InputError, match="open in another process"):
            extract_features(model, dataset, NORMALISATION, store=tmp_path / "s", **SETTINGS)
    with pytest.raises(InputError, match="opened for reading"):
        reader.write_chunk(0, dataset.ids[:8], dataset.y[:8], {})


def store_files(directory):
    return sorted(path.name for path in directory.iterdir() if not path.name.startswith("."))


def test_a_consolidated_array_replaces_its_chunk_files_so_the_store_holds_one_copy(tmp_path):
    model, dataset = tiny_setup(n=20)
    in_memory = extract_features(model, dataset, NORMALISATION, **SETTINGS)
    stored = extract_features(model, dataset, NORMALISATION, store=tmp_path / "s", memory_map=True, **SETTINGS)
    assert store_files(tmp_path / "s") == ["all.bn_minima.npy", "all.ids.npy", "all.logits.npy", "all.y.npy",
                                           "manifest.json"]
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["format_version"] == 3 and manifest["consolidated"] == ["bn_minima", "ids", "logits", "y"]
    reader = FeatureStore.open(tmp_path / "s")
    for name in CAPTURE:
        assert np.array_equal(getattr(stored, name), getattr(in_memory, name))
        assert np.array_equal(reader.read_chunk(1, name), getattr(in_memory, name)[8:16])
        assert np.array_equal(getattr(reader.load(), name), getattr(in_memory, name))
    # A resume of the complete store reads the consolidated files: nothing to redo, the same features.
    again = extract_features(model, dataset, NORMALISATION, store=tmp_path / "s", **SETTINGS)
    assert again.metadata["extracted_samples"] == 0 and np.array_equal(again.bn_minima, in_memory.bn_minima)


@pytest.mark.parametrize("manifest_updated", [False, True])
def test_a_kill_at_any_step_of_consolidating_leaves_a_store_that_loads_and_resumes_the_same(tmp_path,
                                                                                            manifest_updated):
    model, dataset = tiny_setup(n=20)
    plain = tmp_path / "plain"
    expected = extract_features(model, dataset, NORMALISATION, store=plain, **SETTINGS)
    chunk_files = sorted(path.name for path in plain.glob("*.0000*.npy"))
    for left in range(len(chunk_files) + 1):
        # The state a kill leaves: the whole matrix renamed into place, `left` chunk files not yet deleted,
        # the manifest rewritten or not yet; or (left == all, no matrix) the matrix still a temp file.
        store = tmp_path / f"killed-{left}"
        extract_features(model, dataset, NORMALISATION, store=store, memory_map=True, **SETTINGS)
        for name in chunk_files[:left]:
            (store / name).write_bytes((plain / name).read_bytes())
        if not manifest_updated:
            (store / "manifest.json").write_bytes((plain / "manifest.json").read_bytes())
        if left == len(chunk_files) and not manifest_updated:
            for matrix in store.glob("all.*.npy"):
                matrix.rename(store / f".{matrix.name}.x1y2.tmp")
        reader = FeatureStore.open(store)
        for name in CAPTURE:
            assert np.array_equal(getattr(reader.load(), name), getattr(expected, name)), (left, name)
            assert np.array_equal(reader.read_chunk(2, name), getattr(expected, name)[16:]), (left, name)
        resumed = extract_features(model, dataset, NORMALISATION, store=store, memory_map=True, **SETTINGS)
        assert resumed.metadata["extracted_samples"] == 0
        for name in CAPTURE:
            assert np.array_equal(getattr(resumed, name), getattr(expected, name)), (left, name)
        assert store_files(store) == ["all.bn_minima.npy", "all.ids.npy", "all.logits.npy", "all.y.npy",
                                      "manifest.json"], left
        assert not list(store.glob(".*.tmp"))


def test_a_consolidated_file_that_disagrees_with_its_chunks_is_refused_and_nothing_is_deleted(tmp_path):
    model, dataset = tiny_setup(n=20)
    extract_features(model, dataset, NORMALISATION, store=tmp_path / "s", **SETTINGS)
    reader = FeatureStore.open(tmp_path / "s")
    wrong = np.array(reader.load().logits)
    wrong[3, 0] += 1
    np.save(tmp_path / "s" / "all.logits.npy", wrong)
    with pytest.raises(InputError, match="all.logits.npy differs from chunk file .*logits.000000.npy"):
        FeatureStore.open(tmp_path / "s").matrix("logits")
    assert (tmp_path / "s" / "logits.000000.npy").exists()
