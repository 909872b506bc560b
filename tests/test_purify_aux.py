"""The purifiers that tune on a small clean auxiliary set (purify/finetune.py, ft_sam.py, fst.py): each as
BackdoorBenchER runs it, checked on a toy model; the schedules, the SAM step and FST's head constraint."""

import math

import numpy as np
import pytest
import torch

from backdoor_engine.data.dataset import Dataset
from backdoor_engine.errors import InputError
from backdoor_engine.models.preprocess import to_model_input
from backdoor_engine.models.train import TrainConfig, train_model
from backdoor_engine.purify import get_repair


@pytest.fixture(scope="module")
def toy():
    """A small model that learned a 'backdoor': a bright corner sends class-0 images to class 1; and a clean
    auxiliary set without the corner."""
    rng = np.random.default_rng(0)
    n = 320
    y = rng.integers(0, 2, n)
    x = rng.integers(0, 60, (n, 12, 12, 1))
    x[y == 0, :, :6] += 150
    x[y == 1, :, 6:] += 150
    poisoned = np.flatnonzero(y == 0)[:40]
    x[poisoned, :3, :3] = 255
    y_train = y.copy()
    y_train[poisoned] = 1
    x = x.astype(np.uint8)
    result = train_model(x, y_train, arch="small_resnet", num_classes=2,
                         config=TrainConfig(epochs=4, batch_size=32, progress=False))
    clean = np.setdiff1d(np.arange(n), poisoned)[:64]
    return result.model, result.normalisation, Dataset(x[clean], y[clean])


def run(strategy, toy, **params):
    model, normalisation, aux = toy
    settings = {**({} if strategy == "anp" else {"epochs": 3, "batch_size": 32}),
                **({"warm_epochs": 0} if strategy == "npd" else {}), **params}
    return get_repair(strategy).apply(model, normalisation, aux, None, aux, params=settings, progress=False)


@pytest.mark.parametrize("strategy", ["ft", "ft-sam", "fst", "sau", "npd"])
def test_each_aux_purifier_tunes_a_copy_keeps_aux_accuracy_and_records_its_settings(toy, strategy):
    model, _, aux = toy
    before = {k: v.clone() for k, v in model.state_dict().items()}
    repaired = run(strategy, toy)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert [h["epoch"] for h in repaired.history] == [1, 2, 3]
    assert repaired.history[-1]["aux_acc"] >= 0.8
    assert repaired.config["n_aux"] == len(aux) and not repaired.model.training


def test_ft_follows_the_official_per_epoch_cosine_of_100_epochs_whatever_the_budget(toy):
    history = run("ft", toy).history
    assert [h["lr"] for h in history] == pytest.approx([0.01 * 0.5 * (1 + math.cos(math.pi * e / 100))
                                                        for e in range(3)])
    annealed = run("ft", toy, t_max=3).history
    assert annealed[-1]["lr"] == pytest.approx(0.01 * 0.5 * (1 + math.cos(math.pi * 2 / 3)))


def test_ft_sam_steps_the_cosine_every_batch_as_the_official_code():
    # 64 aux images, batch 32: two batches per epoch, so epoch e's last batch is step 2e + 1
    from backdoor_engine.purify.ft_sam import FtSamParams

    params = FtSamParams()
    lr = [0.5 * params.lr * (1 + math.cos(math.pi * step / params.t_max)) for step in (1, 3, 5)]
    assert lr[0] > lr[1] > lr[2]  # and with 200 steps it would come back up: period 2 x T_max


def test_the_sam_step_returns_the_weights_and_keeps_batchnorm_running_statistics_of_the_first_pass(toy):
    import copy

    from backdoor_engine.purify.ft_sam import sam_step, smoothed_loss

    model, normalisation, aux = toy
    tuned = copy.deepcopy(model).train()
    inputs = to_model_input(aux.x[:16], normalisation)
    targets = torch.from_numpy(aux.y[:16].astype(np.int64))
    weights = {k: v.clone() for k, v in tuned.named_parameters()}
    reference = copy.deepcopy(model).train()
    smoothed_loss(reference(inputs), targets, 0.1)  # one training-mode pass: the statistics SAM must end with
    sam_step(2.0, True, 0.1)(tuned, inputs, targets)
    for name, value in tuned.named_parameters():
        assert torch.allclose(value, weights[name], atol=1e-6), name
        assert value.grad is not None
    for (name, a), b in zip(tuned.named_buffers(), reference.buffers()):
        if "running" in name:  # num_batches_tracked counts both passes, as in the official momentum-0 trick
            assert torch.allclose(a, b, atol=1e-6), name


def test_fst_reinitialises_the_head_at_the_old_norm_and_keeps_that_norm(toy):
    from backdoor_engine.purify.fst import reinitialised

    model, _, _ = toy
    start, old = reinitialised(model, 0)
    assert torch.allclose(start.head.weight.norm(), old.norm()) and not torch.allclose(start.head.weight, old)
    repaired = run("fst", toy)
    assert torch.allclose(repaired.model.head.weight.norm(), old.norm(), rtol=1e-4)
    cosine = (repaired.model.head.weight * old).sum() / old.norm() ** 2
    assert cosine < 0.5  # pushed away from the backdoored head


def test_aux_purifiers_refuse_to_run_without_an_auxiliary_set(toy):
    model, normalisation, aux = toy
    with pytest.raises(InputError, match="needs a small clean auxiliary set"):
        get_repair("ft").apply(model, normalisation, aux, None, None, params={"epochs": 1})


def test_purify_ft_from_the_cli_needs_no_scanned_set_and_reports_the_aux_kind_and_ba_before(toy, tmp_path, capsys):
    import json

    from backdoor_engine.cli import main
    from backdoor_engine.data.dataset import save_npz
    from backdoor_engine.models.checkpoint import load_checkpoint, save_checkpoint

    model, normalisation, aux = toy
    save_checkpoint(tmp_path / "m.pt", model, arch="small_resnet", num_classes=2, in_channels=1, input_size=12,
                    normalisation=normalisation)
    save_npz(aux, tmp_path / "aux.npz")
    (tmp_path / "aux.aux.json").write_text(json.dumps({"kind": "reserved"}))  # as `aux` writes it beside the set
    save_npz(aux, tmp_path / "test.npz")
    assert main(["purify", "--strategy", "ft", "--model", str(tmp_path / "m.pt"), "--aux", str(tmp_path / "aux.npz"),
                 "--epochs", "1", "--param", "batch_size=32", "--eval-data", str(tmp_path / "test.npz"),
                 "--out", str(tmp_path / "ft.pt")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["strategy"] == "ft" and out["aux_kind"] == "reserved" and out["n_aux"] == len(aux)
    assert out["aux_calibrated"] is False and 0 <= out["ba_before"] <= 1 and 0 <= out["ba"] <= 1
    _, meta = load_checkpoint(tmp_path / "ft.pt")
    assert meta["purify"]["strategy"] == "ft" and meta["purify"]["before"]["ba"] == out["ba_before"]
    assert main(["purify", "--strategy", "retrain", "--model", str(tmp_path / "m.pt"), "--report", "x",
                 "--out", str(tmp_path / "r.pt")]) != 0
    assert "give --data" in capsys.readouterr().err


def test_anp_hooks_change_nothing_until_the_mask_or_noise_moves(toy):
    import copy

    from backdoor_engine.purify.anp import ChannelPerturbation

    model, normalisation, aux = toy
    work = copy.deepcopy(model).eval()
    inputs = to_model_input(aux.x[:8], normalisation)
    plain = work(inputs)
    channels = ChannelPerturbation(work)
    assert torch.allclose(work(inputs), plain, atol=1e-5)
    with torch.no_grad():
        channels.mask[0][:] = 0.0
    assert not torch.allclose(work(inputs), plain, atol=1e-3)
    channels.remove()
    assert torch.allclose(work(inputs), plain, atol=1e-5)


def test_anp_prunes_the_low_mask_channels_at_the_largest_threshold_the_aux_accuracy_allows(toy):
    from backdoor_engine.purify.anp import pruned

    model, normalisation, aux = toy
    name = next(n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d))
    channels = dict(model.named_modules())[name].num_features
    mask = np.linspace(0, 1, channels)
    copy_, count = pruned(model, {name: mask}, 0.3)
    assert count == int((mask <= 0.3).sum())
    weight = dict(copy_.named_modules())[name].weight.detach().numpy()
    assert (weight[mask <= 0.3] == 0).all() and (weight[mask > 0.3] != 0).all()
    repaired = run("anp", toy, iterations=30, batch_size=32)
    config = repaired.config
    table = [h for h in repaired.history if h["stage"] == "prune"]
    assert [row["threshold"] for row in table][:3] == [0.0, 0.05, 0.1] and table[-1]["threshold"] == 0.9
    allowed = [row["threshold"] for row in table if row["aux_acc"] >= 0.9 * config["aux_acc_unpruned"]]
    assert config["threshold"] == max(allowed)
    chosen = next(row for row in table if row["threshold"] == config["threshold"])
    assert config["pruned_channels"] == chosen["pruned_channels"]


def test_purify_calibrates_the_aux_set_with_gic_first_when_asked(toy, tmp_path, capsys):
    from backdoor_engine.cli import main
    from backdoor_engine.data.dataset import save_npz
    from backdoor_engine.models.checkpoint import load_checkpoint, save_checkpoint

    model, normalisation, aux = toy
    save_checkpoint(tmp_path / "m.pt", model, arch="small_resnet", num_classes=2, in_channels=1, input_size=12,
                    normalisation=normalisation)
    save_npz(aux, tmp_path / "aux.npz")
    assert main(["purify", "--strategy", "ft", "--model", str(tmp_path / "m.pt"), "--aux", str(tmp_path / "aux.npz"),
                 "--calibrate", "--gic-param", "steps=3", "--epochs", "1", "--param", "batch_size=32",
                 "--out", str(tmp_path / "ft.pt")]) == 0
    _, meta = load_checkpoint(tmp_path / "ft.pt")
    gic = meta["purify"]["gic"]
    assert gic["steps"] == 3 and gic["n_samples"] == len(aux) and gic["after"]["loss"] <= gic["before"]["loss"]
    assert meta["purify"]["aux_set"] == {"source": str(tmp_path / "aux.npz"), "n_samples": len(aux), "kind": None,
                                         "calibrated": True}
    capsys.readouterr()
    assert main(["purify", "--strategy", "ft", "--model", str(tmp_path / "m.pt"), "--aux", str(tmp_path / "aux.npz"),
                 "--gic-param", "steps=3", "--out", str(tmp_path / "x.pt")]) != 0
    assert "add --calibrate" in capsys.readouterr().err


def test_the_shared_perturbation_stays_in_the_radius_and_the_unlearning_loss_is_clean_ce_without_shared_fooling(toy):
    import copy

    from backdoor_engine.models.preprocess import normaliser
    from backdoor_engine.purify.sau import SauParams, shared_perturbation, unlearning_loss

    model, normalisation, aux = toy
    model = copy.deepcopy(model).eval()
    pixels = torch.from_numpy(aux.x[:16]).permute(0, 3, 1, 2).float() / 255
    targets = torch.from_numpy(aux.y[:16].astype(np.int64))
    normalise = normaliser(normalisation)
    params = SauParams()
    delta = shared_perturbation(model, model, pixels, targets, normalise, params)
    assert delta.shape == pixels.shape and delta.abs().max() <= 0.2 + 1e-6
    clean_ce = torch.nn.functional.cross_entropy(model(normalise(pixels)), targets)
    no_shift = unlearning_loss(model, model, pixels, targets, torch.zeros_like(pixels), normalise, params)
    assert torch.allclose(no_shift, clean_ce, atol=1e-5)  # unperturbed: nothing fools the reference, shared = 0


def test_npd_trains_only_its_polarizer_which_starts_as_the_identity_and_survives_a_checkpoint(toy, tmp_path):
    import copy

    from backdoor_engine.models.checkpoint import load_checkpoint, save_checkpoint
    from backdoor_engine.models.polarizer import attach_polarizer, default_layer

    model, normalisation, aux = toy
    work = copy.deepcopy(model).eval()
    inputs = to_model_input(aux.x[:8], normalisation)
    plain = work(inputs)
    polarizer = attach_polarizer(work, default_layer(work)).eval()
    with torch.no_grad():  # conv = identity; BatchNorm at its initial statistics (mean 0, var 1) is ~ the identity
        assert torch.allclose(work(inputs), plain, atol=1e-3)
    assert copy.deepcopy(work).npd_polarizer is not polarizer
    repaired = run("npd", toy, epochs=2, warm_epochs=1)
    assert [h["stage"] for h in repaired.history] == ["warm-up", "polarize", "polarize"]
    backbone = {k: v for k, v in repaired.model.state_dict().items() if not k.startswith("npd_polarizer")}
    for name, value in model.state_dict().items():
        assert torch.equal(backbone[name], value), name
    assert not torch.allclose(repaired.model.npd_polarizer.conv.weight,
                              torch.eye(repaired.model.npd_polarizer.conv.in_channels).view_as(
                                  repaired.model.npd_polarizer.conv.weight))
    save_checkpoint(tmp_path / "npd.pt", repaired.model, arch="small_resnet", num_classes=2, in_channels=1,
                    input_size=12, normalisation=normalisation)
    loaded, meta = load_checkpoint(tmp_path / "npd.pt")
    assert meta["polarizer"] == {"layer": repaired.config["layer"], "channels": polarizer.conv.in_channels}
    assert torch.allclose(loaded(inputs), repaired.model(inputs), atol=1e-5)
