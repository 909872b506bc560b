"""Hostile and damaged inputs to the data sources: each ends in a clear InputError or a listed skip,
never a traceback, a hang, an oversized allocation or a silently wrong number."""

import io
import os
import re
import signal
import tarfile
import zipfile
from contextlib import contextmanager

import numpy as np
import pytest

from backdoor_engine.data import ImageFolderSource, TarShardSource, load_npz, make_dataset, open_dataset, open_source
from backdoor_engine.data import write_image_folder, write_tar_shards
from backdoor_engine.data.dataset import LABEL_LIMIT, MAX_CLASSES, check_labels
from backdoor_engine.errors import InputError


@contextmanager
def within(seconds):
    """Fail instead of hanging (a FIFO opened for reading blocks until a writer comes)."""
    def stop(*_):
        raise TimeoutError(f"still running after {seconds} s")
    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def small(n=4, labels=None):
    rng = np.random.default_rng(0)
    y = np.arange(n) % 2 if labels is None else np.asarray(labels)
    return make_dataset(rng.integers(0, 256, (n, 5, 5, 1), dtype=np.uint8), y)


def reasons(source):
    return {os.path.basename(path): reason for path, reason in source.listing_skipped}


def test_dangling_links_link_loops_and_fifos_in_an_image_folder_are_listed_and_never_opened(tmp_path):
    write_image_folder(small(), tmp_path / "root")
    os.symlink(tmp_path / "root" / "0" / "gone.png", tmp_path / "root" / "0" / "dangling.png")
    os.symlink("loop.png", tmp_path / "root" / "0" / "loop.png")
    os.mkfifo(tmp_path / "root" / "1" / "x.png")
    os.symlink("../0", tmp_path / "root" / "1" / "sub")
    os.symlink("nowhere", tmp_path / "root" / "2")  # a dangling link where a class folder would be
    with within(20):
        source = ImageFolderSource(tmp_path / "root")
        data = open_dataset(tmp_path / "root")
    assert source.class_names == ("0", "1") and source.ids.tolist() == ["0/0.png", "0/2.png", "1/1.png", "1/3.png"]
    skipped = reasons(source)
    assert "unreadable entry" in skipped["dangling.png"] and "unreadable entry" in skipped["loop.png"]
    assert "not a regular file" in skipped["x.png"] and "not followed" in skipped["sub"]
    assert "unreadable entry" in skipped["2"]
    assert len(data) == 4


def test_a_file_swapped_for_a_fifo_after_listing_fails_its_read_instead_of_hanging(tmp_path):
    write_image_folder(small(), tmp_path / "root")
    source = ImageFolderSource(tmp_path / "root")
    os.remove(tmp_path / "root" / "0" / "0.png")
    os.mkfifo(tmp_path / "root" / "0" / "0.png")
    with within(20):
        batch = source.read(0, 4)
    assert batch.kept.tolist() == [1, 2, 3] and "not a regular file" in batch.failures[0][1]


def test_links_leaving_the_root_are_listed_with_the_reason_unless_allowed(tmp_path):
    write_image_folder(small(), tmp_path / "root")
    write_image_folder(small(), tmp_path / "outside")
    os.symlink(tmp_path / "outside" / "0", tmp_path / "root" / "2")  # would become class 2
    os.symlink(tmp_path / "outside" / "1" / "3.png", tmp_path / "root" / "1" / "9.png")
    os.symlink(tmp_path / "root" / "0" / "0.png", tmp_path / "root" / "1" / "inside.png")  # stays inside: kept
    source = open_source(tmp_path / "root")
    assert source.class_names == ("0", "1") and source.num_classes == 2
    assert "1/inside.png" in source.ids.tolist() and "1/9.png" not in source.ids.tolist()
    skipped = reasons(source)
    assert {"2", "9.png"} <= skipped.keys() and "outside the dataset root" in skipped["2"]
    assert "--allow-outside-links" in skipped["9.png"]
    allowed = open_source(tmp_path / "root", follow_links_outside=True)
    assert allowed.class_names == ("0", "1", "2") and "1/9.png" in allowed.ids.tolist()


def test_shard_folders_skip_links_leaving_them_fifos_and_dangling_links(tmp_path):
    write_tar_shards(small(), tmp_path / "shards")
    write_tar_shards(small(), tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere" / "shard-000000.tar", tmp_path / "shards" / "outside.tar")
    os.symlink(tmp_path / "shards" / "missing.tar", tmp_path / "shards" / "dangling.tar")
    os.mkfifo(tmp_path / "shards" / "x.tar")
    with within(20):
        source = open_source(tmp_path / "shards")
    assert len(source) == 4 and source.ids[0].startswith("shard-000000.tar/")
    skipped = reasons(source)
    assert "outside" in skipped["outside.tar"] and "unreadable entry" in skipped["dangling.tar"]
    assert "not a regular file" in skipped["x.tar"]
    assert len(open_source(tmp_path / "shards", follow_links_outside=True)) == 8


def write_shard(path, members):
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_a_truncated_shard_is_listed_as_damaged_with_the_byte_where_it_ends(tmp_path):
    paths = write_tar_shards(small(30), tmp_path / "shards")
    whole = open(paths[0], "rb").read()
    for cut in (len(whole) // 2, len(whole) // 2 // 512 * 512):  # mid-member, and on a block boundary
        open(paths[0], "wb").write(whole[:cut])
        source = TarShardSource(paths[0])
        damage = reasons(source)["shard-000000.tar"]
        assert "damaged shard" in damage and re.search(rf"byte {cut}\b", damage), damage
        assert 0 < len(source) < 30
        assert len(source.read(0, len(source)).kept) == len(source)  # what is kept is whole
    open(paths[0], "wb").write(whole)
    assert TarShardSource(paths[0]).listing_skipped == []


def test_a_label_of_26_digits_is_listed_not_an_overflow(tmp_path):
    png = io.BytesIO()
    from PIL import Image
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(png, format="PNG")
    write_shard(tmp_path / "s.tar", [("a.png", png.getvalue()), ("a.cls", b"1" * 26),
                                     ("b.png", png.getvalue()), ("b.cls", str(LABEL_LIMIT).encode()),
                                     ("c.png", png.getvalue()), ("c.cls", b"3")])
    source = TarShardSource(tmp_path / "s.tar")
    assert source.ids.tolist() == ["s.tar/c"] and source.y.tolist() == [3]
    assert "not a class id in [0, 2147483648)" in dict(source.listing_skipped)["s.tar/a"]
    assert "s.tar/b" in dict(source.listing_skipped)


def test_labels_implying_more_classes_than_the_limit_are_refused_naming_the_file(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 3, 3, 1), np.uint8), y=np.array([0, 10**9]))
    with pytest.raises(InputError, match=rf"d\.npz: field 'y': label 1000000000 at index 1 .*MAX_CLASSES={MAX_CLASSES}"
                       ):
        load_npz(tmp_path / "d.npz")
    with pytest.raises(InputError, match=r"train\.tar: label 12 at index 1 .*num_classes=10"):
        check_labels(np.array([0, 12]), 10, "train.tar")
    assert check_labels(np.array([0, 9], np.uint8), 10, "here").dtype == np.int64
    with pytest.raises(InputError, match="MAX_CLASSES"):
        small(2, labels=[0, MAX_CLASSES]).num_classes


def npz_with_member(path, name, header, data):
    """An npz whose member `name`.npy holds `header` (a dict for the .npy header) then `data`."""
    member = io.BytesIO()
    np.lib.format.write_array_header_1_0(member, header)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{name}.npy", member.getvalue() + data)
        y = io.BytesIO()
        np.save(y, np.zeros(2, np.int64))
        archive.writestr("y.npy", y.getvalue())


def test_an_npz_header_declaring_terabytes_is_refused_before_allocating(tmp_path):
    path = tmp_path / "bomb.npz"
    npz_with_member(path, "x", {"descr": "|u1", "fortran_order": False, "shape": (1 << 20, 1024, 1024, 3)}, b"\0" * 64)
    with pytest.raises(InputError, match=r"field 'x' declares uint8 \(1048576, 1024, 1024, 3\) \(3298534883328 "
                                         r"bytes\) but its member holds 64 data bytes"):
        load_npz(path)


def test_a_truncated_npz_member_is_called_truncated_not_a_pickle(tmp_path):
    path = tmp_path / "cut.npz"
    npz_with_member(path, "x", {"descr": "|u1", "fortran_order": False, "shape": (2, 3, 3, 1)}, b"\0" * 10)
    with pytest.raises(InputError, match="field 'x' .*truncated or corrupt") as caught:
        load_npz(path)
    assert "pickl" not in str(caught.value)
    npz_with_member(path, "x", {"descr": "|O", "fortran_order": False, "shape": (2,)}, b"\0" * 16)
    with pytest.raises(InputError, match="field 'x' could not be read without unpickling"):
        load_npz(path)


def test_mixed_image_sizes_say_how_to_resize_from_the_cli_and_the_api(tmp_path):
    write_image_folder(small(), tmp_path / "root")
    from PIL import Image
    Image.fromarray(np.zeros((7, 7), np.uint8)).save(tmp_path / "root" / "1" / "big.png")
    with pytest.raises(InputError, match=re.escape("resize with --image-size H W (CLI) / image_size= (API)")):
        ImageFolderSource(tmp_path / "root")
