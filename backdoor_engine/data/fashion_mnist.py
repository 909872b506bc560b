"""Fashion-MNIST read straight from the gzip idx files of the Debian package dataset-fashion-mnist."""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib

import numpy as np

from backdoor_engine.data.dataset import Dataset, make_dataset
from backdoor_engine.errors import InputError

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

_FILE_PREFIX = {"train": "train", "test": "t10k"}
_EXPECTED_COUNT = {"train": 60000, "test": 10000}
_IMAGES_MAGIC = 0x00000803  # unsigned byte data, 3 dimensions
_LABELS_MAGIC = 0x00000801  # unsigned byte data, 1 dimension
_SIDE = 28
# The train images are 47 MB: a file decompressing to more is not Fashion-MNIST (or is a gzip bomb).
MAX_IDX_BYTES = 64 << 20


def load_fashion_mnist(split: str = "train", root: str | os.PathLike = DEFAULT_ROOT) -> Dataset:
    """The `split` ("train": 60k, "test": 10k) as 28x28x1 uint8 images; ids are the indices in the split."""
    if split not in _FILE_PREFIX:
        raise InputError(f"split: expected 'train' or 'test', got {split!r}")
    root = os.fspath(root)
    prefix = _FILE_PREFIX[split]
    images_path = os.path.join(root, f"{prefix}-images-idx3-ubyte.gz")
    labels_path = os.path.join(root, f"{prefix}-labels-idx1-ubyte.gz")
    for path in (images_path, labels_path):
        if not os.path.isfile(path):
            raise InputError(f"Fashion-MNIST file not found: {path}; "
                             f"install it with `apt-get install -y dataset-fashion-mnist`")
    images = _read_idx(images_path, _IMAGES_MAGIC)
    labels = _read_idx(labels_path, _LABELS_MAGIC)
    expected = _EXPECTED_COUNT[split]
    if images.shape != (expected, _SIDE, _SIDE):
        raise InputError(f"{images_path}: expected {expected} images of {_SIDE}x{_SIDE}, got shape {images.shape}")
    if labels.shape != (expected,):
        raise InputError(f"{labels_path}: expected {expected} labels, got shape {labels.shape}")
    return make_dataset(images[..., None], labels.astype(np.int64), num_classes=len(CLASS_NAMES))


def _read_idx(path: str, expected_magic: int) -> np.ndarray:
    """An idx file: big-endian magic, one uint32 per dimension, then the uint8 data."""
    try:
        with gzip.open(path, "rb") as file:
            # In pieces: read(n) sizes its buffer to n up front, whatever the file really holds.
            pieces, held = [], 0
            while held <= MAX_IDX_BYTES and (piece := file.read(1 << 20)):
                pieces.append(piece)
                held += len(piece)
            content = b"".join(pieces)
    except (OSError, EOFError, zlib.error) as error:
        raise InputError(f"{path}: not a readable gzip file ({type(error).__name__}: {error})") from None
    if len(content) > MAX_IDX_BYTES:
        raise InputError(f"{path}: decompresses to more than {MAX_IDX_BYTES} bytes, more than any Fashion-MNIST file")
    if len(content) < 4:
        raise InputError(f"{path}: too short for an idx header ({len(content)} bytes)")
    (magic,) = struct.unpack(">I", content[:4])
    if magic != expected_magic:
        raise InputError(f"{path}: expected idx magic number {expected_magic:#010x}, got {magic:#010x}")
    ndim = magic & 0xFF
    header_size = 4 + 4 * ndim
    if len(content) < header_size:
        raise InputError(f"{path}: truncated idx header")
    shape = struct.unpack(f">{ndim}I", content[4:header_size])
    data = np.frombuffer(content, dtype=np.uint8, offset=header_size)
    if data.size != math.prod(shape):  # math.prod: numpy's would wrap around on a hostile shape
        raise InputError(f"{path}: header says shape {shape} ({math.prod(shape)} bytes), "
                         f"file holds {data.size} data bytes")
    # Copy: frombuffer over bytes is read-only, and torch.from_numpy warns on read-only arrays.
    return data.reshape(shape).copy()
