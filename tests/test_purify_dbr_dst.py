"""D-BR and D-ST (purify/d_br.py, purify/d_st.py), the three-way split they read, and FLARE(R)'s unlearning
pass without augmentation."""

import importlib
import json

import numpy as np
import pytest
import torch

from backdoor_engine.data.dataset import Dataset
from backdoor_engine.detection import CLEAN, POISONED, UNCERTAIN, Detection
from backdoor_engine.errors import InputError
from backdoor_engine.models.augment import strong_view
from backdoor_engine.models.checkpoint import load_checkpoint, save_checkpoint
from backdoor_engine.models.registry import build_model
from backdoor_engine.purify import get_repair
from backdoor_engine.purify.d_st import DStParams, encoder_lr, supcon_loss
from backdoor_engine.report import write_report
from backdoor_engine.report.reading import flags_from_report, split_from_report


def _reference_supcon(features, labels, split, temperature, base_temperature):
    """The official SupConLoss (contrast_mode 'all') with D-ST's row masking, written as loops."""
    f = features.double().numpy()
    n = len(labels)
    logits = f @ f.T / temperature
    losses = []
    for i in range(2 * n):
        a = i % n
        others = [j for j in range(2 * n) if j != i]
        shifted = logits[i] - logits[i].max()
        log_denominator = np.log(sum(np.exp(shifted[j]) for j in others))
        if split[a] != CLEAN:
            positives = [a + n if i < n else a]
        else:
            positives = [j for j in others if labels[j % n] == labels[a]]
        losses.append(-(temperature / base_temperature) * np.mean([shifted[j] - log_denominator for j in positives]))
    return float(np.mean(losses))


def test_supcon_with_row_masking_matches_the_official_loss_written_out():
    torch.manual_seed(0)
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    split = torch.tensor([CLEAN, POISONED, CLEAN, UNCERTAIN, CLEAN, CLEAN])
    features = torch.nn.functional.normalize(torch.randn(12, 4), dim=1)
    ours = supcon_loss(features, labels, split, temperature=0.1, base_temperature=0.07)
    assert ours.item() == pytest.approx(_reference_supcon(features, labels, split, 0.1, 0.07), rel=1e-5)


def test_a_suspect_anchor_pulls_only_its_own_view_while_clean_anchors_still_pull_it():
    labels = torch.tensor([0, 0])
    features = torch.nn.functional.normalize(torch.randn(4, 3), dim=1).requires_grad_()
    # Sample 1 suspect: its anchors' only positive is its other view; sample 0 (clean) keeps 1 as a positive.
    loss = supcon_loss(features, labels, torch.tensor([CLEAN, POISONED]), temperature=0.1, base_temperature=0.1)
    assert loss.item() == pytest.approx(_reference_supcon(features.detach(), labels, [CLEAN, POISONED], 0.1, 0.1),
                                        rel=1e-5)


def test_the_encoder_schedule_warms_up_per_batch_then_follows_the_cosine():
    params = DStParams(encoder_epochs=20, warmup_epochs=2, encoder_lr=0.5, warmup_from=0.01)
    assert encoder_lr(params, 1, 0, 10) == pytest.approx(0.01)
    end_of_warmup = encoder_lr(params, 3, 0, 10)
    assert encoder_lr(params, 2, 9, 10) == pytest.approx(0.01 + 0.95 * (end_of_warmup - 0.01), rel=1e-3)
    assert encoder_lr(params, 20, 0, 10) < 0.01 and encoder_lr(params, 20, 0, 10) > 0.5e-3


def test_strong_views_are_seeded_uint8_images_of_the_input_shape_and_differ_between_draws():
    images = torch.randint(0, 256, (16, 28, 28, 1), dtype=torch.uint8)
    first = strong_view(images, torch.Generator().manual_seed(0))
    again = strong_view(images, torch.Generator().manual_seed(0))
    assert first.dtype == torch.uint8 and first.shape == images.shape and torch.equal(first, again)
    generator = torch.Generator().manual_seed(0)
    assert not torch.equal(strong_view(images, generator), strong_view(images, generator))
    colour = strong_view(torch.randint(0, 256, (8, 32, 32, 3), dtype=torch.uint8), generator)
    assert colour.shape == (8, 32, 32, 3)


@pytest.fixture(scope="module")
def tiny():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 240)
    x = rng.integers(0, 60, (240, 16, 16, 1)).astype(np.uint8)
    for c in range(3):
        x[y == c, 2 + 4 * c:6 + 4 * c, 3:13] += 150
    poison = np.zeros(240, np.uint8)
    poison[:24] = 1
    x[:24, -3:, -3:] = 255
    y[:24] = 0
    dataset = Dataset(x, y, poison=poison)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_model("small_resnet", num_classes=3, in_channels=1, input_size=16).eval()
    from backdoor_engine.models.preprocess import fit_normalisation

    return dataset, model, fit_normalisation(x)


def _split(n=240):
    split = np.full(n, UNCERTAIN, np.int8)
    split[:12] = POISONED
    split[100:160] = CLEAN
    return split


def unlearns(ascend, kwargs) -> bool:
    """Whether a train_epoch call is an unlearning pass: the official cross-entropy ascent or the margin descent."""
    from backdoor_engine.purify.unlearn_relearn import given_label_margin

    return ascend or kwargs.get("objective") is given_label_margin


def test_d_br_unlearns_only_the_poisoned_part_unaugmented_and_relearns_only_the_clean_part(tiny, monkeypatch):
    module = importlib.import_module("backdoor_engine.purify.unlearn_relearn")

    dataset, model, normalisation = tiny
    seen = []
    original = module.train_epoch

    def spy(model, x, y, *, config, ascend=False, **kwargs):
        seen.append((len(x), unlearns(ascend, kwargs), config.augment))
        return original(model, x, y, config=config, ascend=ascend, **kwargs)

    monkeypatch.setattr(module, "train_epoch", spy)
    repaired = get_repair("d-br").apply(model, normalisation, dataset, _split(), params={"epochs": 2},
                                        progress=False)
    # select=holdout (the default) keeps int(12 * 0.2) = 2 poisoned and int(60 * 0.1) = 6 clean samples out
    assert seen == [(10, True, False), (54, False, True)] * 2
    assert repaired.config["split"] == {"clean": 60, "uncertain": 168, "poisoned": 12}
    assert all(0 <= h["flagged_acc"] <= 1 for h in repaired.history)
    seen.clear()
    get_repair("d-br").apply(model, normalisation, dataset, _split(), params={"epochs": 1, "unlearn_augment": True},
                             progress=False)
    assert seen == [(10, True, True), (54, False, True)]


def test_flare_r_relearns_on_everything_unflagged_and_takes_a_split_as_its_poisoned_part(tiny, monkeypatch):
    module = importlib.import_module("backdoor_engine.purify.unlearn_relearn")

    dataset, model, normalisation = tiny
    seen = []
    original = module.train_epoch
    monkeypatch.setattr(module, "train_epoch", lambda m, x, y, *, config, ascend=False, **kw: (
        seen.append((len(x), unlearns(ascend, kw), config.augment))
        or original(m, x, y, config=config, ascend=ascend, **kw)))
    get_repair("unlearn-relearn").apply(model, normalisation, dataset, _split(), params={"epochs": 1}, progress=False)
    assert seen == [(10, True, False), (206, False, True)]  # 2 of 12 and 22 of 228 held out


def test_a_strategy_gets_bools_or_the_split_as_it_declares_and_bad_flags_are_refused(tiny):
    dataset, model, normalisation = tiny
    d_br = get_repair("d-br")
    flags = np.zeros(240, bool)
    flags[:12] = True
    assert np.array_equal(d_br._check_flags(dataset, flags), np.where(flags, POISONED, CLEAN))
    assert np.array_equal(get_repair("retrain")._check_flags(dataset, _split()), _split() == POISONED)
    with pytest.raises(InputError, match="three-way split"):
        d_br._check_flags(dataset, np.full(240, 7))
    with pytest.raises(InputError, match="repairs the suspect model"):
        d_br.apply(None, normalisation, dataset, flags, params={"epochs": 1})
    with pytest.raises(InputError, match="clean part, which holds 0"):
        d_br.apply(model, normalisation, dataset, np.full(240, UNCERTAIN, np.int8), params={"epochs": 1},
                   progress=False)


def _fct_like_report(tmp_path, dataset, split, scores):
    detection = Detection("fct", split == POISONED, scores=scores, split=split)
    write_report(tmp_path, detection, dataset, timings_s={})
    return tmp_path


def test_a_three_way_report_reads_back_as_its_split_and_any_report_as_flagged_versus_clean(tiny, tmp_path):
    dataset = tiny[0]
    scores = np.linspace(0, 1, 240)
    split = _split()
    report = _fct_like_report(tmp_path / "fct", dataset, split, scores)
    assert np.array_equal(split_from_report(dataset, report), split)
    assert np.array_equal(flags_from_report(dataset, report), split == POISONED)
    header = (report / "samples.csv").read_text().splitlines()[0]
    assert header == "id,label,flagged,score,cluster,split,poison"
    metrics = json.loads((report / "report.json").read_text())["metrics"]
    assert metrics["split"]["poisoned"] == {"n": 12, "n_poison": 12, "poison_share": 1.0, "share_of_all_poison": 0.5}
    two_way = tmp_path / "two"
    write_report(two_way, Detection("x", split == POISONED, scores=scores), dataset, timings_s={})
    plain = split_from_report(dataset, two_way)
    assert (plain == POISONED).sum() == 12 and (plain == CLEAN).sum() == 228
    # The 25% surest: the lowest-scored unflagged samples (scores rise with the position here).
    surest = split_from_report(dataset, two_way, clean_fraction=0.25)
    assert np.array_equal(np.flatnonzero(surest == CLEAN), np.arange(12, 72))
    with pytest.raises(InputError, match="clean_fraction must be in"):
        split_from_report(dataset, two_way, clean_fraction=1.5)


def test_cli_d_st_trains_from_scratch_from_an_fct_report_without_a_suspect_model(tiny, tmp_path, capsys):
    from backdoor_engine.cli import main

    dataset, _, _ = tiny
    data = tmp_path / "set.npz"
    np.savez(data, x=dataset.x, y=dataset.y, poison=dataset.poison)
    report = _fct_like_report(tmp_path / "fct", dataset, _split(), np.linspace(0, 1, 240))
    out = tmp_path / "dst.pt"
    args = ["purify", "--strategy", "d-st", "--data", str(data), "--report", str(report), "--out", str(out)]
    assert main(args) != 0
    assert "name the architecture with --arch" in capsys.readouterr().err
    assert main([*args, "--arch", "small_resnet", "--param", "encoder_epochs=1", "--param", "classifier_epochs=1",
                 "--param", "encoder_batch_size=64", "--param", "classifier_batch_size=64",
                 "--param", "warmup_epochs=0", "--param", "classifier_lr=0.1"]) == 0
    _, meta = load_checkpoint(out)
    record = meta["purify"]
    assert meta["arch"] == "small_resnet" and record["model"] is None and record["strategy"] == "d-st"
    assert record["config"]["split"] == {"clean": 60, "uncertain": 168, "poisoned": 12}
    assert [h["stage"] for h in record["history"]] == ["encoder", "classifier"]
    assert record["param_provenance"]["encoder_lr"].startswith("official code")


def test_cli_d_br_after_any_detectors_report_can_keep_only_the_surest_fraction_as_clean(tiny, tmp_path, capsys):
    from backdoor_engine.cli import main

    dataset, model, normalisation = tiny
    data = tmp_path / "set.npz"
    np.savez(data, x=dataset.x, y=dataset.y)
    suspect = tmp_path / "suspect.pt"
    save_checkpoint(suspect, model, arch="small_resnet", num_classes=3, in_channels=1, input_size=[16, 16],
                    normalisation=normalisation)
    two_way = tmp_path / "scan"
    write_report(two_way, Detection("x", _split() == POISONED, scores=np.linspace(0, 1, 240)), Dataset(dataset.x,
                 dataset.y), timings_s={})
    out = tmp_path / "dbr.pt"
    assert main(["purify", "--strategy", "d-br", "--model", str(suspect), "--data", str(data), "--report",
                 str(two_way), "--clean-fraction", "0.5", "--epochs", "1", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["epoch_returned"] == 1 and 0 <= printed["holdout_flagged_acc"] <= 1
    record = load_checkpoint(out)[1]["purify"]
    assert record["config"]["split"] == {"clean": 120, "uncertain": 108, "poisoned": 12}
    assert record["clean_fraction"] == 0.5 and record["n_removed_or_unlearned"] == 12
    capsys.readouterr()
    assert main(["purify", "--strategy", "d-br", "--model", str(suspect), "--data", str(data), "--clean-fraction",
                 "0.5", "--out", str(tmp_path / "x.pt")]) != 0
    assert "give --report" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


def test_the_unlearning_pass_keeps_batchnorm_statistics_frozen_unless_asked_otherwise(tiny):
    import copy

    from backdoor_engine.models.train import TrainConfig, train_epoch

    dataset, model, normalisation = tiny
    config = TrainConfig(epochs=1, batch_size=32, lr=1e-3, augment=False, progress=False)
    labels = torch.from_numpy(dataset.y.astype(np.int64))

    def bn_means(m):
        return [b.running_mean.clone() for b in m.modules() if isinstance(b, torch.nn.BatchNorm2d)]

    for frozen in (True, False):
        copy_ = copy.deepcopy(model)
        before = bn_means(copy_)
        optimizer = torch.optim.SGD(copy_.parameters(), lr=1e-3)
        train_epoch(copy_, dataset.x[:64], labels[:64], optimizer=optimizer,
                    scheduler=torch.optim.lr_scheduler.ConstantLR(optimizer, 1.0, 0), normalisation=normalisation,
                    config=config, generator=torch.Generator().manual_seed(0), ascend=True, frozen_batchnorm=frozen)
        same = all(torch.equal(a, b) for a, b in zip(before, bn_means(copy_)))
        assert same is frozen
        assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), copy_.state_dict().values()))


_DST_TINY = dict(encoder_epochs=1, classifier_epochs=1, encoder_batch_size=64, classifier_batch_size=64,
                 warmup_epochs=0, classifier_lr=0.1)


def test_d_st_keeps_its_stage_1_encoder_and_reruns_stage_2_alone_from_it(tiny, tmp_path):
    from backdoor_engine import api

    dataset, _, _ = tiny
    kept = tmp_path / "encoder.pt"
    first = api.purify(None, None, dataset, _split(), strategy="d-st", arch="small_resnet", progress=False,
                       encoder_path=str(kept), **_DST_TINY)
    assert kept.exists() and first.history[0]["stage"] == "encoder" and "loss" in first.history[0]
    again = api.purify(None, None, dataset, _split(), strategy="d-st", arch="small_resnet", progress=False,
                       encoder_path=str(kept), **_DST_TINY)
    assert again.history[0] == {"stage": "encoder", "loaded_from": str(kept)}
    first_state, again_state = first.model.state_dict(), again.model.state_dict()
    assert all(torch.equal(first_state[k], again_state[k]) for k in first_state)  # same encoder, same stage 2
    # Stage 2's settings may change: the encoder is the same, the new head differs.
    other = api.purify(None, None, dataset, _split(), strategy="d-st", arch="small_resnet", progress=False,
                       encoder_path=str(kept), **{**_DST_TINY, "classifier_lr": 0.5})
    other_state = other.model.state_dict()
    assert all(torch.equal(first_state[k], other_state[k]) for k in first_state if not k.startswith("head."))
    assert not torch.equal(first_state["head.weight"], other_state["head.weight"])


def test_d_st_refuses_a_kept_encoder_trained_on_other_data_split_or_stage_1_settings(tiny, tmp_path):
    from backdoor_engine import api

    dataset, _, _ = tiny
    kept = tmp_path / "encoder.pt"
    api.purify(None, None, dataset, _split(), strategy="d-st", arch="small_resnet", progress=False,
               encoder_path=str(kept), **_DST_TINY)
    before = kept.read_bytes()
    with pytest.raises(InputError, match=r"trained on other inputs or settings \(encoder_lr differ\)"):
        api.purify(None, None, dataset, _split(), strategy="d-st", arch="small_resnet", progress=False,
                   encoder_path=str(kept), **{**_DST_TINY, "encoder_lr": 0.1})
    moved = _split().copy()
    moved[[0, 100]] = moved[[100, 0]]
    with pytest.raises(InputError, match=r"\(split differ\)"):
        api.purify(None, None, dataset, moved, strategy="d-st", arch="small_resnet", progress=False,
                   encoder_path=str(kept), **_DST_TINY)
    assert kept.read_bytes() == before  # a refusal leaves the kept encoder as it was


def test_d_st_refuses_an_encoder_file_it_cannot_read_and_a_place_it_cannot_write(tiny, tmp_path):
    from backdoor_engine import api

    dataset, _, _ = tiny
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(InputError, match="is not a D-ST encoder file"):
        api.purify(None, None, dataset, _split(), strategy="d-st", arch="small_resnet", progress=False,
                   encoder_path=str(junk), **_DST_TINY)
    with pytest.raises(InputError, match="directory .* does not exist"):
        api.purify(None, None, dataset, _split(), strategy="d-st", arch="small_resnet", progress=False,
                   encoder_path=str(tmp_path / "missing" / "encoder.pt"), **_DST_TINY)
