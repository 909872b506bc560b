"""Fashion-MNIST from the Debian package's gzip idx files."""

import gzip
import os
import struct

import numpy as np
import pytest

from backdoor_engine.data.fashion_mnist import CLASS_NAMES, DEFAULT_ROOT, load_fashion_mnist
from backdoor_engine.errors import InputError

needs_package = pytest.mark.skipif(not os.path.isdir(DEFAULT_ROOT),
                                   reason=f"{DEFAULT_ROOT} missing: apt-get install -y dataset-fashion-mnist")


@needs_package
@pytest.mark.parametrize("split, count", [("train", 60000), ("test", 10000)])
def test_real_split_shapes_labels_and_ids(split, count):
    d = load_fashion_mnist(split)
    assert d.x.shape == (count, 28, 28, 1) and d.x.dtype == np.uint8
    assert d.y.dtype == np.int64
    assert np.bincount(d.y).tolist() == [count // 10] * 10
    assert np.array_equal(d.ids, np.arange(count))
    assert d.poison is None
    assert d.x.max() == 255 and d.x.min() == 0
    assert len(CLASS_NAMES) == d.num_classes


def write_idx(path, magic, array):
    with gzip.open(path, "wb") as file:
        file.write(struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes())


def test_missing_package_says_how_to_install(tmp_path):
    with pytest.raises(InputError, match="apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist("test", root=tmp_path)


def test_unknown_split():
    with pytest.raises(InputError, match="split:.*'validation'"):
        load_fashion_mnist("validation")


def test_wrong_magic_is_rejected(tmp_path):
    labels = np.zeros(10000, dtype=np.uint8)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", 0x801, labels)  # a labels file in the images slot
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", 0x801, labels)
    with pytest.raises(InputError, match="magic number 0x00000803, got 0x00000801"):
        load_fashion_mnist("test", root=tmp_path)


def test_truncated_data_and_wrong_count_are_rejected(tmp_path):
    images_path = tmp_path / "t10k-images-idx3-ubyte.gz"
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", 0x801, np.zeros(10000, dtype=np.uint8))
    with gzip.open(images_path, "wb") as file:
        file.write(struct.pack(">4I", 0x803, 10000, 28, 28) + bytes(100))
    with pytest.raises(InputError, match="file holds 100 data bytes"):
        load_fashion_mnist("test", root=tmp_path)
    write_idx(images_path, 0x803, np.zeros((5, 28, 28), dtype=np.uint8))
    with pytest.raises(InputError, match="expected 10000 images"):
        load_fashion_mnist("test", root=tmp_path)
