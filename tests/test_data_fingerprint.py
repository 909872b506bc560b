"""Dataset fingerprints: byte-identical to the values feature stores already on disk hold.

The hex digests below were computed by engine.fingerprint.dataset_fingerprint and the streamed
sources' fingerprints before the dataset side moved into backdoor_engine.data; a change to any of
them orphans every stored extraction, so they are pinned, not recomputed.
"""

import io
import os
import tarfile

import numpy as np

from backdoor_engine.data import ImageFolderSource, TarShardSource, dataset_fingerprint, make_dataset
from backdoor_engine.data.dataset import ArraySource

PIXELS = np.arange(5 * 4 * 3 * 3, dtype=np.uint8).reshape(5, 4, 3, 3)
LABELS = np.array([0, 1, 2, 1, 0])
MTIME_NS = 1_600_000_000_000_000_000


def test_the_fingerprint_of_a_dataset_with_integer_ids_is_unchanged():
    dataset = make_dataset(PIXELS, LABELS)
    assert dataset_fingerprint(dataset) == "965d3fea83c94674c6f9e96ffbd7a839"
    assert ArraySource(dataset).fingerprint() == "965d3fea83c94674c6f9e96ffbd7a839"


def test_the_fingerprint_of_a_grey_dataset_with_string_ids_is_unchanged_and_ignores_poison():
    ids = np.array(["a/1.png", "a/2.png", "b/x.png", "c/y.png", "c/z.png"])
    dataset = make_dataset(PIXELS[..., :1], LABELS, ids=ids, poison=np.array([0, 1, 0, 0, 1]))
    assert dataset_fingerprint(dataset) == "83554883206cc0e3bad7aa25f413c2f5"
    assert dataset_fingerprint(make_dataset(PIXELS[..., :1], LABELS, ids=ids)) == "83554883206cc0e3bad7aa25f413c2f5"


def test_the_fingerprint_sees_one_changed_pixel_and_a_memory_mapped_copy_hashes_the_same(tmp_path):
    dataset = make_dataset(PIXELS, LABELS)
    changed = PIXELS.copy()
    changed[4, 3, 2, 1] ^= 1
    assert dataset_fingerprint(make_dataset(changed, LABELS)) != dataset_fingerprint(dataset)
    np.save(tmp_path / "x.npy", PIXELS)
    mapped = make_dataset(np.load(tmp_path / "x.npy", mmap_mode="r"), LABELS)
    assert dataset_fingerprint(mapped) == dataset_fingerprint(dataset)


def test_an_image_folder_listing_fingerprint_is_unchanged(tmp_path):
    # With the output shape given nothing is decoded, so the files need not be images: the
    # fingerprint hashes ids, labels, sizes and modification times only.
    for index, relative in enumerate(["cat/1.png", "cat/2.jpg", "dog/a/3.png"]):
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * (10 + index))
        os.utime(path, ns=(MTIME_NS + index, MTIME_NS + index))
    source = ImageFolderSource(tmp_path, image_size=(8, 6), channels=3)
    assert source.fingerprint() == "0fab0006a2b20b42332b23ad46093394"


def test_a_tar_shard_index_fingerprint_is_unchanged(tmp_path):
    path = tmp_path / "s-0.tar"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in [("k0.png", b"abc"), ("k0.cls", b"1"), ("k1.jpg", b"defg"), ("k1.cls", b"0")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    os.utime(path, ns=(MTIME_NS, MTIME_NS))
    assert TarShardSource(tmp_path, image_size=5, channels=1).fingerprint() == "5837adfc6072d5d3f985c4699ab7c3ca"
