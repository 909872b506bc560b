"""Model checkpoints that load without unpickling: a state dict plus plain-typed metadata.

File layout (torch.save zip): {"state_dict": {name: tensor}, "meta": {"arch", "num_classes",
"in_channels", "input_size": [H, W], "normalisation": {"mean": [...], "std": [...]},
"format_version", "engine_version", ...extra}}. Everything in "meta" is str/int/float/bool/None,
lists and str-keyed dicts, so `torch.load(weights_only=True)` reads it and json can write it.
"""

import math
import os
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from .. import __version__
from ..atomic import atomic_write
from ..errors import InputError
from .preprocess import Normalisation
from .registry import build_model, image_size_pair

FORMAT_VERSION = 1
REQUIRED_META = ("arch", "num_classes", "in_channels", "input_size", "normalisation", "format_version")
RESERVED_META = (*REQUIRED_META, "engine_version")


def check_plain(value, where: str) -> None:
    """Raise InputError unless `value` is built only of JSON-like Python types."""
    if value is None or isinstance(value, (str, bool, int)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InputError(f"{where} is {value}: checkpoint metadata must be finite")
        return
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            check_plain(item, f"{where}[{index}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise InputError(f"{where} has a non-string key {key!r}")
            check_plain(item, f"{where}[{key!r}]")
        return
    raise InputError(f"{where} is a {type(value).__name__}; checkpoint metadata takes only "
                     "str, int, float, bool, None, lists and str-keyed dicts")


def save_checkpoint(path: str | os.PathLike, model: nn.Module, *, arch: str, num_classes: int, in_channels: int,
                    input_size: int | Sequence[int], normalisation: Normalisation, extra: dict | None = None) -> None:
    """Write `model`'s weights and what a scan needs to rebuild it; atomic (temp file, then rename)."""
    extra = {} if extra is None else extra
    check_plain(extra, "extra")
    clashing = sorted(set(extra) & set(RESERVED_META))
    if clashing:
        raise InputError(f"extra must not set reserved metadata keys: {', '.join(clashing)}")
    height, width = image_size_pair(input_size)
    meta = {"arch": arch, "num_classes": num_classes, "in_channels": in_channels, "input_size": [height, width],
            "normalisation": normalisation.to_dict(), "format_version": FORMAT_VERSION,
            "engine_version": __version__, **extra}
    # Rebuilding now catches a wrong arch / size before anything is written.
    expected = build_quietly(arch, num_classes=num_classes, in_channels=in_channels, input_size=(height, width))
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    check_state_dict(expected, state, f"model (as {arch})")
    with atomic_write(path) as file:
        torch.save({"state_dict": state, "meta": meta}, file)


def build_quietly(arch: str, **shape) -> nn.Module:
    """build_model without consuming the caller's global RNG (its random init is overwritten anyway)."""
    with torch.random.fork_rng(devices=[]):
        return build_model(arch, **shape)


def check_state_dict(model: nn.Module, state: Mapping, source: str) -> None:
    """Load `state` into `model` strictly; a mismatch becomes an InputError naming the keys."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise InputError(f"{source} does not match the architecture: {error}") from None


def load_checkpoint(path: str | os.PathLike) -> tuple[nn.Module, dict]:
    """The model (CPU, eval mode) and its metadata; meta["normalisation"] comes back as a Normalisation.

    The file is read with weights_only=True: anything that would need unpickling arbitrary objects
    is refused, as is a file that is not a backdoor-engine checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint file not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise InputError(f"{path} cannot be read safely: it is not a torch checkpoint, or it holds objects that "
                         f"need unpickling, which an untrusted file may not ({str(error).splitlines()[0]})") from None
    except Exception as error:  # malformed bytes surface as KeyError, RuntimeError, EOFError, ... from torch
        raise InputError(f"{path} is not a torch checkpoint ({type(error).__name__}: {error})") from None
    if not isinstance(payload, dict) or not {"state_dict", "meta"} <= set(payload):
        found = sorted(payload) if isinstance(payload, dict) else type(payload).__name__
        raise InputError(f"{path} is not a backdoor-engine checkpoint: expected keys state_dict and meta, got {found}")
    meta, state = payload["meta"], payload["state_dict"]
    if not isinstance(meta, dict) or not isinstance(state, dict):
        raise InputError(f"{path}: meta and state_dict must be dicts")
    if not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise InputError(f"{path}: state_dict values must all be tensors")
    for key in REQUIRED_META:
        if key not in meta:
            raise InputError(f"{path}: checkpoint meta is missing {key!r}")
    if meta["format_version"] != FORMAT_VERSION:
        raise InputError(f"{path}: checkpoint format_version {meta['format_version']!r} is not supported "
                         f"(this engine reads {FORMAT_VERSION})")
    model = build_quietly(meta["arch"], num_classes=meta["num_classes"], in_channels=meta["in_channels"],
                          input_size=meta["input_size"])
    check_state_dict(model, state, str(path))
    normalisation = Normalisation.from_dict(meta["normalisation"])
    if normalisation.channels != meta["in_channels"]:
        raise InputError(f"{path}: normalisation has {normalisation.channels} channels, "
                         f"in_channels is {meta['in_channels']}")
    return model.eval(), {**meta, "normalisation": normalisation}
