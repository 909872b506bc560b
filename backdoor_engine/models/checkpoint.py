"""Model checkpoints that load without unpickling: a state dict plus plain-typed metadata.

File layout (torch.save zip): {"state_dict": {name: tensor}, "meta": {"arch", "num_classes",
"in_channels", "input_size": [H, W], "normalisation": {"mean": [...], "std": [...]},
"format_version", "engine_version", ...extra}}. Everything in "meta" is str/int/float/bool/None,
lists and str-keyed dicts, so `torch.load(weights_only=True)` reads it and json can write it.
"""

import math
import os
import pickle
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from .. import __version__
from ..atomic import atomic_write
from ..data.dataset import MAX_CLASSES
from ..errors import InputError
from .polarizer import attach_polarizer, polarizer_meta
from .preprocess import Normalisation
from .registry import build_model, image_size_pair

FORMAT_VERSION = 1
REQUIRED_META = ("arch", "num_classes", "in_channels", "input_size", "normalisation", "format_version")
RESERVED_META = (*REQUIRED_META, "engine_version", "polarizer")
# Sane bounds on declared metadata, checked before anything is built from it: a crafted num_classes of
# 10^12 would otherwise allocate the head first and fail (or exhaust memory) afterwards. The class bound is
# the one labels are held to (data.dataset.MAX_CLASSES).
MAX_NUM_CLASSES = MAX_CLASSES
MAX_INPUT_SIDE = 8192


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
    polarizer = polarizer_meta(model)
    if polarizer is not None:  # NPD: the polarizer is part of the model and rebuilt on load
        meta["polarizer"] = polarizer
    # Rebuilding now catches a wrong arch / size before anything is written.
    expected = build_quietly(arch, num_classes=num_classes, in_channels=in_channels, input_size=(height, width))
    if polarizer is not None:
        attach_polarizer(expected, polarizer["layer"], polarizer["channels"])
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    check_state_dict(expected, state, f"model (as {arch})")
    with atomic_write(path) as file:
        torch.save({"state_dict": state, "meta": meta}, file)


def build_quietly(arch: str, **shape) -> nn.Module:
    """build_model without consuming the caller's global RNG (its random init is overwritten anyway)."""
    with torch.random.fork_rng(devices=[]):
        return build_model(arch, **shape)


def check_finite_weights(state: Mapping, source: str) -> None:
    """Raise InputError naming the first floating tensor of `state` that holds NaN or inf.

    One pass over the weights at load time: a NaN weight would otherwise turn every prediction and feature
    into NaN much later (`eval` printed BA 0.1 / ASR 1.0 for such a file)."""
    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise InputError(f"{source}: tensor {key!r} holds NaN or infinite values")


def load_weights_only(path, *, kind: str, advice: str):
    """`torch.load(path, weights_only=True)` of an untrusted file, every failure an InputError: a file that
    needs unpickling names the global torch refused and says not to load it with weights_only=False (torch's
    own message says that "will likely succeed"; for an untrusted file it would run the file's code), followed
    by `advice`; malformed bytes say the file is not a `kind`."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL (\S+)", str(error))
        what = f"it needs the Python global {found.group(1)}" if found else "it holds objects that need unpickling"
        raise InputError(f"{path} cannot be read safely: {what}. Do not load it with weights_only=False: unpickling "
                         f"an untrusted file runs code from it{advice}") from None
    except Exception as error:  # malformed bytes surface as KeyError, RuntimeError, EOFError, ... from torch
        raise InputError(f"{path} is not a {kind} ({type(error).__name__}: {error})") from None


def _check_declared(meta: dict, state: Mapping, path) -> None:
    """Declared metadata within sane bounds and consistent with the state dict's shapes, before building."""
    for key in ("num_classes", "in_channels"):
        value = meta[key]
        if not isinstance(value, int) or isinstance(value, bool):
            raise InputError(f"{path}: checkpoint meta {key} must be an integer, got {value!r}")
    if not 2 <= meta["num_classes"] <= MAX_NUM_CLASSES:
        raise InputError(f"{path}: checkpoint meta num_classes is {meta['num_classes']}; expected 2..{MAX_NUM_CLASSES}")
    dummy = meta.get("dummy_class")
    if dummy is not None and (not isinstance(dummy, int) or isinstance(dummy, bool) or dummy != meta["num_classes"] - 1):
        raise InputError(f"{path}: checkpoint meta dummy_class must be the last output ({meta['num_classes'] - 1}), "
                         f"got {dummy!r}")
    size = meta["input_size"]
    if (isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(s, int) for s in size)
            and max(size) > MAX_INPUT_SIDE):
        raise InputError(f"{path}: checkpoint meta input_size {size} exceeds {MAX_INPUT_SIDE} pixels a side")
    head = state.get("head.weight")
    if isinstance(head, torch.Tensor) and (head.dim() != 2 or head.shape[0] != meta["num_classes"]):
        raise InputError(f"{path}: checkpoint meta declares num_classes {meta['num_classes']} but its classifier "
                         f"head.weight has shape {tuple(head.shape)}")


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
    payload = load_weights_only(path, kind="torch checkpoint",
                                advice="; a backdoor-engine checkpoint holds only tensors and plain metadata")
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
    _check_declared(meta, state, path)
    check_finite_weights(state, str(path))
    model = build_quietly(meta["arch"], num_classes=meta["num_classes"], in_channels=meta["in_channels"],
                          input_size=meta["input_size"])
    polarizer = meta.get("polarizer")
    if polarizer is not None:
        if not (isinstance(polarizer, dict) and isinstance(polarizer.get("layer"), str)
                and isinstance(polarizer.get("channels"), int)):
            raise InputError(f"{path}: checkpoint meta polarizer must be {{'layer': str, 'channels': int}}, "
                             f"got {polarizer!r}")
        attach_polarizer(model, polarizer["layer"], polarizer["channels"])
    check_state_dict(model, state, str(path))
    normalisation = Normalisation.from_dict(meta["normalisation"])
    if normalisation.channels != meta["in_channels"]:
        raise InputError(f"{path}: normalisation has {normalisation.channels} channels, "
                         f"in_channels is {meta['in_channels']}")
    return model.eval(), {**meta, "normalisation": normalisation}
