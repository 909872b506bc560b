"""Label modes, poisoned-set construction and the attack registry."""

import json

import numpy as np
import pytest
import torch

from backdoor_engine.data.attacks import (
    ATTACKS,
    CLEAN_LABEL_ATTACKS,
    attack_labels,
    attack_param_names,
    draw_samples,
    make_attack,
    poison_dataset,
    triggered_test_set,
)
from backdoor_engine.errors import InputError

K = 5


def dataset(shape=(28, 28, 1), n=200, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, *shape), dtype=np.uint8), rng.integers(0, K, size=n).astype(np.int64)


def tiny_model(channels):
    generator = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(channels, 2, 3), torch.nn.Flatten(1), torch.nn.LazyLinear(K))
    model(torch.zeros(1, channels, 28, 28))
    for parameter in model.parameters():
        torch.nn.init.normal_(parameter, std=0.1, generator=generator)
    return model.eval()


def test_all_to_one_and_all_to_all_labels():
    y = np.array([0, 1, 2, 3, 4, 4])
    np.testing.assert_array_equal(attack_labels(y, "a2o", target=2, num_classes=K), np.full(6, 2))
    np.testing.assert_array_equal(attack_labels(y, "a2a", num_classes=K), [1, 2, 3, 4, 0, 0])


def test_untargeted_labels_differ_from_the_truth_and_cover_every_other_class():
    y = np.repeat(np.arange(K), 400)
    new = attack_labels(y, "ut", num_classes=K, rng=np.random.default_rng(0))
    assert (new != y).all() and new.dtype == np.int64
    for label in range(K):
        counts = np.bincount(new[y == label], minlength=K)
        others = np.delete(counts, label)
        assert counts[label] == 0 and others.min() > 60  # 100 expected per other class
    again = attack_labels(y, "ut", num_classes=K, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(new, again)


@pytest.mark.parametrize(
    "args, field",
    [
        (dict(mode="one", num_classes=K), "mode"),
        (dict(mode="a2o", target=K, num_classes=K), "target"),
        (dict(mode="a2o", num_classes=1), "num_classes"),
        (dict(mode="ut", num_classes=K), "rng"),
    ],
)
def test_attack_labels_rejects_bad_arguments(args, field):
    with pytest.raises(InputError, match=field):
        attack_labels(np.array([0, 1]), **args)


@pytest.mark.parametrize("rate", [0.0, 0.05, 0.333, 1.0])
def test_dirty_label_poisoning_changes_exactly_int_n_rate_samples(rate):
    x, y = dataset(n=197)
    x_before, y_before = x.copy(), y.copy()
    attack = make_attack("badnets", x.shape[1:])
    result = poison_dataset(x, y, attack, mode="a2o", rate=rate, target=1, num_classes=K, seed=0)
    assert result.mask.sum() == int(197 * rate) and not result.cover.any()
    assert (result.y[result.mask] == 1).all()
    np.testing.assert_array_equal(result.x[result.mask], attack.apply(x[result.mask]))
    np.testing.assert_array_equal(result.x[~result.mask], x[~result.mask])
    np.testing.assert_array_equal(result.y[~result.mask], y[~result.mask])
    np.testing.assert_array_equal(x, x_before)
    np.testing.assert_array_equal(y, y_before)
    assert result.params["n_poisoned"] == int(197 * rate)
    json.dumps(result.params)


def test_dirty_label_payload_is_drawn_from_all_classes_including_the_target():
    x, y = dataset(n=400)
    attack = make_attack("blend", x.shape[1:])
    result = poison_dataset(x, y, attack, mode="a2o", rate=0.5, target=0, num_classes=K, seed=0)
    assert set(y[result.mask]) == set(range(K))


@pytest.mark.parametrize("mode", ["a2a", "ut"])
def test_other_label_modes_relabel_the_payload(mode):
    x, y = dataset()
    attack = make_attack("trojan", x.shape[1:])
    result = poison_dataset(x, y, attack, mode=mode, rate=0.2, num_classes=K, seed=0)
    assert (result.y[result.mask] != y[result.mask]).all()
    if mode == "a2a":
        np.testing.assert_array_equal(result.y[result.mask], (y[result.mask] + 1) % K)


def test_same_seed_same_poisoning_different_seed_different_choice():
    x, y = dataset()
    attack = make_attack("adaptive_blend", x.shape[1:])
    first, again, other = (
        poison_dataset(x, y, attack, mode="ut", rate=0.1, num_classes=K, seed=seed) for seed in (3, 3, 4)
    )
    for field in ("x", "y", "mask", "cover"):
        np.testing.assert_array_equal(getattr(first, field), getattr(again, field))
    assert not np.array_equal(first.mask, other.mask)


@pytest.mark.parametrize(
    "name, params, expected_cover",
    [
        ("wanet", {}, 40),
        ("wanet", {"cross_ratio": 0.0}, 0),
        ("adaptive_blend", {}, 20),
        ("adaptive_blend", {"cover_rate": 0.05}, 10),
    ],
)
def test_cover_samples_are_disjoint_and_keep_their_true_labels(name, params, expected_cover):
    x, y = dataset(n=200)
    attack = make_attack(name, x.shape[1:], **params)
    result = poison_dataset(x, y, attack, mode="a2o", rate=0.1, num_classes=K, seed=0)
    assert result.mask.sum() == 20 and result.cover.sum() == expected_cover
    assert not (result.mask & result.cover).any()
    np.testing.assert_array_equal(result.y[result.cover], y[result.cover])
    assert all((result.x[i] != x[i]).any() for i in np.flatnonzero(result.cover))
    clean = ~(result.mask | result.cover)
    np.testing.assert_array_equal(result.x[clean], x[clean])


@pytest.mark.parametrize("name, seed", [("wanet", 0), ("adaptive_patch", 3), ("badnets", 1), ("sig", 2)])
def test_draw_samples_names_the_samples_poison_dataset_hits_without_touching_an_image(name, seed):
    x, y = dataset(n=200, seed=seed)
    attack = make_attack(name, x.shape[1:])
    result = poison_dataset(x, y, attack, mode="a2o", rate=0.1, target=1, num_classes=K, seed=seed)
    payload, cover = draw_samples(y, attack, rate=0.1, target=1, num_classes=K, seed=seed)
    np.testing.assert_array_equal(payload, np.flatnonzero(result.mask))
    np.testing.assert_array_equal(cover, np.flatnonzero(result.cover))
    with pytest.raises(InputError, match="rate"):
        draw_samples(y, attack, rate=1.5, num_classes=K, seed=seed)


def test_cover_that_does_not_fit_is_rejected():
    x, y = dataset(n=50)
    with pytest.raises(InputError, match="cover"):
        poison_dataset(x, y, make_attack("wanet", x.shape[1:]), mode="a2o", rate=0.5, num_classes=K, seed=0)


@pytest.mark.parametrize("name", sorted(CLEAN_LABEL_ATTACKS))
def test_clean_label_attacks_poison_target_class_samples_and_keep_labels(name):
    x, y = dataset(n=200)
    params = {}
    if name == "label_consistent":
        params = {"model": tiny_model(1), "normalisation": {"mean": [0.5], "std": [0.5]}, "steps": 2}
    attack = make_attack(name, x.shape[1:], **params)
    result = poison_dataset(x, y, attack, mode="a2o", rate=0.1, target=2, num_classes=K, seed=0)
    assert result.mask.sum() == 20 and (y[result.mask] == 2).all()
    np.testing.assert_array_equal(result.y, y)
    assert all((result.x[i] != x[i]).any() for i in np.flatnonzero(result.mask))
    np.testing.assert_array_equal(result.x[~result.mask], x[~result.mask])


def test_clean_label_attack_errors():
    x, y = dataset(n=200)
    sig = make_attack("sig", x.shape[1:])
    with pytest.raises(InputError, match="clean-label"):
        poison_dataset(x, y, sig, mode="a2a", rate=0.1, num_classes=K, seed=0)
    with pytest.raises(InputError, match="only"):
        poison_dataset(x, y, sig, mode="a2o", rate=0.5, target=0, num_classes=K, seed=0)


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda x, y: (x[:, :20], y), "x"),
        (lambda x, y: (x, y[:-1]), "y"),
        (lambda x, y: (x, y + K), "y"),
        (lambda x, y: (x, y.astype(np.float32)), "y"),
    ],
)
def test_poison_dataset_rejects_bad_input(change, field):
    x, y = change(*dataset(n=20))
    attack = make_attack("badnets", (28, 28, 1))
    with pytest.raises(InputError, match=field):
        poison_dataset(x, y, attack, mode="a2o", rate=0.1, num_classes=K, seed=0)


def test_poison_dataset_rejects_a_rate_outside_0_1():
    x, y = dataset(n=20)
    with pytest.raises(InputError, match="rate"):
        poison_dataset(x, y, make_attack("badnets", (28, 28, 1)), mode="a2o", rate=1.5, num_classes=K, seed=0)


@pytest.mark.parametrize("mode", ["a2o", "a2a", "ut"])
def test_triggered_test_set(mode):
    x, y = dataset(shape=(32, 32, 3), n=60)
    attack = make_attack("adaptive_blend", x.shape[1:])
    test = triggered_test_set(x, y, attack, mode=mode, target=1, num_classes=K, seed=0)
    expected_index = np.flatnonzero(y != 1) if mode == "a2o" else np.arange(60)
    np.testing.assert_array_equal(test.index, expected_index)
    np.testing.assert_array_equal(test.y_true, y[expected_index])
    np.testing.assert_array_equal(test.x, attack.apply(x[expected_index], train=False))
    if mode == "a2o":
        assert (test.y_attack == 1).all()
    else:
        assert (test.y_attack != test.y_true).all()


def test_registry_lists_attacks_and_parameters():
    expected = {"badnets", "blend", "trojan", "wanet", "sig", "adaptive_blend", "label_consistent"}
    expected |= {"filter", "adaptive_patch", "lf"}
    expected |= {"iad", "siba", "issba"}
    assert set(ATTACKS) == expected
    assert CLEAN_LABEL_ATTACKS == {"sig", "label_consistent"}
    assert attack_param_names("wanet") == {"k": 4, "s": 0.5, "grid_rescale": 1.0, "cross_ratio": 2.0}
    assert attack_param_names("label_consistent")["model"] is None
    assert attack_param_names("label_consistent")["eps"] == 8.0


def test_make_attack_reports_unknown_names_and_parameters():
    with pytest.raises(InputError, match="badnets"):
        make_attack("badnet", (32, 32, 3))
    with pytest.raises(InputError, match="patch_size"):
        make_attack("badnets", (32, 32, 3), size=3)
    with pytest.raises(InputError, match="image_shape"):
        make_attack("badnets", (4, 4, 3))
    with pytest.raises(InputError, match="image_shape"):
        make_attack("badnets", (32, 32, 2))
