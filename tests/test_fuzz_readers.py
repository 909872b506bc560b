"""Fuzzing the readers of untrusted data (npz, Fashion-MNIST idx, image folders, tar shards): every
input ends in a value, an InputError or a listed skip; never another exception, a hang, or an
allocation beyond ALLOCATION_BOUND. A few dozen examples per reader in the default run; `-m slow` runs
the same properties over many more."""

import gzip
import io
import os
import shutil
import signal
import struct
import tarfile
import tempfile
import tracemalloc
import zipfile
from datetime import timedelta

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from backdoor_engine.data import Dataset, ImageFolderSource, TarShardSource, load_npz, make_dataset, read_all
from backdoor_engine.data import save_npz, write_tar_shards
from backdoor_engine.data import source as source_module
from backdoor_engine.data.fashion_mnist import _IMAGES_MAGIC, _read_idx
from backdoor_engine.errors import InputError

ALLOCATION_BOUND = 64 << 20  # traced (numpy and Python) bytes one read of a tiny hostile input may use
TIME_LIMIT_S = 30  # a hang fails the example instead of the run
FAST = settings(max_examples=40, deadline=timedelta(seconds=20), derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
LONG = settings(FAST, max_examples=1500, derandomize=False)


def outcome(read):
    """read()'s value, or the InputError it raised; any other exception, a hang or a traced peak
    above ALLOCATION_BOUND fails the test."""
    def stop(*_):
        raise TimeoutError(f"a read still ran after {TIME_LIMIT_S} s")
    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(TIME_LIMIT_S)
    tracemalloc.start()
    try:
        try:
            value = read()
        except InputError as error:
            value = error
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert peak < ALLOCATION_BOUND, f"peak allocation {peak} bytes"
    return value


@pytest.fixture(autouse=True)
def small_images(monkeypatch):
    # Pillow's own pixel buffers escape tracemalloc: keep what one hostile header may claim small here.
    monkeypatch.setattr(source_module, "MAX_IMAGE_PIXELS", 1 << 16)


@st.composite
def mutated(draw, base: bytes):
    """`base` with a few bytes overwritten, cut out or inserted (or, now and then, random bytes)."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=2 * len(base)))
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 8))):
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        kind = draw(st.sampled_from(("set", "set", "cut", "insert", "truncate")))
        if kind == "set":
            data[at] = draw(st.integers(0, 255))
        elif kind == "cut":
            del data[at:at + draw(st.integers(1, 600))]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=32))
        else:
            del data[at:]
    return bytes(data)


def tiny_dataset(n=3, size=4, channels=1):
    rng = np.random.default_rng(1)
    return make_dataset(rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8), np.arange(n) % 2,
                        ids=np.array([f"s{i}" for i in range(n)]))


def scratch():
    return tempfile.mkdtemp(prefix="fuzz-readers-")


def encoded(image_format):
    buffer = io.BytesIO()
    Image.fromarray(tiny_dataset().x[0, ..., 0]).save(buffer, format=image_format)
    return buffer.getvalue()


# --- npz ---------------------------------------------------------------------------------------------

def _npz_bytes():
    directory = scratch()
    try:
        save_npz(tiny_dataset(), os.path.join(directory, "d.npz"))
        return open(os.path.join(directory, "d.npz"), "rb").read()
    finally:
        shutil.rmtree(directory)


NPZ = _npz_bytes()
DESCRS = ("|u1", "<i8", ">i4", "<f8", "|b1", "<U3", "|O", "|V7", "<c16", "[('a', '<i4')]")


@st.composite
def npz_with_hostile_header(draw):
    """An npz whose x member has a drawn header (dtype, shape up to 2**40 per axis) and data length."""
    shape = tuple(draw(st.lists(st.integers(0, 1 << 40) | st.integers(0, 6), max_size=6)))
    descr = draw(st.sampled_from(DESCRS))
    header = "{'descr': %s, 'fortran_order': %s, 'shape': %r, }" % (
        descr if descr.startswith("[") else repr(descr), draw(st.booleans()), shape)
    member = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header) + 1) + header.encode() + b"\n"
    member += draw(st.binary(max_size=300))
    buffer = io.BytesIO()
    method = draw(st.sampled_from((zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)))
    with zipfile.ZipFile(buffer, "w", method) as archive:
        archive.writestr("x.npy", member)
        y = io.BytesIO()
        np.save(y, np.zeros(3, np.int64))
        archive.writestr("y.npy", y.getvalue())
    return buffer.getvalue()


def check_npz(content: bytes):
    directory = scratch()
    try:
        path = os.path.join(directory, "d.npz")
        open(path, "wb").write(content)
        value = outcome(lambda: load_npz(path))
        assert isinstance(value, (Dataset, InputError))
    finally:
        shutil.rmtree(directory)


@FAST
@given(mutated(NPZ) | npz_with_hostile_header())
def test_any_npz_bytes_load_as_a_dataset_or_an_input_error(content):
    check_npz(content)


@pytest.mark.slow
@LONG
@given(mutated(NPZ) | npz_with_hostile_header())
def test_any_npz_bytes_load_as_a_dataset_or_an_input_error_at_length(content):
    check_npz(content)


# --- Fashion-MNIST idx -------------------------------------------------------------------------------

IDX = struct.pack(">IIII", _IMAGES_MAGIC, 2, 3, 3) + bytes(range(18))


def idx_files():
    raw = mutated(IDX).map(gzip.compress)  # a damaged idx inside a sound gzip
    damaged_gzip = mutated(gzip.compress(IDX))
    hostile_shape = st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)).map(
        lambda shape: gzip.compress(struct.pack(">IIII", _IMAGES_MAGIC, *shape) + bytes(18)))
    return raw | damaged_gzip | hostile_shape


def check_idx(content: bytes):
    directory = scratch()
    try:
        path = os.path.join(directory, "images-idx3-ubyte.gz")
        open(path, "wb").write(content)
        value = outcome(lambda: _read_idx(path, _IMAGES_MAGIC))
        assert isinstance(value, InputError) or (value.dtype == np.uint8 and value.ndim == 3)
    finally:
        shutil.rmtree(directory)


@FAST
@given(idx_files())
def test_any_idx_file_reads_as_an_array_or_an_input_error(content):
    check_idx(content)


@pytest.mark.slow
@LONG
@given(idx_files())
def test_any_idx_file_reads_as_an_array_or_an_input_error_at_length(content):
    check_idx(content)


# --- image folders -----------------------------------------------------------------------------------

PNG, JPEG = encoded("PNG"), encoded("JPEG")
NAMES = ("a.png", "b.jpg", "c.jpeg", "d.PNG", "notes.txt", "sub/e.png")
ENTRY = st.tuples(st.sampled_from(("0", "1", "")), st.sampled_from(NAMES),
                  st.sampled_from(("png", "jpeg", "png", "jpeg", "fifo", "dangling", "loop", "folder", "outside")))


def build_entry(root, outside, class_name, name, kind, draw_bytes):
    path = os.path.join(root, class_name, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.lexists(path):
        return None
    if kind in ("png", "jpeg"):
        open(path, "wb").write(draw_bytes(PNG if kind == "png" else JPEG))
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "dangling":
        os.symlink(os.path.join(root, "missing"), path)
    elif kind == "loop":
        os.symlink(os.path.basename(path), path)
    elif kind == "folder":
        os.mkdir(path)
        return None  # an empty folder named like an image is no file at all
    else:
        os.symlink(outside, path)
    return path


def check_image_folder(data):
    directory = scratch()
    try:
        root, outside = os.path.join(directory, "root"), os.path.join(directory, "outside.png")
        os.mkdir(root)
        open(outside, "wb").write(PNG)
        made = [build_entry(root, outside, *entry, lambda base: data.draw(mutated(base)))
                for entry in data.draw(st.lists(ENTRY, max_size=8))]
        failures = []

        def read():
            source = ImageFolderSource(root)
            return source, read_all(source, skipped=failures)
        value = outcome(read)
        if isinstance(value, InputError):
            return
        source, dataset = value
        # Nothing silent: every file made is a sample, a listed skip or a listed failure.
        accounted = ({os.path.join(root, sample_id) for sample_id in dataset.ids.tolist()}
                     | {path for path, _ in source.listing_skipped}
                     | {os.path.join(root, sample_id) for sample_id, _ in failures})
        for path in filter(None, made):
            assert path in accounted or any(path.startswith(skipped + os.sep) for skipped in accounted), path
    finally:
        shutil.rmtree(directory)


@FAST
@given(st.data())
def test_any_image_folder_reads_as_a_dataset_or_an_input_error_and_every_file_is_accounted_for(data):
    check_image_folder(data)


@pytest.mark.slow
@LONG
@given(st.data())
def test_any_image_folder_reads_as_a_dataset_or_an_input_error_at_length(data):
    check_image_folder(data)


# --- tar shards --------------------------------------------------------------------------------------

def _shard_bytes():
    directory = scratch()
    try:
        [path] = write_tar_shards(tiny_dataset(), os.path.join(directory, "shards"))
        return open(path, "rb").read()
    finally:
        shutil.rmtree(directory)


SHARD = _shard_bytes()
MEMBER = st.tuples(st.sampled_from(("k1", "k2", "dir/k3", "k1.x", "../up", "/abs")),
                   st.sampled_from(("png", "jpg", "cls", "txt")),
                   st.sampled_from((b"", b"7", b"1" * 26, b"-3", b"\xff\xfe", b" 12 \n", PNG, JPEG[:40])))


def shard_of(members):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, suffix, data in members:
            info = tarfile.TarInfo(f"{key}.{suffix}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def check_shard(content: bytes):
    directory = scratch()
    try:
        path = os.path.join(directory, "s.tar")
        open(path, "wb").write(content)

        def read():
            source = TarShardSource(path)
            return source, read_all(source, skipped=[])
        value = outcome(read)
        if not isinstance(value, InputError):
            source, dataset = value
            assert (dataset.y >= 0).all() and (dataset.y < 2**31).all()
            assert set(dataset.ids.tolist()) <= set(source.ids.tolist())
    finally:
        shutil.rmtree(directory)


@FAST
@given(mutated(SHARD) | st.lists(MEMBER, max_size=8).map(shard_of))
def test_any_tar_shard_indexes_to_samples_listed_skips_or_an_input_error(content):
    check_shard(content)


@pytest.mark.slow
@LONG
@given(mutated(SHARD) | st.lists(MEMBER, max_size=8).map(shard_of))
def test_any_tar_shard_indexes_to_samples_listed_skips_or_an_input_error_at_length(content):
    check_shard(content)
