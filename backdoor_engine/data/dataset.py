"""The in-memory dataset and its npz file contract (DESIGN.md section 3)."""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass

import numpy as np

from backdoor_engine.atomic import atomic_write
from backdoor_engine.errors import InputError

NPZ_FIELDS = ("x", "y", "ids", "poison")


@dataclass(frozen=True, eq=False, repr=False)
class Dataset:
    """Images with labels, unique sample ids and optional poison ground truth.

    Construction validates and converts losslessly (see `make_dataset`), so a
    `Dataset` that exists is always well formed.
    """

    x: np.ndarray
    y: np.ndarray
    ids: np.ndarray | None = None
    poison: np.ndarray | None = None

    def __post_init__(self) -> None:
        x = _checked_images(self.x)
        n = x.shape[0]
        object.__setattr__(self, "x", x)
        object.__setattr__(self, "y", _checked_labels(self.y, n))
        ids = np.arange(n, dtype=np.int64) if self.ids is None else _checked_ids(self.ids, n)
        object.__setattr__(self, "ids", ids)
        if self.poison is not None:
            object.__setattr__(self, "poison", _checked_poison(self.poison, n))

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __repr__(self) -> str:
        poison = "None" if self.poison is None else f"{int(self.poison.sum())} marked"
        return (f"Dataset(n={len(self)}, image_shape={self.image_shape}, "
                f"num_classes={self.num_classes}, ids={self.ids.dtype}, poison={poison})")

    @property
    def num_classes(self) -> int:
        """max(y) + 1: the classes this dataset's labels imply."""
        return int(self.y.max()) + 1

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of every image."""
        return tuple(int(s) for s in self.x.shape[1:])

    def images(self, rows) -> np.ndarray:
        """Pixels of the samples at `rows` (what report writers ask of any sample table)."""
        return self.x[np.asarray(rows, dtype=np.int64)]

    def subset(self, index) -> Dataset:
        """The samples at `index` (integer positions, a boolean mask of length N, or a slice)."""
        if isinstance(index, slice):
            positions = np.arange(len(self))[index]
        else:
            positions = _checked_positions(np.asarray(index), len(self))
        return Dataset(self.x[positions], self.y[positions], self.ids[positions],
                       None if self.poison is None else self.poison[positions])


def make_dataset(x, y, ids=None, poison=None, num_classes: int | None = None) -> Dataset:
    """Validate arrays and build a `Dataset`; `num_classes` bounds the labels when given."""
    dataset = Dataset(x, y, ids, poison)
    if num_classes is not None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
            raise InputError(f"num_classes: expected a positive integer, got {num_classes!r}")
        if dataset.num_classes > num_classes:
            bad = int(np.flatnonzero(dataset.y >= num_classes)[0])
            raise InputError(f"y: labels must be < num_classes={num_classes}, "
                             f"got {int(dataset.y[bad])} at index {bad}")
    return dataset


def load_npz(path: str | os.PathLike, num_classes: int | None = None) -> Dataset:
    """Read a dataset npz (fields x, y and optional ids, poison) without ever unpickling."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(f"dataset file not found: {path}")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise InputError(f"{path}: not a readable npz archive ({error})") from error
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise InputError(f"{path}: expected an npz archive with fields x and y, got a single .npy array")
    with archive:
        unknown = sorted(set(archive.files) - set(NPZ_FIELDS))
        if unknown:
            raise InputError(f"{path}: unknown field(s) {unknown}; a dataset npz holds only {list(NPZ_FIELDS)}")
        missing = [name for name in ("x", "y") if name not in archive.files]
        if missing:
            raise InputError(f"{path}: missing required field(s) {missing}")
        arrays = {name: _read_field(archive, name, path) for name in archive.files}
    return make_dataset(arrays["x"], arrays["y"], arrays.get("ids"), arrays.get("poison"), num_classes)


def save_npz(dataset: Dataset, path: str | os.PathLike) -> None:
    """Write `dataset` to `path` (uncompressed npz) atomically: a temp file in the same dir, then rename."""
    if not isinstance(dataset, Dataset):
        raise InputError(f"dataset: expected a Dataset, got {type(dataset).__name__}")
    arrays = {"x": dataset.x, "y": dataset.y, "ids": dataset.ids}
    if dataset.poison is not None:
        arrays["poison"] = dataset.poison
    # A file object (not a name) keeps np.savez from appending ".npz" to the path we chose.
    with atomic_write(path) as file:
        np.savez(file, **arrays)


def _read_field(archive, name: str, path: str) -> np.ndarray:
    try:
        return archive[name]
    except ValueError as error:
        # numpy refuses object (pickled) arrays when allow_pickle=False; say so plainly.
        raise InputError(f"{path}: field {name!r} could not be read without unpickling "
                         f"(object arrays are not accepted): {error}") from error
    except (OSError, EOFError, zipfile.BadZipFile) as error:
        raise InputError(f"{path}: field {name!r} is corrupt ({error})") from error


def _as_array(value, name: str) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype == object:
        raise InputError(f"{name}: object arrays are not accepted, got dtype object")
    return array


def _checked_images(value) -> np.ndarray:
    x = _as_array(value, "x")
    if x.ndim != 4:
        hint = "; add a channel axis with x[..., None]" if x.ndim == 3 else ""
        raise InputError(f"x: expected a 4-D array N x H x W x C (C = 1 or 3), got shape {x.shape}{hint}")
    if x.shape[3] not in (1, 3):
        hint = "; it looks like N x C x H x W, use x.transpose(0, 2, 3, 1)" if x.shape[1] in (1, 3) else ""
        raise InputError(f"x: expected C = 1 or 3 channels in the last axis, got shape {x.shape}{hint}")
    if x.shape[0] == 0:
        raise InputError("x: the dataset is empty (N = 0)")
    if x.shape[1] == 0 or x.shape[2] == 0:
        raise InputError(f"x: images must have H, W >= 1, got shape {x.shape}")
    if x.dtype == np.uint8:
        return x
    if x.dtype.kind not in "iu":
        raise InputError(f"x: expected dtype uint8 (pixel values 0..255), got {x.dtype}")
    low, high = int(x.min()), int(x.max())
    if low < 0 or high > 255:
        raise InputError(f"x: pixel values must lie in 0..255 to convert to uint8, got range {low}..{high}")
    return x.astype(np.uint8)


def _checked_labels(value, n: int) -> np.ndarray:
    y = _as_array(value, "y")
    if y.dtype.kind not in "iu":
        raise InputError(f"y: expected integer class ids (int64), got dtype {y.dtype}")
    if y.ndim != 1 or y.shape[0] != n:
        raise InputError(f"y: expected shape ({n},) to match x, got {y.shape}")
    if y.dtype.kind == "u" and y.size and int(y.max()) > np.iinfo(np.int64).max:
        raise InputError(f"y: labels do not fit in int64, got max {int(y.max())}")
    y = y.astype(np.int64, copy=False)
    if y.min() < 0:
        bad = int(np.flatnonzero(y < 0)[0])
        raise InputError(f"y: labels must be >= 0, got {int(y[bad])} at index {bad}")
    return y


def _checked_ids(value, n: int) -> np.ndarray:
    ids = _as_array(value, "ids")
    if ids.ndim != 1 or ids.shape[0] != n:
        raise InputError(f"ids: expected shape ({n},) to match x, got {ids.shape}")
    if ids.dtype.kind in "iu":
        if ids.dtype.kind == "u" and int(ids.max()) > np.iinfo(np.int64).max:
            raise InputError(f"ids: integer ids must fit in int64, got max {int(ids.max())}")
        ids = ids.astype(np.int64, copy=False)
    elif ids.dtype.kind != "U":
        raise InputError(f"ids: expected int64 or str ids, got dtype {ids.dtype}")
    ordered = np.sort(ids)
    repeated = np.flatnonzero(ordered[1:] == ordered[:-1])
    if repeated.size:
        duplicate = ordered[repeated[0]].item()
        raise InputError(f"ids: sample ids must be unique, got {duplicate!r} more than once")
    return ids


def _checked_poison(value, n: int) -> np.ndarray:
    poison = _as_array(value, "poison")
    if poison.ndim != 1 or poison.shape[0] != n:
        raise InputError(f"poison: expected shape ({n},) to match x, got {poison.shape}")
    if poison.dtype.kind not in "biu":
        raise InputError(f"poison: expected 0/1 integers or booleans, got dtype {poison.dtype}")
    outside = np.flatnonzero((poison != 0) & (poison != 1))
    if outside.size:
        raise InputError(f"poison: expected only 0 or 1, got {poison[outside[0]].item()} at index {int(outside[0])}")
    return poison.astype(np.uint8, copy=False)


def _checked_positions(index: np.ndarray, n: int) -> np.ndarray:
    if index.dtype == bool:
        if index.shape != (n,):
            raise InputError(f"index: a boolean mask must have shape ({n},), got {index.shape}")
        return np.flatnonzero(index)
    if index.dtype.kind not in "iu" or index.ndim != 1:
        raise InputError(f"index: expected a 1-D integer array, boolean mask or slice, "
                         f"got dtype {index.dtype} shape {index.shape}")
    if index.size and (index.min() < -n or index.max() >= n):
        raise InputError(f"index: positions must lie in [-{n}, {n}), got range {index.min()}..{index.max()}")
    positions = np.where(index < 0, index + n, index)
    if np.unique(positions).size != positions.size:
        raise InputError("index: positions repeat, which would duplicate sample ids")
    return positions
