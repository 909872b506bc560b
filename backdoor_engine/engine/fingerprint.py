"""Content fingerprints that tell whether stored features came from this model and this dataset.

A resumed extraction must not mix features of two models or two datasets: the feature store
records both fingerprints and refuses a resume when either differs.
"""

import hashlib

import numpy as np
import torch
from torch import nn

from backdoor_engine.data import Dataset

# Images hashed per step: bounds the copy a memory-mapped dataset needs.
HASH_CHUNK = 4096


def model_fingerprint(model: nn.Module) -> str:
    """Hash of the architecture (its repr, which holds every module's settings such as BN eps) and
    of every state-dict tensor (name, dtype, shape, values); independent of device and memory format."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr(model).encode())
    for name, tensor in model.state_dict().items():
        values = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{values.dtype}|{tuple(values.shape)}".encode())
        digest.update(values.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


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
