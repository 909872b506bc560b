"""read_all: a source read to the end, in memory or into memory-mapped .npy files; and the data
package standing on its own (no engine, no torch)."""

import os
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest

from backdoor_engine.data import ArraySource, ImageFolderSource, make_dataset, read_all, write_image_folder
from backdoor_engine.data.dataset import READ_BYTES
from backdoor_engine.errors import InputError

rng = np.random.default_rng(3)


@pytest.fixture
def folder_with_a_broken_file(tmp_path):
    """40 colour images in 3 classes, string ids, and one corrupt PNG in the middle of the listing."""
    data = make_dataset(rng.integers(0, 256, size=(40, 6, 5, 3), dtype=np.uint8), np.arange(40) % 3,
                        ids=np.array([f"s{i:02d}" for i in range(40)]))
    root = tmp_path / "folder"
    write_image_folder(data, root)
    (root / "2" / "s20.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(30))
    return root


def quietly(function, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return function(*args, **kwargs)


def test_a_read_into_a_directory_is_memory_mapped_and_equals_the_in_memory_read(tmp_path, folder_with_a_broken_file,
                                                                                 capsys):
    source = ImageFolderSource(folder_with_a_broken_file)
    in_memory = quietly(read_all, source)
    capsys.readouterr()
    mapped = read_all(source, into=tmp_path / "pixels")
    assert re.search(r"skipped 1 file\(s\) in .*:\n  2/s20\.png: unreadable image", capsys.readouterr().err)
    assert len(mapped) == len(in_memory) == 39 and "2/s20.png" not in mapped.ids
    assert isinstance(mapped.x.base, np.memmap) and not mapped.x.flags.writeable
    assert np.array_equal(mapped.x, in_memory.x)
    assert np.array_equal(mapped.ids, in_memory.ids) and np.array_equal(mapped.y, in_memory.y)
    # The files on disk hold exactly the kept rows: the npy header was rewritten to 39 rows.
    assert sorted(os.listdir(tmp_path / "pixels")) == ["ids.npy", "x.npy", "y.npy"]
    assert np.load(tmp_path / "pixels" / "x.npy").shape == (39, 6, 5, 3)
    assert np.array_equal(np.load(tmp_path / "pixels" / "ids.npy"), in_memory.ids)
    assert np.array_equal(np.load(tmp_path / "pixels" / "y.npy"), in_memory.y)


def test_a_read_in_many_ranges_equals_one_read(monkeypatch, tmp_path, folder_with_a_broken_file):
    source = ImageFolderSource(folder_with_a_broken_file)
    whole = quietly(read_all, source)
    monkeypatch.setattr("backdoor_engine.data.dataset.READ_BYTES", 3 * 6 * 5 * 3)  # three images a range
    assert READ_BYTES > 3 * 6 * 5 * 3
    for into in (None, tmp_path / "pixels"):
        ranged = quietly(read_all, source, into=into)
        assert np.array_equal(ranged.x, whole.x) and np.array_equal(ranged.ids, whole.ids)


def test_a_read_keeps_poison_ground_truth_and_replaces_an_earlier_read_in_the_same_directory(tmp_path):
    first = make_dataset(rng.integers(0, 256, size=(7, 4, 4, 1), dtype=np.uint8), np.arange(7) % 2,
                         poison=np.array([0, 1, 0, 0, 1, 0, 0]))
    read = read_all(ArraySource(first), into=tmp_path)
    assert np.array_equal(read.x, first.x) and np.array_equal(read.poison, first.poison)
    assert np.array_equal(read.ids, first.ids)
    second = make_dataset(first.x[:3], first.y[:3])
    again = read_all(ArraySource(second), into=tmp_path)
    assert len(again) == 3 and again.poison is None and np.array_equal(again.x, second.x)
    assert sorted(os.listdir(tmp_path)) == ["ids.npy", "x.npy", "y.npy"]  # the old poison.npy went too


def test_a_source_with_nothing_readable_is_an_input_error_and_leaves_no_file(tmp_path):
    (tmp_path / "folder" / "a").mkdir(parents=True)
    (tmp_path / "folder" / "a" / "bad.png").write_bytes(b"nope")
    source = ImageFolderSource(tmp_path / "folder", image_size=4, channels=3)
    with pytest.raises(InputError, match="no sample could be read"):
        read_all(source, into=tmp_path / "pixels")
    assert os.listdir(tmp_path / "pixels") == []
    (tmp_path / "file").write_text("")
    with pytest.raises(InputError, match="not a directory"):
        read_all(source, into=tmp_path / "file")
    with pytest.raises(InputError, match="expected a backdoor_engine.data Source"):
        read_all(make_dataset(np.zeros((1, 2, 2, 1), np.uint8), [0]))


def test_importing_the_data_package_loads_neither_the_engine_nor_torch():
    code = ("import sys, backdoor_engine.data; "
            "print(sorted(m for m in sys.modules if m.startswith(('backdoor_engine.engine', 'torch'))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
