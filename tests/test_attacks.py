"""Pixel-level behaviour of each attack in backdoor_engine.data.attacks."""

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from backdoor_engine.data.attacks import ATTACKS, make_attack
from backdoor_engine.data.attacks.adaptive_blend import piece_map
from backdoor_engine.errors import InputError

SHAPES = [(28, 28, 1), (32, 32, 3)]


def images(shape, n=6, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)


def tiny_model(channels, num_classes=4):
    generator = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(channels, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, num_classes),
    )
    for parameter in model.parameters():
        torch.nn.init.normal_(parameter, std=0.5, generator=generator)
    return model.eval()


LF_DIR = Path(tempfile.mkdtemp(prefix="lf-triggers-"))


def lf_trigger_file(shape):
    """A stored LF perturbation (a smooth +-20 wave) for `shape`, written once per shape."""
    from backdoor_engine.data.attacks.low_frequency import save_lf_trigger

    path = LF_DIR / ("lf-%dx%dx%d.npz" % tuple(shape))
    if not path.exists():
        wave = 20 * np.cos(2 * np.pi * np.arange(shape[0]) / shape[0])[:, None, None]
        save_lf_trigger(path, np.broadcast_to(wave, shape))
    return str(path)


LEARNED_DIR = Path(tempfile.mkdtemp(prefix="learned-triggers-"))


def learned_trigger_file(name, shape):
    """An iad / siba / issba trigger file for `shape` from a seconds-long build on 10 images, written once per shape
    (their quality is tested in test_attacks_learned.py)."""
    from backdoor_engine.data.attacks import iad, issba, siba

    path = LEARNED_DIR / f"{name}-{'x'.join(map(str, shape))}.npz"
    if not path.exists():
        x, labels = images(shape, n=10), np.arange(10) % 4
        normalisation = {"mean": [0.5], "std": [0.25]}
        if name == "iad":
            config = iad.iad_config(epochs=1, mask_epochs=1, batch_size=10, channel_init=4)
            iad.build_iad(x, labels, path, model=tiny_model(shape[2]), normalisation=normalisation, num_classes=4,
                          config=config)
        elif name == "siba":
            siba.build_siba(x, path, model=tiny_model(shape[2]), normalisation=normalisation,
                            config=siba.siba_config(epochs=1))
        else:
            issba.build_issba(x, path, config=issba.issba_config(epochs=2, base_width=4, secret_size=4, lr=0.01))
    return str(path)


def build(name, shape, seed=0, **params):
    if name == "lf":  # applies a stored perturbation: give it one
        params = {"trigger_path": lf_trigger_file(shape), **params}
    if name in ("iad", "siba", "issba"):  # apply a built trigger file: give them one
        params = {"generator": learned_trigger_file(name, shape), **params}
    if name == "label_consistent":
        normalisation = {"mean": [0.5], "std": [0.25]}
        params = {"model": tiny_model(shape[2]), "normalisation": normalisation, "steps": 3, **params}
    return make_attack(name, shape, seed=seed, **params)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_apply_is_pure_and_repeatable(name, shape):
    attack = build(name, shape)
    x = images(shape)
    labels = np.zeros(len(x), dtype=np.int64)
    before = x.copy()
    x.flags.writeable = False  # e.g. a memory-mapped dataset
    for train in (True, False):
        first = attack.apply(x, train=train, labels=labels)
        second = attack.apply(x, train=train, labels=labels)
        assert first.dtype == np.uint8 and first.shape == x.shape
        np.testing.assert_array_equal(first, second)
        assert not np.array_equal(first, x)
    np.testing.assert_array_equal(x, before)
    json.dumps(attack.describe())


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_apply_rejects_wrong_image_shape(name):
    attack = build(name, (32, 32, 3))
    with pytest.raises(InputError, match="expected images of shape"):
        attack.apply(images((28, 28, 1)))
    with pytest.raises(InputError, match="uint8"):
        attack.apply(images((32, 32, 3)).astype(np.float32))


def test_attack_object_and_trigger_are_immutable():
    attack = build("badnets", (32, 32, 3))
    with pytest.raises(AttributeError):
        attack.patch_size = 5
    with pytest.raises(ValueError):
        attack.patch[0, 0, 0] = 1


@pytest.mark.parametrize("shape", SHAPES)
def test_badnets_checkerboard_replaces_only_the_bottom_right_patch(shape):
    x = images(shape)
    out = build("badnets", shape).apply(x)
    checker = np.array([[255, 0, 255], [0, 255, 0], [255, 0, 255]], dtype=np.uint8)
    expected = np.broadcast_to(checker[None, :, :, None], (len(x), 3, 3, shape[2]))
    np.testing.assert_array_equal(out[:, -3:, -3:], expected)
    untouched = np.ones(shape[:2], dtype=bool)
    untouched[-3:, -3:] = False
    np.testing.assert_array_equal(out[:, untouched], x[:, untouched])


def test_badnets_square_at_explicit_position_and_named_corner():
    shape = (32, 32, 3)
    x = images(shape)
    out = build("badnets", shape, pattern="square", patch_size=4, position=(5, 7)).apply(x)
    assert (out[:, 5:9, 7:11] == 255).all()
    out[:, 5:9, 7:11] = x[:, 5:9, 7:11]
    np.testing.assert_array_equal(out, x)
    top_left = build("badnets", shape, pattern="square", position="top-left").apply(x)
    assert (top_left[:, :3, :3] == 255).all()


def test_badnets_random_pattern_follows_the_seed():
    shape = (32, 32, 3)
    first, again, other = (build("badnets", shape, seed=s, pattern="random", patch_size=5) for s in (1, 1, 2))
    np.testing.assert_array_equal(first.patch, again.patch)
    assert not np.array_equal(first.patch, other.patch)
    assert set(np.unique(first.patch)) <= {0, 255}


def test_badnets_alpha_blends_the_patch_only():
    shape = (28, 28, 1)
    x = images(shape)
    out = build("badnets", shape, pattern="square", alpha=0.2).apply(x)
    expected = np.clip(np.rint(0.8 * x[:, -3:, -3:].astype(np.float64) + 0.2 * 255), 0, 255)
    np.testing.assert_array_equal(out[:, -3:, -3:], expected)
    out[:, -3:, -3:] = x[:, -3:, -3:]
    np.testing.assert_array_equal(out, x)


def test_badnets_per_class_slots_tile_from_the_bottom_right_without_overlap():
    shape = (28, 28, 1)
    attack = build("badnets", shape, pattern="square", position="per-class")
    x = np.zeros((10, *shape), np.uint8)
    out = attack.apply(x, labels=np.arange(10))
    boxes = [tuple(np.argwhere(o[..., 0] == 255).min(0)) for o in out]
    # 9 slots fit in a 28-pixel row: classes 0..8 along the bottom row right to left, class 9 one row up.
    assert boxes[:9] == [(25, 25 - 3 * k) for k in range(9)]
    assert boxes[9] == (22, 25)
    assert all((o == 255).sum() == 9 for o in out)
    with pytest.raises(InputError, match="labels"):
        attack.apply(x)
    with pytest.raises(InputError, match="no free"):
        build("badnets", (8, 8, 1), pattern="square", position="per-class").apply(x[:1, :8, :8], labels=np.array([4]))


@pytest.mark.parametrize(
    "params, field",
    [
        ({"alpha": 0}, "alpha"),
        ({"alpha": 1.5}, "alpha"),
        ({"position": "middle"}, "position"),
        ({"position": (30, 30)}, "position"),
        ({"patch_size": 40}, "patch_size"),
        ({"pattern": "stars"}, "pattern"),
    ],
)
def test_badnets_rejects_bad_parameters(params, field):
    with pytest.raises(InputError, match=field):
        build("badnets", (32, 32, 3), **params)


@pytest.mark.parametrize("shape", SHAPES)
def test_blend_equals_the_formula(shape):
    x = images(shape)
    attack = build("blend", shape, seed=3, alpha=0.3)
    expected = np.clip(np.rint(0.7 * x.astype(np.float64) + 0.3 * attack.pattern.astype(np.float64)), 0, 255)
    np.testing.assert_array_equal(attack.apply(x), expected)


def test_blend_noise_pattern_follows_the_seed():
    shape = (32, 32, 3)
    first, again, other = (build("blend", shape, seed=seed).pattern for seed in (1, 1, 2))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_blend_loads_and_resizes_a_pattern_image(tmp_path):
    path = tmp_path / "trigger.png"
    Image.fromarray(np.full((64, 48, 3), (200, 10, 10), dtype=np.uint8)).save(path)
    rgb = build("blend", (32, 32, 3), pattern_path=path)
    assert rgb.pattern.shape == (32, 32, 3)
    assert (rgb.pattern[..., 0] == 200).all() and (rgb.pattern[..., 1] == 10).all()
    gray = build("blend", (28, 28, 1), pattern_path=str(path))
    assert gray.pattern.shape == (28, 28, 1)
    json.dumps(rgb.describe())


def test_blend_reports_missing_or_corrupt_pattern_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        build("blend", (32, 32, 3), pattern_path=tmp_path / "missing.png")
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not an image")
    with pytest.raises(InputError, match="pattern_path"):
        build("blend", (32, 32, 3), pattern_path=corrupt)


@pytest.mark.parametrize("shape, side", [((28, 28, 1), 7), ((32, 32, 3), 8)])
def test_trojan_stamps_a_fixed_mark_at_the_bottom_right(shape, side):
    x = images(shape)
    attack = build("trojan", shape, seed=1)
    out = attack.apply(x)
    expected = np.broadcast_to(attack.mark, (len(x), side, side, shape[2]))
    np.testing.assert_array_equal(out[:, -side:, -side:], expected)
    np.testing.assert_array_equal(out[:, :-side], x[:, :-side])
    np.testing.assert_array_equal(out[:, :, :-side], x[:, :, :-side])
    assert set(np.unique(attack.mark)) == {0, 255}
    np.testing.assert_array_equal(attack.mark, build("trojan", shape, seed=2).mark)


def bilinear_reference(image, grid):
    """Independent bilinear sampler: grid[..., 0] is the column, grid[..., 1] the row, zero padding."""
    height, width, channels = image.shape
    out = np.zeros((height, width, channels))
    padded = np.zeros((height + 2, width + 2, channels))
    padded[1:-1, 1:-1] = image
    for i in range(height):
        for j in range(width):
            col = (grid[i, j, 0] + 1) / 2 * (width - 1)
            row = (grid[i, j, 1] + 1) / 2 * (height - 1)
            r0, c0 = int(np.floor(row)), int(np.floor(col))
            dr, dc = row - r0, col - c0
            value = 0.0
            for rr, wr in ((r0, 1 - dr), (r0 + 1, dr)):
                for cc, wc in ((c0, 1 - dc), (c0 + 1, dc)):
                    if -1 <= rr <= height and -1 <= cc <= width:
                        value = value + wr * wc * padded[rr + 1, cc + 1]
            out[i, j] = value
    return out


@pytest.mark.parametrize("shape", SHAPES + [(16, 24, 3)])
def test_wanet_warp_matches_a_bilinear_reference(shape):
    x = images(shape, n=2)
    attack = build("wanet", shape, seed=4)
    out = attack.apply(x)
    for image, warped in zip(x, out):
        expected = bilinear_reference(image.astype(np.float64), attack.grid.astype(np.float64))
        assert np.abs(warped.astype(np.float64) - expected).max() <= 1


def test_wanet_without_strength_is_the_identity():
    x = images((32, 32, 3))
    np.testing.assert_array_equal(build("wanet", (32, 32, 3), s=0.0).apply(x), x)


def test_wanet_grid_is_stored_from_the_seed_and_bounded():
    shape = (32, 32, 3)
    attack = build("wanet", shape, seed=5)
    np.testing.assert_array_equal(attack.grid, build("wanet", shape, seed=5).grid)
    assert not np.array_equal(attack.grid, build("wanet", shape, seed=6).grid)
    assert attack.grid.shape == (32, 32, 2) and np.abs(attack.grid).max() <= 1
    identity = build("wanet", shape, seed=5, s=0.0).grid
    # Upsampled noise has mean |.| 1; bicubic overshoot keeps it within a few units, divided by H.
    assert 0 < np.abs(attack.grid - identity).max() <= 0.5 * 4 / 32


def test_wanet_cover_adds_per_sample_jitter_from_the_rng():
    shape = (32, 32, 3)
    attack = build("wanet", shape)
    x = np.repeat(images(shape, n=1), 3, axis=0)
    cover = attack.apply_cover(x, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(cover, attack.apply_cover(x, rng=np.random.default_rng(0)))
    assert not np.array_equal(cover[0], cover[1])
    assert not np.array_equal(cover[0], attack.apply(x[:1])[0])
    assert attack.cover_count(1000, 0.1) == 200


@pytest.mark.parametrize("shape", SHAPES)
def test_sig_equals_the_formula_with_clipping(shape):
    x = images(shape)
    x[0] = 250  # saturates on the positive half of the wave
    width = shape[1]
    wave = 20 * np.sin(2 * np.pi * np.arange(width) * 6 / width)
    expected = np.clip(np.rint(x + wave[None, None, :, None]), 0, 255)
    out = build("sig", shape).apply(x)
    np.testing.assert_array_equal(out, expected)
    assert out[0].max() == 255


def test_adaptive_blend_training_trigger_touches_only_the_selected_pieces():
    shape = (32, 32, 3)
    attack = build("adaptive_blend", shape, seed=2)
    x = np.full((5, *shape), 128, dtype=np.uint8)
    out = attack.apply(x, rng=np.random.default_rng(0))
    blended = np.clip(np.rint(0.85 * 128 + 0.15 * attack.pattern.astype(np.float64)), 0, 255)
    chosen_sets = set()
    for sample in out:
        changed = sample != 128
        touched = np.unique(attack.piece_ids[changed.any(axis=2)])
        assert len(touched) == 8
        in_touched = np.isin(attack.piece_ids, touched)
        np.testing.assert_array_equal(sample[in_touched], blended[in_touched])
        assert (sample[~in_touched] == 128).all()
        chosen_sets.add(tuple(touched))
    assert len(chosen_sets) > 1


def test_adaptive_blend_test_trigger_blends_all_pieces_at_test_alpha():
    shape = (28, 28, 1)
    attack = build("adaptive_blend", shape, seed=2)
    x = images(shape)
    expected = np.clip(np.rint(0.8 * x + 0.2 * attack.pattern.astype(np.float64)), 0, 255)
    np.testing.assert_array_equal(attack.apply(x, train=False), expected)


def test_piece_map_splits_uneven_sides_into_near_equal_pieces():
    pieces = piece_map(30, 30, 4)
    sizes = np.bincount(pieces.ravel(), minlength=16)
    assert len(sizes) == 16 and sizes.min() >= 49 and sizes.max() <= 64


@pytest.mark.parametrize("params, field", [({"pieces": 15}, "pieces"), ({"mask_rate": 1.0}, "mask_rate")])
def test_adaptive_blend_rejects_bad_parameters(params, field):
    with pytest.raises(InputError, match=field):
        build("adaptive_blend", (32, 32, 3), **params)


@pytest.mark.parametrize("shape", SHAPES)
def test_label_consistent_perturbation_stays_within_eps_and_raises_the_loss(shape):
    attack = build("label_consistent", shape, eps=4.0, step=1.0, steps=6)
    x = images(shape, n=8)
    labels = np.arange(8) % 4
    out = attack.apply(x, labels=labels)
    region = attack.trigger_weight
    difference = out.astype(int) - x.astype(int)
    assert np.abs(difference[:, ~region]).max() <= 4
    assert np.abs(difference[:, ~region]).max() > 0
    assert (out[:, region] == attack.trigger[region]).all()

    def loss(batch):
        inputs = (torch.tensor(batch).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
        return torch.nn.functional.cross_entropy(attack.model(inputs), torch.tensor(labels)).item()

    perturbed_only = out.copy()
    perturbed_only[:, region] = x[:, region]
    assert loss(perturbed_only) > loss(x)


def test_label_consistent_test_trigger_is_the_four_corner_marks():
    shape = (32, 32, 3)
    attack = build("label_consistent", shape)
    x = images(shape)
    out = attack.apply(x, train=False)
    for rows in (slice(0, 3), slice(29, 32)):
        for cols in (slice(0, 3), slice(29, 32)):
            # Four white pixels per corner mark, on all three channels.
            assert (out[:, rows, cols] == 255).sum(axis=(1, 2, 3)).tolist() == [4 * 3] * len(x)
    region = attack.trigger_weight
    assert region.sum() == 36
    np.testing.assert_array_equal(out[:, ~region], x[:, ~region])
    # BackdoorBox's mark in the bottom-right corner: pixels (-1,-1), (-1,-3), (-3,-1), (-2,-2).
    white = np.nonzero(out[0, 29:, 29:, 0] == 255)
    assert set(zip(*(axis.tolist() for axis in white))) == {(2, 2), (2, 0), (0, 2), (1, 1)}


def test_label_consistent_without_a_model_gives_only_the_test_trigger():
    shape = (32, 32, 3)
    attack = make_attack("label_consistent", shape)
    x = images(shape)
    with_model = build("label_consistent", shape)
    np.testing.assert_array_equal(attack.apply(x, train=False), with_model.apply(x, train=False))
    with pytest.raises(InputError, match="model"):
        attack.apply(x, labels=np.zeros(len(x), dtype=np.int64))


def test_label_consistent_validates_its_inputs():
    shape = (32, 32, 3)
    with pytest.raises(InputError, match="labels"):
        build("label_consistent", shape).apply(images(shape))
    with pytest.raises(InputError, match="eval"):
        build("label_consistent", shape, model=tiny_model(3).train())
    with pytest.raises(InputError, match="normalisation"):
        build("label_consistent", shape, normalisation={"mean": [0.5, 0.5]})
    with pytest.raises(InputError, match="normalisation"):
        make_attack("label_consistent", shape, model=tiny_model(3))
