"""Sources: datasets read range by range, so a scan never holds every image in memory.

A source knows its samples' ids and labels up front (from a file listing or a shard index) and
decodes images only when a range is read. Ids are stable across runs (paths, shard/key names), so
a feature store written by one run is resumed by the next. A sample that cannot be decoded is not
an error: the range comes back without it and the failure is listed with its id and the reason.

This module holds what every kind shares: the `Source` protocol and its `Batch`, the views
`SourceRange` and `SourceRows`, and the one PNG/JPEG decoder and output-shape rule that the
file-based kinds (image folders, tar shards) use, so that their eager and streamed reads agree:

- channels: as asked; unset, 3 (RGB) if any image of the source is colour, else 1 (L). A grey image
  in an RGB source repeats its value in all three channels (Pillow's L -> RGB).
- size: `image_size` resizes every image bilinearly; unset, every image must have the size of the
  others, and two that differ are an InputError naming both (a silently skipped odd size would
  drop samples from a scan without anyone asking for it).

Both are settled when the source is opened, from the image headers only (size and mode, no pixel
decoding) and only when not given; a file whose header cannot be read is left to fail on read.
"""

from __future__ import annotations

import os
import stat
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from backdoor_engine.data.fingerprint import content_digest
from backdoor_engine.errors import InputError

_DECODERS = ("PNG", "JPEG")  # Pillow decides by content, but only these decoders may run
_GREY_MODES = {"1", "L", "LA", "La", "I", "F"}
_SKIPPED_SHOWN = 20  # a folder with thousands of bad files should not flood the terminal
# Pixels one image may declare: 8192 x 8192. A header is read before anything is allocated, and one
# claiming more (a few bytes can claim 65535 x 65535) would size every batch after it; Pillow only
# refuses at 2 x 89M pixels, and merely warns below that.
MAX_IMAGE_PIXELS = 1 << 26
# Bytes one image file (or tar member) may hold: it is read whole into memory before decoding.
MAX_IMAGE_BYTES = 256 << 20
# What to tell a user whose images differ in size, from either face of the engine.
RESIZE_HINT = "resize with --image-size H W (CLI) / image_size= (API)"


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
            # The headers agreed when the source was opened; the file changed since (or lied).
            self.failures.append((str(sample_id), f"image is {pixels.shape[1]}x{pixels.shape[0]} (WxH), expected "
                                  f"{width}x{height}; {RESIZE_HINT}"))
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
        """Class folders, or max(y) + 1 (at most data.dataset.MAX_CLASSES), whichever is more."""
        from backdoor_engine.data.dataset import implied_classes  # dataset imports this module

        return max(len(self.class_names), implied_classes(self.y, self.description))

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


def checked_image_size(image_size) -> tuple[int, int] | None:
    """(height, width) from an int or a pair; None stays None."""
    if image_size is None:
        return None
    size = (image_size, image_size) if isinstance(image_size, (int, np.integer)) else tuple(image_size)
    if len(size) != 2 or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1 for s in size):
        raise InputError(f"image_size: expected a positive int or (height, width), got {image_size!r}")
    return int(size[0]), int(size[1])


def checked_channels(channels) -> int | None:
    if channels not in (None, 1, 3) or isinstance(channels, bool):
        raise InputError(f"channels: expected 1, 3 or None, got {channels!r}")
    return channels


def decode_image(file, size: tuple[int, int] | None, channels: int) -> np.ndarray:
    """H x W (channels=1) or H x W x 3 (channels=3) uint8 pixels of the PNG/JPEG image in `file` (a
    path or a binary file object), resized bilinearly to `size` (height, width) when given; only the
    PNG and JPEG decoders may run on these untrusted bytes."""
    with Image.open(file, formats=_DECODERS) as image:
        _check_pixels(image)
        image.load()
        if image.mode.startswith("I;16"):
            # Pillow clips 16-bit values at 255 when converting to L; scale them to 8 bits instead.
            wide = np.asarray(image).astype(np.uint32)
            image = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8))
        image = image.convert("L" if channels == 1 else "RGB")
    if size is not None:
        image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return np.asarray(image)


def image_header(file) -> tuple[int, int, bool]:
    """(height, width, is colour) of the PNG/JPEG image in `file`, from its header: Pillow reads the
    size and mode without decoding the pixels (a palette image is decoded to look at its colours)."""
    with Image.open(file, formats=_DECODERS) as image:
        _check_pixels(image)
        width, height = image.size
        if image.mode in ("P", "PA"):
            palette = np.array(image.getpalette() or [0, 0, 0]).reshape(-1, 3)
            colour = bool((palette != palette[:, :1]).any())
        else:
            colour = image.mode not in _GREY_MODES and not image.mode.startswith("I;16")
    return height, width, colour


def _check_pixels(image) -> None:
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise ValueError(f"the image declares {width}x{height} pixels, more than the {MAX_IMAGE_PIXELS} one image "
                         "may have (a decompression bomb?)")


def output_shape(size: tuple[int, int] | None, channels: int | None, count: int, header_at, name_at,
                 where: str) -> tuple[int, int, int]:
    """(H, W, C) every image of a source of `count` samples comes out as, by the rule in this module's
    docstring: `size` and `channels` when given, the rest from `header_at(position)` ((height, width,
    is colour) of a sample's image). `name_at(position)` names a sample in the size-mismatch error."""
    if size is not None and channels is not None:
        return (*size, channels)
    first, colour = None, False
    for position in range(count):
        try:
            height, width, is_colour = header_at(position)
        except Exception:  # noqa: BLE001 - listed as a failure when its range is read
            continue
        if first is None:
            first = (position, height, width)
        elif size is None and (height, width) != first[1:]:
            raise InputError(f"{where}: {name_at(position)} is {width}x{height} (WxH) but {name_at(first[0])} is "
                             f"{first[2]}x{first[1]}; {RESIZE_HINT} to bring every image to one size")
        colour = colour or is_colour
        if size is not None and colour:
            break  # nothing left to learn: the size is given and one colour image makes the source RGB
    if first is None:
        raise InputError(f"{where}: none of the {count} images can be decoded")
    return (*(size or first[1:]), channels or (3 if colour else 1))


def warn_skipped(where: str, skipped) -> None:
    """Tell the user, on stderr, which (path or id, reason) files or samples were left out: one plain
    line saying how many and from where, then the first few, indented. Not warnings.warn, whose
    "file:line: UserWarning" prefix and echoed source line mean nothing to a command-line user."""
    skipped = list(skipped)
    if skipped:
        shown = "".join(f"\n  {path}: {reason}" for path, reason in skipped[:_SKIPPED_SHOWN])
        more = len(skipped) - _SKIPPED_SHOWN
        print(f"backdoor-engine: skipped {len(skipped)} file(s) in {where}:{shown}"
              + (f"\n  ... and {more} more" if more > 0 else ""), file=sys.stderr, flush=True)


def open_regular(path: str, max_bytes: int | None = None):
    """`path` opened for binary reading, if it is a regular file (of at most `max_bytes` when given):
    opened without blocking and checked after opening, so a FIFO or device (or a file swapped for one
    since it was listed) raises an OSError instead of hanging the reader."""
    descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode):
            raise OSError(f"{path} is not a regular file")
        if max_bytes is not None and status.st_size > max_bytes:
            raise OSError(f"{path} holds {status.st_size} bytes, more than the {max_bytes} allowed here")
    except BaseException:
        os.close(descriptor)
        raise
    return os.fdopen(descriptor, "rb")
