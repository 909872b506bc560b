"""Learned-trigger attacks (IAD, SIBA, ISSBA): their builders, trigger files and attack classes."""

import json
import pickle
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from backdoor_engine.data.attacks import ATTACKS, harness, make_attack
from backdoor_engine.data.attacks.iad import (
    IAD,
    build_iad,
    derangement,
    iad_config,
    threshold,
)
from backdoor_engine.data.attacks.issba import (
    ISSBA,
    build_issba,
    decode_bits,
    issba_config,
)
from backdoor_engine.data.attacks.harness import trigger_file_path
from backdoor_engine.data.attacks.learned import to_unit
from backdoor_engine.data.attacks.siba import SIBA, build_siba, default_k, siba_config
from backdoor_engine.data.dataset import make_dataset
from backdoor_engine.errors import InputError

K = 4
SHAPE = (12, 12, 1)
NORMALISATION = {"mean": [0.3], "std": [0.3]}


def quadrants(n, seed):
    """A tiny separable set: class k lights up quadrant k of a dark, noisy 12 x 12 image."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, K, n)
    x = np.zeros((n, *SHAPE), np.int64)
    for label in range(K):
        row, col = divmod(label, 2)
        x[y == label, row * 6 : row * 6 + 6, col * 6 : col * 6 + 6] = 200
    return np.clip(x + rng.integers(0, 40, x.shape), 0, 255).astype(np.uint8), y


def mid_grey(n, seed):
    """Random mid-grey images: an ISSBA residual of either sign survives the clip to [0, 255]."""
    return np.random.default_rng(seed).integers(60, 190, (n, *SHAPE), dtype=np.uint8)


def classifier(seed=0, pooled=True):
    torch.manual_seed(seed)
    if pooled:
        layers = [torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                  torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveMaxPool2d(1),
                  torch.nn.Flatten(), torch.nn.Linear(32, K)]
    else:
        layers = [torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 144, K)]
    return torch.nn.Sequential(*layers).eval()


def model_input(x):
    return (to_unit(x) - 0.3) / 0.3


def predict(model, x):
    with torch.no_grad():
        return model(model_input(x)).argmax(1).numpy()


@pytest.fixture(scope="module")
def surrogate():
    """A small clean classifier of the quadrant set (SIBA's surrogate)."""
    x, y = quadrants(512, seed=0)
    model = classifier(pooled=False)
    optimiser = torch.optim.SGD(model.parameters(), 0.05)
    inputs, labels = model_input(x), torch.from_numpy(y)
    model.train()
    for _ in range(30):
        optimiser.zero_grad()
        F.cross_entropy(model(inputs), labels).backward()
        optimiser.step()
    model.eval()
    assert (predict(model, x) == y).mean() > 0.95
    return model


def tiny_build(name, path, seed):
    """A seconds-long build of each attack's trigger file on 40 images."""
    x, y = quadrants(40, seed=1)
    if name == "iad":
        config = iad_config(epochs=1, mask_epochs=1, batch_size=20, channel_init=4)
        return build_iad(x, y, path, model=classifier(), normalisation=NORMALISATION, num_classes=K, seed=seed,
                         config=config)
    if name == "siba":
        return build_siba(x, path, model=classifier(), normalisation=NORMALISATION, seed=seed,
                          config=siba_config(epochs=2, batch_size=20))
    return build_issba(x, path, seed=seed, config=issba_config(epochs=2, base_width=4, secret_size=6, lr=0.01))


# ------------------------------------------------------------------------------------------ all three


def test_learned_attacks_are_registered_with_a_generator_parameter():
    for name, attack in (("iad", IAD), ("siba", SIBA), ("issba", ISSBA)):
        assert ATTACKS[name] is attack
        assert not attack.clean_label
    with pytest.raises(InputError, match="generator: attack 'iad' needs the path of its trigger file"):
        make_attack("iad", SHAPE)


@pytest.mark.parametrize("name", ["iad", "siba", "issba"])
def test_same_seed_gives_the_same_file_and_the_same_poisoned_pixels(tmp_path, name):
    first = tiny_build(name, tmp_path / "a.npz", seed=3)
    again = tiny_build(name, tmp_path / "b.npz", seed=3)
    other = tiny_build(name, tmp_path / "c.npz", seed=4)
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    assert first.sha256 == again.sha256 != other.sha256
    x, _ = quadrants(8, seed=9)
    np.testing.assert_array_equal(make_attack(name, SHAPE, generator=first.path).apply(x),
                                  make_attack(name, SHAPE, generator=again.path).apply(x))
    assert not np.array_equal(make_attack(name, SHAPE, generator=first.path).apply(x),
                              make_attack(name, SHAPE, generator=other.path).apply(x))


@pytest.mark.parametrize("name", ["iad", "siba", "issba"])
def test_poison_then_triggered_test_from_the_json_spec_rebuilds_the_same_trigger(tmp_path, name, surrogate):
    x, y = quadrants(200, seed=2)
    dataset = make_dataset(x, y, num_classes=K)
    spec = harness.PoisonSpec(attack=name, mode="a2o", rate=0.1, target=0, seed=5)
    settings = {"iad": {"epochs": 1, "mask_epochs": 1, "batch_size": 50, "channel_init": 4, "max_samples": 100},
                "siba": {"epochs": 2, "max_samples": 100},
                "issba": {"epochs": 2, "base_width": 4, "secret_size": 6, "lr": 0.01, "max_samples": 100}}[name]
    out = tmp_path / "poisoned.npz"
    spec = harness.prepare_spec(dataset, spec, clean_model=(surrogate, NORMALISATION), budget="cpu",
                                        settings=settings, trigger_path=trigger_file_path(out, name))
    assert spec.params["generator"] == str((tmp_path / f"poisoned.{name}-trigger.npz").resolve())
    poisoned, result = harness.poison(dataset, spec)
    manifest = harness.save_poisoned(poisoned, result, spec, out, source="test")
    attack = make_attack(name, SHAPE, generator=spec.params["generator"])
    payload = result.mask
    np.testing.assert_array_equal(poisoned.x[payload], attack.apply(x[payload]))
    assert (poisoned.y[payload] == 0).all()
    # A JSON round trip of the manifest gives the spec that ASR is measured with.
    reloaded = harness.PoisonSpec.load(harness.manifest_path(out))
    assert reloaded == harness.PoisonSpec.from_dict(json.loads(json.dumps(manifest)))
    test_x, test_y = quadrants(30, seed=3)
    triggered = harness.triggered_test(make_dataset(test_x, test_y, num_classes=K), reloaded, num_classes=K)
    np.testing.assert_array_equal(triggered.x, attack.apply(test_x[test_y != 0]))
    # The recorded sha256 refuses a trigger file rebuilt differently since.
    tiny_build(name, spec.params["generator"], seed=99)
    with pytest.raises(InputError, match="changed since the poisoning run"):
        harness.triggered_test(make_dataset(test_x, test_y, num_classes=K), reloaded, num_classes=K)


def test_prepare_spec_leaves_other_specs_alone_and_asks_for_the_clean_model(tmp_path):
    dataset = make_dataset(*quadrants(40, seed=1), num_classes=K)
    badnets = harness.PoisonSpec(attack="badnets")
    assert harness.prepare_spec(dataset, badnets, trigger_path=tmp_path / "t.npz") is badnets
    built = harness.PoisonSpec(attack="iad", params={"generator": "given.npz"})
    assert harness.prepare_spec(dataset, built, trigger_path=tmp_path / "t.npz") is built
    with pytest.raises(InputError, match="needs a clean model"):
        harness.prepare_spec(dataset, harness.PoisonSpec(attack="siba"), trigger_path=tmp_path / "t.npz")
    with pytest.raises(InputError, match="unknown parameter"):
        harness.prepare_spec(dataset, harness.PoisonSpec(attack="issba", params={"eps": 3}),
                                     trigger_path=tmp_path / "t.npz")
    with pytest.raises(InputError, match="apply only when a trigger file is built"):
        harness.prepare_spec(dataset, badnets, settings={"epochs": 1}, trigger_path=tmp_path / "t.npz")


def test_poison_cli_builds_the_trigger_beside_the_output_and_records_it(tmp_path, capsys):
    from backdoor_engine.cli import main
    from backdoor_engine.data.dataset import save_npz

    data = tmp_path / "clean.npz"
    save_npz(make_dataset(mid_grey(60, seed=0), np.arange(60) % K, num_classes=K), data)
    out = tmp_path / "poisoned.npz"
    rc = main(["poison", "--data", str(data), "--attack", "issba", "--rate", "0.1", "--out", str(out),
               "--build-budget", "cpu", "--build-param", "epochs=1", "--build-param", "base_width=4"])
    assert rc == 0
    trigger = tmp_path / "poisoned.issba-trigger.npz"
    manifest = json.loads((tmp_path / "poisoned.attack.json").read_text())
    assert manifest["params"]["generator"] == str(trigger.resolve())
    assert len(manifest["params"]["generator_sha256"]) == 64
    config = json.loads(str(np.load(trigger, allow_pickle=False)["config"]))
    assert config["epochs"] == 1 and config["base_width"] == 4 and config["max_samples"] == 2000
    capsys.readouterr()


# ------------------------------------------------------------------------------------------ bad files


@pytest.fixture(scope="module")
def siba_file(tmp_path_factory):
    return tiny_build("siba", tmp_path_factory.mktemp("siba") / "siba.npz", seed=0).path


def test_pickled_files_are_refused_without_being_unpickled(tmp_path, siba_file):
    with_object = tmp_path / "object.npz"
    np.savez(with_object, kind=np.array("siba"), payload=np.array([{"a": 1}], dtype=object))
    with pytest.raises(InputError, match="pickled objects"):
        SIBA(SHAPE, generator=str(with_object))
    pickled = tmp_path / "trigger.pt"
    pickled.write_bytes(pickle.dumps({"delta": np.zeros(SHAPE)}))
    with pytest.raises(InputError, match="pickled objects"):
        SIBA(SHAPE, generator=str(pickled))
    torch_file = tmp_path / "weights.npz"
    torch.save({"w": torch.zeros(3)}, torch_file)
    with pytest.raises(InputError, match="trigger file"):
        SIBA(SHAPE, generator=str(torch_file))


def test_files_of_the_wrong_kind_or_shape_are_refused(tmp_path, siba_file):
    with pytest.raises(InputError, match="is a siba trigger file, expected iad"):
        IAD(SHAPE, generator=siba_file)
    with pytest.raises(InputError, match=r"built for images of shape \(12, 12, 1\), not \(16, 16, 1\)"):
        SIBA((16, 16, 1), generator=siba_file)
    with pytest.raises(InputError, match="does not exist"):
        SIBA(SHAPE, generator=str(tmp_path / "missing.npz"))
    single = tmp_path / "single.npy"
    np.save(single, np.zeros(3))
    with pytest.raises(InputError, match="single array"):
        SIBA(SHAPE, generator=str(single))
    arrays = dict(np.load(siba_file, allow_pickle=False))

    def rewritten(**changes):
        path = tmp_path / "changed.npz"
        np.savez(path, **{**arrays, **changes})
        return str(path)

    with pytest.raises(InputError, match="'delta' has shape"):
        SIBA(SHAPE, generator=rewritten(delta=np.zeros((12, 11, 1), np.int16)))
    with pytest.raises(InputError, match="exceeds eps"):
        SIBA(SHAPE, generator=rewritten(delta=np.where(arrays["mask"][..., None], 200, 0).astype(np.int16)))
    with pytest.raises(InputError, match="non-zero outside its mask"):
        SIBA(SHAPE, generator=rewritten(delta=np.ones(SHAPE, np.int16)))
    with pytest.raises(InputError, match="format"):
        SIBA(SHAPE, generator=rewritten(format_version=np.array(7)))


def test_a_network_tensor_of_the_wrong_shape_is_refused(tmp_path):
    path = tiny_build("issba", tmp_path / "issba.npz", seed=0).path
    arrays = dict(np.load(path, allow_pickle=False))
    key = "encoder.residual.weight"
    np.savez(tmp_path / "bad.npz", **{**arrays, key: arrays[key][:, :2]})
    with pytest.raises(InputError, match=f"{key} has shape"):
        ISSBA(SHAPE, generator=str(tmp_path / "bad.npz"))
    del arrays[key]
    np.savez(tmp_path / "missing.npz", **arrays)
    with pytest.raises(InputError, match="does not match its declared shape"):
        ISSBA(SHAPE, generator=str(tmp_path / "missing.npz"))


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: iad_config(p_attack=1.5), "p_attack"),
        (lambda: iad_config(p_attack=0.6, p_cross=0.5), "p_cross"),
        (lambda: iad_config(epochs=0), "epochs"),
        (lambda: iad_config(budget="gpu"), "budget"),
        (lambda: iad_config(lr=0.1), "unknown setting"),
        (lambda: siba_config(eps=300), "eps"),
        (lambda: siba_config(k=0), "k"),
        (lambda: issba_config(max_residual=0), "max_residual"),
        (lambda: issba_config(max_samples=0), "max_samples"),
    ],
)
def test_builders_reject_bad_settings(make, field):
    with pytest.raises(InputError, match=field):
        make()


def test_builders_reject_bad_inputs(tmp_path):
    x, y = quadrants(20, seed=0)
    with pytest.raises(InputError, match="batch_size"):
        build_iad(x, y, tmp_path / "t.npz", model=classifier(), normalisation=NORMALISATION, num_classes=K,
                  config=iad_config(batch_size=5))
    with pytest.raises(InputError, match="k: expected at most 144"):
        build_siba(x, tmp_path / "t.npz", model=classifier(), normalisation=NORMALISATION,
                   config=siba_config(k=145))
    with pytest.raises(InputError, match="normalisation"):
        build_siba(x, tmp_path / "t.npz", model=classifier(), normalisation={"mean": [0.3]})
    with pytest.raises(InputError, match="x: expected a uint8"):
        build_issba(x.astype(np.float32), tmp_path / "t.npz")
    with pytest.raises(InputError, match="trigger file is an .npz"):
        build_issba(x, tmp_path / "t.pt", config=issba_config(epochs=1, base_width=4))


# ------------------------------------------------------------------------------------------ IAD


@pytest.fixture(scope="module")
def iad_built(tmp_path_factory):
    """IAD trained on 512 quadrant images at the paper's rates (p_attack = p_cross = 0.1, lambda_div 1, mask density
    0.032); seeds 1-3 reach held-out ASR 0.81-1.0 as well."""
    x, y = quadrants(512, seed=0)
    config = iad_config(epochs=20, mask_epochs=2, batch_size=64, channel_init=8, lr_classifier=0.05)
    path = tmp_path_factory.mktemp("iad") / "iad.npz"
    # One thread, so the run is the same everywhere: this tiny joint training is chaotic, and at 2 threads the same
    # seed ended at ASR 0.34 (CI, 2026-12-02) where 1 thread gives the run the assertions below describe.
    from backdoor_engine.models.train import torch_threads

    with torch_threads(1):
        return build_iad(x, y, path, model=classifier(), normalisation=NORMALISATION, num_classes=K, target=0,
                         seed=0, config=config)


def test_iad_classifier_trained_with_the_generator_obeys_each_images_own_trigger(iad_built):
    attack = IAD(SHAPE, generator=iad_built.path)
    x, y = quadrants(300, seed=5)  # held out
    others = y != 0
    assert (predict(iad_built.classifier, x) == y).mean() > 0.95
    assert (predict(iad_built.classifier, attack.apply(x[others])) == 0).mean() > 0.75
    # Another image's trigger does not work: cross-trigger samples keep their class.
    assert (predict(iad_built.classifier, attack.apply_cover(x)) == y).mean() > 0.6


def test_iad_gives_each_image_its_own_trigger_and_covers_borrow_another_images(iad_built):
    attack = IAD(SHAPE, generator=iad_built.path)
    x, _ = quadrants(40, seed=6)
    patterns, masks = attack.triggers(x)
    assert patterns.shape == x.shape and masks.shape == x.shape[:3]
    assert 0 <= patterns.min() and patterns.max() <= 1 and 0 <= masks.min() and masks.max() <= 1
    pattern_gaps = np.abs(patterns[:, None] - patterns[None]).mean(axis=(2, 3, 4))
    assert (pattern_gaps[~np.eye(len(x), dtype=bool)] > 1e-3).all()
    # The poisoned image is exactly x + (G(x) - x) * m(x), rounded.
    expected = np.rint(255 * (x / 255 + (patterns - x / 255) * masks[..., None]))
    assert np.abs(attack.apply(x).astype(int) - expected).max() <= 1
    donors = derangement(len(x), np.random.default_rng(3))
    assert (donors != np.arange(len(x))).all() and sorted(donors) == list(range(len(x)))
    cover = attack.apply_cover(x, rng=np.random.default_rng(3))
    np.testing.assert_array_equal(cover, attack._mix(x, x[donors]))
    assert not np.array_equal(cover, attack.apply(x))
    assert attack.cover_count(1000, 0.1) == 100  # p_cross / p_attack = 1
    assert make_attack("iad", SHAPE, generator=iad_built.path, cross_ratio=0).cover_count(1000, 0.1) == 0
    lone = attack.apply_cover(x[:1])
    np.testing.assert_array_equal(lone, attack._mix(x[:1], x[:1, ::-1, ::-1].copy()))


def test_iad_mask_generator_keeps_the_trigger_small(iad_built):
    attack = IAD(SHAPE, generator=iad_built.path)
    x, _ = quadrants(100, seed=7)
    with torch.no_grad():
        masks = threshold(attack.mask_net(attack.normaliser(to_unit(x))))
    assert masks.mean() < 0.3  # 16 steps towards density 0.032; the untrained mask net gives 0.42 here


# ------------------------------------------------------------------------------------------ SIBA


@pytest.fixture(scope="module")
def siba_built(tmp_path_factory, surrogate):
    x, _ = quadrants(512, seed=0)
    path = tmp_path_factory.mktemp("siba") / "siba.npz"
    return build_siba(x[:256], path, model=surrogate, normalisation=NORMALISATION, target=0, seed=0,
                      config=siba_config(epochs=10, batch_size=64, eps=32))


def test_siba_trigger_is_universal_sparse_and_bounded(siba_built):
    attack = SIBA(SHAPE, generator=siba_built.path)
    x, _ = quadrants(50, seed=8)
    x[0] = 128  # no clipping on this one: the full trigger shows
    diff = attack.apply(x).astype(int) - x
    k = default_k(12, 12)
    assert k == 14
    changed = (diff != 0).any(axis=3)
    assert changed.sum(axis=(1, 2)).max() <= k and 0 < changed[0].sum() <= attack.mask.sum() == k
    assert np.abs(diff).max() <= 32 and np.abs(diff[0]).max() == 32
    assert not changed[:, ~attack.mask].any()
    np.testing.assert_array_equal(diff[0], attack.delta)  # the same additive trigger for every image


def test_siba_trigger_moves_the_surrogate_towards_the_target_more_than_a_random_sparse_trigger(siba_built,
                                                                                               surrogate):
    attack = SIBA(SHAPE, generator=siba_built.path)
    x, y = quadrants(512, seed=0)
    held = x[256:][y[256:] != 0]

    def target_log_prob(images):
        with torch.no_grad():
            return torch.log_softmax(surrogate(model_input(images)), 1)[:, 0].mean().item()

    clean = target_log_prob(held)
    gain = target_log_prob(attack.apply(held)) - clean
    rng = np.random.default_rng(1)
    random_gains = []
    pixels = int(attack.mask.sum())
    for _ in range(5):
        delta = np.zeros(SHAPE, np.int16)
        delta.reshape(-1)[rng.choice(144, pixels, replace=False)] = rng.choice([-32, 32], pixels)
        random_gains.append(target_log_prob(np.clip(held + delta, 0, 255).astype(np.uint8)) - clean)
    assert gain > 0.2 and gain > 3 * max(random_gains)


# ------------------------------------------------------------------------------------------ ISSBA


@pytest.fixture(scope="module")
def issba_built(tmp_path_factory):
    path = tmp_path_factory.mktemp("issba") / "issba.npz"
    config = issba_config(epochs=20, secret_only_epochs=16, lr=1e-3, base_width=8, secret_size=8, max_samples=512)
    return build_issba(mid_grey(512, seed=0), path, seed=0, config=config)


def test_issba_decoder_reads_the_secret_from_held_out_poisoned_images(issba_built):
    attack = ISSBA(SHAPE, generator=issba_built.path)
    x = mid_grey(200, seed=11)  # held out
    assert attack.secret.shape == (8,)
    read = decode_bits(issba_built.path, attack.apply(x))
    assert (read == attack.secret).mean() > 0.9
    assert (decode_bits(issba_built.path, x) == attack.secret).mean() < 0.75  # clean images carry no secret


def test_issba_trigger_is_sample_specific_and_bounded(issba_built):
    attack = ISSBA(SHAPE, generator=issba_built.path)
    x = mid_grey(40, seed=12)
    residuals = attack.residuals(x)
    assert np.abs(residuals).max() <= 32 + 1e-4  # clipped at max_residual (float32 on the [0, 1] scale)
    diff = attack.apply(x).astype(int) - x
    assert np.abs(diff).max() <= 32
    # x + residual, rounded (float32 rounding may land one level apart): no clipping on mid-grey images.
    assert np.abs(diff - (np.rint(x + residuals) - x)).max() <= 1
    # Each image gets its own residual, not one pattern for all.
    spread = np.abs(residuals - residuals.mean(axis=0)).mean()
    assert spread > 0.2 * np.abs(residuals).mean()


def test_issba_secret_must_be_bits_and_trigger_files_have_fixed_timestamps(tmp_path):
    built = tiny_build("issba", tmp_path / "issba.npz", seed=0)
    attack = ISSBA(SHAPE, generator=built.path)
    assert attack.secret.shape == (6,) and set(np.unique(attack.secret)) <= {0, 1}
    arrays = dict(np.load(built.path, allow_pickle=False))
    np.savez(tmp_path / "bits.npz", **{**arrays, "secret": np.full(6, 2, np.uint8)})
    with pytest.raises(InputError, match="0/1 bits"):
        ISSBA(SHAPE, generator=str(tmp_path / "bits.npz"))
    with zipfile.ZipFile(built.path) as archive:
        assert all(info.date_time == (1980, 1, 1, 0, 0, 0) for info in archive.infolist())
