"""Feature store: extracted features on disk in fixed chunks of samples, resumable after a crash.

Directory layout:
    manifest.json            what is stored (n_samples, chunk_size, dtype, columns per array,
                             layout, model and dataset fingerprints, ...), finished_chunks and the
                             samples each chunk skipped (unreadable images: id and reason)
    ids.000003.npy           chunk 3's sample ids (rows chunk_size*3 ...), likewise y.*.npy and
    bn_minima.000003.npy     one file per captured array ("penultimate", "logits")
    all.bn_minima.npy        once complete and asked for (`matrix`): every row of an array in one file,
                             memory-mapped; it then replaces that array's chunk files
    .lock                    held (flock) by the one process writing the store

Chunk i always covers source rows [i * chunk_size, (i + 1) * chunk_size) (less the skipped ones), so a
chunk written twice is written identically and no sample is lost or duplicated. A chunk's files are each written
atomically (temp file, then rename) and only then is the chunk added to the manifest, itself
rewritten atomically: after a kill at any point the manifest lists only complete chunks, and a
resumed extraction redoes the rest. Files are plain .npy, read with allow_pickle=False and
memory-mapped.

One copy on disk, not two: consolidating an array (`matrix`) writes "all.<name>.npy" under a temporary
name, renames it into place, re-reads it against every chunk file, records the array under
"consolidated" in the manifest (format_version 3, which older engines refuse instead of looking for
the chunk files) and only then deletes that array's chunk files. "all.<name>.npy" exists only once it
is whole (the rename is the last step of writing it), so whenever it exists it is the array's data:
chunks are read as its row slices. A kill at any point leaves either the chunks alone (no rename yet;
the temp file goes on the next resume), or the whole matrix with some or all chunk files still there
(the next `matrix` call compares the ones left and deletes them). The finished chunks listed in the
manifest never change, so a resume has nothing to redo.
"""

from __future__ import annotations

import fcntl
import json
import os
import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from backdoor_engine.atomic import atomic_write, write_json_atomic
from backdoor_engine.engine.feature_set import CAPTURES, FeatureSet
from backdoor_engine.engine.layout import FeatureLayout
from backdoor_engine.errors import InputError

MANIFEST = "manifest.json"
LOCK = ".lock"
FORMAT = "backdoor-engine feature store"
FORMAT_VERSION = 2
CONSOLIDATED_VERSION = 3  # written once an array's chunk files are replaced by its matrix
READABLE_VERSIONS = (1, 2, 3)  # version 1: float32 only, nothing skipped
# float16 halves the store (24.6 GB -> 12.3 GB for ResNet-18 minima at 1.28M samples) and keeps 3 significant
# digits. Minima are log-likelihoods: measured between -353 and +0.25 on the Fashion-MNIST models here; a value past
# float16's +-65504 (an activation ~360 standard deviations out) is saturated there instead of becoming infinite.
FEATURE_DTYPES = ("float32", "float16")
DEFAULT_CHUNK_SIZE = 4096
# Fields that must match for a resume, with what a mismatch means to the user.
_RESUME_FIELDS = {
    "model_fingerprint": "a different model (weights or architecture)",
    "dataset_fingerprint": "a different dataset (ids, labels or pixels)",
    "n_samples": "a different number of samples",
    "chunk_size": "a different chunk_size",
    "columns": "different captures",
    "ids_dtype": "ids of another type",
    "layout": "a different BatchNorm2d layout",
    "normalisation": "a different input normalisation",
    "head": "a different head module",
    "dtype": "another feature dtype",
}
_REQUIRED = ("format", "format_version", "finished_chunks", *_RESUME_FIELDS)


class FeatureStore:
    """One store directory. `open` reads a finished or partial store; `create_or_resume` (used as a
    context manager, holding the store's lock) writes one."""

    def __init__(self, directory: Path, manifest: dict, lock_file=None):
        self.directory = directory
        self._manifest = manifest
        self._lock_file = lock_file
        self._matrices: dict[str, np.ndarray] = {}

    @classmethod
    def open(cls, directory: str | os.PathLike) -> FeatureStore:
        directory = Path(directory)
        return cls(directory, _read_manifest(directory))

    @classmethod
    def create_or_resume(cls, directory: str | os.PathLike, *, n_samples: int, chunk_size: int,
                         columns: Mapping[str, int], ids_dtype: np.dtype, layout: FeatureLayout | None,
                         normalisation: dict, head: str | None, model_fingerprint: str,
                         dataset_fingerprint: str, dtype: str = "float32") -> FeatureStore:
        """A new store, or the existing one at `directory` when it was written with the same settings;
        InputError saying what differs otherwise."""
        directory = Path(directory)
        check_chunk_size(chunk_size)
        check_feature_dtype(dtype)
        unknown = sorted(set(columns) - set(CAPTURES))
        if unknown or not columns:
            raise InputError(f"columns must name some of {CAPTURES}, got {sorted(columns)}")
        wanted = {
            "model_fingerprint": model_fingerprint, "dataset_fingerprint": dataset_fingerprint,
            "n_samples": int(n_samples), "chunk_size": int(chunk_size),
            "columns": {name: int(columns[name]) for name in CAPTURES if name in columns},
            "ids_dtype": np.dtype(ids_dtype).str, "layout": None if layout is None else layout.to_dict(),
            "normalisation": normalisation, "head": head, "dtype": dtype,
        }
        # A JSON round trip, so the comparison with a stored manifest sees the same types.
        wanted = json.loads(json.dumps(wanted))
        if directory.exists() and not directory.is_dir():
            raise InputError(f"feature store {directory} exists and is not a directory")
        directory.mkdir(parents=True, exist_ok=True)
        lock_file = _lock(directory)
        try:
            if (directory / MANIFEST).exists():
                manifest = _read_manifest(directory)
                _check_resumable(directory, manifest, wanted)
                _remove_stale_temp_files(directory)
            else:
                strangers = sorted(entry.name for entry in directory.iterdir() if not entry.name.startswith("."))
                if strangers:
                    raise InputError(f"{directory} is not empty and holds no {MANIFEST}: not a feature store "
                                     f"(found {strangers[:5]}); give an empty or new directory")
                manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **wanted, "finished_chunks": [],
                            "skipped": {}}
                write_json_atomic(directory / MANIFEST, manifest)
        except BaseException:
            lock_file.close()
            raise
        return cls(directory, manifest, lock_file)

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Release the writer's lock (a reader holds none)."""
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    @property
    def n_samples(self) -> int:
        return self._manifest["n_samples"]

    @property
    def chunk_size(self) -> int:
        return self._manifest["chunk_size"]

    @property
    def num_chunks(self) -> int:
        return -(-self.n_samples // self.chunk_size)

    @property
    def columns(self) -> dict[str, int]:
        """Captured array name -> its number of columns."""
        return dict(self._manifest["columns"])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self._manifest["dtype"])

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """(id, reason) of every sample a finished chunk left out, in row order."""
        stored = self._manifest.get("skipped", {})
        return [tuple(entry) for index in sorted(stored, key=int) for entry in stored[index]]

    @property
    def n_stored(self) -> int:
        """Rows the finished chunks hold (samples minus skipped ones)."""
        return sum(self._rows_kept(index) for index in self.finished_chunks)

    @property
    def layout(self) -> FeatureLayout | None:
        stored = self._manifest["layout"]
        return None if stored is None else FeatureLayout.from_dict(stored)

    @property
    def provenance(self) -> dict:
        """Fingerprints, normalisation and head the features were extracted with."""
        return {key: self._manifest[key] for key in ("model_fingerprint", "dataset_fingerprint", "normalisation",
                                                     "head")}

    @property
    def finished_chunks(self) -> tuple[int, ...]:
        return tuple(self._manifest["finished_chunks"])

    @property
    def is_complete(self) -> bool:
        return len(self._manifest["finished_chunks"]) == self.num_chunks

    def chunk_rows(self, index: int) -> tuple[int, int]:
        """Dataset rows [start, stop) of chunk `index`."""
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < self.num_chunks:
            raise InputError(f"chunk index must be in [0, {self.num_chunks}), got {index!r}")
        start = int(index) * self.chunk_size
        return start, min(start + self.chunk_size, self.n_samples)

    def write_chunk(self, index: int, ids: np.ndarray, y: np.ndarray, features: Mapping[str, np.ndarray],
                    skipped: list[tuple[str, str]] = ()) -> None:
        """Store chunk `index` (every array file atomically), then mark it finished in the manifest.
        `skipped`: (id, reason) of the chunk's samples that could not be read; the arrays hold the others."""
        if self._lock_file is None:
            raise InputError(f"feature store {self.directory} was opened for reading; write through "
                             "FeatureStore.create_or_resume")
        start, stop = self.chunk_rows(index)
        if set(features) != set(self.columns):
            raise InputError(f"chunk {index} must hold exactly {sorted(self.columns)}, got {sorted(features)}")
        skipped = [[str(sample_id), str(reason)] for sample_id, reason in skipped]
        rows = stop - start - len(skipped)
        arrays = {"ids": np.asarray(ids), "y": np.asarray(y, dtype=np.int64),
                  **{name: self._stored(values) for name, values in features.items()}}
        for name, values in arrays.items():
            if values.shape != self._chunk_shape(name, rows):
                raise InputError(f"chunk {index} {name}: expected shape {self._chunk_shape(name, rows)} "
                                 f"({stop - start} rows, {len(skipped)} skipped), got {values.shape}")
        for name, values in arrays.items():
            with atomic_write(self._chunk_path(name, index)) as file:
                np.save(file, values, allow_pickle=False)
        finished = sorted(set(self._manifest["finished_chunks"]) | {int(index)})
        manifest = {**self._manifest, "finished_chunks": finished}
        if skipped:
            manifest["skipped"] = {**manifest.get("skipped", {}), str(int(index)): skipped}
        write_json_atomic(self.directory / MANIFEST, manifest)
        self._manifest = manifest

    def read_chunk(self, index: int, name: str) -> np.ndarray:
        """Array `name` ("ids", "y" or a captured array) of a finished chunk, memory-mapped read-only."""
        self.chunk_rows(index)
        if name not in ("ids", "y", *self.columns):
            raise InputError(f"this store holds ids, y and {sorted(self.columns)}, not {name!r}")
        if index not in self._manifest["finished_chunks"]:
            raise InputError(f"chunk {index} of feature store {self.directory} is not finished")
        whole = self._consolidated(name)
        if whole is not None:
            start = sum(self._rows_kept(earlier) for earlier in range(index))
            return whole[start:start + self._rows_kept(index)]
        path = self._chunk_path(name, index)
        try:
            values = np.load(path, mmap_mode="r", allow_pickle=False)
        except FileNotFoundError:
            raise InputError(f"feature store chunk file {path} is missing although the manifest lists "
                             f"chunk {index} as finished") from None
        except ValueError as error:
            raise InputError(f"feature store chunk file {path} is corrupt ({error})") from None
        expected = self._chunk_shape(name, self._rows_kept(index))
        if values.shape != expected or values.dtype != self._array_dtype(name):
            raise InputError(f"feature store chunk file {path} holds {values.dtype} {values.shape}, expected "
                             f"{self._array_dtype(name)} {expected}")
        return values

    def iter_chunks(self, name: str) -> Iterator[np.ndarray]:
        """Array `name` chunk by chunk in row order (bounded memory); the store must be complete."""
        self._check_complete()
        for index in range(self.num_chunks):
            yield self.read_chunk(index, name)

    def matrix(self, name: str) -> np.ndarray:
        """Array `name` of every stored row as one read-only memory-mapped array: the chunks are copied
        once, chunk by chunk (bounded memory), into "all.<name>.npy", which then replaces them (see the
        module docstring) and which later calls reuse."""
        self._check_complete()
        if name not in ("ids", "y", *self.columns):
            raise InputError(f"this store holds ids, y and {sorted(self.columns)}, not {name!r}")
        path = self._matrix_path(name)
        if self._consolidated(name) is None:
            with atomic_write(path) as file:
                header = {"descr": np.lib.format.dtype_to_descr(self._array_dtype(name)), "fortran_order": False,
                          "shape": self._chunk_shape(name, self.n_stored)}
                np.lib.format.write_array_header_2_0(file, header)
                for chunk in self.iter_chunks(name):
                    file.write(np.ascontiguousarray(chunk).tobytes())
        values = self._consolidated(name)
        self._drop_chunk_files(name, values)
        return values

    def _consolidated(self, name: str) -> np.ndarray | None:
        """The memory-mapped "all.<name>.npy" once it exists (then it is whole), else None."""
        if name in self._matrices:
            return self._matrices[name]
        path = self._matrix_path(name)
        if not path.exists():
            return None
        shape = self._chunk_shape(name, self.n_stored)
        try:
            values = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as error:
            raise InputError(f"feature store file {path} is corrupt ({error})") from None
        if values.shape != shape or values.dtype != self._array_dtype(name):
            raise InputError(f"{path} holds {values.dtype} {values.shape}, expected {self._array_dtype(name)} {shape}")
        self._matrices[name] = values
        return values

    def _drop_chunk_files(self, name: str, whole: np.ndarray) -> None:
        """Delete array `name`'s chunk files once `whole` (its matrix, read back from disk) is seen to
        hold exactly their rows, after the manifest says the array is consolidated."""
        present = [index for index in range(self.num_chunks) if self._chunk_path(name, index).exists()]
        if not present:
            return
        start = 0
        offsets = {}
        for index in range(self.num_chunks):
            offsets[index] = start
            start += self._rows_kept(index)
        for index in present:
            chunk = np.load(self._chunk_path(name, index), mmap_mode="r", allow_pickle=False)
            rows = whole[offsets[index]:offsets[index] + self._rows_kept(index)]
            if chunk.shape != rows.shape or chunk.dtype != rows.dtype or not np.array_equal(chunk, rows):
                raise InputError(f"{self._matrix_path(name)} differs from chunk file {self._chunk_path(name, index)}; "
                                 "delete the all.* file to have it rebuilt from the chunks")
        # Read afresh: another reader may have consolidated another array meanwhile.
        stored = _read_manifest(self.directory)
        if name not in stored.get("consolidated", []):
            stored = {**stored, "format_version": CONSOLIDATED_VERSION,
                      "consolidated": sorted({*stored.get("consolidated", []), name})}
            write_json_atomic(self.directory / MANIFEST, stored)
        self._manifest = stored
        for index in present:
            self._chunk_path(name, index).unlink(missing_ok=True)

    def load(self, memory_map: bool = False) -> FeatureSet:
        """All stored features as one FeatureSet: concatenated into memory, or with memory_map the
        memory-mapped `matrix` of each array (bounded memory at any N)."""
        self._check_complete()
        names = ("ids", "y", *self.columns)
        if memory_map:
            arrays = {name: self.matrix(name) for name in names}
        else:
            arrays = {name: _joined(list(self.iter_chunks(name))) for name in names}
        return FeatureSet(ids=arrays.pop("ids"), y=arrays.pop("y"), layout=self.layout, **arrays,
                          metadata={"store": str(self.directory), "skipped": self.skipped, **self.provenance})

    def _check_complete(self) -> None:
        if not self.is_complete:
            raise InputError(f"feature store {self.directory} is incomplete: {len(self.finished_chunks)} of "
                             f"{self.num_chunks} chunks finished; run the extraction again with this store "
                             "to resume it")

    def _stored(self, values) -> np.ndarray:
        values = np.asarray(values)
        if self.dtype == np.float16:
            limit = np.finfo(np.float16).max
            values = np.clip(values, -limit, limit)
        return np.asarray(values, dtype=self.dtype)

    def _rows_kept(self, index: int) -> int:
        start, stop = self.chunk_rows(index)
        return stop - start - len(self._manifest.get("skipped", {}).get(str(index), ()))

    def _array_dtype(self, name: str) -> np.dtype:
        return np.dtype(self._manifest["ids_dtype"] if name == "ids" else "<i8" if name == "y" else self.dtype)

    def _chunk_shape(self, name: str, rows: int) -> tuple[int, ...]:
        return (rows,) if name in ("ids", "y") else (rows, self.columns[name])

    def _chunk_path(self, name: str, index: int) -> Path:
        return self.directory / f"{name}.{index:06d}.npy"

    def _matrix_path(self, name: str) -> Path:
        return self.directory / f"all.{name}.npy"


def check_chunk_size(chunk_size) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise InputError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")


def check_feature_dtype(dtype) -> None:
    if dtype not in FEATURE_DTYPES:
        raise InputError(f"feature dtype must be one of {FEATURE_DTYPES}, got {dtype!r}")


def _joined(chunks: list[np.ndarray]) -> np.ndarray:
    # One chunk stays memory-mapped; several are concatenated into memory.
    return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)


# Lock files this process holds. A forked child (a decode worker) inherits their descriptors, and an
# flock lasts while any descriptor of it is open: the child closes its copies, or a worker outliving
# a killed writer would keep the store locked against the resume.
_held_locks = weakref.WeakSet()


def _close_inherited_locks() -> None:
    for lock_file in list(_held_locks):
        lock_file.close()


os.register_at_fork(after_in_child=_close_inherited_locks)


def _lock(directory: Path):
    lock_file = open(directory / LOCK, "a")
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock_file.close()
        # the holder may only be reading: extract_features opens a complete store the same way to reuse it
        raise InputError(f"feature store {directory} is open in another process (an extraction writing it, or one "
                         f"reusing it, holds it while it runs); wait for that process to finish or give another "
                         f"store directory") from None
    _held_locks.add(lock_file)
    return lock_file


def _read_manifest(directory: Path) -> dict:
    path = directory / MANIFEST
    if not path.is_file():
        raise InputError(f"{directory} is not a feature store: {MANIFEST} not found")
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise InputError(f"{path} is not a {FORMAT} manifest")
    missing = [key for key in _REQUIRED if key not in manifest]
    if missing:
        raise InputError(f"{path} is missing {missing}")
    if manifest["format_version"] not in READABLE_VERSIONS or manifest.get("dtype") not in FEATURE_DTYPES:
        raise InputError(f"{path}: format_version {manifest['format_version']!r} dtype {manifest.get('dtype')!r} "
                         f"is not supported (this engine reads versions {READABLE_VERSIONS}, {FEATURE_DTYPES})")
    return manifest


def _check_resumable(directory: Path, manifest: dict, wanted: dict) -> None:
    for key, meaning in _RESUME_FIELDS.items():
        if manifest[key] != wanted[key]:
            detail = "" if key.endswith("fingerprint") else f": stored {manifest[key]!r}, now {wanted[key]!r}"
            raise InputError(f"feature store {directory} holds features of {meaning}{detail}; refusing to resume "
                             "into it (delete it or give another directory to start afresh)")


def _remove_stale_temp_files(directory: Path) -> None:
    # Left by a writer killed mid-write (atomic_write's ".NAME.XXXX.tmp"); the lock says none is running.
    for temp in directory.glob(".*.tmp"):
        temp.unlink(missing_ok=True)
