"""GIC (auxiliary/gic.py): the calibration lowers the victim model's loss on the auxiliary labels inside the
radius, batches give the one-at-a-time result, the model is left untouched, and bad input is refused."""

import numpy as np
import pytest
import torch

from backdoor_engine.auxiliary import GicParams, calibrate
from backdoor_engine.data.dataset import Dataset
from backdoor_engine.errors import InputError
from backdoor_engine.models.train import TrainConfig, train_model


@pytest.fixture(scope="module")
def victim():
    """A small model trained on bright-left vs bright-right images, and a darkened (shifted) auxiliary set."""
    rng = np.random.default_rng(0)
    n = 256
    y = rng.integers(0, 2, n)
    x = rng.integers(0, 60, (n, 12, 12, 1))
    x[y == 0, :, :6] += 150
    x[y == 1, :, 6:] += 150
    x = x.astype(np.uint8)
    result = train_model(x, y, arch="small_resnet", num_classes=2,
                         config=TrainConfig(epochs=3, batch_size=32, progress=False))
    shifted = Dataset((x[:64] * 0.35).astype(np.uint8), y[:64])
    return result.model, result.normalisation, shifted


def test_calibration_lowers_the_loss_within_the_radius_and_keeps_labels(victim):
    model, normalisation, aux = victim
    result = calibrate(model, normalisation, aux, GicParams(steps=30))
    assert result.after["loss"] < result.before["loss"]
    assert result.after["acc"] >= result.before["acc"]
    moved = np.abs(result.dataset.x.astype(np.int16) - aux.x.astype(np.int16))
    assert moved.max() <= round(0.1 * 255) + 1  # the radius, plus rounding to uint8
    assert np.array_equal(result.dataset.y, aux.y) and np.array_equal(result.dataset.ids, aux.ids)
    assert np.abs(result.delta).max() <= 0.1 + 1e-6 and result.delta.shape == (64, 12, 12, 1)
    summary = result.summary()
    assert summary["mode"] == "per_sample" and 0 < summary["delta"]["mean_abs"] <= 0.1


def test_a_batch_of_images_gives_each_the_delta_it_gets_alone(victim):
    model, normalisation, aux = victim
    small = aux.subset(np.arange(6))
    together = calibrate(model, normalisation, small, GicParams(steps=10, batch_size=6))
    alone = calibrate(model, normalisation, small, GicParams(steps=10, batch_size=1))
    np.testing.assert_allclose(together.delta, alone.delta, atol=2e-3)


def test_the_universal_mode_shares_one_delta_and_the_model_is_left_as_it_was(victim):
    model, normalisation, aux = victim
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = calibrate(model, normalisation, aux, GicParams(steps=20, mode="universal", batch_size=16))
    assert result.delta.shape == (1, 12, 12, 1)
    assert result.after["loss"] < result.before["loss"]
    assert model.training and all(p.requires_grad for p in model.parameters())
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


@pytest.mark.parametrize("given, message", [({"radius": 0}, "radius must be in"), ({"steps": 0}, "steps"),
                                            ({"mode": "global"}, "mode must be one of"),
                                            ({"fit_warning_acc": 1.5}, "fit_warning_acc must be in")])
def test_bad_calibration_settings_are_refused(given, message):
    with pytest.raises(InputError, match=message):
        GicParams(**given)


def test_an_auxiliary_set_that_does_not_fit_the_model_is_refused(victim):
    model, normalisation, _ = victim
    rgb = Dataset(np.zeros((4, 12, 12, 3), np.uint8), np.zeros(4, np.int64))
    with pytest.raises(InputError, match="3 channels"):
        calibrate(model, normalisation, rgb)


def test_the_calibrate_command_writes_the_set_its_summary_and_a_page(victim, tmp_path, capsys):
    import json

    from backdoor_engine.cli import main
    from backdoor_engine.data.dataset import load_npz, save_npz
    from backdoor_engine.models.checkpoint import save_checkpoint

    model, normalisation, aux = victim
    save_checkpoint(tmp_path / "victim.pt", model, arch="small_resnet", num_classes=2, in_channels=1, input_size=12,
                    normalisation=normalisation)
    save_npz(aux, tmp_path / "aux.npz")
    out = tmp_path / "aux_cal.npz"
    assert main(["calibrate", "--model", str(tmp_path / "victim.pt"), "--aux", str(tmp_path / "aux.npz"),
                 "--out", str(out), "--param", "steps=5", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 5 and summary["after"]["loss"] < summary["before"]["loss"]
    calibrated = load_npz(out)
    assert calibrated.x.shape == aux.x.shape and np.array_equal(calibrated.y, aux.y)
    assert json.loads((tmp_path / "aux_cal.gic.json").read_text())["mode"] == "per_sample"
    assert "data:image/png;base64," in (tmp_path / "aux_cal.html").read_text()
    assert main(["calibrate", "--model", str(tmp_path / "victim.pt"), "--aux", str(tmp_path / "aux.npz"),
                 "--out", str(tmp_path / "bad.npz"), "--param", "radius=2"]) != 0
    assert "radius must be in" in capsys.readouterr().err
    assert not (tmp_path / "bad.npz").exists() and not (tmp_path / "bad.html").exists()


def test_a_set_the_victim_already_scores_well_on_is_calibrated_with_a_warning_and_others_without(victim, tmp_path,
                                                                                                capsys):
    from backdoor_engine.cli import main
    from backdoor_engine.data.dataset import save_npz
    from backdoor_engine.models.checkpoint import save_checkpoint

    model, normalisation, aux = victim
    acc = calibrate(model, normalisation, aux, GicParams(steps=2)).before["acc"]
    at = calibrate(model, normalisation, aux, GicParams(steps=2, fit_warning_acc=acc))
    assert f"already classifies {100 * acc:.1f}%" in at.summary()["warning"]
    above = calibrate(model, normalisation, aux, GicParams(steps=2, fit_warning_acc=min(1.0, acc + 0.01)))
    assert above.summary()["warning"] is None or acc == 1.0
    save_checkpoint(tmp_path / "victim.pt", model, arch="small_resnet", num_classes=2, in_channels=1, input_size=12,
                    normalisation=normalisation)
    save_npz(aux, tmp_path / "aux.npz")
    assert main(["calibrate", "--model", str(tmp_path / "victim.pt"), "--aux", str(tmp_path / "aux.npz"),
                 "--out", str(tmp_path / "cal.npz"), "--param", "steps=2", "--param", "fit_warning_acc=0",
                 "--json"]) == 0
    assert "calibrate: warning: the victim model already classifies" in capsys.readouterr().err
    assert "GIC is for shifted sets" in (tmp_path / "cal.html").read_text()
    assert main(["calibrate", "--model", str(tmp_path / "victim.pt"), "--aux", str(tmp_path / "aux.npz"),
                 "--out", str(tmp_path / "cal2.npz"), "--param", "steps=2", "--param", "fit_warning_acc=1",
                 "--json"]) == 0
    assert "warning" not in capsys.readouterr().err or acc == 1.0


def test_auxiliary_sets_are_stratified_unseen_and_shifted_as_their_kind_says():
    from backdoor_engine.auxiliary.sets import make_aux, stratified

    rng = np.random.default_rng(3)
    pool = Dataset(rng.integers(0, 256, (400, 6, 6, 1)).astype(np.uint8), np.repeat(np.arange(4), 100))
    train = pool.subset(np.arange(0, 400, 2))  # the victim saw the even ids
    poison = np.zeros(len(train), np.int64)
    poison[:30] = 1
    train = Dataset(train.x, train.y, train.ids, poison)
    seen = make_aux("seen", train, size=20)
    assert len(seen) == 20 and (seen.poison == 0).all() and np.bincount(seen.y).tolist() == [5, 5, 5, 5]
    reserved = make_aux("reserved", train, pool)  # default: 5% of the training set
    assert len(reserved) == 10 and not np.isin(reserved.ids, train.ids).any()
    assert np.array_equal(reserved.x, pool.x[reserved.ids])
    inverted = make_aux("inverted", train, pool)
    assert np.array_equal(inverted.ids, reserved.ids) and np.array_equal(inverted.x, 255 - reserved.x)
    bright = make_aux("bright", train, pool)
    assert (bright.x >= reserved.x).all() and bright.x.mean() > reserved.x.mean()
    # a class short of samples gives what it has, the others fill the size
    y = np.array([0] * 2 + [1] * 50 + [2] * 50)
    assert np.bincount(y[stratified(y, 30, 3, 0)]).tolist() == [2, 14, 14]


@pytest.mark.parametrize("kind, given, message", [
    ("seen", {}, "ground-truth `poison` column"),
    ("reserved", {}, "give --pool"),
    ("external", {}, "kind must be one of"),
])
def test_auxiliary_sets_refuse_what_they_cannot_build(kind, given, message):
    from backdoor_engine.auxiliary.sets import make_aux

    train = Dataset(np.zeros((40, 4, 4, 1), np.uint8), np.arange(40) % 2)
    with pytest.raises(InputError, match=message):
        make_aux(kind, train, **given)


def test_the_aux_command_writes_a_reserved_set_outside_the_training_ids(tmp_path, capsys):
    import json

    from backdoor_engine.cli import main
    from backdoor_engine.data.dataset import load_npz, save_npz

    rng = np.random.default_rng(4)
    pool = Dataset(rng.integers(0, 256, (200, 6, 6, 1)).astype(np.uint8), np.arange(200) % 4)
    save_npz(pool, tmp_path / "pool.npz")
    save_npz(pool.subset(np.arange(100)), tmp_path / "train.npz")
    assert main(["aux", "--kind", "dark", "--train", str(tmp_path / "train.npz"), "--pool",
                 str(tmp_path / "pool.npz"), "--out", str(tmp_path / "aux.npz")]) == 0
    summary = json.loads(capsys.readouterr().out)
    aux = load_npz(tmp_path / "aux.npz")
    assert summary["n_samples"] == 5 == len(aux) and (aux.ids >= 100).all()
    assert np.array_equal(aux.x, np.round(pool.x[aux.ids] * 0.5).astype(np.uint8))
    described = json.loads((tmp_path / "aux.aux.json").read_text())
    assert described["kind"] == "dark" and described["n_samples"] == 5 and described["seed"] == 0
    assert main(["aux", "--kind", "seen", "--train", str(tmp_path / "train.npz"), "--out",
                 str(tmp_path / "seen.npz")]) != 0
    assert "ground-truth `poison` column" in capsys.readouterr().err and not (tmp_path / "seen.npz").exists()
    assert not (tmp_path / "seen.aux.json").exists()


def test_a_sets_kind_is_read_from_the_files_beside_it_and_nothing_else(tmp_path):
    from backdoor_engine.auxiliary.sets import aux_description

    (tmp_path / "a.aux.json").write_text('{"kind": "bright"}')
    assert aux_description(tmp_path / "a.npz") == {"kind": "bright", "calibrated": False}
    (tmp_path / "a_cal.gic.json").write_text('{"aux_kind": "bright", "steps": 100}')
    assert aux_description(tmp_path / "a_cal.npz") == {"kind": "bright", "calibrated": True}
    (tmp_path / "b.aux.json").write_text('{"kind": "../../etc"}')  # not a kind: unknown
    (tmp_path / "c.aux.json").write_text("not json")
    (tmp_path / "d.aux.json").write_text('{"kind": "reserved", "pad": "' + "x" * (1 << 20) + '"}')
    for name in ("b", "c", "d", "e"):
        assert aux_description(tmp_path / f"{name}.npz") == {"kind": None, "calibrated": False}
    assert aux_description(tmp_path / "folder") == {"kind": None, "calibrated": False}
