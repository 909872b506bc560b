"""SCALE-UP ("scale_up", and its clean-data mode "scale_up_clean") on a planted backdoor: a hand-built network
whose triggered images keep their prediction when the pixels are amplified while clean ones drift
(tests/planted_backdoor.py)."""

import html
import json
from dataclasses import fields

import numpy as np
import pytest
import torch
from planted_backdoor import NORMALISATION, TARGET, add_trigger, clean_images, planted_model, poisoned_set, predict
from torch import nn

from backdoor_engine.detection import detection_metrics, score_auroc
from backdoor_engine.errors import InputError
from backdoor_engine.methods import ScanData, available_detectors, get_detector, make_detector
from backdoor_engine.methods.scale_up import CLEAN_FIGURE_TITLE, FIGURE_TITLE, ScaleUp, ScaleUpClean


@pytest.fixture(scope="module")
def planted():
    x, y, truth = poisoned_set()
    return planted_model(), x, y, truth


def direct_spc(model, x, scales, classes):
    """SPC computed the plain way: each scale's prediction on clip(pixels x scale, 0, 1), compared with `classes`."""
    pixels = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
    agree = [(predict(model, (pixels * s).clamp(0, 1)).argmax(1).numpy() == classes) for s in scales]
    return np.mean(agree, axis=0)


def test_scale_up_flags_the_planted_trigger_and_explains_itself(planted):
    model, x, _, truth = planted
    detection = ScaleUp().fit(model, NORMALISATION, x)
    metrics = detection_metrics(detection.flags, truth)
    assert metrics["tpr"] >= 0.9 and metrics["fpr"] <= 0.1
    d = detection.diagnostics
    assert d["threshold"] == 0.5 and d["scales"] == [3, 5, 7, 9, 11]
    assert d["n_forward"] == len(x) * 6 and d["extra_passes_per_sample"] == 5
    assert d["flagged_per_predicted_class"] == {str(TARGET): detection.n_flagged}
    assert "SPC >= 0.5" in d["explanation"] and "scale_up" in d["timings_s"]
    assert np.array_equal(detection.flags, detection.scores >= 0.5)


def test_spc_is_the_share_of_scales_whose_prediction_matches_the_unscaled_one(planted):
    model, x, _, truth = planted
    rows = np.r_[np.flatnonzero(truth)[:5], np.flatnonzero(~truth)[:20]]
    scales = (1, 2.5, 3, 11)
    detector = ScaleUp(scales=list(scales))
    detection = detector.fit(model, NORMALISATION, x[rows])
    pixels = torch.from_numpy(x[rows]).permute(0, 3, 1, 2).float() / 255
    original = predict(model, pixels).argmax(1).numpy()
    assert np.array_equal(detector.predictions_, original)
    assert np.allclose(detection.scores, direct_spc(model, x[rows], scales, original), atol=0)
    # Scale 1 always agrees: JunfengGo/SCALE-UP's scoring (h = 1..11, the unscaled prediction counted) is scales 1..11.
    assert (detector.scaled_predictions_[:, 0] == original).all() and detection.scores.min() >= 0.25
    assert (detection.scores[:5] == 1).all() and (detection.scores[5:] < 1).all()


def test_forward_batch_changes_no_value(planted):
    model, x, _, _ = planted
    one = ScaleUp(forward_batch=7).fit(model, NORMALISATION, x)
    other = ScaleUp(forward_batch=256).fit(model, NORMALISATION, x)
    assert np.array_equal(one.scores, other.scores) and np.array_equal(one.flags, other.flags)


def test_a_model_in_training_mode_is_read_in_eval_mode_and_left_as_it_was(planted):
    _, x, _, truth = planted
    model = planted_model().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    detection = ScaleUp().fit(model, NORMALISATION, x)
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert detection_metrics(detection.flags, truth)["tpr"] >= 0.9


def test_the_clean_data_mode_standardises_by_the_clean_sets_spc(planted):
    model, x, _, truth = planted
    rx, ry = clean_images(90, seed=5)
    detector = ScaleUpClean()
    detection = detector.fit(model, NORMALISATION, x, rx, ry)
    # The reference code's init_spc_norm: the clean images' scaled predictions against their labels, torch.std (n - 1).
    reference = direct_spc(model, rx, (3, 5, 7, 9, 11), ry)
    assert np.allclose(detector.reference_spc_, reference, atol=0)
    mean, std = reference.mean(), reference.std(ddof=1)
    assert np.isclose(detector.reference_mean_, mean) and np.isclose(detector.reference_std_, std)
    assert np.allclose(detection.scores, (detector.spc_ - mean) / std)
    assert np.array_equal(detection.flags, detection.scores >= 0.5)
    assert detection_metrics(detection.flags, truth)["tpr"] == 1.0 and score_auroc(detection.scores, truth) == 1.0
    d = detection.diagnostics
    assert d["n_reference"] == 90 and d["reference_class"] == "label"
    assert d["n_forward"] == (len(x) + 90) * 6
    # Against the model's own predictions instead of the labels: the same on clean images it classifies right.
    by_prediction = ScaleUpClean(reference_class="prediction").fit(model, NORMALISATION, x, rx, ry)
    assert np.allclose(by_prediction.scores, detection.scores)


def test_the_clean_data_mode_refuses_a_clean_set_without_spread(planted):
    model, x, _, _ = planted
    rx, ry = clean_images(30, seed=5)
    rx = add_trigger(rx)  # every "clean" image now keeps its (target) prediction at every scale: SPC 1 throughout
    with pytest.raises(InputError, match="same SPC"):
        ScaleUpClean(reference_class="prediction").fit(model, NORMALISATION, x, rx, ry)
    with pytest.raises(InputError, match="at least 2"):
        ScaleUpClean().fit(model, NORMALISATION, x, rx[:1], ry[:1])


def test_parameters_are_checked_by_name():
    with pytest.raises(InputError, match="unknown parameter.*scale_set"):
        make_detector("scale_up", {"scale_set": [3, 5]})
    with pytest.raises(InputError, match="scales must be a non-empty list"):
        make_detector("scale_up", {"scales": []})
    with pytest.raises(InputError, match="scales must be"):
        make_detector("scale_up", {"scales": [3, 0]})
    with pytest.raises(InputError, match="threshold must be a number"):
        make_detector("scale_up", {"threshold": "high"})
    with pytest.raises(InputError, match="forward_batch must be >= 1"):
        make_detector("scale_up", {"forward_batch": 0})
    with pytest.raises(InputError, match="reference_class must be one of"):
        make_detector("scale_up_clean", {"reference_class": "labels"})
    assert make_detector("scale_up", {"scales": [3, 5.5]}).params.scales == (3.0, 5.5)


def test_bad_inputs_are_refused_with_an_error_that_names_them(planted):
    model, x, _, _ = planted
    detector = ScaleUp()
    with pytest.raises(InputError, match="uint8"):
        detector.fit(model, NORMALISATION, x.astype(np.float32))
    with pytest.raises(InputError, match="empty"):
        detector.fit(model, NORMALISATION, x[:0])
    with pytest.raises(InputError, match="3 channel"):
        detector.fit(model, NORMALISATION, np.repeat(x, 3, axis=-1))
    with pytest.raises(InputError, match="nn.Module"):
        detector.fit(lambda t: t, NORMALISATION, x)
    with pytest.raises(InputError, match="N x K tensor"):
        detector.fit(nn.Identity(), NORMALISATION, x[:4])

    class Broken(nn.Module):
        def forward(self, inputs):
            out = torch.zeros(len(inputs), 3)
            out[2] = float("nan")
            return out

    with pytest.raises(InputError, match="non-finite class scores for sample 2"):
        detector.fit(Broken(), NORMALISATION, x[:4])
    with pytest.raises(InputError, match="pass the model"):
        detector.fit_scan(ScanData(ids=np.arange(3), y=np.zeros(3, int), num_classes=1))
    with pytest.raises(InputError, match="--clean"):
        ScaleUpClean().fit_scan(ScanData(ids=np.arange(len(x)), y=np.zeros(len(x), int), num_classes=4,
                                         pixels=type("P", (), {"x": x})(), model=model, normalisation=NORMALISATION))
    with pytest.raises(InputError, match="reference_y: expected 10 labels"):
        ScaleUpClean().fit(model, NORMALISATION, x, x[:10], np.zeros(9, int))


@pytest.mark.parametrize("method,needs", [("scale_up", {"model", "pixels"}),
                                          ("scale_up_clean", {"model", "pixels", "reference"})])
def test_registered_and_every_parameter_described(method, needs):
    assert method in available_detectors()
    detector = get_detector(method)
    assert detector.needs == frozenset(needs) and detector.needs_model()
    text = detector.describe()
    for f in fields(detector.params_class):
        assert f"{f.name}=" in text and f.metadata["provenance"] in text


@pytest.mark.parametrize("method,title", [("scale_up", FIGURE_TITLE), ("scale_up_clean", CLEAN_FIGURE_TITLE)])
def test_a_scan_through_the_api_writes_the_report_with_the_histogram(tmp_path, planted, method, title):
    from backdoor_engine import api
    from backdoor_engine.data.dataset import make_dataset

    model, x, y, truth = planted
    rx, ry = clean_images(60, seed=9)
    clean = make_dataset(rx, ry) if method == "scale_up_clean" else None
    out = tmp_path / method
    result = api.scan(make_dataset(x, y, poison=truth.astype(np.int64)), model, NORMALISATION, method=method,
                      out_dir=out, progress=False, clean=clean)
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == method and report["n_samples"] == len(x)
    assert len(report["flagged"]) == result.detection.n_flagged and report["metrics"]["tpr"] == 1.0
    assert report["diagnostics"]["threshold"] == 0.5
    assert html.escape(title) in (out / "report.html").read_text()
