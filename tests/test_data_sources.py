"""open_dataset: every kind of spec resolves to the right loader."""

import importlib.util
import os
import re

import numpy as np
import pytest
from PIL import Image

from backdoor_engine.data.dataset import make_dataset, save_npz
from backdoor_engine.data.fashion_mnist import DEFAULT_ROOT
from backdoor_engine.data.open import describe_sources, open_dataset
from backdoor_engine.errors import InputError


def write_cifar_batches(directory, train_records=2, test_records=3):
    directory.mkdir(parents=True, exist_ok=True)
    names = {f"data_batch_{i}.bin": train_records for i in range(1, 6)} | {"test_batch.bin": test_records}
    for name, count in names.items():
        (directory / name).write_bytes(bytes([7] + [0] * 3072) * count)


@pytest.mark.skipif(not os.path.isdir(DEFAULT_ROOT), reason=f"{DEFAULT_ROOT} missing (dataset-fashion-mnist)")
def test_fashion_mnist_names():
    assert len(open_dataset("fashion-mnist")) == 60000
    assert len(open_dataset("fashion-mnist:test")) == 10000


@pytest.mark.skipif(importlib.util.find_spec("foolbox") is None, reason="foolbox not installed")
def test_cifar10_samples_name():
    assert open_dataset("cifar10-samples").image_shape == (32, 32, 3)


def test_cifar10_binary_specs(tmp_path):
    write_cifar_batches(tmp_path / "cifar-10-batches-bin")
    assert len(open_dataset(f"cifar10:{tmp_path}")) == 10
    assert len(open_dataset(f"cifar10:{tmp_path}:test")) == 3
    assert len(open_dataset(f"cifar10:{tmp_path}:train")) == 10
    plain_directory = open_dataset(tmp_path)
    assert len(plain_directory) == 10 and set(plain_directory.y.tolist()) == {7}


def test_npz_path(tmp_path):
    path = tmp_path / "set.npz"
    save_npz(make_dataset(np.zeros((3, 4, 4, 1), dtype=np.uint8), [0, 1, 2]), path)
    assert len(open_dataset(path)) == 3 and len(open_dataset(str(path))) == 3
    with pytest.raises(InputError, match="image folders and tar shards only"):
        open_dataset(path, image_size=8)
    with pytest.raises(InputError, match="not found"):
        open_dataset(tmp_path / "absent.npz")


def test_image_folder_says_which_files_it_skipped(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    Image.fromarray(np.zeros((6, 6, 3), dtype=np.uint8)).save(tmp_path / "a/x.png")
    (tmp_path / "a/bad.jpg").write_bytes(b"not a jpeg")
    d = open_dataset(tmp_path, image_size=3)
    assert re.search(r"^backdoor-engine: skipped 1 file\(s\) in .*:\n.*bad\.jpg", capsys.readouterr().err)
    assert d.image_shape == (3, 3, 3) and d.ids.tolist() == ["a/x.png"]


def test_unknown_spec_lists_accepted_forms(tmp_path):
    with pytest.raises(InputError) as error:
        open_dataset(tmp_path / "nowhere")
    assert "unknown dataset source" in str(error.value)
    for form in ("PATH.npz", "fashion-mnist", "cifar10-samples", "cifar10:DIR"):
        assert form in str(error.value) and form in describe_sources()
