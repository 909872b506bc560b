"""An image folder read as a stream: listed once, images decoded range by range (bounded memory)."""

from __future__ import annotations

import os
import numpy as np

from backdoor_engine.data.image_folder import IMAGE_EXTENSIONS, checked_image_size, decode_image, listed_files
from backdoor_engine.data.source import Batch, BatchBuilder, Source, content_digest, output_shape
from backdoor_engine.errors import InputError


class ImageFolderSource(Source):
    """`root/<class>/**/<image>.(png|jpg|jpeg)`, the layout `load_image_folder` reads, as a Source.

    Sorted class folder names give the class ids; ids are paths relative to root (forward slashes),
    in sorted order. Every image comes out image_size (bilinear resize) with `channels` channels
    (L or RGB); unset, both are taken from the first readable image, and an image of another size
    then fails (listed, skipped). Files of other types are listed in `listing_skipped`.
    """

    def __init__(self, root: str | os.PathLike, *, image_size: int | tuple[int, int] | None = None,
                 channels: int | None = None):
        self.root = os.path.abspath(os.fspath(root))
        if not os.path.isdir(self.root):
            raise InputError(f"{root}: not a directory")
        if channels not in (None, 1, 3):
            raise InputError(f"channels: expected 1, 3 or None, got {channels!r}")
        size = checked_image_size(image_size)
        entries = sorted(os.scandir(self.root), key=lambda entry: entry.name)
        self.class_names = tuple(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
        if not self.class_names:
            raise InputError(f"{root}: no class sub-folders found; expected {root}/<class>/<image>.png")
        self.listing_skipped = [(e.path, "not inside a class folder") for e in entries
                                if not e.is_dir() and not e.name.startswith(".")]
        ids, labels, stats = [], [], []
        for label, class_name in enumerate(self.class_names):
            for relative, stat in listed_files(self.root, class_name):
                extension = os.path.splitext(relative)[1].lower()
                if extension in IMAGE_EXTENSIONS:
                    ids.append(relative)
                    labels.append(label)
                    stats.append(stat)
                else:
                    self.listing_skipped.append((os.path.join(self.root, relative),
                                                 f"extension {extension or '(none)'!r} is not one of "
                                                 f"{', '.join(IMAGE_EXTENSIONS)}"))
        if not ids:
            raise InputError(f"{root}: no PNG/JPEG files found ({len(self.listing_skipped)} other files)")
        self.ids = np.array(ids, dtype=str)
        self.y = np.array(labels, dtype=np.int64)
        self._stats = np.array(stats, dtype=np.int64).reshape(-1, 2)  # (size, mtime_ns) per file
        self._size, self._channels = size, channels
        self.image_shape = output_shape(size, channels, len(self.ids), lambda position: decode_image(
            os.path.join(self.root, self.ids[position]), size, channels), self.root)

    def read(self, start: int, stop: int) -> Batch:
        self.check_range(start, stop)
        size = self.image_shape[:2] if self._size else None
        builder = BatchBuilder(self.image_shape, stop - start)
        for position in range(start, stop):
            path = os.path.join(self.root, self.ids[position])
            builder.add(position, self.ids[position], lambda: decode_image(path, size, self.image_shape[2]))
        return builder.batch()

    def fingerprint(self) -> str:
        """Hash of ids, labels, each file's size and modification time, and the output shape (the
        pixels are not read: hashing a million files would cost as much as scanning them)."""
        return content_digest(f"image-folder|{self.image_shape}|{self._size}|{self._channels}",
                              (self.ids, self.y, self._stats))
