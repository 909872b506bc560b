"""An image folder, `root/<class>/**/<image>.(png|jpg|jpeg)`, as a Source; and a writer for one.

Listing (once, when the source is opened): sorted class folder names give the class ids; a sample's
id is its path relative to root with forward slashes; files are taken folder by folder, names
sorted, so ids and their order are stable across runs. Hidden files and folders (".name") are
ignored; files beside the class folders and files of other extensions are listed in
`listing_skipped`, never raised. Only regular files are ever opened: an entry that cannot be stat'ed
(dangling link, link loop), a FIFO, socket or device, a link to a folder below a class folder, and,
unless `follow_links_outside=True`, a symbolic link whose target leaves the root are listed there
too, each with its reason.

Decoding (when a range is read): only the PNG and JPEG decoders run, whatever the extension says.
Channels and size follow the rule of data.source: a folder is RGB if any of its images is colour,
else grey (`channels` forces either); images must all have one size unless `image_size` is given,
and a folder mixing sizes is refused when opened with an error naming two files that differ. A
file that cannot be decoded is a failure of its range (listed with its id and the reason).

Loading a folder into memory is reading this source to the end (`read_all`, which `open_dataset`
calls), so the eager and the streamed read give the same pixels, ids and labels.
"""

from __future__ import annotations

import io
import os
import secrets
import shutil
import stat
from pathlib import PurePath

import numpy as np
from PIL import Image

from backdoor_engine.data.dataset import Dataset
from backdoor_engine.data.fingerprint import content_digest
from backdoor_engine.data.source import (
    MAX_IMAGE_BYTES,
    Batch,
    BatchBuilder,
    Source,
    checked_channels,
    checked_image_size,
    decode_image,
    image_header,
    open_regular,
    output_shape,
)
from backdoor_engine.errors import InputError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


class ImageFolderSource(Source):
    """Every PNG/JPEG image under `root`'s class folders (see the module docstring), each coming out
    `image_size` (int or (height, width); bilinear) with `channels` (1 or 3) channels."""

    def __init__(self, root: str | os.PathLike, *, image_size: int | tuple[int, int] | None = None,
                 channels: int | None = None, follow_links_outside: bool = False):
        self.root = os.path.abspath(os.fspath(root))
        if not os.path.isdir(self.root):
            raise InputError(f"{root}: not a directory")
        channels, size = checked_channels(channels), checked_image_size(image_size)
        self.follow_links_outside = bool(follow_links_outside)
        listing = _Listing(self.root, self.follow_links_outside)
        class_names = []
        for entry in sorted(listing.scan(self.root), key=lambda entry: entry.name):
            if entry.name.startswith("."):
                continue
            kind = listing.kind(entry.path)
            if kind == "dir":
                class_names.append(entry.name)
            elif kind == "file":
                listing.skipped.append((entry.path, "not inside a class folder"))
        self.class_names = tuple(class_names)
        if not self.class_names:
            raise InputError(f"{root}: no class sub-folders found; expected {root}/<class>/<image>.png"
                             + (f" ({len(listing.skipped)} entries skipped)" if listing.skipped else ""))
        ids, labels, stats = [], [], []
        for label, class_name in enumerate(self.class_names):
            for relative, file_stat in listing.files(class_name):
                extension = os.path.splitext(relative)[1].lower()
                if extension in IMAGE_EXTENSIONS:
                    ids.append(relative)
                    labels.append(label)
                    stats.append(file_stat)
                else:
                    listing.skipped.append((os.path.join(self.root, relative),
                                            f"extension {extension or '(none)'!r} is not one of "
                                            f"{', '.join(IMAGE_EXTENSIONS)}"))
        self.listing_skipped = listing.skipped
        if not ids:
            raise InputError(f"{root}: no PNG/JPEG files found ({len(self.listing_skipped)} other entries)")
        self.ids = np.array(ids, dtype=str)
        self.y = np.array(labels, dtype=np.int64)
        self._stats = np.array(stats, dtype=np.int64).reshape(-1, 2)  # (size, mtime_ns) per file
        self._size, self._channels = size, channels
        self.image_shape = output_shape(size, channels, len(self.ids), lambda position: image_header(
            read_regular_file(self._path(position))), self._path, self.root)

    def read(self, start: int, stop: int) -> Batch:
        self.check_range(start, stop)
        builder = BatchBuilder(self.image_shape, stop - start)
        for position in range(start, stop):
            path = self._path(position)
            builder.add(position, self.ids[position],
                        lambda: decode_image(read_regular_file(path), self._size, self.image_shape[2]))
        return builder.batch()

    def fingerprint(self) -> str:
        """Hash of ids, labels, each file's size and modification time, and the output shape (the
        pixels are not read: hashing a million files would cost as much as scanning them)."""
        return content_digest(f"image-folder|{self.image_shape}|{self._size}|{self._channels}",
                              (self.ids, self.y, self._stats))

    def _path(self, position: int) -> str:
        return os.path.join(self.root, self.ids[position])


class _Listing:
    """The folder walk, refusing what must not be opened and listing it in `skipped` with the reason:
    entries that cannot be stat'ed (a dangling link, a link loop, no permission), anything but regular
    files and folders (a FIFO named x.png would block the reading process forever), and, unless
    `follow_links_outside`, symbolic links whose target lies outside `root` (an outside folder must
    not become a class, nor an outside file a sample, without the user asking for it)."""

    def __init__(self, root: str, follow_links_outside: bool):
        self.root, self.follow_links_outside = root, follow_links_outside
        self.real_root = os.path.realpath(root)
        self.skipped: list[tuple[str, str]] = []

    def scan(self, directory: str) -> list[os.DirEntry]:
        try:
            with os.scandir(directory) as entries:
                return list(entries)
        except OSError as error:
            self.skipped.append((directory, f"unreadable folder: {error.strerror or error}"))
            return []

    def kind(self, path: str, stat_out: list | None = None) -> str | None:
        """"dir", "file" or None (skipped, with the reason listed) for the entry at `path`."""
        try:
            if os.path.islink(path):
                target = os.path.realpath(path)
                if not self.follow_links_outside and not _inside(target, self.real_root):
                    self.skipped.append((path, f"symbolic link to {target}, outside the dataset root "
                                               f"{self.real_root} (allow with --allow-outside-links / "
                                               "follow_links_outside=True)"))
                    return None
            status = os.stat(path)  # follows links: a dangling one or a loop raises here
        except OSError as error:
            self.skipped.append((path, f"unreadable entry: {error.strerror or type(error).__name__}"))
            return None
        except ValueError as error:  # e.g. an embedded NUL byte
            self.skipped.append((path, f"unreadable entry: {error}"))
            return None
        if stat.S_ISDIR(status.st_mode):
            return "dir"
        if stat.S_ISREG(status.st_mode):
            if stat_out is not None:
                stat_out.append(status)
            return "file"
        self.skipped.append((path, "not a regular file (a FIFO, socket or device is never opened)"))
        return None

    def files(self, class_name: str) -> list[tuple[str, tuple[int, int]]]:
        """(path relative to root with forward slashes, (size, mtime_ns)) of the non-hidden regular
        files under root/class_name, in a stable order: folder by folder, names sorted. A link to a
        folder below a class folder is listed, not walked (as os.walk did): walking it could loop, or
        give another class's images this class's label."""
        found = []
        pending = [os.path.join(self.root, class_name)]
        while pending:
            directory = pending.pop()
            folders = []
            for entry in sorted(self.scan(directory), key=lambda entry: entry.name):
                if entry.name.startswith("."):
                    continue
                status: list = []
                kind = self.kind(entry.path, status)
                if kind == "dir" and os.path.islink(entry.path):
                    self.skipped.append((entry.path, "symbolic link to a folder inside a class folder: not followed"))
                elif kind == "dir":
                    folders.append(entry.path)
                elif kind == "file":
                    relative = PurePath(os.path.relpath(entry.path, self.root)).as_posix()
                    found.append((relative, (status[0].st_size, status[0].st_mtime_ns)))
            pending.extend(reversed(folders))  # depth first, in name order, as os.walk listed them
        return found


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def read_regular_file(path: str) -> io.BytesIO:
    """The bytes of the regular file at `path` (see data.source.open_regular), in memory."""
    with open_regular(path, MAX_IMAGE_BYTES) as file:
        return _FileBytes(file.read(), path)


class _FileBytes(io.BytesIO):
    """A file's bytes whose repr (which Pillow's errors quote) is the file's path, as when Pillow opened
    the path itself: a skip reason reads the same in every run and process, with no memory address."""

    def __init__(self, data: bytes, path: str):
        super().__init__(data)
        self.path = path

    def __repr__(self) -> str:
        return repr(self.path)


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
