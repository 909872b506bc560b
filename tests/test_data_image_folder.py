"""Image folders: reading class sub-folders robustly, and writing them back losslessly."""

import os

import numpy as np
import pytest
from PIL import Image

from backdoor_engine.data.dataset import make_dataset
from backdoor_engine.data.image_folder import load_image_folder, write_image_folder
from backdoor_engine.errors import InputError

rng = np.random.default_rng(0)


def save(path, pixels, format="PNG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=format)


def colour(h=8, w=8):
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def grey(h=8, w=8):
    return rng.integers(0, 256, size=(h, w), dtype=np.uint8)


@pytest.fixture
def messy_folder(tmp_path):
    """cat/ and dog/ with good images plus a corrupt PNG, a text file, a GIF named .png and hidden files."""
    pixels = {"cat/a.png": colour(), "cat/sub/b.png": grey(), "dog/c.png": colour()}
    for relative, image in pixels.items():
        save(tmp_path / relative, image)
    save(tmp_path / "dog/d.JPG", colour(), format="JPEG")
    (tmp_path / "dog/broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
    (tmp_path / "dog/notes.txt").write_text("labels were checked by hand")
    save(tmp_path / "dog/animated.png", grey(), format="GIF")
    (tmp_path / "dog/.DS_Store").write_bytes(b"\0\1")
    (tmp_path / ".cache").mkdir()
    save(tmp_path / ".cache/x.png", colour())
    return tmp_path, pixels


def test_reads_class_folders_and_reports_bad_files(messy_folder):
    root, pixels = messy_folder
    result = load_image_folder(root)
    d = result.dataset
    assert result.class_names == ("cat", "dog")
    assert d.ids.tolist() == ["cat/a.png", "cat/sub/b.png", "dog/c.png", "dog/d.JPG"]
    assert d.y.tolist() == [0, 0, 1, 1]
    assert d.x.shape == (4, 8, 8, 3)  # one colour image makes the whole set RGB
    assert np.array_equal(d.x[0], pixels["cat/a.png"])
    assert np.array_equal(d.x[1], np.repeat(pixels["cat/sub/b.png"][..., None], 3, axis=2))
    skipped = dict(result.skipped)
    assert set(skipped) == {str(root / "dog" / name) for name in ("broken.png", "notes.txt", "animated.png")}
    assert "unreadable image" in skipped[str(root / "dog/broken.png")]
    assert "'.txt'" in skipped[str(root / "dog/notes.txt")]


def test_channel_choice(tmp_path):
    save(tmp_path / "a/x.png", grey())
    save(tmp_path / "b/y.png", grey())
    assert load_image_folder(tmp_path).dataset.image_shape == (8, 8, 1)
    save(tmp_path / "b/z.png", colour())
    assert load_image_folder(tmp_path).dataset.image_shape == (8, 8, 3)
    forced = load_image_folder(tmp_path, channels=1).dataset
    assert forced.image_shape == (8, 8, 1)
    assert np.array_equal(forced.x[2, ..., 0], np.asarray(Image.open(tmp_path / "b/z.png").convert("L")))


def test_sizes_must_match_unless_resized(tmp_path):
    save(tmp_path / "a/x.png", colour(8, 8))
    save(tmp_path / "a/y.png", colour(10, 12))
    with pytest.raises(InputError, match=r"y\.png: image is 12x10 \(WxH\) .*x\.png is 8x8.*image_size"):
        load_image_folder(tmp_path)
    assert load_image_folder(tmp_path, image_size=(6, 5)).dataset.image_shape == (6, 5, 3)
    assert load_image_folder(tmp_path, image_size=4).dataset.image_shape == (4, 4, 3)
    with pytest.raises(InputError, match="image_size:"):
        load_image_folder(tmp_path, image_size=(0, 4))


def test_truncated_png_is_skipped(tmp_path):
    save(tmp_path / "a/good.png", colour())
    save(tmp_path / "a/cut.png", colour(32, 32))
    cut = tmp_path / "a/cut.png"
    cut.write_bytes(cut.read_bytes()[:-200])
    result = load_image_folder(tmp_path)
    assert result.dataset.ids.tolist() == ["a/good.png"]
    assert [path for path, _ in result.skipped] == [str(cut)]


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    (tmp_path / "a").mkdir()
    Image.fromarray(np.array([[0, 257 * 128, 65535]], dtype=np.uint16)).save(tmp_path / "a/deep.png")
    assert load_image_folder(tmp_path).dataset.x[0, 0, :, 0].tolist() == [0, 128, 255]


def test_folders_without_images_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="not a directory"):
        load_image_folder(tmp_path / "absent")
    with pytest.raises(InputError, match="no class sub-folders"):
        load_image_folder(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "a/bad.png").write_bytes(b"nope")
    with pytest.raises(InputError, match="no readable PNG/JPEG images.*1 files skipped"):
        load_image_folder(tmp_path)


@pytest.mark.parametrize("channels", [1, 3])
def test_write_then_load_round_trips(tmp_path, channels):
    n = 13
    x = rng.integers(0, 256, size=(n, 7, 5, channels), dtype=np.uint8)
    y = np.arange(n) % 11  # 11 classes: folder "10" must still sort after "2"
    original = make_dataset(x, y, ids=np.arange(n) * 3)
    write_image_folder(original, tmp_path / "out")
    loaded = load_image_folder(tmp_path / "out").dataset
    order = np.argsort(original.y, kind="stable")
    assert np.array_equal(loaded.x, original.x[order])
    assert np.array_equal(loaded.y, original.y[order])
    assert loaded.ids[0] == "00/00.png"


def test_write_with_class_names_and_string_ids(tmp_path):
    original = make_dataset(rng.integers(0, 256, size=(2, 4, 4, 3), dtype=np.uint8), [1, 0],
                            ids=["photos/p1", "p2"])
    write_image_folder(original, tmp_path / "out", class_names=["cat", "dog", "emu"])
    result = load_image_folder(tmp_path / "out")
    assert result.class_names == ("cat", "dog", "emu")
    assert result.dataset.ids.tolist() == ["cat/p2.png", "dog/photos/p1.png"]
    assert np.array_equal(result.dataset.x, original.x[::-1])


def test_write_refuses_unsafe_input_and_leaves_nothing(tmp_path):
    d = make_dataset(rng.integers(0, 256, size=(2, 4, 4, 1), dtype=np.uint8), [0, 1], ids=["ok", "../escape"])
    with pytest.raises(InputError, match="'../escape'"):
        write_image_folder(d, tmp_path / "out")
    safe = make_dataset(d.x, d.y)
    with pytest.raises(InputError, match="sorted order"):
        write_image_folder(safe, tmp_path / "out", class_names=["zebra", "ant"])
    with pytest.raises(InputError, match="at least 2 names"):
        write_image_folder(safe, tmp_path / "out", class_names=["ant"])
    assert os.listdir(tmp_path) == []
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy/file").write_text("keep me")
    with pytest.raises(InputError, match="not an empty directory"):
        write_image_folder(safe, tmp_path / "busy")
    assert os.listdir(tmp_path / "busy") == ["file"]


def test_write_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    d = make_dataset(rng.integers(0, 256, size=(3, 4, 4, 3), dtype=np.uint8), [0, 1, 0])
    calls = []

    def fail_on_second_image(self, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return original_save(self, path, *args, **kwargs)

    original_save = Image.Image.save
    monkeypatch.setattr(Image.Image, "save", fail_on_second_image)
    with pytest.raises(OSError, match="disk full"):
        write_image_folder(d, tmp_path / "out")
    assert os.listdir(tmp_path) == []
