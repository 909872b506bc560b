import numpy as np
import pytest
import torch
from torch import nn

from backdoor_engine.data import make_dataset
from backdoor_engine.errors import InputError
from backdoor_engine.models import TrainConfig, fit_normalisation, train_model
from backdoor_engine.models.preprocess import to_model_input
from backdoor_engine.purify import retrain_on_kept, unlearn_relearn, unlearn_relearn_config


def separable_set(count=192, seed=0):
    """Three classes told apart by where a bright band lies, so a few-epoch model learns them. (A band, not the
    overall brightness: BatchNorm's running statistics shift under unlearning, and a class told by brightness alone
    then reads as another in eval mode.)"""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, count).astype(np.int64)
    x = rng.integers(0, 40, (count, 12, 12, 1))
    for k in range(3):
        x[y == k, 4 * k:4 * k + 4] += 150
    return make_dataset(x.astype(np.uint8), y)


def mean_loss(model, normalisation, x, y):
    with torch.no_grad():
        logits = model(to_model_input(torch.from_numpy(x), normalisation))
        return float(nn.functional.cross_entropy(logits, torch.from_numpy(y)))


def config(**overrides):
    return {"batch_size": 32, "progress": False, "augment": False, **overrides}


@pytest.fixture(scope="module")
def trained():
    data = separable_set()
    result = train_model(data.x, data.y, arch="small_resnet", num_classes=3, config=TrainConfig(epochs=4, **config()))
    return data, result


def test_retrain_uses_only_the_kept_samples():
    data = separable_set()
    flags = data.y == 2
    result = retrain_on_kept(data, flags, arch="small_resnet", config=TrainConfig(epochs=1, **config()))
    expected = fit_normalisation(data.x[~flags])
    assert np.allclose(result.normalisation.mean, expected.mean)
    assert not np.allclose(result.normalisation.mean, fit_normalisation(data.x).mean)
    assert result.model.head.out_features == 3  # the class count of the whole set, even if one class is gone


@pytest.mark.parametrize("settings", [{"unlearn_loss": "margin", "unlearn_frozen_bn": True},
                                      {"unlearn_loss": "ce", "unlearn_frozen_bn": False}], ids=["ours", "official"])
def test_unlearning_makes_the_flagged_wrong_keeps_the_kept_and_leaves_the_input_alone(trained, settings):
    data, result = trained
    before = {k: v.clone() for k, v in result.model.state_dict().items()}
    flags = np.zeros(len(data), bool)
    flags[data.y == 1] = True

    def acc(model, rows):
        logits = model(to_model_input(torch.from_numpy(data.x[rows]), result.normalisation))
        return (logits.argmax(1).numpy() == data.y[rows]).mean()

    assert acc(result.model.eval(), flags) > 0.9 and acc(result.model.eval(), ~flags) > 0.9
    flagged_loss = mean_loss(result.model, result.normalisation, data.x[flags], data.y[flags])
    # On this toy set one whole class is flagged: the first unlearning epochs also shake the kept classes and the
    # relearning passes bring them back, so the last epoch is read after 8 (at 3 it depended on the CPU).
    repaired, history = unlearn_relearn(result.model, result.normalisation, data, flags,
                                        unlearn_relearn_config(epochs=8, lr=0.01, **config()), select="last",
                                        **settings)
    for name, value in result.model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert len(history) == 8 and {"unlearn_loss", "relearn_loss", "flagged_acc"} <= history[0].keys()
    assert mean_loss(repaired, result.normalisation, data.x[flags], data.y[flags]) > flagged_loss + 0.5
    assert acc(repaired, flags) < 0.1 and history[-1]["flagged_acc"] == acc(repaired, flags)
    if settings["unlearn_loss"] == "margin":
        # Ours keeps the kept classes; the official loss (ascending the cross-entropy, BatchNorm statistics moving)
        # left them at 41% on some CPUs and epoch counts of this toy set (RESULTS.md, session 32).
        assert acc(repaired, ~flags) > 0.9
    assert not repaired.training


def test_the_held_out_rule_returns_the_epoch_its_held_out_parts_score_best_and_never_trains_on_them(trained,
                                                                                                  monkeypatch):
    import importlib

    module = importlib.import_module("backdoor_engine.purify.unlearn_relearn")
    data, result = trained
    flags = data.y == 1
    trained_on = []
    original = module.train_epoch
    monkeypatch.setattr(module, "train_epoch", lambda m, x, y, **kw: trained_on.append(x) or original(m, x, y, **kw))
    # lr 0.05 overshoots: the unlearning wrecks clean accuracy in some epochs and relearning repairs it in others
    states = {}
    repaired, history = unlearn_relearn(result.model, result.normalisation, data, flags,
                                        unlearn_relearn_config(epochs=4, lr=0.05, **config()),
                                        callback=lambda epoch, model: states.update(
                                            {epoch: {k: v.clone() for k, v in model.state_dict().items()}}))
    flagged, kept = np.flatnonzero(flags), np.flatnonzero(~flags)
    held_flagged, held_kept = held_out_rows(flagged, kept, seed=0, holdout=0.2, holdout_clean=0.1)
    assert len(held_flagged) == int(len(flagged) * 0.2) and len(held_kept) == int(len(kept) * 0.1)
    seen = {bytes(image) for batch in trained_on for image in batch}
    assert not seen & {bytes(image) for image in data.x[np.r_[held_flagged, held_kept]]}
    scores = [h["holdout_clean_acc"] - h["holdout_flagged_acc"] for h in history]
    assert [h["holdout_score"] for h in history] == scores
    returned = [h["epoch"] for h in history if h["returned"]]
    assert returned == [int(np.argmax(scores)) + 1]
    chosen = history[returned[0] - 1]
    assert all(torch.equal(value, states[returned[0]][name]) for name, value in repaired.state_dict().items())
    assert returned[0] != 4  # ties go to the earliest epoch here, so the saved state is what came back

    def acc(rows):
        logits = repaired(to_model_input(torch.from_numpy(data.x[rows]), result.normalisation))
        return float((logits.argmax(1).numpy() == data.y[rows]).mean())

    with torch.no_grad():
        assert acc(held_flagged) == chosen["holdout_flagged_acc"] and acc(held_kept) == chosen["holdout_clean_acc"]


def held_out_rows(flagged, kept, *, seed, holdout, holdout_clean):
    """The rows unlearn_relearn holds out, drawn again the documented way: one generator seeded with the run's seed,
    the flagged part's draw first."""
    from backdoor_engine.purify.unlearn_relearn import held_out

    rng = np.random.default_rng(seed)
    return held_out(flagged, holdout, rng)[1], held_out(kept, holdout_clean, rng)[1]


def test_the_held_out_rule_refuses_a_split_too_small_to_hold_anything_out(trained):
    data, result = trained
    flags = np.zeros(len(data), bool)
    flags[:4] = True
    with pytest.raises(InputError, match="at least one of each"):
        unlearn_relearn(result.model, result.normalisation, data, flags, unlearn_relearn_config(epochs=1, **config()))
    with pytest.raises(InputError, match="holdout must lie strictly between 0 and 1"):
        unlearn_relearn(result.model, result.normalisation, data, flags, unlearn_relearn_config(epochs=1, **config()),
                        holdout=1.0)
    with pytest.raises(InputError, match="select must be one of"):
        unlearn_relearn(result.model, result.normalisation, data, flags, unlearn_relearn_config(epochs=1, **config()),
                        select="best")
    _, history = unlearn_relearn(result.model, result.normalisation, data, flags,
                                 unlearn_relearn_config(epochs=1, **config()), select="last")
    assert history[-1]["returned"] and "holdout_score" not in history[-1]


def test_the_margin_loss_is_how_far_each_sample_is_into_its_given_label():
    from backdoor_engine.purify.unlearn_relearn import given_label_margin

    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 5.0]])
    model = lambda inputs: logits  # noqa: E731
    # sample 0: label 0 leads by 2; sample 1: label 1 trails class 2 by 3, already unlearned, so 0
    assert given_label_margin(model, None, torch.tensor([0, 1])).item() == pytest.approx(1.0)
    assert given_label_margin(model, None, torch.tensor([2, 2])).item() == pytest.approx((0 + 3) / 2)


def test_bad_flags_are_refused(trained):
    data, result = trained
    with pytest.raises(InputError, match="one per sample"):
        unlearn_relearn(result.model, result.normalisation, data, np.zeros(5, bool))
    with pytest.raises(InputError, match="at least 2 flagged"):
        unlearn_relearn(result.model, result.normalisation, data, np.zeros(len(data), bool))
    with pytest.raises(InputError, match="nothing to train on"):
        retrain_on_kept(data, np.ones(len(data), bool), arch="small_resnet", config=TrainConfig(**config()))


def test_the_strategies_give_the_same_weights_as_the_trainer_with_the_same_settings(trained):
    """The registry path adds no numeric change: same seed and settings, bit-identical weights."""
    from backdoor_engine.api import purify

    data, result = trained
    flags = data.y == 1
    settings = {"epochs": 1, "seed": 3, "batch_size": 32}
    by_hand = retrain_on_kept(data, flags, arch="small_resnet",
                              config=TrainConfig(**settings, progress=False))
    by_registry = purify(result.model, result.normalisation, data, flags, strategy="retrain", arch="small_resnet",
                         progress=False, **settings)
    for name, value in by_hand.model.state_dict().items():
        assert torch.equal(value, by_registry.model.state_dict()[name]), name
    timeless = [{k: v for k, v in epoch.items() if k != "seconds"} for epoch in by_hand.history]
    assert [{k: v for k, v in epoch.items() if k != "seconds"} for epoch in by_registry.history] == timeless
    assert by_registry.config["arch"] == "small_resnet"
    # D-BR's official settings written out here, independently of the params class: lr 1e-4, constant, momentum
    # 0.9, weight decay 5e-4, crop + flip; only the epochs, batch and seed are shortened for the test.
    d_br = TrainConfig(lr=1e-4, schedule="constant", momentum=0.9, weight_decay=5e-4, augment=True, hflip=True,
                       progress=False, **settings)
    by_hand, history = unlearn_relearn(result.model, result.normalisation, data, flags, d_br)
    by_registry = purify(result.model, result.normalisation, data, flags, strategy="unlearn-relearn",
                         progress=False, **settings)
    for name, value in by_hand.state_dict().items():
        assert torch.equal(value, by_registry.model.state_dict()[name]), name
    assert by_registry.history == history
    assert by_registry.normalisation is result.normalisation
    assert by_registry.config["lr"] == 1e-4 and by_registry.config["schedule"] == "constant"


def test_purify_refuses_inputs_the_strategy_did_not_declare(trained):
    from backdoor_engine.api import purify

    data, result = trained
    flags = data.y == 1
    with pytest.raises(InputError, match="architecture name"):
        purify(result.model, result.normalisation, data, flags, strategy="retrain")
    with pytest.raises(InputError, match="takes no auxiliary clean set"):
        purify(result.model, result.normalisation, data, flags, strategy="unlearn-relearn", aux=data)
    with pytest.raises(InputError, match="scan's flags"):
        purify(result.model, result.normalisation, data, None, strategy="unlearn-relearn")
    with pytest.raises(InputError, match="one per sample"):
        purify(result.model, result.normalisation, data, flags[:5], strategy="unlearn-relearn")
    with pytest.raises(InputError, match=r"unknown parameter\(s\) epoch; known: epochs"):
        purify(result.model, result.normalisation, data, flags, strategy="unlearn-relearn", epoch=2)
