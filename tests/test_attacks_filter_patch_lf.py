"""The Instagram-filter, Adaptive-Patch and Low Frequency attacks: pixel effects, seeds, cover samples, the
spec round trip through the harness, and the LF perturbation builder."""

import json

import numpy as np
import pilgram
import pytest
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter

from backdoor_engine.data.attacks import ATTACKS, harness, make_attack, poison_dataset
from backdoor_engine.data.attacks.adaptive_patch import (
    corner_origins,
    default_patch_size,
)
from backdoor_engine.data.attacks.low_frequency import (
    build_lf_trigger,
    default_sigma,
    load_lf_trigger,
    save_lf_trigger,
)
from backdoor_engine.data.dataset import make_dataset
from backdoor_engine.errors import InputError

K = 5
NORMALISATION = {"mean": [0.5], "std": [0.25]}


def images(shape, n=6, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)


def tiny_model(channels, num_classes=K):
    generator = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(channels, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(8, num_classes),
    )
    for parameter in model.parameters():
        torch.nn.init.normal_(parameter, std=0.5, generator=generator)
    return model.eval()


def smooth_perturbation(shape, magnitude=20.0):
    """A known low-frequency pattern: one period of a cosine along the rows, the same on every channel."""
    height = shape[0]
    wave = np.cos(2 * np.pi * np.arange(height) / height)[:, None, None]
    return (magnitude * np.broadcast_to(wave, shape)).astype(np.float32)


def written_trigger(tmp_path, shape, magnitude=20.0, name="lf.npz"):
    path = tmp_path / name
    save_lf_trigger(path, smooth_perturbation(shape, magnitude), eps=25.5)
    return path


def dataset(shape=(28, 28, 1), n=200, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    y = np.arange(n) % K
    return make_dataset(x, y, num_classes=K)


def test_the_three_attacks_are_registered_under_their_names():
    assert ATTACKS["filter"].__name__ == "InstagramFilter"
    assert ATTACKS["adaptive_patch"].__name__ == "AdaptivePatch"
    assert ATTACKS["lf"].__name__ == "LowFrequency"


# ---- filter -------------------------------------------------------------------------------------------


def test_filter_output_equals_pilgrams_1977_on_each_colour_image():
    x = images((32, 32, 3), n=4)
    out = make_attack("filter", (32, 32, 3)).apply(x)
    for original, filtered in zip(x, out):
        np.testing.assert_array_equal(filtered, np.asarray(pilgram._1977(Image.fromarray(original))))
    assert not np.array_equal(out, x)


def test_filter_on_grey_images_goes_through_rgb_and_back_to_luma():
    x = images((28, 28, 1), n=4)
    out = make_attack("filter", (28, 28, 1), filter="kelvin").apply(x)
    for original, filtered in zip(x, out):
        rgb = Image.fromarray(original[:, :, 0]).convert("RGB")
        expected = np.asarray(pilgram.kelvin(rgb).convert("L"))
        np.testing.assert_array_equal(filtered[:, :, 0], expected)


def test_filter_is_deterministic_the_same_at_test_time_and_independent_of_the_seed():
    x = images((28, 28, 1))
    first, other_seed = (make_attack("filter", (28, 28, 1), seed=s) for s in (0, 5))
    train = first.apply(x, train=True, rng=np.random.default_rng(1))
    np.testing.assert_array_equal(train, first.apply(x, train=False))
    np.testing.assert_array_equal(train, other_seed.apply(x, rng=np.random.default_rng(2)))


def test_filter_name_is_a_parameter_spelt_with_or_without_the_underscore():
    x = images((32, 32, 3))
    underscored = make_attack("filter", (32, 32, 3), filter="_1977")
    assert underscored.describe()["filter"] == "1977"
    np.testing.assert_array_equal(underscored.apply(x), make_attack("filter", (32, 32, 3)).apply(x))
    assert not np.array_equal(make_attack("filter", (32, 32, 3), filter="kelvin").apply(x), underscored.apply(x))


@pytest.mark.parametrize("name", ["sepia", "", 3, None])
def test_filter_refuses_an_unknown_filter_and_lists_the_valid_ones(name):
    with pytest.raises(InputError, match="filter") as error:
        make_attack("filter", (28, 28, 1), filter=name)
    if isinstance(name, str):
        assert "kelvin" in str(error.value)


# ---- adaptive_patch -----------------------------------------------------------------------------------


@pytest.mark.parametrize("side, expected", [(28, 4), (32, 4), (64, 8), (8, 1)])
def test_adaptive_patch_default_side_is_4_px_per_32(side, expected):
    assert default_patch_size(side, side) == expected
    assert make_attack("adaptive_patch", (side, side, 1)).side == expected


def test_adaptive_patch_sits_in_the_four_corners():
    attack = make_attack("adaptive_patch", (28, 28, 1))
    assert attack.origins == ((24, 24), (0, 0), (0, 24), (24, 0)) == corner_origins(4, 4, 28, 28)


def patch_mask(attack, patch):
    row, col = attack.origins[patch]
    mask = np.zeros(attack.image_shape[:2], dtype=bool)
    mask[row : row + attack.side, col : col + attack.side] = True
    return mask


def blended(value, pattern, alpha):
    return np.clip(np.rint((1 - alpha) * value + alpha * pattern.astype(np.float64)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("shape", [(28, 28, 1), (32, 32, 3)])
def test_adaptive_patch_training_trigger_is_one_patch_at_its_own_opacity(shape):
    attack = make_attack("adaptive_patch", shape, seed=3)
    x = np.full((40, *shape), 128, dtype=np.uint8)
    out = attack.apply(x, rng=np.random.default_rng(0))
    used = set()
    for sample in out:
        touched = [p for p in range(4) if (sample[patch_mask(attack, p)] != 128).any()]
        assert len(touched) == 1
        patch = touched[0]
        used.add(patch)
        region = patch_mask(attack, patch)
        expected = blended(128, attack.patterns[patch], attack.alphas[patch])
        np.testing.assert_array_equal(sample[region].reshape(expected.shape), expected)
        assert (sample[~region] == 128).all()
    assert used == {0, 1, 2, 3}


def test_adaptive_patch_test_trigger_is_every_patch_at_the_test_opacity():
    shape = (28, 28, 1)
    x = images(shape)
    for test_alpha in (1.0, 0.6):
        attack = make_attack("adaptive_patch", shape, seed=1, test_alpha=test_alpha)
        out = attack.apply(x, train=False)
        expected = x.copy()
        for patch in range(4):
            row, col = attack.origins[patch]
            window = (slice(None), slice(row, row + 4), slice(col, col + 4))
            expected[window] = blended(x[window].astype(np.float64), attack.patterns[patch], test_alpha)
        np.testing.assert_array_equal(out, expected)
    # Opacity 1 pastes the patterns themselves, which are 0/255 squares.
    out = make_attack("adaptive_patch", shape, seed=1).apply(x, train=False)
    np.testing.assert_array_equal(out[:, :4, :4], np.broadcast_to(attack.patterns[1], (len(x), 4, 4, 1)))
    assert set(np.unique(attack.patterns)) <= {0, 255}


def test_adaptive_patch_can_put_several_patches_on_each_training_sample():
    shape = (32, 32, 3)
    attack = make_attack("adaptive_patch", shape, patches_per_sample=2, alphas=[0.4, 0.4, 0.4])
    out = attack.apply(np.zeros((30, *shape), dtype=np.uint8))
    counts = [sum((sample[patch_mask(attack, p)] != 0).any() for p in range(3)) for sample in out]
    assert counts == [2] * 30
    row, col = corner_origins(4, attack.side, 32, 32)[3]
    assert (out[:, row : row + attack.side, col : col + attack.side] == 0).all()  # three patches were asked for


def test_adaptive_patch_follows_the_seed():
    shape = (28, 28, 1)
    first, again, other = (make_attack("adaptive_patch", shape, seed=s) for s in (4, 4, 5))
    np.testing.assert_array_equal(first.patterns, again.patterns)
    assert not np.array_equal(first.patterns, other.patterns)
    data = dataset(shape)
    one, two = (poison_dataset(data.x, data.y, first if i == 0 else again, mode="a2o", rate=0.1, num_classes=K,
                               seed=9) for i in range(2))
    for name in ("x", "y", "mask", "cover"):
        np.testing.assert_array_equal(getattr(one, name), getattr(two, name))


@pytest.mark.parametrize("params, expected_cover", [({}, 20), ({"cover_rate": 0.02}, 4)])
def test_adaptive_patch_cover_samples_keep_their_labels_and_carry_one_faint_patch(params, expected_cover):
    data = dataset((28, 28, 1))
    attack = make_attack("adaptive_patch", (28, 28, 1), **params)
    result = poison_dataset(data.x, data.y, attack, mode="a2o", rate=0.05, target=2, num_classes=K, seed=0)
    assert result.mask.sum() == 10 and result.cover.sum() == expected_cover
    assert not (result.mask & result.cover).any()
    np.testing.assert_array_equal(result.y[result.cover], data.y[result.cover])
    assert (result.y[result.mask] == 2).all()
    for index in np.flatnonzero(result.cover | result.mask):
        changed = result.x[index] != data.x[index]
        touched = [p for p in range(4) if changed[patch_mask(attack, p)].any()]
        assert len(touched) <= 1  # one patch; a faint blend can leave a few pixels equal
        outside = ~np.any([patch_mask(attack, p) for p in range(4)], axis=0)
        assert not changed[outside].any()
    clean = ~(result.mask | result.cover)
    np.testing.assert_array_equal(result.x[clean], data.x[clean])


@pytest.mark.parametrize(
    "params, field",
    [
        ({"alphas": []}, "alphas"),
        ({"alphas": [0.5] * 5}, "alphas"),
        ({"alphas": [0.5, 0.0]}, "alphas"),
        ({"alphas": "0.5"}, "alphas"),
        ({"alphas": [0.5, "strong"]}, "alphas"),
        ({"test_alpha": 0}, "test_alpha"),
        ({"patch_size": 15}, "patch_size"),
        ({"patch_size": 0}, "patch_size"),
        ({"patches_per_sample": 5}, "patches_per_sample"),
        ({"patches_per_sample": 0}, "patches_per_sample"),
        ({"cover_rate": 1.5}, "cover_rate"),
    ],
)
def test_adaptive_patch_rejects_bad_parameters(params, field):
    with pytest.raises(InputError, match=field):
        make_attack("adaptive_patch", (28, 28, 1), **params)


# ---- lf: the attack -----------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(28, 28, 1), (32, 32, 3)])
def test_lf_adds_the_stored_perturbation_and_clips_to_the_pixel_range(tmp_path, shape):
    attack = make_attack("lf", shape, trigger_path=str(written_trigger(tmp_path, shape)))
    x = images(shape)
    x[0] = 0
    x[1] = 255
    expected = np.clip(np.rint(x.astype(np.float64) + smooth_perturbation(shape)), 0, 255)
    for train in (True, False):
        np.testing.assert_array_equal(attack.apply(x, train=train), expected)
    assert attack.apply(x)[1].min() < 255 and attack.apply(x)[0].max() > 0  # both signs of the pattern


@pytest.mark.parametrize("stored_shape", [(28, 28, 3), (32, 32, 1), (28, 28), (1, 28, 28, 1)])
def test_lf_refuses_a_perturbation_file_of_the_wrong_shape(tmp_path, stored_shape):
    path = tmp_path / "wrong.npz"
    np.savez(path, perturbation=np.zeros(stored_shape, dtype=np.float32))
    with pytest.raises(InputError, match="shape"):
        make_attack("lf", (28, 28, 1), trigger_path=str(path))


def test_lf_refuses_files_it_must_not_or_cannot_read(tmp_path):
    shape = (28, 28, 1)
    with pytest.raises(InputError, match="trigger_path"):
        make_attack("lf", shape)
    with pytest.raises(InputError, match="not found"):
        make_attack("lf", shape, trigger_path=str(tmp_path / "missing.npz"))
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, perturbation=np.array([{"evil": 1}], dtype=object))
    with pytest.raises(InputError, match="trigger_path"):
        make_attack("lf", shape, trigger_path=str(pickled))
    other_key = tmp_path / "other.npz"
    np.savez(other_key, pattern=np.zeros(shape, dtype=np.float32))
    with pytest.raises(InputError, match="perturbation"):
        make_attack("lf", shape, trigger_path=str(other_key))
    not_npz = tmp_path / "text.npz"
    not_npz.write_text("hello")
    with pytest.raises(InputError, match="trigger_path"):
        make_attack("lf", shape, trigger_path=str(not_npz))
    single = tmp_path / "single.npy"
    np.save(single, np.zeros(shape, dtype=np.float32))
    with pytest.raises(InputError, match="single .npy"):
        make_attack("lf", shape, trigger_path=str(single))
    nan = tmp_path / "nan.npz"
    np.savez(nan, perturbation=np.full(shape, np.nan, dtype=np.float32))
    with pytest.raises(InputError, match="non-finite"):
        make_attack("lf", shape, trigger_path=str(nan))


def test_lf_refuses_a_stored_perturbation_above_its_eps(tmp_path):
    path = written_trigger(tmp_path, (28, 28, 1), magnitude=30.0)
    with pytest.raises(InputError, match="eps"):
        make_attack("lf", (28, 28, 1), trigger_path=str(path))
    make_attack("lf", (28, 28, 1), trigger_path=str(path), eps=30)
    with pytest.raises(InputError, match="eps"):
        make_attack("lf", (28, 28, 1), trigger_path=str(path), eps=0)


# ---- lf: building the perturbation --------------------------------------------------------------------


def target_log_probability(model, x, target):
    inputs = (torch.tensor(x).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
    with torch.no_grad():
        return torch.log_softmax(model(inputs), dim=1)[:, target].mean().item()


def added(x, perturbation):
    return np.clip(np.rint(x + perturbation), 0, 255).astype(np.uint8)


def test_lf_perturbation_moves_a_tiny_models_predictions_to_the_target_more_than_noise_of_its_norm():
    shape = (28, 28, 1)
    model = tiny_model(1)
    x = images(shape, n=200)
    build, held_out = x[:100], x[100:]
    rng = np.random.default_rng(0)
    sigma = (default_sigma(28, 28), default_sigma(28, 28), 0)
    for target in (1, 3):
        perturbation = build_lf_trigger(model, NORMALISATION, build, target, steps=30)
        norm = np.linalg.norm(perturbation)
        base = target_log_probability(model, held_out, target)
        gain = target_log_probability(model, added(held_out, perturbation), target) - base
        white = rng.standard_normal(shape)
        white_gain = target_log_probability(model, added(held_out, white * norm / np.linalg.norm(white)), target) - base
        assert gain > 0.2 and gain > 3 * max(white_gain, 0.01), (target, gain, white_gain)
        # Low-pass noise too (every one of 10 draws): the gain comes from the direction, not from the smoothness.
        for _ in range(10):
            smooth = gaussian_filter(rng.standard_normal(shape), sigma=sigma)
            smooth_gain = target_log_probability(model, added(held_out, smooth * norm / np.linalg.norm(smooth)),
                                                 target) - base
            assert gain > smooth_gain, (target, gain, smooth_gain)


def test_lf_perturbation_is_low_frequency_and_uses_the_whole_bound():
    shape = (32, 32, 3)
    perturbation = build_lf_trigger(tiny_model(3), NORMALISATION, images(shape, n=40), 0, eps=20, steps=10)
    assert perturbation.shape == shape and perturbation.dtype == np.float32
    assert np.abs(perturbation).max() == pytest.approx(20, rel=1e-5)
    spectrum = np.abs(np.fft.fftshift(np.fft.fft2(perturbation, axes=(0, 1)), axes=(0, 1))) ** 2
    rows, cols = np.indices(shape[:2]) - 16
    high = np.hypot(rows, cols) > 8  # beyond a quarter of the band
    assert spectrum[high].sum() / spectrum.sum() < 0.01
    white = np.abs(np.fft.fft2(np.random.default_rng(0).standard_normal(shape), axes=(0, 1))) ** 2
    assert white[np.fft.ifftshift(high)].sum() / white.sum() > 0.5  # what an unfiltered pattern would have


def test_lf_builder_is_deterministic_under_its_seed():
    shape = (28, 28, 1)
    model, x = tiny_model(1), images(shape, n=30)
    first, again, other = (build_lf_trigger(model, NORMALISATION, x, 2, steps=6, batch_size=8, seed=s)
                           for s in (0, 0, 1))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)  # the seed orders the batches when they do not hold every image


def test_lf_builder_rejects_bad_inputs():
    shape = (28, 28, 1)
    x = images(shape)
    with pytest.raises(InputError, match="eval"):
        build_lf_trigger(tiny_model(1).train(), NORMALISATION, x, 0)
    with pytest.raises(InputError, match="target"):
        build_lf_trigger(tiny_model(1), NORMALISATION, x, K, steps=1)
    with pytest.raises(InputError, match="images"):
        build_lf_trigger(tiny_model(1), NORMALISATION, x.astype(np.float32), 0)
    with pytest.raises(InputError, match="normalisation"):
        build_lf_trigger(tiny_model(1), {"mean": [0.5, 0.5]}, x, 0)
    with pytest.raises(InputError, match="eps"):
        build_lf_trigger(tiny_model(1), NORMALISATION, x, 0, eps=300)
    with pytest.raises(InputError, match="sigma"):
        build_lf_trigger(tiny_model(1), NORMALISATION, x, 0, sigma=-1)
    with pytest.raises(InputError, match="steps"):
        build_lf_trigger(tiny_model(1), NORMALISATION, x, 0, steps=0)


def test_lf_default_low_pass_is_the_official_6_px_scaled_to_the_image():
    assert default_sigma(32, 32) == 6.0
    assert default_sigma(28, 28) == pytest.approx(5.25)


# ---- the spec round trip through the harness ----------------------------------------------------------


def round_trip(tmp_path, data, spec, clean_model=None):
    spec = harness.prepare_spec(data, spec, clean_model=clean_model, trigger_path=tmp_path / "p.lf-trigger.npz")
    poisoned, result = harness.poison(data, spec, clean_model=clean_model)
    harness.save_poisoned(poisoned, result, spec, tmp_path / "p.npz", source="test")
    loaded = harness.PoisonSpec.load(harness.manifest_path(tmp_path / "p.npz"))
    return loaded, result, harness.triggered_test(data, loaded, num_classes=K)


@pytest.mark.parametrize("name, params", [("filter", {"filter": "kelvin"}), ("adaptive_patch", {"test_alpha": 0.8})])
def test_spec_round_trip_gives_the_test_trigger(tmp_path, name, params):
    data = dataset((28, 28, 1), n=100)
    spec = harness.PoisonSpec(attack=name, rate=0.1, target=1, seed=3, params=params)
    loaded, result, test = round_trip(tmp_path, data, spec)
    assert loaded == spec
    attack = make_attack(name, (28, 28, 1), seed=3, **params)
    np.testing.assert_array_equal(test.x, attack.apply(data.x[data.y != 1], train=False))
    assert (test.y_attack == 1).all()
    if name == "adaptive_patch":
        assert result.cover.sum() == 20


def test_lf_spec_round_trip_builds_the_perturbation_once_and_records_its_file(tmp_path):
    data = dataset((28, 28, 1), n=100)
    spec = harness.PoisonSpec(attack="lf", rate=0.1, target=2, seed=1, params={"steps": 5, "n_images": 20})
    loaded, result, test = round_trip(tmp_path, data, spec, clean_model=(tiny_model(1), NORMALISATION))
    path = tmp_path / "p.lf-trigger.npz"
    assert loaded.params == {"steps": 5, "n_images": 20, "trigger_path": str(path.resolve())}
    perturbation = load_lf_trigger(path, (28, 28, 1))
    assert np.abs(perturbation).max() == pytest.approx(25.5, rel=1e-5)
    np.testing.assert_array_equal(result.x[result.mask], added(data.x[result.mask], perturbation))
    np.testing.assert_array_equal(test.x, added(data.x[data.y != 2], perturbation))
    # The same spec and data build the same perturbation.
    again = harness.prepare_spec(data, spec, clean_model=(tiny_model(1), NORMALISATION),
                                 trigger_path=tmp_path / "again.npz")
    np.testing.assert_array_equal(load_lf_trigger(again.params["trigger_path"], (28, 28, 1)), perturbation)


def test_lf_without_a_clean_model_or_a_stored_file_says_what_is_missing(tmp_path):
    data = dataset((28, 28, 1), n=50)
    with pytest.raises(InputError, match="--adv-model"):
        harness.prepare_spec(data, harness.PoisonSpec(attack="lf"), trigger_path=tmp_path / "t.npz")
    with pytest.raises(InputError, match="n_images"):
        harness.prepare_spec(data, harness.PoisonSpec(attack="lf", params={"n_images": 0}),
                             clean_model=(tiny_model(1), NORMALISATION), trigger_path=tmp_path / "t.npz")
    with pytest.raises(InputError, match="unknown"):
        harness.prepare_spec(data, harness.PoisonSpec(attack="lf", params={"alpha": 1}),
                             clean_model=(tiny_model(1), NORMALISATION), trigger_path=tmp_path / "t.npz")
    stored = harness.PoisonSpec(attack="lf", params={"trigger_path": str(written_trigger(tmp_path, (28, 28, 1)))})
    assert harness.prepare_spec(data, stored) is stored  # nothing to build


def test_poison_cli_builds_lf_beside_the_output_from_the_clean_checkpoint(tmp_path, capsys):
    from backdoor_engine.cli import main
    from backdoor_engine.data.dataset import load_npz, save_npz
    from backdoor_engine.models.checkpoint import save_checkpoint
    from backdoor_engine.models.preprocess import Normalisation
    from backdoor_engine.models.registry import build_model

    data = dataset((12, 12, 1), n=60)
    save_npz(data, tmp_path / "d.npz")
    torch.manual_seed(0)
    model = build_model("small_resnet", num_classes=K, in_channels=1, input_size=12).eval()
    save_checkpoint(tmp_path / "clean.pt", model, arch="small_resnet", num_classes=K, in_channels=1, input_size=12,
                    normalisation=Normalisation((0.5,), (0.25,)))
    out = tmp_path / "p.npz"
    assert main(["poison", "--data", str(tmp_path / "d.npz"), "--attack", "lf", "--param", "steps=2",
                 "--param", "n_images=8", "--adv-model", str(tmp_path / "clean.pt"), "--out", str(out)]) == 0
    manifest = json.loads((tmp_path / "p.attack.json").read_text())
    trigger = tmp_path / "p.lf-trigger.npz"
    assert manifest["params"]["trigger_path"] == str(trigger.resolve()) and trigger.is_file()
    poisoned = load_npz(out)
    hit = poisoned.poison.astype(bool)
    assert hit.sum() == 6 and (poisoned.y[hit] == 0).all()
    perturbation = load_lf_trigger(trigger, (12, 12, 1))
    np.testing.assert_array_equal(poisoned.x[hit], added(data.x[hit], perturbation))
    capsys.readouterr()
    rc = main(["poison", "--data", str(tmp_path / "d.npz"), "--attack", "lf", "--out", str(tmp_path / "q.npz")])
    assert rc == 2 and "--adv-model" in capsys.readouterr().err
