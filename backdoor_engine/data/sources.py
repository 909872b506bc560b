"""open_dataset / open_source: one string (a CLI --data value) names any supported dataset source."""

from __future__ import annotations

import os
import warnings

from backdoor_engine.data.cifar import find_cifar10_binary_dir, load_cifar10_binary, load_foolbox_cifar10_samples
from backdoor_engine.data.dataset import Dataset, load_npz, make_dataset
from backdoor_engine.data.fashion_mnist import load_fashion_mnist
from backdoor_engine.data.folder_source import ImageFolderSource
from backdoor_engine.data.image_folder import load_image_folder
from backdoor_engine.data.source import ArraySource, Source
from backdoor_engine.data.tar_shards import TarShardSource
from backdoor_engine.errors import InputError

_SPLITS = ("train", "test")
_SKIPPED_SHOWN = 20  # a folder with thousands of bad files should not flood the terminal


def describe_sources() -> str:
    """The accepted dataset specs, one per line (for CLI --help and error messages)."""
    return "\n".join((
        "  PATH.npz               dataset npz (x uint8 NxHxWxC, y int64; optional ids, poison)",
        "  DIR                    image folder DIR/<class>/<image>.png|jpg, or CIFAR-10 binary batches",
        "  DIR | PATH.tar         WebDataset-style tar shards (DIR/*.tar): members <key>.png|jpg + <key>.cls",
        "  cifar10:DIR[:test]     CIFAR-10 binary version in DIR (or DIR/cifar-10-batches-bin)",
        "  fashion-mnist[:test]   Fashion-MNIST from the Debian package dataset-fashion-mnist",
        "  cifar10-samples        the 20 real CIFAR-10 test images shipped with foolbox",
    ))


def open_dataset(spec: str | os.PathLike, *, image_size: int | tuple[int, int] | None = None) -> Dataset:
    """Load the dataset that `spec` names (see `describe_sources`); `image_size` resizes image folders only."""
    text = os.fspath(spec)
    if text in ("fashion-mnist", "fashion-mnist:train", "fashion-mnist:test"):
        _refuse_resize(image_size, text)
        return load_fashion_mnist(text.partition(":")[2] or "train")
    if text == "cifar10-samples":
        _refuse_resize(image_size, text)
        return load_foolbox_cifar10_samples()
    if text.startswith("cifar10:"):
        _refuse_resize(image_size, text)
        path, split = _path_and_split(text[len("cifar10:"):])
        return load_cifar10_binary(path, split)
    if text.lower().endswith(".npz"):
        _refuse_resize(image_size, text)
        return load_npz(text)
    if _is_tar_shards(text):
        return read_all(TarShardSource(text, image_size=image_size))
    if os.path.isdir(text):
        if find_cifar10_binary_dir(text) is not None:
            _refuse_resize(image_size, text)
            return load_cifar10_binary(text, "train")
        result = load_image_folder(text, image_size=image_size)
        _warn_skipped(text, result.skipped)
        return result.dataset
    raise InputError(f"unknown dataset source {text!r} (not a named set, an existing directory or a .npz path); "
                     f"accepted:\n{describe_sources()}")


def open_source(spec: str | os.PathLike, *, image_size: int | tuple[int, int] | None = None,
                channels: int | None = None) -> Source:
    """The source `spec` names, streamed: image folders and tar shards are listed now and decoded
    range by range (`image_size`, `channels`: every image's output shape, e.g. the model's input);
    any other spec is loaded into memory by `open_dataset` as it is and wrapped."""
    text = os.fspath(spec)
    if _is_tar_shards(text):
        return TarShardSource(text, image_size=image_size, channels=channels)
    if os.path.isdir(text) and find_cifar10_binary_dir(text) is None:
        source = ImageFolderSource(text, image_size=image_size, channels=channels)
        _warn_skipped(text, source.listing_skipped)
        return source
    return ArraySource(open_dataset(text))


def read_all(source: Source) -> Dataset:
    """Every readable sample of `source` in memory (unreadable ones warned about and left out)."""
    batch = source.read(0, len(source))
    _warn_skipped(source.description, [*source.listing_skipped, *batch.failures])
    if not len(batch.kept):
        raise InputError(f"{source.description}: no sample could be read")
    return make_dataset(batch.x, source.y[batch.kept], ids=source.ids[batch.kept])


def _is_tar_shards(text: str) -> bool:
    if text.lower().endswith(".tar"):
        return True
    return os.path.isdir(text) and any(name.endswith(".tar") for name in os.listdir(text))


def _warn_skipped(where: str, skipped: list[tuple[str, str]]) -> None:
    if skipped:
        shown = "\n".join(f"  {path}: {reason}" for path, reason in skipped[:_SKIPPED_SHOWN])
        more = len(skipped) - _SKIPPED_SHOWN
        warnings.warn(f"{where}: skipped {len(skipped)} file(s):\n{shown}"
                      + (f"\n  ... and {more} more" if more > 0 else ""), stacklevel=3)


def _path_and_split(rest: str) -> tuple[str, str]:
    path, _, split = rest.rpartition(":")
    if split not in _SPLITS:
        path, split = rest, "train"
    if not path:
        raise InputError(f"cifar10:PATH[:test]: the path is empty in 'cifar10:{rest}'")
    return path, split


def _refuse_resize(image_size, source: str) -> None:
    # Silently ignoring a requested size would hand the model images of a size the user did not ask for.
    if image_size is not None:
        raise InputError(f"image_size: resizing applies to image folders only, not to {source!r}")
