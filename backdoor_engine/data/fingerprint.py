"""Content fingerprints of datasets: what a feature store records to refuse mixing two datasets.

Two hashes, both blake2b-128 hex digests, both stable across runs and processes (feature stores on
disk hold them, so a change here orphans every stored extraction; tests pin their values):

- `dataset_fingerprint`: an in-memory Dataset's ids, labels and pixels, in order.
- `content_digest`: a streamed source's listing (ids, labels, file sizes and times, offsets) under a
  header naming the source kind and output shape; the pixels are not read, since hashing a million
  files would cost as much as scanning them.

The model's fingerprint lives with the models it hashes (engine.fingerprint); this module imports
nothing of the package, so `backdoor_engine.data` loads without torch or the engine.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from backdoor_engine.data.dataset import Dataset

# Images hashed per step: bounds the copy a memory-mapped dataset needs.
HASH_CHUNK = 4096


def dataset_fingerprint(dataset: Dataset) -> str:
    """Hash of the ids, labels and pixels, in order."""
    digest = hashlib.blake2b(digest_size=16)
    for name, array in (("ids", dataset.ids), ("y", dataset.y)):
        digest.update(f"{name}|{array.dtype.str}|{array.shape}".encode())
        digest.update(np.ascontiguousarray(array))
    digest.update(f"x|{dataset.x.shape}".encode())
    for start in range(0, len(dataset), HASH_CHUNK):
        digest.update(np.ascontiguousarray(dataset.x[start:start + HASH_CHUNK]))
    return digest.hexdigest()


def content_digest(header: str, arrays) -> str:
    """blake2b-128 of `header`, then each array's dtype, shape and bytes in order: what a source's
    fingerprint hashes (its listing, not its pixels)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(header.encode())
    for array in arrays:
        digest.update(f"{array.dtype.str}|{array.shape}".encode())
        digest.update(np.ascontiguousarray(array))
    return digest.hexdigest()
