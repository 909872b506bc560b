"""open_source / open_dataset: one string (a CLI --data value) names any supported dataset source.

The spec is resolved here and nowhere else (see `describe_sources`). Image folders and tar shards
stream: `open_source` lists them and decodes range by range, and `open_dataset` is that source read
to the end (`read_all`), so both give the same pixels, ids and labels. The other kinds (npz, CIFAR-10
binary, Fashion-MNIST, the foolbox samples) are read into memory directly; `open_source` wraps them.
"""

from __future__ import annotations

import os

from backdoor_engine.data.cifar import find_cifar10_binary_dir, load_cifar10_binary, load_foolbox_cifar10_samples
from backdoor_engine.data.dataset import ArraySource, Dataset, load_npz, read_all
from backdoor_engine.data.fashion_mnist import load_fashion_mnist
from backdoor_engine.data.image_folder import ImageFolderSource
from backdoor_engine.data.source import Source, warn_skipped
from backdoor_engine.data.tar_shards import TarShardSource
from backdoor_engine.errors import InputError

_SPLITS = ("train", "test")
_FASHION_MNIST = ("fashion-mnist", "fashion-mnist:train", "fashion-mnist:test")


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


def open_dataset(spec: str | os.PathLike, *, image_size: int | tuple[int, int] | None = None,
                 follow_links_outside: bool = False) -> Dataset:
    """Load the dataset that `spec` names (see `describe_sources`); `image_size` resizes image folders
    and tar shards only, `follow_links_outside` lets their symbolic links leave the given root (refused
    and listed by default). Files and samples left out are reported once, on stderr."""
    text = os.fspath(spec)
    source = _streamed_source(text, image_size, None, follow_links_outside)
    if source is not None:
        return read_all(source)
    if text in _FASHION_MNIST:
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
    if os.path.isdir(text):  # not streamed: a folder of CIFAR-10 binary batches
        _refuse_resize(image_size, text)
        return load_cifar10_binary(text, "train")
    raise InputError(f"unknown dataset source {text!r} (not a named set, an existing directory or a .npz path); "
                     f"accepted:\n{describe_sources()}")


def open_source(spec: str | os.PathLike, *, image_size: int | tuple[int, int] | None = None,
                channels: int | None = None, follow_links_outside: bool = False) -> Source:
    """The source `spec` names, streamed: image folders and tar shards are listed now (files the
    listing skips are warned about) and decoded range by range (`image_size`, `channels`: every
    image's output shape, e.g. the model's input; `follow_links_outside`: follow symbolic links that
    leave the folder, refused and listed by default); any other spec is loaded into memory by
    `open_dataset` as it is and wrapped."""
    text = os.fspath(spec)
    source = _streamed_source(text, image_size, channels, follow_links_outside)
    if source is None:
        return ArraySource(open_dataset(text))
    warn_skipped(text, source.listing_skipped)
    return source


def _streamed_source(text: str, image_size, channels, follow_links_outside: bool = False) -> Source | None:
    """The tar shards or image folder `text` names, or None for a spec of an in-memory kind (a name
    or an npz path wins over a directory that happens to be called so)."""
    named = text in _FASHION_MNIST or text == "cifar10-samples" or text.startswith("cifar10:")
    if named or text.lower().endswith(".npz"):
        return None
    if _is_tar_shards(text):
        return TarShardSource(text, image_size=image_size, channels=channels,
                              follow_links_outside=follow_links_outside)
    if os.path.isdir(text) and find_cifar10_binary_dir(text) is None:
        return ImageFolderSource(text, image_size=image_size, channels=channels,
                                 follow_links_outside=follow_links_outside)
    return None


def _is_tar_shards(text: str) -> bool:
    if text.lower().endswith(".tar"):
        return True
    return os.path.isdir(text) and any(name.endswith(".tar") for name in os.listdir(text))


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
        raise InputError(f"image_size: resizing applies to image folders and tar shards only, not to {source!r}")
