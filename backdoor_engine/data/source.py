"""Sources: datasets read range by range, so a scan never holds every image in memory.

A source knows its samples' ids and labels up front (from a file listing or a shard index) and
decodes images only when a range is read. Ids are stable across runs (paths, shard/key names), so
a feature store written by one run is resumed by the next. A sample that cannot be decoded is not
an error: the range comes back without it and the failure is listed with its id and the reason.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np

from backdoor_engine.data.dataset import Dataset
from backdoor_engine.errors import InputError


@dataclass(frozen=True)
class Batch:
    """The readable samples of one range: pixels x [m, H, W, C] uint8 and their source positions
    `kept` [m]; `failures` lists (id, reason) of the samples of the range that could not be read."""

    x: np.ndarray
    kept: np.ndarray
    failures: list[tuple[str, str]] = field(default_factory=list)


class BatchBuilder:
    """Collects the decoded samples of one range into a Batch; a sample whose decoding raises, or
    that decodes to another size, becomes a failure with its reason instead of an error."""

    def __init__(self, image_shape: tuple[int, int, int], capacity: int):
        self.image_shape = image_shape
        self.x = np.empty((capacity, *image_shape), np.uint8)
        self.kept, self.failures = [], []

    def add(self, position: int, sample_id, decode) -> None:
        """Decode one sample by calling `decode()` (H x W or H x W x C uint8 pixels)."""
        height, width, channels = self.image_shape
        try:
            pixels = decode()
        except Exception as error:  # untrusted bytes: any decoder failure means "corrupt", not a crash
            self.failures.append((str(sample_id), f"unreadable image: {type(error).__name__}: {error}"))
            return
        if pixels.shape[:2] != (height, width):
            self.failures.append((str(sample_id), f"image is {pixels.shape[1]}x{pixels.shape[0]} (WxH), expected "
                                  f"{width}x{height}; pass image_size to resize every image"))
            return
        self.x[len(self.kept)] = pixels.reshape(height, width, channels)
        self.kept.append(position)

    def batch(self) -> Batch:
        return Batch(self.x[:len(self.kept)], np.array(self.kept, dtype=np.int64), self.failures)


class Source(ABC):
    """Samples with stable ids and labels; pixels decoded on demand, every image H x W x C.

    Subclasses set `ids` [N], `y` [N] int64, `image_shape` (H, W, C), `class_names` and
    `listing_skipped` ((path, reason) of files left out before any decoding, e.g. a wrong extension).
    `poison` (0/1 ground truth, metrics only) is None unless the source carries it.
    """

    ids: np.ndarray
    y: np.ndarray
    image_shape: tuple[int, int, int]
    class_names: tuple[str, ...] = ()
    listing_skipped: tuple[tuple[str, str], ...] | list[tuple[str, str]] = ()
    poison: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_classes(self) -> int:
        return max(len(self.class_names), int(self.y.max()) + 1)

    @abstractmethod
    def read(self, start: int, stop: int) -> Batch:
        """Decode samples [start, stop)."""

    @abstractmethod
    def fingerprint(self) -> str:
        """A hash that changes when the samples (ids, labels, files) change; a resume compares it."""

    @property
    def description(self) -> str:
        return f"{type(self).__name__}(n={len(self)}, image_shape={self.image_shape})"

    def images(self, positions) -> np.ndarray:
        """Pixels of the samples at `positions` (for a report's montage); an unreadable one is black."""
        positions = np.asarray(positions, dtype=np.int64)
        out = np.zeros((len(positions), *self.image_shape), np.uint8)
        for row, position in enumerate(positions.tolist()):
            batch = self.read(position, position + 1)
            if len(batch.kept):
                out[row] = batch.x[0]
        return out

    def check_range(self, start: int, stop: int) -> None:
        if not 0 <= start <= stop <= len(self):
            raise InputError(f"range [{start}, {stop}) is outside this source's {len(self)} samples")


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
        from backdoor_engine.engine.fingerprint import dataset_fingerprint

        return dataset_fingerprint(self.dataset)


class SourceRange(Source):
    """Rows [start, stop) of another source, as a source of their own (one scale-out work item)."""

    def __init__(self, source: Source, start: int, stop: int):
        source.check_range(start, stop)
        self.source, self.start = source, int(start)
        self.ids, self.y = source.ids[start:stop], source.y[start:stop]
        self.poison = None if source.poison is None else source.poison[start:stop]
        self.image_shape, self.listing_skipped = source.image_shape, ()

    def read(self, start: int, stop: int) -> Batch:
        self.check_range(start, stop)
        batch = self.source.read(self.start + start, self.start + stop)
        return Batch(batch.x, batch.kept - self.start, batch.failures)

    def fingerprint(self) -> str:
        """The range and its rows' ids and labels (pixels unread, as the streamed sources do)."""
        return content_digest(f"{type(self.source).__name__}|{self.image_shape}|{self.start}|{len(self)}",
                              (self.ids, self.y))


class SourceRows:
    """The rows of `source` a scan kept (positions into the source, in order), seen as a table:
    ids, y, poison and, on demand, images; what the report writers read instead of a Dataset."""

    def __init__(self, source: Source, positions: np.ndarray):
        self.source, self.positions = source, np.asarray(positions, dtype=np.int64)
        self.ids, self.y = source.ids[self.positions], source.y[self.positions]
        self.poison = None if source.poison is None else source.poison[self.positions]

    def __len__(self) -> int:
        return len(self.positions)

    def images(self, rows) -> np.ndarray:
        return self.source.images(self.positions[np.asarray(rows, dtype=np.int64)])


def content_digest(header: str, arrays) -> str:
    """blake2b-128 of `header`, then each array's dtype, shape and bytes in order: what a source's
    fingerprint hashes (its listing, not its pixels)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(header.encode())
    for array in arrays:
        digest.update(f"{array.dtype.str}|{array.shape}".encode())
        digest.update(np.ascontiguousarray(array))
    return digest.hexdigest()


def output_shape(size: tuple[int, int] | None, channels: int | None, count: int, decode_at,
                 where: str) -> tuple[int, int, int]:
    """(H, W, C) every image of a source comes out as: `size` and `channels` when both are given,
    otherwise those of the first of its `count` samples that `decode_at(position)` decodes (one that
    cannot be decoded fails later, when its range is read)."""
    if size is not None and channels is not None:
        return (*size, channels)
    for position in range(count):
        try:
            pixels = decode_at(position)
        except Exception:  # noqa: BLE001 - listed as a failure when its range is read
            continue
        return (*pixels.shape[:2], 1 if pixels.ndim == 2 else 3)
    raise InputError(f"{where}: none of the {count} images can be decoded")


def as_source(data) -> Source:
    """A Source as is; a Dataset wrapped in an ArraySource."""
    if isinstance(data, Source):
        return data
    if isinstance(data, Dataset):
        return ArraySource(data)
    raise InputError(f"data must be a backdoor_engine.data.Dataset or Source, got {type(data).__name__}")
