"""The Dataset contract: validation, subsets and the npz file format."""

import os

import numpy as np
import pytest

from backdoor_engine.data import dataset as dataset_module
from backdoor_engine.data.dataset import Dataset, load_npz, make_dataset, save_npz
from backdoor_engine.errors import InputError


def images(n=4, h=5, w=6, c=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, c), dtype=np.uint8)


def test_make_dataset_converts_losslessly_and_defaults_ids():
    x = images().astype(np.int32)
    d = make_dataset(x, np.array([0, 2, 1, 2], dtype=np.int8), poison=[True, False, False, True])
    assert d.x.dtype == np.uint8 and np.array_equal(d.x, x)
    assert d.y.dtype == np.int64 and d.y.tolist() == [0, 2, 1, 2]
    assert d.ids.dtype == np.int64 and d.ids.tolist() == [0, 1, 2, 3]
    assert d.poison.dtype == np.uint8 and d.poison.tolist() == [1, 0, 0, 1]
    assert (len(d), d.num_classes, d.image_shape) == (4, 3, (5, 6, 3))


def test_string_ids_are_kept():
    d = make_dataset(images(n=2), [0, 1], ids=["cat/a.png", "dog/b.png"])
    assert d.ids.dtype.kind == "U" and d.ids.tolist() == ["cat/a.png", "dog/b.png"]


ERROR_CASES = {
    "float x": (dict(x=images().astype(np.float32)), ["x:", "uint8", "float32"]),
    "3-D x": (dict(x=images()[..., 0]), ["x:", "4-D", "(4, 5, 6)", "x[..., None]"]),
    "two channels": (dict(x=images(c=2)), ["x:", "C = 1 or 3", "(4, 5, 6, 2)"]),
    "channels first": (dict(x=images(h=3, w=8, c=8)), ["x:", "transpose(0, 2, 3, 1)"]),
    "pixels out of range": (dict(x=images().astype(np.int16) + 1), ["x:", "0..255", "256"]),
    "empty": (dict(x=images(n=0), y=[]), ["x:", "empty"]),
    "object x": (dict(x=images().astype(object)), ["x:", "object"]),
    "float y": (dict(y=np.array([0.0, 1.0, 1.0, 0.0])), ["y:", "int64", "float64"]),
    "y too short": (dict(y=[0, 1, 1]), ["y:", "(4,)", "(3,)"]),
    "negative label": (dict(y=[0, -1, 1, 0]), ["y:", ">= 0", "-1", "index 1"]),
    "label beyond num_classes": (dict(y=[0, 1, 3, 0], num_classes=3), ["y:", "num_classes=3", "3 at index 2"]),
    "bad num_classes": (dict(num_classes=0), ["num_classes:", "positive"]),
    "duplicate int ids": (dict(ids=[5, 7, 9, 7]), ["ids:", "unique", "7"]),
    "duplicate str ids": (dict(ids=["a", "b", "c", "b"]), ["ids:", "unique", "'b'"]),
    "ids length": (dict(ids=[1, 2, 3]), ["ids:", "(4,)", "(3,)"]),
    "float ids": (dict(ids=[0.5, 1.5, 2.5, 3.5]), ["ids:", "int64 or str", "float64"]),
    "object ids": (dict(ids=np.array([1, "a", 2, 3], dtype=object)), ["ids:", "object"]),
    "poison not 0/1": (dict(poison=[0, 1, 2, 0]), ["poison:", "0 or 1", "2 at index 2"]),
    "float poison": (dict(poison=[0.0, 1.0, 0.0, 0.0]), ["poison:", "float64"]),
    "poison length": (dict(poison=[0, 1]), ["poison:", "(4,)", "(2,)"]),
}


@pytest.mark.parametrize("case", ERROR_CASES, ids=list(ERROR_CASES))
def test_invalid_input_names_field_and_problem(case):
    overrides, fragments = ERROR_CASES[case]
    arguments = dict(x=images(), y=[0, 1, 1, 0]) | overrides
    with pytest.raises(InputError) as error:
        make_dataset(**arguments)
    for fragment in fragments:
        assert fragment in str(error.value)


def test_direct_construction_validates_too():
    with pytest.raises(InputError, match="x:"):
        Dataset(images().astype(np.float64), np.zeros(4, dtype=np.int64))


def test_subset_keeps_rows_together():
    d = make_dataset(images(n=5), [0, 1, 2, 3, 4], ids=[10, 11, 12, 13, 14], poison=[0, 1, 0, 1, 0])
    for index in ([3, 1], np.array([False, True, False, True, False]), slice(1, 4, 2)):
        part = d.subset(index)
        positions = np.arange(5)[index]
        assert np.array_equal(part.x, d.x[positions])
        assert np.array_equal(part.y, d.y[positions])
        assert np.array_equal(part.ids, d.ids[positions])
        assert np.array_equal(part.poison, d.poison[positions])


def test_subset_rejects_repeats_and_out_of_range():
    d = make_dataset(images(), [0, 1, 1, 0])
    with pytest.raises(InputError, match="repeat"):
        d.subset([0, 0])
    with pytest.raises(InputError, match="index:"):
        d.subset([4])
    with pytest.raises(InputError, match="mask"):
        d.subset([True, False])


@pytest.mark.parametrize("ids", [None, np.array([100, -3, 7, 2**40]), np.array(["c/z.png", "a", "b", "é"])])
@pytest.mark.parametrize("with_poison", [False, True])
def test_npz_round_trip_is_exact(tmp_path, ids, with_poison):
    poison = np.array([0, 1, 1, 0], dtype=np.uint8) if with_poison else None
    original = make_dataset(images(c=1), [3, 0, 2, 1], ids=ids, poison=poison)
    path = tmp_path / "d.npz"
    save_npz(original, path)
    loaded = load_npz(path)
    for name in ("x", "y", "ids"):
        assert getattr(loaded, name).dtype == getattr(original, name).dtype
        assert np.array_equal(getattr(loaded, name), getattr(original, name))
    if with_poison:
        assert loaded.poison.dtype == np.uint8 and np.array_equal(loaded.poison, poison)
    else:
        assert loaded.poison is None
    assert os.listdir(tmp_path) == ["d.npz"]


def test_load_rejects_unknown_field(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=images(), y=np.zeros(4, dtype=np.int64), labels=np.zeros(4))
    with pytest.raises(InputError, match="'labels'"):
        load_npz(path)


class MakesDirectoryWhenUnpickled:
    """Unpickling this calls os.mkdir: the test sees whether the loader ever unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_load_refuses_pickled_object_array(tmp_path):
    marker = str(tmp_path / "unpickled")
    payload = np.array([MakesDirectoryWhenUnpickled(marker)] * 4, dtype=object)
    path = tmp_path / "d.npz"
    np.savez(path, x=images(), y=np.zeros(4, dtype=np.int64), ids=payload)
    with pytest.raises(InputError, match="'ids'.*object arrays"):
        load_npz(path)
    assert not os.path.exists(marker)


def test_load_reports_missing_and_invalid_content(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_npz(tmp_path / "absent.npz")
    only_labels = tmp_path / "y.npz"
    np.savez(only_labels, y=np.zeros(4, dtype=np.int64))
    with pytest.raises(InputError, match=r"missing required field\(s\) \['x'\]"):
        load_npz(only_labels)
    text = tmp_path / "notes.npz"
    text.write_text("not an archive")
    with pytest.raises(InputError, match="not a readable npz"):
        load_npz(text)
    single = tmp_path / "x.npy"
    np.save(single, images())
    with pytest.raises(InputError, match="single .npy"):
        load_npz(single)
    labelled = tmp_path / "float_y.npz"
    np.savez(labelled, x=images(), y=np.zeros(4))
    with pytest.raises(InputError, match="y:"):
        load_npz(labelled)


def test_load_applies_num_classes(tmp_path):
    path = tmp_path / "d.npz"
    save_npz(make_dataset(images(), [0, 1, 5, 0]), path)
    with pytest.raises(InputError, match="num_classes=4"):
        load_npz(path, num_classes=4)


def test_failed_save_keeps_previous_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "d.npz"
    first = make_dataset(images(), [0, 1, 1, 0])
    save_npz(first, path)

    def crash_midway(file, **arrays):
        file.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(dataset_module.np, "savez", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        save_npz(make_dataset(images(seed=1), [1, 1, 1, 1]), path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["d.npz"]
    assert np.array_equal(load_npz(path).x, first.x)


def test_save_into_missing_directory_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        save_npz(make_dataset(images(), [0, 1, 1, 0]), tmp_path / "missing" / "d.npz")
