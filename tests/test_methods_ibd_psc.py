"""IBD-PSC ("ibd_psc") on a planted backdoor: a hand-built network with four BatchNorm2d layers whose triggered images
keep their predicted class when the last BatchNorm layers are amplified while clean ones lose it
(tests/planted_backdoor.py)."""

import copy
import html
import json
from dataclasses import fields

import numpy as np
import pytest
import torch
from planted_backdoor import NORMALISATION, TARGET, clean_images, planted_model, poisoned_set, predict
from torch import nn

from backdoor_engine.detection import detection_metrics
from backdoor_engine.errors import InputError
from backdoor_engine.methods import ScanData, available_detectors, get_detector, make_detector
from backdoor_engine.methods.ibd_psc import FIGURE_TITLE, Amplifier, IbdPsc, choose_start, model_counts


@pytest.fixture(scope="module")
def planted():
    x, y, truth = poisoned_set()
    rx, ry = clean_images(90, seed=5)
    return planted_model(), x, y, truth, rx, ry


def pixels(x):
    return torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255


def reference_amplified(model, bn_indices, scale):
    """The reference code's scale_var_index: a deep copy with weight.data and bias.data of the chosen BatchNorm2d
    layers (indices in named_modules order) multiplied by scale."""
    out = copy.deepcopy(model)
    bns = [m for _, m in out.named_modules() if isinstance(m, nn.BatchNorm2d)]
    for index in bn_indices:
        bns[index].weight.data *= scale
        bns[index].bias.data *= scale
    return out.eval()


def test_ibd_psc_flags_the_planted_trigger_with_the_start_layer_chosen_on_clean_data(planted):
    model, x, _, truth, rx, ry = planted
    detector = IbdPsc()
    detection = detector.fit(model, NORMALISATION, x, rx, ry)
    metrics = detection_metrics(detection.flags, truth)
    assert metrics["tpr"] >= 0.9 and metrics["fpr"] <= 0.1
    d = detection.diagnostics
    # Amplifying the last BN layer x1.5 already sends every clean image to the sink class: k = 1, so the five
    # models amplify the last 2, 3, 4, 4, 4 of the 4 layers (the reference's slice past L repeats all of them).
    assert d["start_layer"] == 1 and d["start_found"] and d["clean_error_by_amplified_layers"] == {"1": 1.0}
    assert d["amplified_layer_counts"] == [2, 3, 4, 4, 4] and d["n_batchnorm_layers"] == 4
    assert d["clean_error_unamplified"] == 0.0 and d["threshold"] == 0.9
    assert d["n_forward"] == 90 * 2 + len(x) * 4 and d["extra_passes_per_sample"] == 3
    assert d["flagged_per_predicted_class"] == {str(TARGET): detection.n_flagged}
    assert "err on 100.0%" in d["explanation"]
    assert np.array_equal(detection.flags, detection.scores >= 0.9)


def test_psc_is_the_mean_softmax_probability_of_the_original_class_over_the_amplified_models(planted):
    model, x, _, truth, rx, ry = planted
    rows = np.r_[np.flatnonzero(truth)[:4], np.flatnonzero(~truth)[:12]]
    detection = IbdPsc(n_models=3, scale=1.3).fit(model, NORMALISATION, x[rows], rx, ry)
    inputs = pixels(x[rows])
    original = predict(model, inputs).argmax(1)
    start = detection.diagnostics["start_layer"]
    sorted_indices = list(reversed(range(4)))  # the reference's last-layer-first order
    probabilities = []
    for layer_index in range(start, start + 3):
        amplified = reference_amplified(model, sorted_indices[:layer_index + 1], 1.3)
        softmax = torch.softmax(predict(amplified, inputs).double(), dim=1)
        probabilities.append(softmax[torch.arange(len(rows)), original].numpy())
    assert np.allclose(detection.scores, np.mean(probabilities, axis=0), rtol=1e-6, atol=1e-9)
    assert detection.scores[:4].min() > 0.99 > 0.5 > detection.scores[4:].max()


def test_the_start_layer_is_the_references_prob_start(planted):
    model, _, _, _, rx, ry = planted
    for scale in (1.05, 1.2, 1.5):
        expected = None
        for k in range(1, 4):  # prob_start: the first k in 1 .. L-1 whose clean error exceeds xi
            error = np.mean(predict(reference_amplified(model, list(reversed(range(4)))[:k], scale),
                                    pixels(rx)).argmax(1).numpy() != ry)
            if error > 0.6:
                expected = k
                break
        with torch.no_grad():
            start, errors, found = choose_start(Amplifier(model, scale), NORMALISATION, rx, ry, 0.6, forward_batch=32)
        assert found == (expected is not None) and (start == expected or not found)
        assert list(errors) == list(range(1, (expected or 3) + 1))
    assert model_counts(1, 5, 4) == [2, 3, 4, 4, 4] and model_counts(0, 3, 10) == [1, 2, 3]


def test_when_no_start_layer_crosses_xi_every_model_amplifies_all_layers_and_the_report_says_so(planted):
    model, x, _, _, rx, ry = planted
    detector = IbdPsc(scale=1.0)  # amplifying by 1 changes nothing: the clean error never exceeds xi
    detection = detector.fit(model, NORMALISATION, x, rx, ry)
    d = detection.diagnostics
    assert d["start_found"] is False and d["start_layer"] == 3 and d["amplified_layer_counts"] == [4] * 5
    assert d["clean_error_by_amplified_layers"] == {"1": 0.0, "2": 0.0, "3": 0.0}
    assert "no start layer found" in d["explanation"]
    assert any("No start layer crossed" in note for note in detector.report(detection, None, None).notes)
    # PSC is then the unamplified model's own confidence in its prediction.
    softmax = torch.softmax(predict(model, pixels(x)).double(), dim=1).max(dim=1).values.numpy()
    assert np.allclose(detection.scores, softmax, rtol=1e-6)


def test_a_given_start_layer_needs_no_clean_set_and_is_checked_against_the_layer_count(planted):
    model, x, _, _, rx, ry = planted
    fixed = IbdPsc(start_layer=1).fit(model, NORMALISATION, x)
    chosen = IbdPsc().fit(model, NORMALISATION, x, rx, ry)
    assert np.array_equal(fixed.scores, chosen.scores) and fixed.diagnostics["start_source"] == "given"
    with pytest.raises(InputError, match=r"start_layer must be in \[0, 3\]"):
        IbdPsc(start_layer=4).fit(model, NORMALISATION, x)
    with pytest.raises(InputError, match="clean reference set"):
        IbdPsc().fit(model, NORMALISATION, x)


def test_the_callers_model_is_never_modified(planted):
    _, x, _, _, rx, ry = planted
    for training in (False, True):
        model = planted_model().train(training)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        IbdPsc().fit(model, NORMALISATION, x, rx, ry)
        assert model.training == training
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        assert all(p.requires_grad for p in model.parameters())  # its parameters still train


def test_forward_batch_changes_no_value(planted):
    model, x, _, _, rx, ry = planted
    one = IbdPsc(forward_batch=7).fit(model, NORMALISATION, x, rx, ry)
    other = IbdPsc(forward_batch=256).fit(model, NORMALISATION, x, rx, ry)
    assert np.allclose(one.scores, other.scores, rtol=0, atol=1e-12) and np.array_equal(one.flags, other.flags)


def test_parameters_are_checked_by_name():
    with pytest.raises(InputError, match="unknown parameter.*\\bn\\b"):
        make_detector("ibd_psc", {"n": 5})
    with pytest.raises(InputError, match="n_models must be >= 1"):
        make_detector("ibd_psc", {"n_models": 0})
    with pytest.raises(InputError, match="xi must be in"):
        make_detector("ibd_psc", {"xi": 1.0})
    with pytest.raises(InputError, match="scale must be > 0"):
        make_detector("ibd_psc", {"scale": 0})
    with pytest.raises(InputError, match="start_layer must be"):
        make_detector("ibd_psc", {"start_layer": -1})
    with pytest.raises(InputError, match="threshold must be a finite number"):
        make_detector("ibd_psc", {"threshold": float("inf")})
    assert make_detector("ibd_psc", {"start_layer": None}).params.start_layer is None


def test_models_without_amplifiable_batchnorm_and_bad_clean_sets_are_refused(planted):
    _, x, _, _, rx, ry = planted
    plain = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    with pytest.raises(InputError, match="BatchNorm2d layers, and this model has none"):
        IbdPsc().fit(plain, NORMALISATION, x, rx, ry)
    frozen_bn = nn.Sequential(nn.Conv2d(1, 2, 8), nn.BatchNorm2d(2, affine=False), nn.Flatten(), nn.Linear(2, 3))
    with pytest.raises(InputError, match="affine=False"):
        IbdPsc().fit(frozen_bn.eval(), NORMALISATION, x, rx, ry)
    with pytest.raises(InputError, match="label 7 is not one of the model's 4 classes"):
        IbdPsc().fit(planted_model(), NORMALISATION, x, rx, np.full(len(rx), 7))
    with pytest.raises(InputError, match="reference_y: expected 90 labels"):
        IbdPsc().fit(planted_model(), NORMALISATION, x, rx, ry[:10])
    with pytest.raises(InputError, match="--clean"):
        IbdPsc().fit_scan(ScanData(ids=np.arange(len(x)), y=np.zeros(len(x), int), num_classes=4,
                                   pixels=type("P", (), {"x": x})(), model=planted_model(),
                                   normalisation=NORMALISATION))


def test_registered_and_every_parameter_described():
    assert "ibd_psc" in available_detectors()
    detector = get_detector("ibd_psc")
    assert detector.needs == frozenset({"model", "pixels", "reference"}) and detector.needs_reference()
    text = detector.describe()
    for f in fields(detector.params_class):
        assert f"{f.name}=" in text and f.metadata["provenance"] in text


def test_a_scan_through_the_api_with_a_clean_set_writes_the_report(tmp_path, planted):
    from backdoor_engine import api
    from backdoor_engine.data.dataset import make_dataset

    model, x, y, truth, rx, ry = planted
    out = tmp_path / "ibd_psc"
    result = api.scan(make_dataset(x, y, poison=truth.astype(np.int64)), model, NORMALISATION, method="ibd_psc",
                      out_dir=out, progress=False, clean=make_dataset(rx, ry))
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "ibd_psc" and report["n_samples"] == len(x)
    assert len(report["flagged"]) == result.detection.n_flagged and report["metrics"]["tpr"] == 1.0
    assert report["diagnostics"]["start_layer"] == 1 and report["diagnostics"]["n_reference"] == 90
    assert html.escape(FIGURE_TITLE) in (out / "report.html").read_text()
    with pytest.raises(InputError, match="clean reference set"):
        api.scan(make_dataset(x, y), model, NORMALISATION, method="ibd_psc", progress=False)
