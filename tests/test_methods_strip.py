"""STRIP (Gao et al. 2019) as a training-set filter ("strip"): superimposition on a clean reference set, the mean
prediction entropy, a threshold at the reference's false-rejection rate. A hand-built model whose prediction a
bright 3x3 corner patch dominates stands in for a trojaned network, so the checks need no training."""

import html
import json
from dataclasses import fields
from statistics import NormalDist

import numpy as np
import pytest
import torch
from scipy.stats import entropy as scipy_entropy
from scipy.stats import norm
from torch import nn

from backdoor_engine.detection import detection_metrics, score_auroc
from backdoor_engine.errors import InputError
from backdoor_engine.methods import ScanData, available_detectors, get_detector, make_detector
from backdoor_engine.methods import strip as strip_module
from backdoor_engine.methods.strip import (
    FIGURE_TITLE,
    REFERENCE_STREAM,
    SUSPECT_STREAM,
    Strip,
    draw_backgrounds,
    frr_threshold,
)
from backdoor_engine.models.preprocess import Normalisation

SIZE, CLASSES = 8, 4
NORMALISATION = Normalisation((0.25,), (0.15,))


class PatchTrojan(nn.Module):
    """Class 0 with near certainty whenever the top-left 3x3 patch, in [0, 1] pixels (the normalisation undone), is
    bright on average (> 0.875: a 255 patch blended with anything stays >= 1, two images of pixels <= 0.5 stay
    <= 1); otherwise softmax of a fixed random linear map of the pixels, so the prediction follows the content."""

    def __init__(self, normalisation: Normalisation, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("mean", torch.tensor(normalisation.mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(normalisation.std).view(1, -1, 1, 1))
        self.register_buffer("weights", torch.randn(CLASSES, len(normalisation.mean) * SIZE * SIZE,
                                                    generator=generator) * 0.4)

    def forward(self, z):
        pixels = z * self.std + self.mean
        gate = torch.sigmoid(30 * (pixels[:, :, :3, :3].mean(dim=(1, 2, 3)) - 0.875))
        content = pixels.flatten(1) @ self.weights.T
        return content + 25 * gate[:, None] * nn.functional.one_hot(torch.zeros_like(gate, dtype=torch.long),
                                                                     CLASSES)


def images(rng, n, channels=1):
    return rng.integers(0, 128, (n, SIZE, SIZE, channels), dtype=np.uint8)  # pixels <= 0.5


def planted(seed=0, n_clean=400, n_poison=40, n_reference=300):
    """Suspect images (the first n_poison carry the 255 corner patch, relabelled 0), their labels and truth, and a
    clean reference set."""
    rng = np.random.default_rng(seed)
    x = images(rng, n_clean + n_poison)
    y = rng.integers(0, CLASSES, len(x))
    truth = np.zeros(len(x), bool)
    truth[:n_poison] = True
    x[:n_poison, :3, :3] = 255
    y[:n_poison] = 0
    reference = images(rng, n_reference)
    return x, y, truth, reference, rng.integers(0, CLASSES, n_reference)


@pytest.fixture(scope="module")
def model():
    return PatchTrojan(NORMALISATION).eval()


def test_strip_flags_the_triggered_samples_at_the_false_positive_rate_its_frr_sets(model):
    x, y, truth, reference, _ = planted()
    detector = Strip()  # the defaults: N = 100, FRR 10%, order statistic
    detection = detector.fit(model, NORMALISATION, x, y, reference)
    metrics = detection_metrics(detection.flags, truth)
    assert metrics["tpr"] >= 0.9
    assert 0.04 <= metrics["fpr"] <= 0.17  # the clean suspects come from the reference's distribution: ~10%
    d = detection.diagnostics
    assert d["reference_rejected"] == pytest.approx(0.1)  # 30 of 300 strictly below the threshold
    assert d["threshold"] == detector.threshold_ and d["n_reference"] == 300 and d["num_outputs"] == CLASSES
    assert d["n_forward"] == 100 * (len(x) + len(reference))
    assert d["reference_entropy_quantiles"]["0.1"] == pytest.approx(d["threshold"], rel=0.05)
    # The trigger dominates every blend: the poisoned samples' entropy is near 0 bits, far below any clean one's.
    assert detector.entropies_[truth].max() < 0.01 < detector.reference_entropies_.min()
    assert np.array_equal(detection.flags, detector.entropies_ < detector.threshold_)
    # Scores: 1 - entropy / log2(K), higher = more suspicious.
    assert np.allclose(detection.scores, 1 - detector.entropies_ / np.log2(CLASSES))
    assert score_auroc(detection.scores, truth) > 0.99
    assert set(d["timings_s"]) == {"strip_reference", "strip_suspect"}
    assert d["flagged_per_class"]["0"] >= 36 and sum(d["flagged_per_class"].values()) == detection.n_flagged


def test_the_entropy_is_the_mean_over_the_blends_of_the_prediction_entropy_in_bits(model):
    x, y, _, reference, _ = planted(seed=1, n_clean=4, n_poison=2, n_reference=6)
    n_draws = 7
    detector = Strip(n_superimpose=n_draws, forward_batch=4, seed=5)
    detector.fit(model, NORMALISATION, x, y, reference)

    def direct(image, draws):
        blends = (image[None].astype(np.float64) + reference[draws].astype(np.float64)) / 255.0
        inputs = (torch.tensor(blends, dtype=torch.float32).permute(0, 3, 1, 2) - 0.25) / 0.15
        with torch.no_grad():
            p = torch.softmax(model(inputs).double(), dim=1).numpy()
        return np.mean([scipy_entropy(row, base=2) for row in p])

    suspect_draws = draw_backgrounds(5, SUSPECT_STREAM, 0, len(x), n_draws, len(reference))
    expected = [direct(x[i], suspect_draws[i]) for i in range(len(x))]
    assert np.allclose(detector.entropies_, expected, rtol=1e-5, atol=1e-9)
    reference_draws = draw_backgrounds(5, REFERENCE_STREAM, 0, len(reference), n_draws, len(reference), first_row=0)
    assert not (reference_draws == np.arange(len(reference))[:, None]).any()  # never blended with itself
    expected = [direct(reference[i], reference_draws[i]) for i in range(len(reference))]
    assert np.allclose(detector.reference_entropies_, expected, rtol=1e-5, atol=1e-9)


def test_the_threshold_rules_are_the_order_statistic_and_the_papers_normal_fit():
    values = np.random.default_rng(0).permutation(100).astype(float)
    # BackdoorBench: sorted(entropies)[int(frr * n)], flagged strictly below (float round-down of 0.29 x 100 fixed).
    assert frr_threshold(values, 0.1, "quantile") == 10.0
    assert frr_threshold(values, 0.29, "quantile") == 29.0 and (values < 29.0).mean() == 0.29
    samples = np.random.default_rng(1).normal(0.9, 0.3, 500)
    # The official notebook: scipy.stats.norm.ppf(frr, *scipy.stats.norm.fit(benign entropies)).
    assert frr_threshold(samples, 0.01, "normal") == pytest.approx(norm.ppf(0.01, *norm.fit(samples)), rel=1e-9)
    assert frr_threshold(samples, 0.01, "normal") == pytest.approx(
        NormalDist(samples.mean(), samples.std()).inv_cdf(0.01))


def test_the_batch_size_and_the_sample_blocks_change_no_value(model, monkeypatch):
    x, y, _, reference, _ = planted(seed=2, n_clean=30, n_poison=5, n_reference=20)
    monkeypatch.setattr(strip_module, "DRAW_BLOCK", 8)  # several blocks of draws for both sets
    runs = [Strip(n_superimpose=13, forward_batch=batch) for batch in (5, 13, 64, 10_000)]
    detections = [run.fit(model, NORMALISATION, x, y, reference) for run in runs]
    for run, detection in zip(runs[1:], detections[1:]):
        assert np.allclose(run.entropies_, runs[0].entropies_, rtol=1e-6, atol=1e-12)
        assert np.allclose(run.reference_entropies_, runs[0].reference_entropies_, rtol=1e-6, atol=1e-12)
        assert np.array_equal(detection.flags, detections[0].flags)


def test_the_same_seed_gives_the_same_flags_and_another_seed_other_draws(model):
    x, y, _, reference, _ = planted(seed=3, n_clean=60, n_poison=6, n_reference=40)
    first = Strip(n_superimpose=10, seed=3)
    second = Strip(n_superimpose=10, seed=3)
    a, b = first.fit(model, NORMALISATION, x, y, reference), second.fit(model, NORMALISATION, x, y, reference)
    assert np.array_equal(a.flags, b.flags) and np.array_equal(first.entropies_, second.entropies_)
    assert first.threshold_ == second.threshold_
    other = Strip(n_superimpose=10, seed=4)
    other.fit(model, NORMALISATION, x, y, reference)
    assert not np.allclose(other.entropies_[6:], first.entropies_[6:])
    assert get_detector("strip").seed_param == "seed"


def test_a_model_in_training_mode_is_scanned_in_eval_mode_and_handed_back_as_it_was():
    class ModeSpy(PatchTrojan):
        def forward(self, z):
            assert not self.training
            return super().forward(z)

    spy = ModeSpy(NORMALISATION).train()
    x, y, _, reference, _ = planted(seed=4, n_clean=5, n_poison=1, n_reference=4)
    Strip(n_superimpose=3).fit(spy, NORMALISATION, x, y, reference)
    assert spy.training


def test_without_a_reference_set_it_is_refused_naming_clean(model, tmp_path):
    from backdoor_engine import api
    from backdoor_engine.data.dataset import make_dataset

    x, y, _, _, _ = planted(seed=5, n_clean=12, n_poison=0, n_reference=2)
    dataset = make_dataset(x, y, num_classes=CLASSES)
    data = ScanData(ids=dataset.ids, y=dataset.y, num_classes=CLASSES, pixels=dataset, model=model,
                    normalisation=NORMALISATION)
    with pytest.raises(InputError, match="--clean"):
        Strip().fit_scan(data)
    with pytest.raises(InputError, match="--clean"):
        api.scan(dataset, model, NORMALISATION, method="strip", out_dir=tmp_path / "o", progress=False)


def test_bad_input_is_refused_with_an_error_that_names_it(model):
    x, y, _, reference, _ = planted(seed=6, n_clean=10, n_poison=0, n_reference=5)
    detector = Strip(n_superimpose=2)
    with pytest.raises(InputError, match="clean reference images are 8x8x3"):
        detector.fit(model, NORMALISATION, x, y, np.repeat(reference, 3, axis=-1))
    with pytest.raises(InputError, match="clean reference images are 6x6x1"):
        detector.fit(model, NORMALISATION, x, y, reference[:, :6, :6])
    with pytest.raises(InputError, match="1 channel.*normalisation has 3"):
        detector.fit(model, Normalisation((0.5,) * 3, (0.25,) * 3), x, y, reference)
    with pytest.raises(InputError, match="at least 2"):
        detector.fit(model, NORMALISATION, x, y, reference[:1])
    with pytest.raises(InputError, match="expected 10 labels"):
        detector.fit(model, NORMALISATION, x, y[:4], reference)
    with pytest.raises(InputError, match="uint8"):
        detector.fit(model, NORMALISATION, x.astype(np.float32), y, reference)
    with pytest.raises(InputError, match="N x K tensor"):
        detector.fit(nn.Flatten(0), NORMALISATION, x, y, reference)
    with pytest.raises(InputError, match="needs >= 2 classes"):
        detector.fit(nn.Sequential(nn.Flatten(), nn.Linear(SIZE * SIZE, 1)), NORMALISATION, x, y, reference)


def test_parameters_are_refused_by_name():
    for params, message in [({"n_superimpose": 0}, "n_superimpose must be >= 1"), ({"frr": 1.0}, "frr must be in"),
                            ({"frr": 0}, "frr must be in"), ({"forward_batch": 0}, "forward_batch must be >= 1"),
                            ({"alpha": 0}, "alpha must be a finite number > 0"), ({"beta": -1}, "beta must be"),
                            ({"threshold_rule": "gaussian"}, "threshold_rule must be one of"),
                            ({"blend_space": "logits"}, "blend_space must be one of"),
                            ({"blend_space": "normalised", "clip": True}, "clip applies to blend_space 'pixels'"),
                            ({"N": 64}, "unknown parameter.*N"), ({"batch_size": 64}, "unknown parameter.*batch_size"),
                            ({"seed": -1}, "seed must be >= 0")]:
        with pytest.raises(InputError, match=message):
            make_detector("strip", params)
    assert make_detector("strip", {"threshold_rule": "Normal"}).params.threshold_rule == "normal"


def test_the_normalised_blend_adds_the_normalised_tensors_as_backdoorbench_does(model):
    x, y, _, reference, _ = planted(seed=7, n_clean=3, n_poison=1, n_reference=5)
    detector = Strip(n_superimpose=4, blend_space="normalised", beta=0.5, seed=2)
    detector.fit(model, NORMALISATION, x, y, reference)
    draws = draw_backgrounds(2, SUSPECT_STREAM, 0, len(x), 4, len(reference))

    def normalised(pixels):
        return (torch.tensor(pixels / 255.0, dtype=torch.float32).permute(0, 3, 1, 2) - 0.25) / 0.15

    for i in range(len(x)):
        inputs = normalised(x[i:i + 1]) + 0.5 * normalised(reference[draws[i]])
        with torch.no_grad():
            p = torch.softmax(model(inputs).double(), dim=1).numpy()
        assert detector.entropies_[i] == pytest.approx(np.mean([scipy_entropy(row, base=2) for row in p]), rel=1e-5)


def test_strip_is_registered_and_describes_every_parameter():
    assert "strip" in available_detectors()
    detector = get_detector("strip")
    assert detector is Strip and detector.needs == frozenset({"model", "pixels", "reference"})
    assert detector.needs_model() and detector.needs_reference() and detector.captures() == ()
    text = detector.describe()
    for f in fields(detector.params_class):
        assert f"{f.name}=" in text and f.metadata["provenance"] in text


def test_a_scan_through_the_api_writes_the_report_with_the_entropy_histograms(model, tmp_path):
    from backdoor_engine import api
    from backdoor_engine.data.dataset import make_dataset

    x, y, truth, reference, reference_y = planted(seed=8, n_clean=150, n_poison=15, n_reference=80)
    dataset = make_dataset(x, y, poison=truth.astype(np.int64), num_classes=CLASSES)
    clean = make_dataset(reference, reference_y, num_classes=CLASSES)
    out = tmp_path / "strip"
    result = api.scan(dataset, model, NORMALISATION, method="strip", clean=clean, out_dir=out, progress=False,
                      n_superimpose=20)
    assert {p.name for p in out.iterdir()} >= {"report.json", "samples.csv", "report.html"}
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "strip" and report["n_samples"] == len(x)
    assert report["params"]["n_superimpose"] == 20 and set(report["params"]) == set(Strip().params.__dict__)
    assert len(report["flagged"]) == result.detection.n_flagged and report["metrics"]["tpr"] >= 0.9
    assert report["diagnostics"]["n_forward"] == 20 * (len(x) + len(reference))
    assert "strip_suspect" in report["timings_s"]
    page = (out / "report.html").read_text()
    assert html.escape(FIGURE_TITLE) in page and "a dominating trigger" in page
    assert len((out / "samples.csv").read_text().splitlines()) == len(x) + 1
