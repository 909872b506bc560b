"""A folder of class sub-folders holding PNG/JPEG images: read into a Dataset, and written from one."""

from __future__ import annotations

import os
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import PurePath

import numpy as np
from PIL import Image
from tqdm import tqdm

from backdoor_engine.data.dataset import Dataset, make_dataset
from backdoor_engine.errors import InputError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
_DECODERS = ("PNG", "JPEG")  # Pillow decides by content, but only these decoders may run
_GREY_MODES = {"1", "L", "LA", "La", "I", "F"}


@dataclass(frozen=True)
class ImageFolderResult:
    """The loaded dataset, the class names (index = class id) and the files left out with the reason."""

    dataset: Dataset
    class_names: tuple[str, ...]
    skipped: list[tuple[str, str]] = field(default_factory=list)


def load_image_folder(root: str | os.PathLike, *, image_size: int | tuple[int, int] | None = None,
                      channels: int | None = None, progress: bool = False) -> ImageFolderResult:
    """Read `root/<class>/**/<image>.(png|jpg|jpeg)`; sorted class folder names give the class ids.

    Images become L (channels=1) or RGB (channels=3); by default RGB if any image is colour, else L.
    `image_size` (int or (height, width)) resizes bilinearly; without it all images must share one size.
    Unreadable files and files of other types are listed in `skipped`, never raised. Sample ids are
    the paths relative to `root` with forward slashes. Hidden files and folders (".name") are ignored.
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise InputError(f"{root}: not a directory")
    size = checked_image_size(image_size)
    if channels not in (None, 1, 3):
        raise InputError(f"channels: expected 1, 3 or None, got {channels!r}")
    entries = sorted(os.scandir(root), key=lambda entry: entry.name)
    class_names = tuple(entry.name for entry in entries if entry.is_dir() and not entry.name.startswith("."))
    if not class_names:
        raise InputError(f"{root}: no class sub-folders found; expected {root}/<class>/<image>.png")
    skipped = [(entry.path, "not inside a class folder") for entry in entries
               if not entry.is_dir() and not entry.name.startswith(".")]

    candidates = []
    for label, class_name in enumerate(class_names):
        for relative, _ in listed_files(root, class_name):
            extension = os.path.splitext(relative)[1].lower()
            if extension in IMAGE_EXTENSIONS:
                candidates.append((relative, label))
            else:
                skipped.append((os.path.join(root, relative),
                                f"extension {extension or '(none)'!r} is not one of {', '.join(IMAGE_EXTENSIONS)}"))

    images, labels, ids, first_path = [], [], [], None
    for relative, label in tqdm(candidates, desc="decoding images", unit="image", disable=not progress):
        path = os.path.join(root, relative)
        try:
            pixels = decode_image(path, size, channels)
        except Exception as error:  # untrusted files: any decoder failure means "corrupt", not a crash
            skipped.append((path, f"unreadable image: {type(error).__name__}: {error}"))
            continue
        if first_path is None:
            first_path = path
        elif pixels.shape[:2] != images[0].shape[:2]:
            raise InputError(f"{path}: image is {pixels.shape[1]}x{pixels.shape[0]} (WxH) but {first_path} is "
                             f"{images[0].shape[1]}x{images[0].shape[0]}; pass image_size to resize all images")
        images.append(pixels)
        labels.append(label)
        ids.append(relative)
    if not images:
        raise InputError(f"{root}: no readable PNG/JPEG images found ({len(skipped)} files skipped)")

    target_channels = channels or (3 if any(pixels.ndim == 3 for pixels in images) else 1)
    x = np.empty((len(images), *images[0].shape[:2], target_channels), dtype=np.uint8)
    for index, pixels in enumerate(images):
        # A grey image broadcasts into all channels, exactly what Pillow's L -> RGB conversion does.
        x[index] = pixels[..., None] if pixels.ndim == 2 else pixels
    dataset = make_dataset(x, np.array(labels, dtype=np.int64), ids=np.array(ids, dtype=str))
    return ImageFolderResult(dataset, class_names, skipped)


def write_image_folder(dataset: Dataset, root: str | os.PathLike,
                       class_names: tuple[str, ...] | list[str] | None = None) -> None:
    """Write `dataset` as PNGs `root/<class>/<id>.png` that `load_image_folder` reads back losslessly.

    Without `class_names` the folders are the zero-padded class ids. `root` must not exist or be empty;
    the tree is built under a temporary name beside it and renamed into place, so a failure leaves nothing.
    """
    if not isinstance(dataset, Dataset):
        raise InputError(f"dataset: expected a Dataset, got {type(dataset).__name__}")
    root = os.path.abspath(os.fspath(root))
    folders = _class_folders(dataset.num_classes, class_names)
    files = _image_file_names(dataset.ids)
    if os.path.lexists(root) and (not os.path.isdir(root) or os.listdir(root)):
        raise InputError(f"{root}: already exists and is not an empty directory")
    parent = os.path.dirname(root)
    if not os.path.isdir(parent):
        raise InputError(f"{root}: parent directory {parent} does not exist")
    staging = os.path.join(parent, f".{os.path.basename(root)}.tmp-{secrets.token_hex(4)}")
    os.mkdir(staging)
    try:
        for folder in folders:
            os.mkdir(os.path.join(staging, folder))
        for image, label, name in zip(dataset.x, dataset.y, files):
            path = os.path.join(staging, folders[label], name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            Image.fromarray(image[..., 0] if image.shape[2] == 1 else image).save(path, format="PNG")
        os.replace(staging, root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def checked_image_size(image_size) -> tuple[int, int] | None:
    if image_size is None:
        return None
    size = (image_size, image_size) if isinstance(image_size, (int, np.integer)) else tuple(image_size)
    if len(size) != 2 or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1 for s in size):
        raise InputError(f"image_size: expected a positive int or (height, width), got {image_size!r}")
    return int(size[0]), int(size[1])


def listed_files(root: str, class_name: str) -> list[tuple[str, tuple[int, int]]]:
    """(path relative to root with forward slashes, (size, mtime_ns)) of the non-hidden files under
    root/class_name, in a stable order: folder by folder, names sorted."""
    found = []
    for directory, subdirectories, names in os.walk(os.path.join(root, class_name)):
        subdirectories[:] = sorted(name for name in subdirectories if not name.startswith("."))
        for name in sorted(names):
            if not name.startswith("."):
                path = os.path.join(directory, name)
                stat = os.stat(path)
                found.append((PurePath(os.path.relpath(path, root)).as_posix(), (stat.st_size, stat.st_mtime_ns)))
    return found


def decode_image(file, size: tuple[int, int] | None, channels: int | None) -> np.ndarray:
    """H x W (grey) or H x W x 3 (colour) uint8 pixels of the PNG/JPEG image in `file` (a path or a
    binary file object); only the PNG and JPEG decoders may run on these untrusted bytes."""
    with Image.open(file, formats=_DECODERS) as image:
        image.load()
        if image.mode.startswith("I;16"):
            # Pillow clips 16-bit values at 255 when converting to L; scale them to 8 bits instead.
            wide = np.asarray(image).astype(np.uint32)
            image = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8))
        mode = {1: "L", 3: "RGB"}.get(channels) or ("RGB" if _is_colour(image) else "L")
        image = image.convert(mode)
    if size is not None:
        image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return np.asarray(image)


def _is_colour(image: Image.Image) -> bool:
    if image.mode in ("P", "PA"):
        palette = np.array(image.getpalette() or [0, 0, 0]).reshape(-1, 3)
        return bool((palette != palette[:, :1]).any())
    return image.mode not in _GREY_MODES


def _class_folders(num_classes: int, class_names) -> list[str]:
    if class_names is None:
        width = len(str(num_classes - 1))  # zero-padded so sorted folder names keep the class order
        return [f"{label:0{width}d}" for label in range(num_classes)]
    names = [str(name) for name in class_names]
    if len(names) < num_classes:
        raise InputError(f"class_names: expected at least {num_classes} names (labels go up to "
                         f"{num_classes - 1}), got {len(names)}")
    for name in names:
        if not name or name.startswith(".") or any(c in name for c in "/\\\0"):
            raise InputError(f"class_names: {name!r} cannot be a folder name (empty, hidden, or has / \\ NUL)")
    if len(set(names)) != len(names):
        raise InputError("class_names: names must be unique")
    if names != sorted(names):
        raise InputError("class_names: names must be in sorted order, since load_image_folder assigns class "
                         "ids by sorted folder name; prefix them with the zero-padded class id if needed")
    return names


def _image_file_names(ids: np.ndarray) -> list[str]:
    if ids.dtype.kind == "i":
        # Zero-padded non-negative ids keep their numeric order when the folder is read back sorted.
        width = len(str(ids.max())) if ids.min() >= 0 else 1
        return [f"{sample_id:0{width}d}.png" for sample_id in ids.tolist()]
    for sample_id in ids.tolist():
        parts = sample_id.split("/")
        if any(not part or part.startswith(".") or "\\" in part or "\0" in part for part in parts):
            raise InputError(f"ids: {sample_id!r} is not a safe relative file path for write_image_folder")
    return [f"{sample_id}.png" for sample_id in ids.tolist()]
