"""Streaming sources: image folders and WebDataset-style tar shards read range by range."""

import io
import os
import tarfile

import numpy as np
import pytest

from backdoor_engine.data import (
    ImageFolderSource,
    TarShardSource,
    load_fashion_mnist,
    open_dataset,
    open_source,
    write_image_folder,
    write_tar_shards,
)
from backdoor_engine.engine.prefetch import read_ahead
from backdoor_engine.errors import InputError


@pytest.fixture(scope="module")
def real_images():
    """60 real Fashion-MNIST training images (28x28 grey), string ids."""
    data = load_fashion_mnist("train").subset(np.arange(60))
    return type(data)(data.x, data.y, np.array([f"img{i:03d}" for i in range(60)]))


def test_an_image_folder_streams_the_pixels_and_ids_the_in_memory_loader_reads(tmp_path, real_images, capsys):
    root = tmp_path / "folder"
    write_image_folder(real_images, root)
    (root / "3" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    (root / "3" / "notes.txt").write_text("not an image")
    loaded = open_dataset(root)
    assert "skipped 2 file(s)" in capsys.readouterr().err
    source = ImageFolderSource(root)
    assert len(source) == 61 and source.image_shape == (28, 28, 1)
    assert [path.endswith("notes.txt") for path, _ in source.listing_skipped] == [True]
    whole = source.read(0, len(source))
    assert [sample_id for sample_id, _ in whole.failures] == ["3/broken.png"]
    assert "unreadable image" in whole.failures[0][1]
    assert np.array_equal(source.ids[whole.kept], loaded.ids)
    assert np.array_equal(source.y[whole.kept], loaded.y)
    assert np.array_equal(whole.x, loaded.x)
    # Ranges read separately give the same samples as one read.
    parts = [source.read(start, min(start + 7, len(source))) for start in range(0, len(source), 7)]
    assert np.array_equal(np.concatenate([part.kept for part in parts]), whole.kept)
    assert np.array_equal(np.concatenate([part.x for part in parts]), whole.x)


def test_ids_and_fingerprint_are_stable_and_the_fingerprint_sees_a_changed_file(tmp_path, real_images):
    root = tmp_path / "folder"
    write_image_folder(real_images, root)
    first, second = ImageFolderSource(root), ImageFolderSource(root)
    assert np.array_equal(first.ids, second.ids) and first.fingerprint() == second.fingerprint()
    changed = root / first.ids[5]
    changed.write_bytes(changed.read_bytes() + b"\0" * 7)
    assert ImageFolderSource(root).fingerprint() != first.fingerprint()
    assert ImageFolderSource(root, image_size=32).fingerprint() != ImageFolderSource(root).fingerprint()


def test_tar_shards_round_trip_pixels_labels_and_ids_over_several_shards(tmp_path, real_images):
    paths = write_tar_shards(real_images, tmp_path / "shards", shard_size=25)
    assert [os.path.basename(path) for path in paths] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    source = TarShardSource(tmp_path / "shards")
    assert source.ids[0] == "shard-000000.tar/00" and source.ids[59] == "shard-000002.tar/59"
    batch = source.read(0, 60)
    assert not batch.failures and np.array_equal(batch.kept, np.arange(60))
    assert np.array_equal(batch.x, real_images.x) and np.array_equal(source.y, real_images.y)
    # A range crossing a shard boundary, and one shard file alone.
    assert np.array_equal(source.read(20, 30).x, real_images.x[20:30])
    assert len(TarShardSource(paths[1])) == 25
    assert TarShardSource(tmp_path / "shards").fingerprint() == source.fingerprint()


def test_tar_shards_decoded_as_jpeg_and_resized_to_three_channels(tmp_path, real_images):
    write_tar_shards(real_images, tmp_path / "shards", image_format="jpg")
    source = TarShardSource(tmp_path / "shards", image_size=(32, 30), channels=3)
    batch = source.read(0, 10)
    assert batch.x.shape == (10, 32, 30, 3) and not batch.failures
    # JPEG at quality 95 then a resize: close to the original, grey in all three channels.
    assert np.array_equal(batch.x[..., 0], batch.x[..., 2])
    assert 40 < batch.x.mean() < 140


def _tar_with(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_corrupt_members_fail_on_read_and_incomplete_samples_are_listed(tmp_path, real_images):
    good = io.BytesIO()
    from PIL import Image

    Image.fromarray(real_images.x[0, ..., 0]).save(good, format="PNG")
    _tar_with(tmp_path / "a.tar", [
        ("x/good.png", good.getvalue()), ("x/good.cls", b"4\n"),
        ("x/bad.png", b"garbage bytes, not an image"), ("x/bad.cls", b"1"),
        ("x/nolabel.png", good.getvalue()),
        ("x/badlabel.png", good.getvalue()), ("x/badlabel.cls", b"cat"),
        ("x/onlylabel.cls", b"2"),
    ])
    source = TarShardSource(tmp_path / "a.tar")
    assert list(source.ids) == ["a.tar/x/good", "a.tar/x/bad"] and list(source.y) == [4, 1]
    reasons = dict(source.listing_skipped)
    assert reasons["a.tar/x/nolabel"] == "no .cls member"
    assert "not a class id" in reasons["a.tar/x/badlabel"] and reasons["a.tar/x/onlylabel"] == "no image member"
    batch = source.read(0, 2)
    assert list(batch.kept) == [0] and batch.failures[0][0] == "a.tar/x/bad"
    assert np.array_equal(batch.x[0, ..., 0], real_images.x[0, ..., 0])


def test_a_truncated_shard_keeps_its_readable_samples_and_a_compressed_one_is_refused(tmp_path, real_images):
    write_tar_shards(real_images, tmp_path / "shards", shard_size=60)
    whole = (tmp_path / "shards" / "shard-000000.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(whole[: len(whole) // 2])
    source = TarShardSource(tmp_path / "cut.tar")
    assert 20 < len(source) < 40
    batch = source.read(0, len(source))
    assert np.array_equal(batch.x, real_images.x[batch.kept])
    import gzip

    (tmp_path / "zipped.tar").write_bytes(gzip.compress(whole))
    with pytest.raises(InputError, match="no sample"):
        TarShardSource(tmp_path / "zipped.tar")


def test_open_source_streams_folders_and_shards_and_open_dataset_reads_shards_into_memory(tmp_path, real_images):
    write_image_folder(real_images, tmp_path / "folder")
    write_tar_shards(real_images, tmp_path / "shards", shard_size=30)
    assert isinstance(open_source(tmp_path / "folder"), ImageFolderSource)
    assert isinstance(open_source(tmp_path / "shards"), TarShardSource)
    in_memory = open_dataset(str(tmp_path / "shards"))
    assert np.array_equal(in_memory.x, real_images.x) and np.array_equal(in_memory.y, real_images.y)
    with pytest.raises(InputError, match="not a directory"):
        ImageFolderSource(tmp_path / "missing")
    with pytest.raises(InputError, match="no .tar shards in this directory"):
        TarShardSource(tmp_path / "folder" / "0")
    with pytest.raises(InputError, match="expected a .tar shard"):
        TarShardSource(tmp_path / "folder" / "0" / "img000.png")


def test_decoding_ahead_in_worker_processes_gives_the_batches_in_order(tmp_path, real_images):
    write_tar_shards(real_images, tmp_path / "shards", shard_size=25)
    source = TarShardSource(tmp_path / "shards")
    ranges = [(start, min(start + 9, 60)) for start in range(0, 60, 9)]
    serial = list(read_ahead(source, ranges))
    parallel = list(read_ahead(source, ranges, workers=2, depth=3))
    for one, other in zip(serial, parallel, strict=True):
        assert np.array_equal(one.kept, other.kept) and np.array_equal(one.x, other.x)
    # A consumer that stops early does not hang on the workers still decoding.
    reader = read_ahead(source, ranges, workers=2)
    next(reader)
    reader.close()
    with pytest.raises(InputError, match="workers"):
        list(read_ahead(source, ranges, workers=-1))


def test_tar_shards_follow_the_folder_rule_rgb_if_any_image_is_colour_and_one_size_unless_resized(tmp_path):
    from PIL import Image

    def png(pixels):
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        return buffer.getvalue()

    rng = np.random.default_rng(5)
    grey, colour = rng.integers(0, 256, (6, 6), np.uint8), rng.integers(0, 256, (6, 6, 3), np.uint8)
    _tar_with(tmp_path / "a.tar", [("g.png", png(grey)), ("g.cls", b"0"), ("c.png", png(colour)), ("c.cls", b"1")])
    source = TarShardSource(tmp_path / "a.tar")
    assert source.image_shape == (6, 6, 3)
    eager = open_dataset(tmp_path / "a.tar")
    assert np.array_equal(eager.x, source.read(0, 2).x) and list(eager.ids) == list(source.ids)
    assert np.array_equal(eager.x[0], np.repeat(grey[..., None], 3, axis=2))
    _tar_with(tmp_path / "b.tar", [("g.png", png(grey)), ("g.cls", b"0"), ("w.png", png(grey[:, :4])), ("w.cls", b"1")])
    with pytest.raises(InputError, match=r"b\.tar/w is 4x6 \(WxH\) but b\.tar/g is 6x6.*image_size"):
        open_dataset(tmp_path / "b.tar")
    resized = open_dataset(tmp_path / "b.tar", image_size=5)
    assert resized.image_shape == (5, 5, 1)
    assert np.array_equal(resized.x, TarShardSource(tmp_path / "b.tar", image_size=5).read(0, 2).x)
