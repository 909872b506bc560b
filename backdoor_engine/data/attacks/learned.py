"""What the learned-trigger attacks (IAD, SIBA, ISSBA) share: the trigger file, its checks, the base class.

A trigger file is an ``.npz`` of plain arrays, read with ``allow_pickle=False``: network weights under
``<net>.<state-dict key>``, plus ``kind`` (the attack's name), ``format_version``, ``image_shape`` and
``config`` (the builder's settings as a JSON string, for the record). Nothing in it is ever unpickled.
The attack classes take the file's path as a JSON parameter, so a PoisonSpec stays JSON and rebuilds the
same trigger; ``generator_sha256`` (recorded by the CLI) makes a spec refuse a file changed since.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from backdoor_engine.errors import InputError

from .base import Attack, check_image_shape, check_images, check_int
from .label_consistent import check_normalisation

FORMAT_VERSION = 1
ZIP_TIME = (1980, 1, 1, 0, 0, 0)
BUDGETS = ("paper", "cpu")


# ----------------------------------------------------------------------------------------- builder settings


def make_config(config_class: type, cpu_budget: dict, budget: str = "paper", **overrides: Any):
    """``config_class`` with the paper's defaults, or the small CPU budget, then ``overrides``; unknown
    names or a bad budget raise InputError listing the valid ones."""
    if budget not in BUDGETS:
        raise InputError(f"budget: expected one of {list(BUDGETS)}, got {budget!r}")
    valid = {field.name for field in dataclasses.fields(config_class)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise InputError(f"{config_class.__name__}: unknown setting(s) {unknown}; valid: {sorted(valid)}")
    settings = {**(cpu_budget if budget == "cpu" else {}), **overrides}
    return config_class(**settings)


def as_number(value: Any, field: str) -> float:
    """``value`` as a finite float; anything else (a string, NaN, a bool) is an InputError naming ``field``."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not np.isfinite(number) or isinstance(value, bool):
        raise InputError(f"{field}: expected a number, got {value!r}")
    return number


def check_positive(value: Any, field: str) -> float:
    number = as_number(value, field)
    if not number > 0:
        raise InputError(f"{field}: expected a positive number, got {value!r}")
    return number


def check_max_samples(value: Any) -> int | None:
    return None if value is None else check_int(value, "max_samples", 1)


def training_subset(x: np.ndarray, max_samples: int | None, rng: np.random.Generator) -> np.ndarray:
    """Indices of the images a builder trains on: all, or a seeded uniform subset (the CPU budget)."""
    if max_samples is None or max_samples >= len(x):
        return np.arange(len(x))
    return np.sort(rng.choice(len(x), max_samples, replace=False))


def batches(n: int, batch_size: int, rng: np.random.Generator, *, drop_last: bool = True) -> list[np.ndarray]:
    """One epoch of shuffled index batches; the short last batch is dropped when a full one exists
    (BackdoorBox's IAD loaders drop it), else the epoch is one batch of everything."""
    order = rng.permutation(n)
    if n <= batch_size:
        return [order]
    stop = n - n % batch_size if drop_last else n
    return [order[start : start + batch_size] for start in range(0, stop, batch_size)]


# ----------------------------------------------------------------------------------------- torch helpers


def to_unit(x: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float32 NCHW in [0, 1] (copies: inputs may be read-only)."""
    return torch.tensor(x).permute(0, 3, 1, 2).float() / 255


def from_unit(images: torch.Tensor) -> np.ndarray:
    """float NCHW in [0, 1] -> uint8 NHWC, rounded to the nearest level."""
    return np.clip(np.rint(images.permute(0, 2, 3, 1).numpy() * 255), 0, 255).astype(np.uint8)


class Normaliser(nn.Module):
    """(pixel in [0, 1] - mean) / std per channel, a model's input normalisation as a module."""

    def __init__(self, mean, std, channels: int):
        super().__init__()
        mean = torch.as_tensor(np.broadcast_to(np.asarray(mean, dtype=np.float32), (channels,)).copy())
        std = torch.as_tensor(np.broadcast_to(np.asarray(std, dtype=np.float32), (channels,)).copy())
        self.register_buffer("mean", mean.view(1, -1, 1, 1))
        self.register_buffer("std", std.view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean) / self.std


def check_classifier(model: Any, normalisation: Any, channels: int) -> tuple[nn.Module, Normaliser]:
    """A torch classifier and its normalisation ({'mean', 'std'} or a Normalisation) as a Normaliser."""
    if not isinstance(model, nn.Module):
        raise InputError(f"model: expected a torch.nn.Module (a clean classifier), got {type(model).__name__}")
    mean, std = check_normalisation(normalisation, channels)
    return model, Normaliser(mean, std, channels)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters(), torch.empty(0)).device


def check_logits(logits: torch.Tensor, num_classes: int) -> None:
    if logits.ndim != 2 or logits.shape[1] < num_classes:
        raise InputError(f"model: expected N x K logits with K >= {num_classes}, got shape {tuple(logits.shape)}")


# ----------------------------------------------------------------------------------------- trigger files


def module_arrays(prefix: str, module: nn.Module) -> dict[str, np.ndarray]:
    return {f"{prefix}.{key}": value.detach().cpu().numpy() for key, value in module.state_dict().items()}


def load_module(module: nn.Module, arrays: dict[str, np.ndarray], prefix: str, path: str) -> nn.Module:
    """Fill ``module`` (built from the file's declared shape) from ``arrays``; any missing, extra,
    mis-shaped or non-finite tensor is an InputError naming it. Returned in eval mode."""
    expected = module.state_dict()
    found = {key[len(prefix) + 1 :]: value for key, value in arrays.items() if key.startswith(prefix + ".")}
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or extra:
        raise InputError(f"{path}: the {prefix} network does not match its declared shape "
                         f"(missing {missing[:3]}, unexpected {extra[:3]})")
    state = {}
    for key, reference in expected.items():
        value = found[key]
        if tuple(value.shape) != tuple(reference.shape):
            raise InputError(f"{path}: {prefix}.{key} has shape {tuple(value.shape)}, "
                             f"expected {tuple(reference.shape)}")
        if value.dtype.kind not in "fiu" or (value.dtype.kind == "f" and not np.isfinite(value).all()):
            raise InputError(f"{path}: {prefix}.{key} is not a finite numeric array")
        state[key] = torch.from_numpy(np.array(value, dtype=value.dtype)).to(reference.dtype)
    module.load_state_dict(state)
    return module.eval()


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_build_inputs(out, config, config_class: type, config_maker: str, x) -> tuple[object, tuple[int, int, int]]:
    """What every builder checks before it trains: the output path, its config's type (None = the paper's
    defaults) and the images; returns (config, image_shape)."""
    check_trigger_path(out)
    config = config_class() if config is None else config
    if not isinstance(config, config_class):
        raise InputError(f"config: expected a {config_class.__name__} (see {config_maker}), "
                         f"got {type(config).__name__}")
    if not isinstance(x, np.ndarray) or x.ndim != 4:
        raise InputError("x: expected a uint8 array N x H x W x C")
    image_shape = check_image_shape(x.shape[1:])
    check_images(x, image_shape)
    if len(x) < 1:
        raise InputError("x: expected at least one image")
    return config, image_shape


def check_trigger_path(path: str | os.PathLike) -> Path:
    """A writable-looking .npz path, checked before a build spends minutes training."""
    path = Path(path)
    if path.suffix != ".npz":
        raise InputError(f"{path}: a trigger file is an .npz")
    if not path.parent.is_dir():
        raise InputError(f"cannot write {path}: directory {path.parent} does not exist")
    return path


def save_trigger_file(path: str | os.PathLike, kind: str, image_shape, arrays: dict[str, np.ndarray],
                      config: dict) -> str:
    """Write the trigger file atomically; returns its sha256."""
    from ...atomic import atomic_write

    path = check_trigger_path(path)
    record = {
        "kind": np.array(kind),
        "format_version": np.array(FORMAT_VERSION, dtype=np.int64),
        "image_shape": np.array(image_shape, dtype=np.int64),
        "config": np.array(json.dumps(config, sort_keys=True)),
        **arrays,
    }
    with atomic_write(path) as file, zipfile.ZipFile(file, "w", zipfile.ZIP_STORED) as archive:
        for key, value in record.items():
            # np.savez's layout (one .npy per array) with a fixed timestamp: the same build gives the same bytes.
            with archive.open(zipfile.ZipInfo(key + ".npy", date_time=ZIP_TIME), "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(value), allow_pickle=False)
    return file_sha256(path)


def load_trigger_file(path: Any, kind: str) -> dict[str, np.ndarray]:
    """The arrays of a trigger file of this ``kind``; a pickled, corrupt or foreign file is an InputError."""
    if not isinstance(path, (str, os.PathLike)):
        raise InputError(f"generator: expected the path of a {kind} trigger file, got {type(path).__name__}")
    if not Path(path).is_file():
        raise InputError(f"generator: {path} does not exist (build it first, see backdoor_engine.data.attacks.{kind})")
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise InputError(f"{path} is a single array, not a {kind} trigger file (.npz)")
        with data:
            arrays = {key: data[key] for key in data.files}
    except InputError:
        raise
    except ValueError as error:
        if "allow_pickle" in str(error):
            raise InputError(f"{path} holds pickled objects: a trigger file holds only arrays and is never "
                             "unpickled") from None
        raise InputError(f"{path} is not a {kind} trigger file ({error})") from None
    except (OSError, EOFError, zipfile.BadZipFile) as error:
        raise InputError(f"{path} is not a {kind} trigger file (.npz): {error}") from None
    if not isinstance(arrays, dict) or "kind" not in arrays:
        raise InputError(f"{path} is not a trigger file: it has no 'kind' entry")
    found = arrays["kind"]
    if found.dtype.kind != "U" or found.shape != () or str(found) != kind:
        raise InputError(f"{path} is a {found!s} trigger file, expected {kind}")
    version = arrays.get("format_version")
    if version is None or version.shape != () or int(version) != FORMAT_VERSION:
        raise InputError(f"{path}: trigger file format {version} is not the supported {FORMAT_VERSION}")
    return arrays


def require(arrays: dict[str, np.ndarray], key: str, path: str, *, shape=None, kind: str = "fiub") -> np.ndarray:
    """``arrays[key]``, checked for presence, dtype kind and (where given) exact shape."""
    if key not in arrays:
        raise InputError(f"{path}: trigger file has no {key!r} entry")
    value = arrays[key]
    if value.dtype.kind not in kind:
        raise InputError(f"{path}: {key!r} has dtype {value.dtype}, expected a numeric array")
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise InputError(f"{path}: {key!r} has shape {tuple(value.shape)}, expected {tuple(shape)}")
    if value.dtype.kind == "f" and not np.isfinite(value).all():
        raise InputError(f"{path}: {key!r} holds NaN or infinite values")
    return value


def scalar(arrays: dict[str, np.ndarray], key: str, path: str) -> float:
    return float(require(arrays, key, path, shape=()))


# ----------------------------------------------------------------------------------------- attack base


@dataclass(frozen=True, eq=False, kw_only=True)
class LearnedAttack(Attack):
    """An attack whose trigger comes from a trigger file (``generator``, a path) built by its builder.

    ``generator_sha256``: when given, the file must have this digest (the CLI records it in the manifest,
    so ``triggered_test`` refuses a trigger file rebuilt or replaced since the poisoning run).
    ``batch_size``: images per inference batch when applying the trigger.
    """

    kind: ClassVar[str]
    trigger_file_param = "generator"

    generator: str | None = None
    generator_sha256: str | None = None
    batch_size: int = 256

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.generator is None:
            raise InputError(
                f"generator: attack {self.name!r} needs the path of its trigger file; build it with "
                f"`backdoor-engine poison --attack {self.name} --adv-model CLEAN.pt ...` or "
                f"backdoor_engine.data.attacks.{self.name}.build_{self.name}"
            )
        if not isinstance(self.generator, (str, os.PathLike)):
            raise InputError(f"generator: expected a path, got {type(self.generator).__name__}")
        object.__setattr__(self, "generator", os.fspath(self.generator))
        object.__setattr__(self, "batch_size", check_int(self.batch_size, "batch_size", 1))
        arrays = load_trigger_file(self.generator, self.name)
        if self.generator_sha256 is not None:
            actual = file_sha256(self.generator)
            if actual != str(self.generator_sha256).lower():
                raise InputError(f"generator: {self.generator} has sha256 {actual}, not the recorded "
                                 f"{self.generator_sha256}: the trigger file changed since the poisoning run")
        declared = tuple(int(v) for v in require(arrays, "image_shape", self.generator, shape=(3,), kind="iu"))
        if declared != self.image_shape:
            raise InputError(f"generator: {self.generator} was built for images of shape {declared}, "
                             f"not {self.image_shape}")
        # Building the networks must not consume the caller's global torch RNG (their init is overwritten).
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            self._load(arrays, self.generator)

    def _load(self, arrays: dict[str, np.ndarray], path: str) -> None:
        """Read the trigger from the file's arrays (set fields with object.__setattr__)."""
        raise NotImplementedError
