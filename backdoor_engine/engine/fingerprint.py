"""The model's content fingerprint: tells whether stored features came from this model.

A resumed extraction must not mix features of two models or two datasets: the feature store
records both fingerprints and refuses a resume when either differs. The dataset's side lives with
the data (backdoor_engine.data.fingerprint).
"""

import hashlib

import torch
from torch import nn


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
