"""FCT (methods/fct.py): tau, the SD model's loss, the two passes and the rank split, stage by stage."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from backdoor_engine.data.dataset import ArraySource, Dataset
from backdoor_engine.data.source import SourceRange
from backdoor_engine.detection import CLEAN, POISONED, UNCERTAIN, score_auroc
from backdoor_engine.errors import InputError
from backdoor_engine.methods import get_detector, make_detector
from backdoor_engine.methods.fct import (
    Fct,
    FctParams,
    TransformedSource,
    apply_tau,
    centre_separation_loss,
    draw_tau,
    fct_values,
    split_by_rank,
)
from backdoor_engine.models.base import ImageClassifier
from backdoor_engine.models.preprocess import Normalisation


def _images(n=6, h=28, w=28, c=1, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, c)).astype(np.uint8)


def test_rotation_by_a_quarter_turn_is_pils_counter_clockwise_turn_pixel_for_pixel():
    x = _images(3, c=3)
    turned = apply_tau(x, {"angle": np.array([90.0, -90.0, 180.0])}, np.arange(3), ("rotate",))
    for image, out, k in zip(x, turned, (1, -1, 2)):
        assert np.array_equal(out, np.rot90(image, k))


def test_translation_moves_by_whole_pixels_and_fills_black():
    x = np.zeros((1, 28, 28, 1), np.uint8)
    x[0, 5:10, 5:20] = 200
    out = apply_tau(x, {"dx": np.array([3]), "dy": np.array([-2])}, np.arange(1), ("affine",))
    expected = np.zeros_like(x)
    expected[0, 3:8, 8:23] = 200
    assert np.array_equal(out, expected)


def test_flip_crop_blur_and_erase_do_what_torchvision_does():
    x = _images(2)
    flipped = apply_tau(x, {"flip": np.array([True, False])}, np.arange(2), ("flip",))
    assert np.array_equal(flipped[0], x[0, :, ::-1]) and np.array_equal(flipped[1], x[1])
    same = apply_tau(x, {"crop": np.array([[4, 4], [0, 8]])}, np.arange(2), ("crop",))
    assert np.array_equal(same[0], x[0])  # offset 4 of padding 4: the image itself
    # top 0, left 8 of the 4-padded image: 4 black rows on top, shifted 4 columns left, 4 black columns on the right
    assert np.array_equal(same[1, 4:, :24], x[1, :24, 4:]) and not same[1, :4].any() and not same[1, :, 24:].any()
    sharp = apply_tau(x, {"sigma": np.array([0.1, 2.0])}, np.arange(2), ("blur",))
    assert np.array_equal(sharp[0], x[0])  # sigma 0.1: the kernel is a delta at 8 bits
    assert sharp[1].astype(float).std() < x[1].astype(float).std() / 2
    erased = apply_tau(x, {"erase": np.array([[5, 7, 2, 3], [1, 1, 0, 0]])}, np.arange(2), ("erase",))
    assert not erased[0, 2:7, 3:10].any() and erased[1, 0, 0, 0] == 0
    untouched = np.ones(x.shape[1:3], bool)
    untouched[2:7, 3:10] = False
    assert np.array_equal(erased[0][untouched], x[0][untouched])


def test_each_samples_tau_is_fixed_by_the_seed_and_its_position_not_by_how_it_is_read():
    x = _images(10)
    params = FctParams(transforms=("rotate", "affine", "flip", "crop", "blur", "erase"), seed=3)
    source = ArraySource(Dataset(x, np.zeros(10, np.int64)))
    tau = TransformedSource(source, draw_tau(10, x.shape[1:], params), params.transforms, "t")
    whole = tau.read(0, 10).x
    assert np.array_equal(np.concatenate([tau.read(0, 3).x, tau.read(3, 10).x]), whole)
    assert np.array_equal(SourceRange(tau, 4, 9).read(0, 5).x, whole[4:9])
    other = draw_tau(10, x.shape[1:], FctParams(seed=4))
    assert not np.array_equal(other["angle"], draw_tau(10, x.shape[1:], params)["angle"])


def test_the_centre_separation_loss_is_the_official_mean_cosine_between_class_centres():
    torch.manual_seed(0)
    features = torch.randn(12, 5)
    labels = torch.tensor([0, 0, 2, 2, 2, 5, 5, 5, 5, 0, 2, 5])
    present = [0, 2, 5]
    centres = torch.stack([features[labels == c].mean(0) for c in present])
    centres = centres / centres.norm(dim=1, keepdim=True)
    matrix = centres @ centres.T
    matrix.fill_diagonal_(0)
    assert torch.allclose(centre_separation_loss(features, labels), matrix.mean(), atol=1e-6)


def test_the_split_by_rank_has_exactly_the_asked_sizes_and_keeps_the_order():
    values = np.random.default_rng(0).random(1000)
    split = split_by_rank(values, 0.2, 0.05)
    assert [(split == code).sum() for code in (CLEAN, UNCERTAIN, POISONED)] == [200, 750, 50]
    assert values[split == CLEAN].max() < values[split == UNCERTAIN].min()
    assert values[split == UNCERTAIN].max() < values[split == POISONED].min()


class CornerModel(ImageClassifier):
    """Penultimate features = the pixels of the top-left 6 x 6 corner: a trigger there moves under tau."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(36, 2)

    def penultimate(self, x):
        return x[:, 0, :6, :6].flatten(1)


def test_fct_ranks_samples_whose_features_hang_on_a_corner_patch_above_the_rest():
    rng = np.random.default_rng(0)
    x = rng.integers(90, 110, (300, 28, 28, 1)).astype(np.uint8)
    poison = np.zeros(300, bool)
    poison[rng.choice(300, 30, replace=False)] = True
    x[poison, :6, :6] = 255
    dataset = Dataset(x, np.zeros(300, np.int64))
    values, timings = fct_values(CornerModel().eval(), dataset, Normalisation((0.4,), (0.1,)), FctParams())
    assert score_auroc(values, poison) > 0.97
    split = split_by_rank(values, 0.2, 0.05)
    assert poison[split == POISONED].mean() >= 0.9 and poison[split == CLEAN].mean() <= 0.01
    assert set(timings) == {"plain_pass", "transformed_pass"}


@pytest.mark.parametrize("given, message", [
    ({"transforms": ["rotate", "shear"]}, "transforms must be a non-empty sequence"),
    ({"clean_ratio": 0.9, "poison_ratio": 0.2}, "sum <= 1"),
    ({"arch": "resnet999"}, "unknown arch"),
    ({"ce_epochs": 0, "intra_epochs": 0}, "at least one epoch"),
])
def test_bad_fct_parameters_are_refused_naming_the_problem(given, message):
    with pytest.raises(InputError, match=message):
        make_detector("fct", given)


def test_fct_is_registered_needs_no_suspect_model_and_lists_its_provenance():
    cls = get_detector("fct")
    assert cls is Fct and not cls.needs_model()
    text = cls.describe()
    assert "clean_ratio=0.2 (official code" in text and "transforms=('rotate', 'affine')" in text


def test_scan_with_fct_from_the_cli_writes_the_three_way_split_the_fct_values_and_their_auroc(tmp_path, capsys):
    from backdoor_engine.cli import main

    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 160)
    x = rng.integers(0, 60, (160, 16, 16, 1)).astype(np.uint8)
    x[y == 1, 4:12, 4:12] += 150
    poison = np.zeros(160, np.uint8)
    poison[:16] = 1
    x[:16, :4, :4] = 255
    data = tmp_path / "set.npz"
    np.savez(data, x=x, y=y, poison=poison)
    out = tmp_path / "scan"
    code = main(["scan", "--method", "fct", "--data", str(data), "--out", str(out), "--json",
                 "--param", "ce_epochs=1", "--param", "intra_epochs=1", "--param", "sd_batch_size=32"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "fct" and report["n_flagged"] == 8 and len(report["uncertain"]) == 120
    assert set(report["metrics"]["split"]) >= {"clean", "uncertain", "poisoned", "poisoned_precision"}
    assert 0 <= report["metrics"]["auroc"] <= 1
    header, *rows = (out / "samples.csv").read_text().splitlines()
    assert header.split(",") == ["id", "label", "flagged", "score", "cluster", "split", "poison"]
    assert sorted({row.split(",")[5] for row in rows}) == ["clean", "poisoned", "uncertain"]
    html = (out / "report.html").read_text()
    assert "FCT per sample" in html and "AUROC of the scores" in html and "uncertain part" in html
