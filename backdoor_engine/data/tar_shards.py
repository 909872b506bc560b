"""WebDataset-style tar shards as a Source, and a writer for them.

A shard is a plain (uncompressed) tar whose members are grouped into samples by key, WebDataset's
convention: "dir/n01440764_10026.jpg" and "dir/n01440764_10026.cls" are the image and the label
of sample "dir/n01440764_10026" (the key is the member path up to the first dot of its file name).
The label member holds the class id as decimal text. The index (where each image's bytes lie) is
built once from the tar headers, so a range is read by seeking, never by unpacking a shard.

Images are decoded and shaped as data.source says for every file-based kind (RGB if any image is
colour, one size for all unless `image_size` is given); loading shards into memory is reading this
source to the end (`read_all`), the same decode path as a streamed scan.
"""

from __future__ import annotations

import io
import os
import posixpath
import secrets
import shutil
import stat
import tarfile

import numpy as np
from PIL import Image

from backdoor_engine.data.dataset import LABEL_LIMIT, Dataset
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

IMAGE_SUFFIXES = ("png", "jpg", "jpeg")
LABEL_SUFFIX = "cls"


class TarShardSource(Source):
    """Every sample of the shards `path` names: a .tar file, or a directory whose *.tar files are
    taken in sorted name order. Ids are "<shard file name>/<key>". Every image comes out image_size
    with `channels` channels (unset: data.source's rule over all image headers). Samples without an
    image or a readable label are listed in `listing_skipped`; undecodable images fail on read.
    In a directory, only regular files are taken as shards, and a symbolic link whose target leaves
    the directory only with `follow_links_outside=True`; the others are listed with the reason. A
    damaged shard (truncated, or unreadable from some member on) is listed with the byte offset where
    it stops being readable; the complete samples before that point are kept."""

    def __init__(self, path: str | os.PathLike, *, image_size: int | tuple[int, int] | None = None,
                 channels: int | None = None, follow_links_outside: bool = False):
        path = os.path.abspath(os.fspath(path))
        self.listing_skipped = []
        if os.path.isdir(path):
            names = sorted(name for name in os.listdir(path) if name.endswith(".tar") and not name.startswith("."))
            self.shards = tuple(shard for shard in (os.path.join(path, name) for name in names)
                                if self._usable_shard(shard, path, follow_links_outside))
        elif os.path.isfile(path) and path.endswith(".tar"):
            self.shards = (path,)
        else:
            raise InputError(f"{path}: expected a .tar shard or a directory of .tar shards")
        if not self.shards:
            raise InputError(f"{path}: no .tar shards in this directory"
                             + (f" ({len(self.listing_skipped)} skipped)" if self.listing_skipped else ""))
        self._size, self._channels = checked_image_size(image_size), checked_channels(channels)
        ids, labels, where = [], [], []
        for shard_index, shard in enumerate(self.shards):
            for key, label, offset, size in self._index_shard(shard):
                ids.append(f"{os.path.basename(shard)}/{key}")
                labels.append(label)
                where.append((shard_index, offset, size))
        if not ids:
            raise InputError(f"{path}: no sample with both an image ({', '.join(IMAGE_SUFFIXES)}) and a "
                             f".{LABEL_SUFFIX} label in {len(self.shards)} shard(s)")
        self.ids = np.array(ids, dtype=str)
        self.y = np.array(labels, dtype=np.int64)
        self._where = np.array(where, dtype=np.int64)  # (shard, data offset, size) per sample
        self.image_shape = output_shape(self._size, channels, len(self.ids), lambda position: image_header(
            _MemberBytes(self._member_bytes(position))), lambda position: self.ids[position], path)

    def read(self, start: int, stop: int) -> Batch:
        self.check_range(start, stop)
        builder = BatchBuilder(self.image_shape, stop - start)
        open_shard, file = None, None
        try:
            for position in range(start, stop):
                shard, offset, size = (int(v) for v in self._where[position])
                if shard != open_shard:
                    if file is not None:
                        file.close()
                    file, open_shard = open_regular(self.shards[shard]), shard
                file.seek(offset)
                data = file.read(size)
                builder.add(position, self.ids[position], lambda: self._decode(data, self.image_shape[2]))
        finally:
            if file is not None:
                file.close()
        return builder.batch()

    def fingerprint(self) -> str:
        """Hash of each shard's name, size and modification time, and of the index (ids, labels,
        offsets) and the output shape; the image bytes are not read."""
        stats = [(os.path.basename(shard), os.stat(shard)) for shard in self.shards]
        shards = "".join(f"{name}|{stat.st_size}|{stat.st_mtime_ns}" for name, stat in stats)
        return content_digest(f"tar-shards|{self.image_shape}|{self._size}|{self._channels}{shards}",
                              (self.ids, self.y, self._where))

    def _decode(self, data: bytes, channels: int) -> np.ndarray:
        return decode_image(_MemberBytes(data), self._size, channels)

    def _member_bytes(self, position: int) -> bytes:
        shard, offset, size = (int(v) for v in self._where[position])
        with open_regular(self.shards[shard]) as file:
            file.seek(offset)
            return file.read(size)

    def _usable_shard(self, shard: str, directory: str, follow_links_outside: bool) -> bool:
        """Whether `shard` (listed in `directory`) may be opened; if not, it is listed with the reason."""
        if os.path.islink(shard) and not follow_links_outside:
            target, root = os.path.realpath(shard), os.path.realpath(directory)
            if not target.startswith(root.rstrip(os.sep) + os.sep):
                self.listing_skipped.append((shard, f"symbolic link to {target}, outside {root} (allow with "
                                                    "--allow-outside-links / follow_links_outside=True)"))
                return False
        try:
            mode = os.stat(shard).st_mode
        except OSError as error:
            self.listing_skipped.append((shard, f"unreadable entry: {error.strerror or type(error).__name__}"))
            return False
        if not stat.S_ISREG(mode):
            self.listing_skipped.append((shard, "not a regular file (a FIFO, socket or device is never opened)"))
            return False
        return True

    def _index_shard(self, shard: str) -> list[tuple[str, int, int, int]]:
        """(key, label, data offset, size) of each complete sample of one shard, in member order."""
        images, labels, order = {}, {}, []
        name = os.path.basename(shard)
        members, damage = 0, None
        try:
            with open_regular(shard) as file:
                length = os.fstat(file.fileno()).st_size
                # "r:" refuses compression: members must be seekable.
                with tarfile.open(fileobj=file, mode="r:") as tar:
                    for member in tar:
                        if member.offset_data + member.size > length:
                            damage = (f"truncated: member {member.name!r} needs bytes up to "
                                      f"{member.offset_data + member.size} but the file ends at byte {length}")
                            break
                        members += 1
                        if not member.isfile():
                            continue
                        directory, base = posixpath.split(member.name)
                        stem, _, suffix = base.partition(".")
                        key, suffix = posixpath.join(directory, stem), suffix.lower()
                        if key not in images and key not in labels:
                            order.append(key)
                        if suffix in IMAGE_SUFFIXES:
                            images[key] = (member.offset_data, member.size)
                        elif suffix == LABEL_SUFFIX:
                            labels[key] = _label(tar.extractfile(member).read(64))
                    if damage is None:
                        # tarfile reads a file cut at a member boundary as a shorter archive: only the
                        # end-of-archive marker (a zero block) says the shard was written to its end.
                        file.seek(tar.offset)
                        if file.read(512) != bytes(512):
                            damage = (f"truncated or damaged at byte {tar.offset} of {length}: no end-of-archive "
                                      f"marker after member {members}")
        except (tarfile.TarError, OSError, EOFError, ValueError, UnicodeError) as error:
            # A foreign file or damaged headers: keep what was indexed before the damage, list the shard.
            damage = f"not a readable uncompressed tar from member {members} on: {type(error).__name__}: {error}"
        if damage is not None:
            self.listing_skipped.append((shard, f"damaged shard, {damage}; the samples before it are kept"))
        samples = []
        for key in order:
            label = labels.get(key)
            if key in images and images[key][1] > MAX_IMAGE_BYTES:
                self.listing_skipped.append((f"{name}/{key}", f"image member of {images[key][1]} bytes, more than "
                                                              f"the {MAX_IMAGE_BYTES} one image may have"))
                continue
            if key not in images or not isinstance(label, int):
                reason = ("no image member" if key not in images else f"no .{LABEL_SUFFIX} member" if key not in labels
                          else f".{LABEL_SUFFIX} is not a class id in [0, {LABEL_LIMIT}): {label}")
                self.listing_skipped.append((f"{name}/{key}", reason))
                continue
            samples.append((key, label, *images[key]))
        return samples


class _MemberBytes(io.BytesIO):
    """A member's bytes; its repr (which decoder errors quote) does not carry a memory address, so
    the reason a sample was skipped reads the same in every run and every process."""

    def __repr__(self) -> str:
        return "<image member bytes>"


def _label(text: bytes) -> int | str:
    """The class id in a label member, or the text itself (for the skip reason) when it is not one:
    decimal digits below LABEL_LIMIT (26 digits would overflow the int64 label array)."""
    stripped = text.strip()
    if stripped.isdigit() and len(stripped) <= len(str(LABEL_LIMIT)) and int(stripped) < LABEL_LIMIT:
        return int(stripped)
    return repr(stripped[:20])


def write_tar_shards(dataset: Dataset, directory: str | os.PathLike, *, shard_size: int = 10000,
                     image_format: str = "png") -> list[str]:
    """Write `dataset` as shards `directory/shard-000000.tar` ... (`shard_size` samples each), every
    sample an image member "<key>.png" (or .jpg, quality 95) and a "<key>.cls" label, keys the
    zero-padded row numbers. Built in a temporary folder and renamed into place; returns the paths."""
    if not isinstance(dataset, Dataset):
        raise InputError(f"dataset: expected a Dataset, got {type(dataset).__name__}")
    if image_format not in ("png", "jpg"):
        raise InputError(f"image_format: expected 'png' or 'jpg', got {image_format!r}")
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise InputError(f"shard_size: expected an integer >= 1, got {shard_size!r}")
    directory = os.path.abspath(os.fspath(directory))
    if os.path.lexists(directory):
        raise InputError(f"{directory}: already exists")
    staging = os.path.join(os.path.dirname(directory), f".{os.path.basename(directory)}.tmp-{secrets.token_hex(4)}")
    os.mkdir(staging)
    width = len(str(len(dataset) - 1))
    names = []
    try:
        for shard, start in enumerate(range(0, len(dataset), shard_size)):
            names.append(f"shard-{shard:06d}.tar")
            with tarfile.open(os.path.join(staging, names[-1]), mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for row in range(start, min(start + shard_size, len(dataset))):
                    image = dataset.x[row]
                    buffer = io.BytesIO()
                    Image.fromarray(image[..., 0] if image.shape[2] == 1 else image).save(
                        buffer, format="PNG" if image_format == "png" else "JPEG", quality=95)
                    _add(tar, f"{row:0{width}d}.{image_format}", buffer.getvalue())
                    _add(tar, f"{row:0{width}d}.{LABEL_SUFFIX}", str(int(dataset.y[row])).encode())
        os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return [os.path.join(directory, name) for name in names]


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))
