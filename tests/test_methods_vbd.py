"""VBD on real Fashion-MNIST with a small budget (one simple model, few epochs): the poisoned class is
found, the mask sits on the trigger, the poisoned samples are flagged; plus each stage's contract."""

import dataclasses

import numpy as np
import pytest
import torch

from backdoor_engine.data.attacks import harness
from backdoor_engine.data.fashion_mnist import load_fashion_mnist
from backdoor_engine.errors import InputError
from backdoor_engine.detection import detection_metrics
from backdoor_engine.methods.vbd import (Inputs, Vbd, VbdParams, choose_triggers, extract_trigger, mask_box,
                                        passes_check, predict_probabilities, stratified_split,
                                        test_class as vbd_test_class, train_poison_models)
from backdoor_engine.models.preprocess import fit_normalisation

SMALL = dict(poison_archs=("10-10P",), poison_epochs=10, detector_epochs=8, ssl_start_epoch=3, ssl_stop_epoch=6)


@pytest.fixture(scope="module")
def poisoned():
    train = load_fashion_mnist("train").subset(np.arange(4000))
    spec = harness.PoisonSpec(attack="badnets", mode="a2o", rate=0.1, target=2, seed=0,
                          params={"pattern": "square", "position": "top-left"})
    dataset, _ = harness.poison(train, spec)
    return dataset


@pytest.fixture(scope="module")
def inputs(poisoned):
    return Inputs(poisoned.x, fit_normalisation(poisoned.x))


@pytest.fixture(scope="module")
def fitted(poisoned):
    vbd = Vbd(**SMALL)
    return vbd, vbd.fit(poisoned.x, poisoned.y, num_classes=10)


def test_finds_the_class_the_mask_and_the_samples(poisoned, fitted):
    vbd, detection = fitted
    assert detection.diagnostics["poisoned_classes"] == [2]
    trigger = vbd.triggers_[2]
    # The mask covers most of the 3x3 trigger and stays within 2 pixels of it: the 3x3 blur widens the gradient mask
    # by a pixel, and on Fashion-MNIST's constant black background the variance step cannot trim it back.
    mask = trigger.mask.astype(bool)
    assert mask[:3, :3].mean() >= 0.75, mask_box(trigger.mask)
    assert not mask[5:].any() and not mask[:, 5:].any(), mask_box(trigger.mask)
    assert trigger.p_value < 0.01 and trigger.asr >= 0.33 and trigger.detector_kept
    metrics = detection_metrics(detection.flags, poisoned.poison)
    assert metrics["tpr"] >= 0.95 and metrics["fpr"] <= 0.01, metrics
    # Only samples labelled with a detected class are ever flagged, and scores rank them.
    assert (poisoned.y[detection.flags] == 2).all()
    assert detection.scores[detection.flags].min() >= 0.5 > detection.scores[~detection.flags].max(initial=0)


def test_diagnostics_explain_every_stage(fitted):
    vbd, detection = fitted
    d = detection.diagnostics
    assert [m["arch"] for m in d["models"]] == ["10-10P"] and 0 < d["models"][0]["train_accuracy"] <= 1
    # Ten confidence tests, then a concentration test of each class not found (all but 2), on each input.
    assert [(t["label"], t["top_set"], t["coordinate"]) for t in d["class_tests"]] == (
        [(c, "confidence", "official") for c in range(10)]
        + [(c, "concentration", i) for c in range(10) if c != 2 for i in ("official", "magnitude")])
    assert any(c["label"] == 2 and c["passed"] and c["top_set"] == "confidence" for c in d["candidates"])
    assert all(c["source_asr"] is not None and c["source_class"] != c["label"] for c in d["candidates"])
    (trigger,) = d["triggers"]
    assert np.asarray(trigger["mask"]).shape == (28, 28) and np.asarray(trigger["pattern_pixels"]).shape == (28, 28, 1)
    assert set(d["timings_s"]) == {"simple_models", "triggers", "detectors"}
    assert "explanation" not in d


def test_same_seed_same_flags(poisoned, fitted):
    _, detection = fitted
    torch.rand(7)  # the global generator's state must not matter (the detector's dropout once drew from it)
    again = Vbd(**SMALL).fit(poisoned.x, poisoned.y, num_classes=10)
    np.testing.assert_array_equal(again.flags, detection.flags)


def test_nothing_found_is_said_not_silent(poisoned):
    # ks_alpha=0: no class can pass the test, as on data without a static trigger.
    detection = Vbd(**{**SMALL, "poison_epochs": 1, "ks_alpha": 0.0}).fit(poisoned.x, poisoned.y, num_classes=10)
    assert not detection.flags.any() and detection.diagnostics["poisoned_classes"] == []
    assert "No class was found poisoned" in detection.diagnostics["explanation"]
    assert "static triggers" in detection.diagnostics["explanation"]


def test_stratified_split_keeps_class_shares():
    y = np.repeat(np.arange(3), [100, 50, 10])
    train, detect = stratified_split(y, 0.8, np.random.default_rng(0))
    assert np.bincount(y[train]).tolist() == [80, 40, 8]
    assert len(np.intersect1d(train, detect)) == 0 and len(train) + len(detect) == len(y)


def _trigger(label, model, asr, score, mask_pixels=4):
    from backdoor_engine.methods.vbd import Trigger

    mask = np.zeros((10, 10))
    mask.flat[:mask_pixels] = 1
    return Trigger(label, model, "64P", mask, np.zeros((1, 10, 10), np.float32), np.zeros((10, 10, 1), np.uint8),
                   1e-5, asr, score)


def test_choose_triggers_keeps_the_best_scoring_pattern_past_the_asr_bar():
    chosen = choose_triggers([_trigger(0, 0, 0.9, 0.4), _trigger(0, 1, 0.5, 0.6), _trigger(0, 2, 0.2, 0.9),
                              _trigger(3, 0, 0.1, 0.9)], VbdParams())
    assert list(chosen) == [0] and chosen[0].model_index == 1


def test_a_large_mask_needs_a_high_asr_unless_official():
    # 6 of 100 pixels: over the 5% bar, so the ASR must reach 0.9; 5 pixels is not over it.
    large, strong, small = _trigger(1, 0, 0.6, 0.5, 6), _trigger(2, 0, 0.95, 0.5, 6), _trigger(3, 0, 0.6, 0.5, 5)
    assert sorted(choose_triggers([large, strong, small], VbdParams())) == [2, 3]
    assert sorted(choose_triggers([large, strong, small], VbdParams(large_mask_fraction=None))) == [1, 2, 3]


@pytest.mark.parametrize("params, match", [
    ({"colour": 1}, r"vbd: unknown parameter\(s\) colour"),
    ({"poison_archs": ("64Q",)}, "simple model arch"),
    ({"detector_alpha": (0.0, 1.0)}, "detector_alpha"),
    ({"detector_alpha": (0.5,)}, "detector_alpha"),
    ({"min_top_n": 30}, "min_top_n"),
    ({"poison_train_fraction": 1.0}, "poison_train_fraction"),
    ({"large_mask_fraction": 1.5}, "large_mask_fraction"),
    ({"rank_accuracy": 0.0}, "rank_accuracy"),
    ({"fill_check_min_source": 0.0}, "fill_check_min_source"),
    ({"fill_check_min_leave": 1.5}, "fill_check_min_leave"),
    ({"concentration_coordinates": ("official", "median")}, "concentration_coordinates must be a non-empty list"),
    ({"concentration_coordinates": ()}, "concentration_coordinates"),
    ({"concentration_coordinates": "magnitude"}, "concentration_coordinates"),
])
def test_bad_parameters_are_named(params, match):
    with pytest.raises(InputError, match=match):
        Vbd(**params)


def test_bad_labels_are_named(poisoned):
    with pytest.raises(InputError, match="labels must be in"):
        Vbd(**SMALL).fit(poisoned.x, poisoned.y + 5, num_classes=10)


def test_the_top_set_is_ranked_after_the_first_epoch_that_reaches_rank_accuracy(poisoned, fitted, inputs):
    vbd, detection = fitted  # rank_accuracy=0.8 by default (None, the official last epoch: the next test)
    (model,) = vbd.models_
    # The 10-epoch model reaches 80% on its detection split before its last epoch; the ranking is that epoch's.
    assert 1 <= model.rank_epoch < SMALL["poison_epochs"] and model.rank_split_accuracy >= 0.8
    assert detection.diagnostics["models"][0]["rank_epoch"] == model.rank_epoch
    # test_class orders the top set by the ranking it is given, among the samples the last epoch predicts as the class.
    detect = np.arange(0, len(poisoned.y), 5)
    final = np.full((len(detect), 10), 0.01)
    final[np.arange(len(detect)), poisoned.y[detect]] = 0.9
    members = np.flatnonzero(poisoned.y[detect] == 2)
    ranking = final.copy()
    ranking[members, 2] = np.linspace(0.1, 0.9, len(members))  # the last members rank highest
    params = VbdParams(**SMALL)
    official = vbd_test_class(model.model, 0, inputs, poisoned.y, detect, final, 2, params)
    ranked = vbd_test_class(model.model, 0, inputs, poisoned.y, detect, final, 2, params, ranking)
    assert official.top_index.tolist() == detect[members[:20]].tolist()  # ties keep the order (stable)
    assert ranked.top_index.tolist() == detect[members[::-1][:20]].tolist()


def test_watching_the_epochs_leaves_the_trained_models_unchanged(poisoned, inputs):
    y = poisoned.y
    train, detect = stratified_split(y, 0.8, np.random.default_rng(0))
    params = dict(poison_archs=("10-10P",), poison_epochs=3)
    watched = train_poison_models(("10-10P",), inputs, y, train, num_classes=10,
                                  params=VbdParams(**params, rank_accuracy=0.5), detect_index=detect)
    plain = train_poison_models(("10-10P",), inputs, y, train, num_classes=10,
                                params=VbdParams(**params, rank_accuracy=None), detect_index=detect)
    assert watched[0].rank_epoch is not None  # it did watch (and stopped watching once reached)
    assert plain[0].rank_epoch is None and plain[0].rank_probabilities is None
    # A concentration top set does not read the ranking, so stage 1 does not keep one (nor report its epoch).
    concentration = train_poison_models(("10-10P",), inputs, y, train, num_classes=10, detect_index=detect,
                                        params=VbdParams(**params, rank_accuracy=0.5, top_set="concentration"))
    assert concentration[0].rank_epoch is None and concentration[0].rank_probabilities is None
    for a, b in zip(watched[0].model.state_dict().values(), plain[0].model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_half_clean_top_set_yields_the_trigger_at_full_strength_from_its_carriers(poisoned, fitted, inputs):
    """The all-to-all failure in miniature: the top set is half poisoned. The KS statistic marks the carriers,
    and the pattern extracted from them is the white square itself, where the whole top set gives a grey one."""
    vbd, _ = fitted
    model = vbd.models_[0].model
    detect = np.arange(len(poisoned.y))
    in_class = np.flatnonzero(poisoned.y == 2)
    bad, good = in_class[poisoned.poison[in_class] == 1][:10], in_class[poisoned.poison[in_class] == 0][:200]
    # Rank: 10 poisoned and 10 clean on top (interleaved), the rest of the class below, clean samples lowest.
    probabilities = np.full((len(detect), 10), 0.01)
    probabilities[in_class, 2] = 0.5
    probabilities[good[10:], 2] = 0.2
    top = np.empty(20, int)
    top[0::2], top[1::2] = bad, good[:10]
    probabilities[top, 2] = np.linspace(0.99, 0.9, 20)
    params = VbdParams(**SMALL, trigger_carriers=True)
    test = vbd_test_class(model, 0, inputs, poisoned.y, detect, probabilities, 2, params)
    assert set(test.top_index.tolist()) == set(top.tolist())
    is_bad = poisoned.poison[test.top_index] == 1
    assert test.carriers.sum() >= 8 and is_bad[test.carriers].mean() >= 0.9, (test.carriers, is_bad)
    assert test.summary()["n_carriers"] == int(test.carriers.sum())
    mask, _, carried = extract_trigger(test, inputs)
    whole = extract_trigger(dataclasses.replace(test, carriers=None), inputs)[2]
    square = np.zeros((28, 28), bool)
    square[:3, :3] = True
    on = square & mask.astype(bool)
    assert on.sum() >= 6, mask_box(mask)
    # The white (255) square: the carriers' mean is near white, the whole top set's near the half-way grey.
    assert carried[on].mean() >= 220 and whole[on].mean() <= 180, (carried[on].mean(), whole[on].mean())
    # Official (trigger_carriers=False): no carriers are marked and stage 3 uses the whole top set.
    official = vbd_test_class(model, 0, inputs, poisoned.y, detect, probabilities, 2,
                              VbdParams(**SMALL, trigger_carriers=False))
    assert official.carriers is None and official.summary()["n_carriers"] is None


def test_epoch_end_sees_every_epoch_and_leaves_the_models_unchanged(poisoned, inputs):
    y = poisoned.y
    train, detect = stratified_split(y, 0.8, np.random.default_rng(0))
    params = VbdParams(poison_archs=("10-10P",), poison_epochs=2, rank_accuracy=None)
    calls = []

    def record(epoch, models):  # as the top-set study does: it evaluates the models (eval mode) every epoch
        calls.append((epoch, len(models), predict_probabilities(models[0], inputs, detect).shape))

    seen = train_poison_models(("10-10P",), inputs, y, train, num_classes=10, params=params, detect_index=detect,
                               epoch_end=record)
    plain = train_poison_models(("10-10P",), inputs, y, train, num_classes=10, params=params, detect_index=detect)
    assert calls == [(1, 1, (len(detect), 10)), (2, 1, (len(detect), 10))]
    for a, b in zip(seen[0].model.state_dict().values(), plain[0].model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_concentration_top_set_holds_the_poison_that_confidence_ranks_below_clean_samples(poisoned, fitted, inputs):
    """The easy-class all-to-all failure in miniature: the class's confident clean samples outrank every poisoned
    one, so the official top set is all clean; ranked by how concentrated each sample's margin gradient
    is, the top set is the trigger's carriers."""
    vbd, _ = fitted
    model = vbd.models_[0].model
    detect = np.arange(len(poisoned.y))
    in_class = np.flatnonzero(poisoned.y == 2)
    bad = in_class[poisoned.poison[in_class] == 1][:60]
    good = in_class[poisoned.poison[in_class] == 0][:200]
    keep = np.concatenate([bad, good])
    probabilities = np.full((len(detect), 10), 0.01)
    probabilities[np.arange(len(detect)), poisoned.y] = 0.9
    probabilities[np.setdiff1d(in_class, keep), 2] = 0.01  # outside this planted class: not predicted as 2
    probabilities[np.setdiff1d(in_class, keep), 3] = 0.9
    probabilities[bad, 2] = 0.95
    probabilities[good[:150], 2] = np.linspace(0.999, 0.96, 150)  # clean samples above every poisoned one ...
    probabilities[good[150:], 2] = 0.3  # ... and the least confident (the low set) clean too
    confidence = vbd_test_class(model, 0, inputs, poisoned.y, detect, probabilities, 2, VbdParams(**SMALL))
    concentration = vbd_test_class(model, 0, inputs, poisoned.y, detect, probabilities, 2,
                                   VbdParams(**SMALL, top_set="concentration"))
    assert poisoned.poison[confidence.top_index].sum() == 0
    assert poisoned.poison[concentration.top_index].mean() >= 0.8, poisoned.poison[concentration.top_index]
    with pytest.raises(InputError, match="top_set"):
        VbdParams(top_set="gradient")


def test_confidence_then_concentration_retests_only_the_missed_classes_and_finds_what_confidence_missed(
        poisoned, fitted, monkeypatch):
    """The fallback (the default): classes the confidence top set finds keep their confidence triggers (the run's
    flags are the confidence run's); every other class is tested again with a concentration top set. With the
    confidence pass made to miss the poisoned class, the concentration pass finds it, its trigger and its samples."""
    from backdoor_engine.methods import vbd as vbd_module

    _, both = fitted
    assert VbdParams().top_set == "confidence-then-concentration"
    confident = Vbd(**SMALL, top_set="confidence").fit(poisoned.x, poisoned.y, num_classes=10)
    np.testing.assert_array_equal(both.flags, confident.flags)  # the second pass (test_diagnostics_...) adds none
    assert both.diagnostics["triggers"][0]["top_set"] == "confidence"

    real = vbd_module.class_candidates

    def confidence_misses_class_2(*args, **kwargs):
        tests, candidates = real(*args, **kwargs)
        if args[-1] == "confidence":
            candidates = [c for c in candidates if c.label != 2]
        return tests, candidates

    monkeypatch.setattr(vbd_module, "class_candidates", confidence_misses_class_2)
    rescued = Vbd(**SMALL).fit(poisoned.x, poisoned.y, num_classes=10)
    assert rescued.diagnostics["poisoned_classes"] == [2]
    (trigger,) = rescued.diagnostics["triggers"]
    assert trigger["top_set"] == "concentration" and trigger["mask_box"][2] <= 4 and trigger["mask_box"][3] <= 4
    # The second pass also runs the exceedance test; the confidence pass never does.
    assert 0 < trigger["exceedance_p"] < 0.01 and both.diagnostics["triggers"][0]["exceedance_p"] is None
    metrics = detection_metrics(rescued.flags, poisoned.poison)
    assert metrics["tpr"] >= 0.95 and metrics["fpr"] <= 0.01, metrics
    # The official top set never runs a second pass.
    assert {t["top_set"] for t in confident.diagnostics["class_tests"]} == {"confidence"}


def test_a_small_pattern_that_flips_one_source_class_passes_only_with_source_min_asr():
    # The all-to-all trigger learned with its source class: ASR 0.15 over every class, 0.7 of one class.
    a2a = dataclasses.replace(_trigger(1, 0, 0.15, 0.5, 4), source_asr=0.7, source_class=0)
    weak = dataclasses.replace(_trigger(2, 0, 0.15, 0.5, 4), source_asr=0.4, source_class=0)
    large = dataclasses.replace(_trigger(3, 0, 0.15, 0.5, 6), source_asr=0.9, source_class=0)  # over 5%
    assert sorted(choose_triggers([a2a, weak, large], VbdParams(source_min_asr=None))) == []  # official
    assert VbdParams().source_min_asr == 0.5
    assert sorted(choose_triggers([a2a, weak, large], VbdParams())) == [1]
    with pytest.raises(InputError, match="source_min_asr"):
        VbdParams(source_min_asr=0.0)


def test_the_source_check_counts_only_the_flips_beyond_those_of_the_class_s_own_mean_image():
    # A clean class's silhouette (held-out: trousers on dresses) flips its look-alike, and so does the class's mean.
    silhouette = dataclasses.replace(_trigger(1, 0, 0.15, 0.5, 4), source_asr=0.64, source_class=3,
                                     source_control=0.30)
    a2a = dataclasses.replace(_trigger(2, 0, 0.2, 0.5, 4), source_asr=0.58, source_class=1, source_control=0.05)
    assert VbdParams().source_control is True
    assert sorted(choose_triggers([silhouette, a2a], VbdParams())) == [2]
    # Without the control (session 15's check) both pass.
    unguarded = [dataclasses.replace(t, source_control=None) for t in (silhouette, a2a)]
    assert sorted(choose_triggers(unguarded, VbdParams(source_control=False))) == [1, 2]


def test_class_asr_is_the_share_of_each_class_the_pasted_pattern_flips(poisoned, fitted, inputs):
    from backdoor_engine.methods.vbd import class_asr

    vbd, _ = fitted
    trigger = vbd.triggers_[2]
    model = vbd.models_[0].model
    clean = np.flatnonzero((poisoned.poison == 0) & (poisoned.y != 2))[:900]
    rates = class_asr(model, inputs, clean, poisoned.y[clean], 2, trigger.pattern, trigger.mask)
    assert sorted(rates) == sorted(set(poisoned.y[clean].tolist())) and 2 not in rates
    assert min(rates.values()) >= 0.8, rates  # the a2o trigger flips every class
    blank = class_asr(model, inputs, clean, poisoned.y[clean], 2, trigger.pattern, np.zeros_like(trigger.mask))
    assert max(blank.values()) <= 0.1, blank  # nothing pasted: the clean predictions
    expected = (predict_probabilities(model, inputs, clean).argmax(1) == 2)
    for c, rate in blank.items():
        assert rate == pytest.approx(expected[poisoned.y[clean] == c].mean())
    # The control, the class's mean image through the trigger's mask: here the target class is half poison, so
    # its mean carries the square too and flips most classes. The control bounds only the source route; an
    # all-to-one trigger passes by its ASR.
    members = np.flatnonzero(poisoned.y == 2)
    own = (inputs(members).mean(dim=0).numpy() * trigger.mask).astype(np.float32)
    control = class_asr(model, inputs, clean, poisoned.y[clean], 2, own, trigger.mask)
    assert max(control.values()) >= 0.5, control
    assert trigger.source_control is not None and trigger.asr >= 0.9 and passes_check(trigger, vbd.params)


def test_the_exceedance_p_value_is_the_share_of_orderings_that_put_that_many_top_samples_above_every_low_one():
    import itertools
    from math import comb

    from backdoor_engine.methods.vbd import exceedance_p_value
    n_top, n_low = 5, 4
    for k in range(n_top + 1):
        # Every way to place the top set among the pooled ranks (0 = lowest), equally likely when exchangeable.
        hits = [sum(r > max(set(range(n_top + n_low)) - set(top)) for r in top) >= k
                for top in itertools.combinations(range(n_top + n_low), n_top)]
        assert exceedance_p_value(n_top, n_low, k) == pytest.approx(sum(hits) / comb(n_top + n_low, n_top))
    # VBD's 20 vs 20 at alpha 0.01: 7 carriers pass, 6 do not.
    assert exceedance_p_value(20, 20, 6) > 0.01 > exceedance_p_value(20, 20, 7)


def test_a_concentration_top_set_with_a_third_carrying_the_trigger_passes_by_its_carriers_where_ks_does_not(
        monkeypatch):
    """The mixed top set of an all-to-all class, on planted margin gradients: 7 trigger carriers with a spike on
    one pixel far above every other sample, 13 clean samples among them. KS sees a third of the distribution
    shifted and does not pass at 0.01; the exceedance test (7 of 20 above all 20 low-set samples) does. The
    confidence top set keeps the official KS test only."""
    from backdoor_engine.methods import vbd as vbd_module

    n, label = 120, 2
    y = np.full(n, label)
    carriers = np.arange(7)

    def planted_gradients(model, inputs, index, label):
        noise = np.stack([np.random.default_rng(int(i)).uniform(-1, 1, (1, 28, 28)) for i in index])
        noise[:, 0, 0, 0] = np.where(np.isin(index, carriers), 5.0, 0.5)  # the clean samples all tie there
        return torch.from_numpy(noise.astype(np.float32))

    monkeypatch.setattr(vbd_module, "batched_gradients", planted_gradients)
    probabilities = np.full((n, 10), 0.01)
    probabilities[:, label] = np.linspace(0.99, 0.5, n)
    run = lambda **kw: vbd_test_class(None, 0, None, y, np.arange(n), probabilities, label,  # noqa: E731
                                      VbdParams(**SMALL, **kw))
    test = run(top_set="concentration")
    assert set(carriers) <= set(test.top_index.tolist()) and test.carriers.sum() == 7
    assert test.p_value >= 0.01 and test.exceedance_p == pytest.approx(0.0042, abs=1e-4) and test.poisoned(0.01)
    assert test.summary()["exceedance_p"] == test.exceedance_p
    ks_only = run(top_set="concentration", exceedance_test=False)
    assert ks_only.exceedance_p is None and not ks_only.poisoned(0.01)
    assert run().exceedance_p is None  # the confidence top set


def test_a_concentration_top_set_is_tested_where_its_gradient_magnitudes_are_largest_not_where_signs_agree(
        monkeypatch):
    """Planted margin gradients: 7 trigger carriers spike on one pixel, pulling the margin either way (+5 on four,
    -5 on three), and every sample, top or low, has the same +1.5 on a second pixel (a silhouette all share).
    |mean gradient| over the top set is 0.25 on the spike and 1.5 on the shared pixel: the official choice tests the
    shared pixel, where no sample stands out. The mean magnitude (1.75 against 1.5) tests the spike: 7 carriers."""
    from backdoor_engine.methods import vbd as vbd_module

    n, label = 120, 2
    y = np.full(n, label)
    carriers = np.arange(7)

    def planted_gradients(model, inputs, index, label):
        noise = np.stack([np.random.default_rng(int(i)).uniform(-0.1, 0.1, (1, 28, 28)) for i in index])
        sign = np.where(index % 2 == 0, 1.0, -1.0)
        noise[:, 0, 3, 3] = np.where(np.isin(index, carriers), 5.0 * sign, 0.0)
        noise[:, 0, 20, 20] = 1.5
        return torch.from_numpy(noise.astype(np.float32))

    monkeypatch.setattr(vbd_module, "batched_gradients", planted_gradients)
    probabilities = np.full((n, 10), 0.01)
    probabilities[:, label] = np.linspace(0.99, 0.5, n)
    run = lambda coordinate: vbd_test_class(None, 0, None, y, np.arange(n), probabilities, label,  # noqa: E731
                                            VbdParams(**SMALL), top_set="concentration", coordinate=coordinate)
    test = run("magnitude")
    assert test.coordinates == [[0, 3, 3]] and test.carriers.sum() == 7 and test.poisoned(0.01)
    assert set(test.top_index[test.carriers].tolist()) == set(carriers) and test.summary()["coordinate"] == "magnitude"
    official = run("official")
    assert official.coordinates == [[0, 20, 20]] and official.carriers.sum() == 0 and not official.poisoned(0.01)


def test_a_concentration_top_set_is_tested_on_each_input_and_the_confidence_top_set_on_the_official_one(
        poisoned, fitted, inputs):
    """Stages 2-4 on the fixture's models: the concentration pass gives one test per model, class and input
    (official first), and a candidate carries the input its test read; the confidence pass keeps the official input
    only."""
    from backdoor_engine.methods.vbd import class_candidates
    vbd, _ = fitted
    assert VbdParams().concentration_coordinates == ("official", "magnitude")
    _, detect = stratified_split(poisoned.y, 0.8, np.random.default_rng(0))  # the fit's detection split
    probabilities = [predict_probabilities(m.model, inputs, detect) for m in vbd.models_]
    run = lambda top_set, **kw: class_candidates(  # noqa: E731
        vbd.models_, inputs, poisoned.y, detect, probabilities, [2, 5], VbdParams(**SMALL, **kw),
        np.random.default_rng(0), top_set)
    tests, candidates = run("concentration")
    assert [(t.label, t.coordinate) for t in tests] == [(2, "official"), (2, "magnitude"), (5, "official"),
                                                        (5, "magnitude")]
    # The planted square is found on both inputs: two candidates for class 2, each naming its input.
    assert sorted((c.label, c.coordinate) for c in candidates if c.label == 2) == [(2, "magnitude"), (2, "official")]
    assert {c.summary()["coordinate"] for c in candidates} <= {"official", "magnitude"}
    one, _ = run("concentration", concentration_coordinates=["official"])
    assert [(t.label, t.coordinate) for t in one] == [(2, "official"), (5, "official")]
    confidence, _ = run("confidence")
    assert [t.coordinate for t in confidence] == ["official", "official"]


def test_the_fill_check_applies_to_flags_from_one_source_class_and_keeps_the_ones_that_leave(
        poisoned, fitted, inputs):
    """With the square covered by the unflagged class-2 samples' mean image, a poisoned sample reads as the class
    it was drawn from and a clean one stays in class 2. Flags drawn from one source class (all-to-all's shape)
    plus clean over-flags: the check applies and keeps the poison. The run's own all-to-one flags: the samples
    that leave spread over every class, and the check leaves the flags as they were."""
    from backdoor_engine.methods.vbd import apply_fill_check, fill_check

    vbd, detection = fitted
    trigger = vbd.triggers_[2]
    model = vbd.models_[trigger.model_index].model
    drawn_from = load_fashion_mnist("train").subset(np.arange(4000)).y  # the harness keeps the order
    # An all-to-all class in miniature: class 2's clean samples and its poison drawn from ankle boots (no look-alike
    # of class 2) only. The unflagged members' mean must be trigger-free, so the other poison is left out.
    members = np.flatnonzero(poisoned.y == 2)
    members = members[(poisoned.poison[members] == 0) | (drawn_from[members] == 9)]
    one_source = poisoned.poison[members] == 1
    over = np.flatnonzero(~one_source)[:15]  # clean class-2 samples a detector over-flagged
    flagged = one_source.copy()
    flagged[over] = True
    assert one_source.sum() >= 20
    leaves, sources = fill_check(model, trigger, inputs, members, flagged, 10)
    assert not leaves[~flagged].any() and sources.sum() == leaves.sum()
    assert leaves[one_source].mean() >= 0.8 and leaves[over].sum() <= 2, (leaves[one_source].mean(), leaves[over])
    planted = dataclasses.replace(trigger, fill_source=None, fill_source_share=None, fill_checked=False)
    assert apply_fill_check(planted, leaves, sources, VbdParams())
    assert planted.fill_source == 9 and planted.fill_source_share >= 0.8
    # Fewer than min_top_n leaving: no evidence of a source, no check.
    few = dataclasses.replace(trigger, fill_source=None, fill_source_share=None, fill_checked=False)
    assert not apply_fill_check(few, leaves, np.eye(10, dtype=int)[0] * 4, VbdParams())
    assert few.fill_source is None and not few.fill_checked
    # The all-to-one run: its flagged poison leaves class 2 for every class, so the check did not apply.
    assert VbdParams().fill_check_min_source == 0.5
    assert trigger.fill_source_share is not None and trigger.fill_source_share < 0.5
    assert not trigger.fill_checked and trigger.n_fill_unflagged == 0
    assert trigger.n_flagged == int(detection.flags.sum())
    summary = detection.diagnostics["triggers"][0]
    assert summary["fill_checked"] is False and summary["fill_source_share"] == trigger.fill_source_share


def test_flags_the_fill_check_removes_keep_half_their_score(poisoned, fitted, monkeypatch, tmp_path):
    """Made to apply (every flagged sample forced to read as class 0 but one), the check removes one flag: its
    score is halved, so the scores still threshold at 0.5 to the flags."""
    from backdoor_engine.methods import vbd as vbd_module

    _, detection = fitted
    real = vbd_module.fill_check

    def one_stays(model, trigger, inputs, members, flagged, num_classes, batch_size=1024):
        leaves = flagged.copy()
        stays = np.flatnonzero(flagged)[0]
        leaves[stays] = False
        return leaves, np.bincount(np.zeros(int(leaves.sum()), int), minlength=num_classes)

    monkeypatch.setattr(vbd_module, "fill_check", one_stays)
    vbd = Vbd(**SMALL)
    checked = vbd.fit(poisoned.x, poisoned.y, num_classes=10)
    monkeypatch.setattr(vbd_module, "fill_check", real)
    removed = np.flatnonzero(detection.flags & ~checked.flags)
    assert len(removed) == 1 and not (checked.flags & ~detection.flags).any()
    assert checked.scores[removed[0]] == pytest.approx(detection.scores[removed[0]] / 2)
    assert checked.scores[checked.flags].min() >= 0.5 > checked.scores[~checked.flags].max()
    (trigger,) = checked.diagnostics["triggers"]
    assert trigger["fill_checked"] and trigger["n_fill_unflagged"] == 1 and trigger["fill_source"] == 0
    assert trigger["n_flagged"] == int(checked.flags.sum())
    # The report's title says what the check removed and where the kept flags read.
    (title, _), = vbd.report(checked, poisoned, tmp_path).figures
    assert (f"{trigger['n_flagged']} flagged (1 more read as class 2 with the mask filled by its unflagged mean "
            "image, unflagged; 100% of the rest read as class 0)") in title
    # Off: the detector's flags.
    off = Vbd(**SMALL, fill_check_min_source=None).fit(poisoned.x, poisoned.y, num_classes=10)
    np.testing.assert_array_equal(off.flags, detection.flags)
    assert off.diagnostics["triggers"][0]["fill_source"] is None


def test_a_pattern_whose_flags_stay_in_their_class_once_it_is_covered_loses_them(poisoned, fitted, inputs, monkeypatch,
                                                                                  tmp_path):
    """A false class's 'trigger' is the class's own content: its flagged samples, mask filled with the class's
    other samples' mean, still read as the class. Clean class-2 samples flagged by the real trigger's mask stay; the
    run's own all-to-one flags mostly leave, so it keeps them. Made to stay (every flag), the run drops the
    trigger's flags and says why."""
    from backdoor_engine.methods import vbd as vbd_module

    vbd, detection = fitted
    trigger = vbd.triggers_[2]
    model = vbd.models_[trigger.model_index].model
    members = np.flatnonzero((poisoned.y == 2) & (poisoned.poison == 0))
    flagged = np.zeros(len(members), bool)
    # A detector flags what the simple model assigns to the class: 30 such clean samples.
    flagged[np.flatnonzero(predict_probabilities(model, inputs, members).argmax(1) == 2)[:30]] = True
    leaves, _ = vbd_module.fill_check(model, trigger, inputs, members, flagged, 10)
    assert leaves[flagged].mean() < VbdParams().fill_check_min_leave == 0.2, leaves[flagged].mean()
    assert trigger.carries_label and trigger.fill_leave_share >= 0.7, trigger.fill_leave_share

    def all_stay(model, trigger, inputs, members, flagged, num_classes, batch_size=1024):
        return np.zeros(len(members), bool), np.zeros(num_classes, int)

    monkeypatch.setattr(vbd_module, "fill_check", all_stay)
    run = Vbd(**SMALL)
    dropped = run.fit(poisoned.x, poisoned.y, num_classes=10)
    assert not dropped.flags.any() and dropped.diagnostics["poisoned_classes"] == []
    (summary,) = dropped.diagnostics["triggers"]
    assert summary["carries_label"] is False and summary["fill_leave_share"] == 0.0
    assert summary["n_flagged"] == 0 and summary["n_fill_unflagged"] == int(detection.flags.sum())
    assert "(class 2 passed stages 2-4, but the flagged samples stay" in dropped.diagnostics["explanation"]
    np.testing.assert_allclose(dropped.scores[detection.flags], detection.scores[detection.flags] / 2)
    assert dropped.scores.max() < 0.5
    (title, _), = run.report(dropped, poisoned, tmp_path).figures
    assert f"flags dropped: 0% of its {summary['n_fill_unflagged']} flagged samples leave class 2" in title
