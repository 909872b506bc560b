"""CIFAR-10 binary batches (synthetic files in the exact format) and the foolbox samples."""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

import backdoor_engine
from backdoor_engine.data.cifar import load_cifar10_binary, load_foolbox_cifar10_samples
from backdoor_engine.errors import InputError

BATCHES = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]


def write_batches(directory, records_per_file=3, seed=0):
    """Write every batch file as label byte + 3072 CHW bytes per record; returns {name: (chw, labels)}."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in BATCHES:
        chw = rng.integers(0, 256, size=(records_per_file, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, 10, size=records_per_file, dtype=np.uint8)
        (directory / name).write_bytes(np.concatenate([labels[:, None], chw.reshape(records_per_file, -1)], 1).tobytes())
        written[name] = (chw, labels)
    return written


def test_train_split_concatenates_batches_in_order(tmp_path):
    written = write_batches(tmp_path)
    d = load_cifar10_binary(tmp_path, "train")
    chw = np.concatenate([written[name][0] for name in BATCHES[:5]])
    assert d.x.shape == (15, 32, 32, 3) and d.x.dtype == np.uint8
    assert np.array_equal(d.x, chw.transpose(0, 2, 3, 1))
    assert np.array_equal(d.y, np.concatenate([written[name][1] for name in BATCHES[:5]]))
    assert np.array_equal(d.ids, np.arange(15))


def test_test_split_from_parent_directory(tmp_path):
    written = write_batches(tmp_path / "cifar-10-batches-bin")
    d = load_cifar10_binary(tmp_path, "test")
    chw, labels = written["test_batch.bin"]
    assert d.x[1, 4, 7].tolist() == chw[1, :, 4, 7].tolist()  # pixel (row 4, col 7) of image 1, RGB
    assert np.array_equal(d.y, labels)


def test_missing_truncated_and_bad_label_files(tmp_path):
    with pytest.raises(InputError, match="data_batch_1.bin"):
        load_cifar10_binary(tmp_path)
    write_batches(tmp_path)
    (tmp_path / "data_batch_3.bin").unlink()
    with pytest.raises(InputError, match="missing: .*data_batch_3.bin"):
        load_cifar10_binary(tmp_path)
    write_batches(tmp_path)
    test_file = tmp_path / "test_batch.bin"
    test_file.write_bytes(test_file.read_bytes()[:-10])
    with pytest.raises(InputError, match="test_batch.bin: truncated"):
        load_cifar10_binary(tmp_path, "test")
    test_file.write_bytes(bytes([10]) + bytes(3072))
    with pytest.raises(InputError, match="label byte 10"):
        load_cifar10_binary(tmp_path, "test")
    with pytest.raises(InputError, match="split:"):
        load_cifar10_binary(tmp_path, "val")


needs_foolbox = pytest.mark.skipif(importlib.util.find_spec("foolbox") is None, reason="foolbox not installed")


@needs_foolbox
def test_foolbox_samples_are_the_first_cifar10_test_images():
    d = load_foolbox_cifar10_samples()
    assert d.x.shape == (20, 32, 32, 3) and d.x.dtype == np.uint8
    assert np.array_equal(d.ids, np.arange(20))
    assert d.y.min() >= 0 and d.y.max() <= 9
    assert d.y[:4].tolist() == [3, 8, 8, 0]  # labels of CIFAR-10 test images 0..3 (cat, ship, ship, airplane)
    assert d.x.std() > 20  # real photographs, not blank placeholders


@needs_foolbox
def test_foolbox_samples_load_without_importing_foolbox():
    # A fresh interpreter: other tests in this process may import foolbox for their own reasons.
    code = ("import sys; from backdoor_engine.data.cifar import load_foolbox_cifar10_samples; "
            "load_foolbox_cifar10_samples(); print('foolbox' in sys.modules)")
    repo_root = os.path.dirname(os.path.dirname(backdoor_engine.__file__))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo_root)
    assert result.stdout.strip() == "False"
