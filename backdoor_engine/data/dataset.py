"""The in-memory dataset, its npz file contract (DESIGN.md section 3), and its two bridges to sources.

- `Dataset`: validated arrays x (N x H x W x C uint8, C = 1 or 3), y, unique ids, optional poison.
  x may be memory-mapped (see `read_all`); nothing here copies it.
- `load_npz` / `save_npz`: the npz contract, never unpickling, written atomically. Each field's .npy
  header is checked against its zip member's size before anything is allocated.
- `check_labels`: labels are class ids in [0, num_classes), or, where no model gives the count, in
  [0, MAX_CLASSES) (100,000); a file's label past LABEL_LIMIT (2**31) is never a class id.
- `ArraySource` / `as_source`: a Dataset seen as a Source (nothing to decode, nothing fails).
- `read_all`: a Source read to the end into a Dataset; this is what loading an image folder or tar
  shards eagerly means, so there is one decode path. Unreadable samples are warned about and left
  out (the result's ids are the samples kept). With `into` a directory the pixels go to
  `into/x.npy` range by range and come back memory-mapped read-only, so a detector that needs
  random access to every pixel for many epochs holds one range in memory, not N images; ids, y
  (and poison when the source has it) go beside it as ids.npy, y.npy, poison.npy. Each file is
  written under a temporary name and renamed, so a failed read leaves an earlier one in place.
"""

from __future__ import annotations

import io
import os
import zipfile
from dataclasses import dataclass

import numpy as np

from backdoor_engine.atomic import atomic_write
from backdoor_engine.data.fingerprint import dataset_fingerprint
from backdoor_engine.data.source import Batch, Source, warn_skipped
from backdoor_engine.errors import InputError

NPZ_FIELDS = ("x", "y", "ids", "poison")
# Labels are class ids: a file's label at or past LABEL_LIMIT is not one (it would also overflow int32
# consumers), and without a model to say how many classes there are, labels may imply at most
# MAX_CLASSES (a stray label of 10**9 would otherwise size a classifier head of 10**9 outputs).
LABEL_LIMIT = 2**31
MAX_CLASSES = 100_000
# Deflate cannot expand data more than ~1032-fold: a zip member claiming more than this many bytes per
# stored byte lies about its size.
_DEFLATE_RATIO = 1100
READ_BYTES = 64 << 20  # pixels decoded per range by read_all: bounds its memory besides the result


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
        """max(y) + 1: the classes this dataset's labels imply (at most MAX_CLASSES)."""
        return implied_classes(self.y, "y")

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


def check_labels(y, num_classes: int | None, where: str) -> np.ndarray:
    """`y` as int64 class ids after checking each lies in [0, num_classes) (the model's class count),
    or, with num_classes None, in [0, MAX_CLASSES); an InputError naming `where` (the file or field)
    and the first bad label otherwise."""
    y = np.asarray(y)
    if y.dtype.kind not in "iu" or y.ndim != 1:
        raise InputError(f"{where}: labels must be a 1-D array of integer class ids, got {y.dtype} {y.shape}")
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer))
                                    or num_classes < 1):
        raise InputError(f"num_classes: expected a positive integer, got {num_classes!r}")
    limit = MAX_CLASSES if num_classes is None else int(num_classes)
    bad = np.flatnonzero((y < 0) | (y >= limit)) if y.size else np.empty(0, np.int64)
    if bad.size:
        value, index = y[bad[0]].item(), int(bad[0])
        bound = (f"num_classes={limit} (the model's classes)" if num_classes is not None else
                 f"MAX_CLASSES={MAX_CLASSES} (the most classes labels may imply without a model)")
        raise InputError(f"{where}: label {value} at index {index} ({bad.size} such) is not a class id in "
                         f"[0, {limit}): outside {bound}")
    return y.astype(np.int64, copy=False)


def implied_classes(y: np.ndarray, where: str) -> int:
    """max(y) + 1, the class count labels imply when no model says it; at most MAX_CLASSES."""
    high = int(y.max())
    if high >= MAX_CLASSES:
        check_labels(y, None, where)
    return high + 1


def load_npz(path: str | os.PathLike, num_classes: int | None = None) -> Dataset:
    """Read a dataset npz (fields x, y and optional ids, poison) without ever unpickling. Every
    field's .npy header is checked against the bytes its member holds before anything is allocated
    (a header may declare terabytes); y is checked with `check_labels`."""
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
        for name in archive.files:
            _check_member_header(archive.zip, name, path)
        arrays = {name: _read_field(archive, name, path) for name in archive.files}
    if arrays["y"].dtype.kind in "iu" and arrays["y"].ndim == 1:
        check_labels(arrays["y"], num_classes, f"{path}: field 'y'")
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


class ArraySource(Source):
    """An in-memory Dataset seen as a source (nothing to decode, nothing fails)."""

    def __init__(self, dataset: Dataset):
        if not isinstance(dataset, Dataset):
            raise InputError(f"dataset: expected a Dataset, got {type(dataset).__name__}")
        self.dataset = dataset
        self.ids, self.y, self.poison = dataset.ids, dataset.y, dataset.poison
        self.image_shape = dataset.image_shape
        self.listing_skipped = ()

    def read(self, start: int, stop: int) -> Batch:
        self.check_range(start, stop)
        return Batch(self.dataset.x[start:stop], np.arange(start, stop, dtype=np.int64))

    def images(self, positions) -> np.ndarray:
        return self.dataset.x[np.asarray(positions, dtype=np.int64)]

    def fingerprint(self) -> str:
        return dataset_fingerprint(self.dataset)


def as_source(data) -> Source:
    """A Source as is; a Dataset wrapped in an ArraySource."""
    if isinstance(data, Source):
        return data
    if isinstance(data, Dataset):
        return ArraySource(data)
    raise InputError(f"data must be a backdoor_engine.data.Dataset or Source, got {type(data).__name__}")


def read_all(source: Source, *, into: str | os.PathLike | None = None, skipped: list | None = None) -> Dataset:
    """Every readable sample of `source`, in order, as a Dataset (see the module docstring); with
    `into`, a directory (created if missing), its x is memory-mapped from `into/x.npy`. With `skipped`
    (a list), the samples that could not be decoded are appended to it as (id, reason) instead of
    being warned about (a scan lists them in its report)."""
    if not isinstance(source, Source):
        raise InputError(f"source: expected a backdoor_engine.data Source, got {type(source).__name__}")
    shape = (len(source), *source.image_shape)
    if into is None:
        pixels = np.empty(shape, np.uint8)
        kept = _read_into(source, pixels, skipped)
        # The leading rows of the full buffer: no copy, even when some samples were left out.
        return _kept_dataset(source, pixels[:len(kept)], kept)
    into = os.fspath(into)
    if os.path.exists(into) and not os.path.isdir(into):
        raise InputError(f"into: {into} exists and is not a directory")
    os.makedirs(into, exist_ok=True)
    x_path = os.path.join(into, "x.npy")
    with atomic_write(x_path, "w+b") as file:
        np.lib.format.write_array_header_1_0(file, _npy_header(shape))
        offset = file.tell()
        file.truncate(offset + int(np.prod(shape)))
        file.flush()
        pixels = np.memmap(file, np.uint8, "r+", offset=offset, shape=shape)
        kept = _read_into(source, pixels, skipped)
        pixels.flush()
        del pixels  # unmapped before the file is cut to the kept rows
        if len(kept) < shape[0]:
            header = io.BytesIO()
            np.lib.format.write_array_header_1_0(header, _npy_header((len(kept), *shape[1:])))
            # numpy pads a header so that axis 0 can change in place; refuse rather than shift the data.
            if header.tell() != offset:
                raise RuntimeError(f"numpy {np.__version__} wrote a {header.tell()}-byte npy header where "
                                   f"{offset} bytes were reserved")
            file.seek(0)
            file.write(header.getvalue())
            file.truncate(offset + len(kept) * int(np.prod(shape[1:])))
        arrays = {"ids": source.ids[kept], "y": source.y[kept]}
        if source.poison is not None:
            arrays["poison"] = source.poison[kept]
        for name, array in arrays.items():
            with atomic_write(os.path.join(into, f"{name}.npy")) as array_file:
                np.save(array_file, array, allow_pickle=False)
        if source.poison is None and os.path.lexists(os.path.join(into, "poison.npy")):
            os.remove(os.path.join(into, "poison.npy"))  # an earlier read's: not these samples' truth
    return _kept_dataset(source, np.load(x_path, mmap_mode="r"), kept)


def _read_into(source: Source, pixels: np.ndarray, skipped: list | None) -> np.ndarray:
    """Decode `source` range by range into the leading rows of `pixels`; warns about what was left
    out and returns the positions kept (an InputError when none could be read)."""
    rows = max(1, READ_BYTES // int(np.prod(source.image_shape)))
    kept, failures, filled = [], [], 0
    for start in range(0, len(source), rows):
        batch = source.read(start, min(start + rows, len(source)))
        pixels[filled:filled + len(batch.kept)] = batch.x
        filled += len(batch.kept)
        kept.append(batch.kept)
        failures.extend(batch.failures)
    if skipped is None:
        warn_skipped(source.description, [*source.listing_skipped, *failures])
    else:
        skipped.extend(failures)
    if not filled:
        raise InputError(f"{source.description}: no sample could be read")
    return np.concatenate(kept)


def _kept_dataset(source: Source, x: np.ndarray, kept: np.ndarray) -> Dataset:
    return make_dataset(x, source.y[kept], ids=source.ids[kept],
                        poison=None if source.poison is None else source.poison[kept])


def _npy_header(shape: tuple[int, ...]) -> dict:
    return {"descr": np.dtype(np.uint8).str, "fortran_order": False, "shape": shape}


def _check_member_header(archive: zipfile.ZipFile, name: str, path: str) -> None:
    """Refuse field `name` unless its .npy header is a plain array whose declared size is exactly what
    its zip member holds, and the member's own size is believable (at most what deflate could expand
    the stored bytes to, within the archive's size): so reading it allocates no more than the file
    can really give."""
    member = f"{name}.npy"
    try:
        info = archive.getinfo(member)
        stored_limit = os.path.getsize(path) if isinstance(archive.filename, str) else None
        if info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size:
            raise InputError(f"{path}: field {name!r}: its zip entry claims {info.file_size} bytes but stores "
                             f"{info.compress_size}: the archive is corrupt")
        if info.file_size > _DEFLATE_RATIO * max(info.compress_size, 1) + 1024 or (
                stored_limit is not None and info.compress_size > stored_limit):
            raise InputError(f"{path}: field {name!r}: its zip entry claims {info.file_size} bytes from "
                             f"{info.compress_size} compressed ones: the archive is corrupt or a decompression bomb")
        with archive.open(info) as file:
            version = np.lib.format.read_magic(file)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(file, max_header_size=10000)
            elif version in ((2, 0), (3, 0)):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(file, max_header_size=10000)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
            header_bytes = file.tell()
    except InputError:
        raise
    except KeyError:
        raise InputError(f"{path}: field {name!r} is not stored as {member}") from None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError,
            SyntaxError, TypeError, RuntimeError) as error:
        raise InputError(f"{path}: field {name!r} is truncated or corrupt: its .npy header cannot be read "
                         f"({type(error).__name__}: {error})") from None
    if dtype.hasobject:
        raise InputError(f"{path}: field {name!r} could not be read without unpickling (object arrays are not "
                         f"accepted): dtype {dtype}")
    if len(shape) > 4 or any(not isinstance(side, int) or side < 0 for side in shape):
        raise InputError(f"{path}: field {name!r} declares shape {shape}, not an array of a dataset npz")
    declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
    held = info.file_size - header_bytes
    if declared != held:
        raise InputError(f"{path}: field {name!r} declares {dtype} {shape} ({declared} bytes) but its member "
                         f"holds {held} data bytes: the file is truncated or corrupt")


def _read_field(archive, name: str, path: str) -> np.ndarray:
    try:
        return archive[name]
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, RuntimeError) as error:
        # The header was checked (a plain array of the right size), so what fails now is the data itself.
        raise InputError(f"{path}: field {name!r} is truncated or corrupt ({type(error).__name__}: {error})") from None


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
