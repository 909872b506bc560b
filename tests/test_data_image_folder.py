"""Image folders: reading class sub-folders robustly (eagerly = streamed to the end), writing them back
losslessly, and one channels/size rule for the eager and the streamed read."""

import os
import re
import warnings

import numpy as np
import pytest
from PIL import Image

from backdoor_engine.data.dataset import make_dataset, read_all
from backdoor_engine.data.image_folder import ImageFolderSource, write_image_folder
from backdoor_engine.data.open import open_dataset
from backdoor_engine.errors import InputError

rng = np.random.default_rng(0)


def save(path, pixels, format="PNG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=format)


def colour(h=8, w=8):
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def grey(h=8, w=8):
    return rng.integers(0, 256, size=(h, w), dtype=np.uint8)


def load(root, **options):
    """The folder read into memory, with the warning about skipped files silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return read_all(ImageFolderSource(root, **options))


def assert_eager_equals_streamed(root, **options):
    """open_dataset (eager) and the source read range by range give the same pixels, ids and labels."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eager = open_dataset(root, image_size=options.get("image_size"))
    source = ImageFolderSource(root, **options)
    parts = [source.read(start, min(start + 2, len(source))) for start in range(0, len(source), 2)]
    kept = np.concatenate([part.kept for part in parts])
    assert np.array_equal(np.concatenate([part.x for part in parts]), eager.x)
    assert np.array_equal(source.ids[kept], eager.ids) and np.array_equal(source.y[kept], eager.y)
    return eager


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


def test_reads_class_folders_and_reports_bad_files(messy_folder, capsys):
    root, pixels = messy_folder
    source = ImageFolderSource(root)
    assert source.class_names == ("cat", "dog")
    assert dict(source.listing_skipped).keys() == {str(root / "dog/notes.txt")}
    assert "'.txt'" in dict(source.listing_skipped)[str(root / "dog/notes.txt")]
    capsys.readouterr()
    d = read_all(source)
    message = capsys.readouterr().err
    assert message.startswith("backdoor-engine: skipped 3 file(s) in ImageFolderSource")
    assert d.ids.tolist() == ["cat/a.png", "cat/sub/b.png", "dog/c.png", "dog/d.JPG"]
    assert d.y.tolist() == [0, 0, 1, 1]
    assert d.x.shape == (4, 8, 8, 3)  # one colour image makes the whole set RGB
    assert np.array_equal(d.x[0], pixels["cat/a.png"])
    assert np.array_equal(d.x[1], np.repeat(pixels["cat/sub/b.png"][..., None], 3, axis=2))
    assert "dog/broken.png: unreadable image" in message and "dog/animated.png: unreadable image" in message
    assert_eager_equals_streamed(root)


def test_a_folder_is_rgb_if_any_image_is_colour_wherever_that_image_sorts(tmp_path):
    save(tmp_path / "a/x.png", grey())
    save(tmp_path / "b/y.png", grey())
    assert load(tmp_path).image_shape == (8, 8, 1)
    save(tmp_path / "b/z.png", colour())  # the last file: the first ones alone would say grey
    assert load(tmp_path).image_shape == (8, 8, 3)
    assert ImageFolderSource(tmp_path).image_shape == (8, 8, 3)
    mixed = assert_eager_equals_streamed(tmp_path)
    assert np.array_equal(mixed.x[0], np.repeat(np.asarray(Image.open(tmp_path / "a/x.png"))[..., None], 3, axis=2))
    forced = load(tmp_path, channels=1)
    assert forced.image_shape == (8, 8, 1)
    assert np.array_equal(forced.x[2, ..., 0], np.asarray(Image.open(tmp_path / "b/z.png").convert("L")))


def test_a_grey_palette_image_counts_as_grey_and_a_coloured_one_as_colour(tmp_path):
    (tmp_path / "a").mkdir()
    Image.fromarray(grey()).convert("P").save(tmp_path / "a/p.png")  # a palette of greys only
    assert ImageFolderSource(tmp_path).image_shape == (8, 8, 1)
    Image.fromarray(colour()).convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "a/q.png")
    assert ImageFolderSource(tmp_path).image_shape == (8, 8, 3)
    assert_eager_equals_streamed(tmp_path)


def test_a_folder_mixing_sizes_is_refused_naming_two_files_unless_resized(tmp_path):
    save(tmp_path / "a/x.png", colour(8, 8))
    save(tmp_path / "a/y.png", colour(10, 12))
    for read in (lambda: load(tmp_path), lambda: ImageFolderSource(tmp_path), lambda: open_dataset(tmp_path)):
        with pytest.raises(InputError, match=r"y\.png is 12x10 \(WxH\) but .*x\.png is 8x8.*image_size"):
            read()
    assert load(tmp_path, image_size=(6, 5)).image_shape == (6, 5, 3)
    assert load(tmp_path, image_size=4).image_shape == (4, 4, 3)
    resized = assert_eager_equals_streamed(tmp_path, image_size=(6, 5))
    assert resized.ids.tolist() == ["a/x.png", "a/y.png"]
    with pytest.raises(InputError, match="image_size:"):
        load(tmp_path, image_size=(0, 4))
    with pytest.raises(InputError, match="channels:"):
        load(tmp_path, channels=2)


def test_a_mixed_grey_colour_and_mixed_size_folder_reads_the_same_eagerly_and_streamed(tmp_path):
    save(tmp_path / "a/1.png", grey(9, 7))
    save(tmp_path / "a/2.jpg", colour(5, 5), format="JPEG")
    save(tmp_path / "b/3.png", grey(4, 6))
    (tmp_path / "b/4.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
    eager = assert_eager_equals_streamed(tmp_path, image_size=(6, 6))
    assert eager.image_shape == (6, 6, 3) and eager.ids.tolist() == ["a/1.png", "a/2.jpg", "b/3.png"]


def test_truncated_png_is_skipped_and_said_on_stderr_in_plain_lines(tmp_path, capsys):
    save(tmp_path / "a/good.png", colour())
    save(tmp_path / "a/cut.png", colour(8, 8))
    cut = tmp_path / "a/cut.png"
    cut.write_bytes(cut.read_bytes()[:-40])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a Python warning with its source line means nothing to a CLI user
        d = read_all(ImageFolderSource(tmp_path))
    said = capsys.readouterr().err
    assert re.match(r"backdoor-engine: skipped 1 file\(s\) in .*:\n  a/cut\.png: unreadable image", said)
    assert d.ids.tolist() == ["a/good.png"]


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    (tmp_path / "a").mkdir()
    Image.fromarray(np.array([[0, 257 * 128, 65535]], dtype=np.uint16)).save(tmp_path / "a/deep.png")
    assert ImageFolderSource(tmp_path).image_shape == (1, 3, 1)
    assert load(tmp_path).x[0, 0, :, 0].tolist() == [0, 128, 255]


def test_folders_without_images_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="not a directory"):
        ImageFolderSource(tmp_path / "absent")
    with pytest.raises(InputError, match="no class sub-folders"):
        ImageFolderSource(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "a/notes.txt").write_text("no images here")
    with pytest.raises(InputError, match="no PNG/JPEG files found"):
        ImageFolderSource(tmp_path)
    (tmp_path / "a/bad.png").write_bytes(b"nope")
    with pytest.raises(InputError, match="none of the 1 images can be decoded"):
        ImageFolderSource(tmp_path)
    # With the output shape given nothing is decoded up front: reading finds nothing readable.
    with pytest.raises(InputError, match="no sample could be read"):
        read_all(ImageFolderSource(tmp_path, image_size=4, channels=1))


@pytest.mark.parametrize("channels", [1, 3])
def test_write_then_load_round_trips(tmp_path, channels):
    n = 13
    x = rng.integers(0, 256, size=(n, 7, 5, channels), dtype=np.uint8)
    y = np.arange(n) % 11  # 11 classes: folder "10" must still sort after "2"
    original = make_dataset(x, y, ids=np.arange(n) * 3)
    write_image_folder(original, tmp_path / "out")
    loaded = load(tmp_path / "out")
    order = np.argsort(original.y, kind="stable")
    assert np.array_equal(loaded.x, original.x[order])
    assert np.array_equal(loaded.y, original.y[order])
    assert loaded.ids[0] == "00/00.png"


def test_write_with_class_names_and_string_ids(tmp_path):
    original = make_dataset(rng.integers(0, 256, size=(2, 4, 4, 3), dtype=np.uint8), [1, 0],
                            ids=["photos/p1", "p2"])
    write_image_folder(original, tmp_path / "out", class_names=["cat", "dog", "emu"])
    assert ImageFolderSource(tmp_path / "out").class_names == ("cat", "dog", "emu")
    loaded = load(tmp_path / "out")
    assert loaded.ids.tolist() == ["cat/p2.png", "dog/photos/p1.png"]
    assert np.array_equal(loaded.x, original.x[::-1])


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
