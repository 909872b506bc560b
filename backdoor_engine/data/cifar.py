"""CIFAR-10: the official binary version, and the 20 real test images shipped inside the foolbox wheel."""

from __future__ import annotations

import importlib.util
import os
import re

import numpy as np
from PIL import Image

from backdoor_engine.data.dataset import Dataset, make_dataset
from backdoor_engine.errors import InputError

CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer",
               "dog", "frog", "horse", "ship", "truck")

BINARY_DIR_NAME = "cifar-10-batches-bin"
SPLIT_FILES = {
    "train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
    "test": ("test_batch.bin",),
}
_SIDE = 32
_RECORD_BYTES = 1 + 3 * _SIDE * _SIDE  # one label byte, then the image as 3 x 32 x 32 (CHW)

# foolbox/data/cifar10_<index>_<label>.png; the indices 00..19 are the first 20 CIFAR-10 test images.
_FOOLBOX_SAMPLE_NAME = re.compile(r"cifar10_(\d+)_(\d+)\.png")


def find_cifar10_binary_dir(root: str | os.PathLike) -> str | None:
    """`root` itself or its `cifar-10-batches-bin` child, whichever holds CIFAR-10 batch files; else None."""
    root = os.fspath(root)
    names = SPLIT_FILES["train"] + SPLIT_FILES["test"]
    for candidate in (root, os.path.join(root, BINARY_DIR_NAME)):
        if any(os.path.isfile(os.path.join(candidate, name)) for name in names):
            return candidate
    return None


def load_cifar10_binary(root: str | os.PathLike, split: str = "train") -> Dataset:
    """The `split` ("train" or "test") of the CIFAR-10 binary version as 32x32x3 uint8; ids are indices."""
    if split not in SPLIT_FILES:
        raise InputError(f"split: expected 'train' or 'test', got {split!r}")
    directory = find_cifar10_binary_dir(root)
    if directory is None:
        raise InputError(f"{os.fspath(root)}: no CIFAR-10 binary files found there or in {BINARY_DIR_NAME}/; "
                         f"expected {', '.join(SPLIT_FILES['train'] + SPLIT_FILES['test'])}")
    records = np.concatenate([_read_records(os.path.join(directory, name)) for name in SPLIT_FILES[split]])
    images = records[:, 1:].reshape(-1, 3, _SIDE, _SIDE).transpose(0, 2, 3, 1)
    return make_dataset(np.ascontiguousarray(images), records[:, 0].astype(np.int64),
                        num_classes=len(CLASS_NAMES))


def load_foolbox_cifar10_samples() -> Dataset:
    """The 20 real CIFAR-10 test images bundled with foolbox; ids are their test-set indices."""
    # find_spec locates the package without importing it (foolbox imports eagerpy and more on import).
    spec = importlib.util.find_spec("foolbox")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("cifar10-samples needs the foolbox package: pip install --no-deps foolbox")
    data_dir = os.path.join(list(spec.submodule_search_locations)[0], "data")
    matches = sorted((int(m.group(1)), int(m.group(2)), name)
                     for name in (os.listdir(data_dir) if os.path.isdir(data_dir) else [])
                     if (m := _FOOLBOX_SAMPLE_NAME.fullmatch(name)))
    if not matches:
        raise InputError(f"{data_dir}: no cifar10_<index>_<label>.png samples found in this foolbox install")
    images = []
    for _, _, name in matches:
        with Image.open(os.path.join(data_dir, name)) as image:
            images.append(np.asarray(image.convert("RGB")))
    return make_dataset(np.stack(images), np.array([label for _, label, _ in matches], dtype=np.int64),
                        ids=np.array([index for index, _, _ in matches], dtype=np.int64),
                        num_classes=len(CLASS_NAMES))


def _read_records(path: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise InputError(f"CIFAR-10 batch file missing: {path}")
    data = np.fromfile(path, dtype=np.uint8)
    if data.size == 0 or data.size % _RECORD_BYTES:
        raise InputError(f"{path}: truncated or not a CIFAR-10 batch: {data.size} bytes is not a whole "
                         f"number of {_RECORD_BYTES}-byte records")
    records = data.reshape(-1, _RECORD_BYTES)
    if records[:, 0].max() >= len(CLASS_NAMES):
        raise InputError(f"{path}: label byte {int(records[:, 0].max())} is not a CIFAR-10 class (0..9)")
    return records
