"""An image folder, `root/<class>/**/<image>.(png|jpg|jpeg)`, as a Source; and a writer for one.

Listing (once, when the source is opened): sorted class folder names give the class ids; a sample's
id is its path relative to root with forward slashes; files are taken folder by folder, names
sorted, so ids and their order are stable across runs. Hidden files and folders (".name") are
ignored; files beside the class folders and files of other extensions are listed in
`listing_skipped`, never raised.

Decoding (when a range is read): only the PNG and JPEG decoders run, whatever the extension says.
Channels and size follow the rule of data.source: a folder is RGB if any of its images is colour,
else grey (`channels` forces either); images must all have one size unless `image_size` is given,
and a folder mixing sizes is refused when opened with an error naming two files that differ. A
file that cannot be decoded is a failure of its range (listed with its id and the reason).

Loading a folder into memory is reading this source to the end (`read_all`, which `open_dataset`
calls), so the eager and the streamed read give the same pixels, ids and labels.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import PurePath

import numpy as np
from PIL import Image

from backdoor_engine.data.dataset import Dataset
from backdoor_engine.data.fingerprint import content_digest
from backdoor_engine.data.source import (
    Batch,
    BatchBuilder,
    Source,
    checked_channels,
    checked_image_size,
    decode_image,
    image_header,
    output_shape,
)
from backdoor_engine.errors import InputError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


class ImageFolderSource(Source):
    """Every PNG/JPEG image under `root`'s class folders (see the module docstring), each coming out
    `image_size` (int or (height, width); bilinear) with `channels` (1 or 3) channels."""

    def __init__(self, root: str | os.PathLike, *, image_size: int | tuple[int, int] | None = None,
                 channels: int | None = None):
        self.root = os.path.abspath(os.fspath(root))
        if not os.path.isdir(self.root):
            raise InputError(f"{root}: not a directory")
        channels, size = checked_channels(channels), checked_image_size(image_size)
        entries = sorted(os.scandir(self.root), key=lambda entry: entry.name)
        self.class_names = tuple(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
        if not self.class_names:
            raise InputError(f"{root}: no class sub-folders found; expected {root}/<class>/<image>.png")
        self.listing_skipped = [(e.path, "not inside a class folder") for e in entries
                                if not e.is_dir() and not e.name.startswith(".")]
        ids, labels, stats = [], [], []
        for label, class_name in enumerate(self.class_names):
            for relative, stat in _listed_files(self.root, class_name):
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
        self.image_shape = output_shape(size, channels, len(self.ids), lambda position: image_header(
            self._path(position)), self._path, self.root)

    def read(self, start: int, stop: int) -> Batch:
        self.check_range(start, stop)
        builder = BatchBuilder(self.image_shape, stop - start)
        for position in range(start, stop):
            path = self._path(position)
            builder.add(position, self.ids[position], lambda: decode_image(path, self._size, self.image_shape[2]))
        return builder.batch()

    def fingerprint(self) -> str:
        """Hash of ids, labels, each file's size and modification time, and the output shape (the
        pixels are not read: hashing a million files would cost as much as scanning them)."""
        return content_digest(f"image-folder|{self.image_shape}|{self._size}|{self._channels}",
                              (self.ids, self.y, self._stats))

    def _path(self, position: int) -> str:
        return os.path.join(self.root, self.ids[position])


def _listed_files(root: str, class_name: str) -> list[tuple[str, tuple[int, int]]]:
    """(path relative to root with forward slashes, (size, mtime_ns)) of the non-hidden files under
    root/class_name, in a stable order: folder by folder, names sorted."""
    found = []
    for directory, subdirectories, names in os.walk(os.path.join(root, class_name)):
        subdirectories[:] = sorted(name for name in subdirectories if not name.startswith("."))
        for name in sorted(names):
            if not name.startswith("."):
                path = os.path.join(directory, name)
                stat = os.stat(path)
                found.append((PurePath(os.path.relpath(path, root)).as_posix(), (stat.st_size, stat.st_mtime_ns)))
    return found


def write_image_folder(dataset: Dataset, root: str | os.PathLike,
                       class_names: tuple[str, ...] | list[str] | None = None) -> None:
    """Write `dataset` as PNGs `root/<class>/<id>.png` that `ImageFolderSource` reads back losslessly.

    Without `class_names` the folders are the zero-padded class ids. `root` must not exist or be empty;
    the tree is built under a temporary name beside it and renamed into place, so a failure leaves nothing.
    """
    if not isinstance(dataset, Dataset):
        raise InputError(f"dataset: expected a Dataset, got {type(dataset).__name__}")
    root = os.path.abspath(os.fspath(root))
    folders = _class_folders(dataset.num_classes, class_names)
    files = _image_file_names(dataset.ids)
    if os.path.lexists(root) and (not os.path.isdir(root) or os.listdir(root)):
        raise InputError(f"{root}: already exists and is not an empty directory")
    parent = os.path.dirname(root)
    if not os.path.isdir(parent):
        raise InputError(f"{root}: parent directory {parent} does not exist")
    staging = os.path.join(parent, f".{os.path.basename(root)}.tmp-{secrets.token_hex(4)}")
    os.mkdir(staging)
    try:
        for folder in folders:
            os.mkdir(os.path.join(staging, folder))
        for image, label, name in zip(dataset.x, dataset.y, files):
            path = os.path.join(staging, folders[label], name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            Image.fromarray(image[..., 0] if image.shape[2] == 1 else image).save(path, format="PNG")
        os.replace(staging, root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _class_folders(num_classes: int, class_names) -> list[str]:
    if class_names is None:
        width = len(str(num_classes - 1))  # zero-padded so sorted folder names keep the class order
        return [f"{label:0{width}d}" for label in range(num_classes)]
    names = [str(name) for name in class_names]
    if len(names) < num_classes:
        raise InputError(f"class_names: expected at least {num_classes} names (labels go up to "
                         f"{num_classes - 1}), got {len(names)}")
    for name in names:
        if not name or name.startswith(".") or any(c in name for c in "/\\\0"):
            raise InputError(f"class_names: {name!r} cannot be a folder name (empty, hidden, or has / \\ NUL)")
    if len(set(names)) != len(names):
        raise InputError("class_names: names must be unique")
    if names != sorted(names):
        raise InputError("class_names: names must be in sorted order, since an image folder's class ids "
                         "follow the sorted folder names; prefix them with the zero-padded class id if needed")
    return names


def _image_file_names(ids: np.ndarray) -> list[str]:
    if ids.dtype.kind == "i":
        # Zero-padded non-negative ids keep their numeric order when the folder is read back sorted.
        width = len(str(ids.max())) if ids.min() >= 0 else 1
        return [f"{sample_id:0{width}d}.png" for sample_id in ids.tolist()]
    for sample_id in ids.tolist():
        parts = sample_id.split("/")
        if any(not part or part.startswith(".") or "\\" in part or "\0" in part for part in parts):
            raise InputError(f"ids: {sample_id!r} is not a safe relative file path for write_image_folder")
    return [f"{sample_id}.png" for sample_id in ids.tolist()]
