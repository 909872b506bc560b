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
    """Three classes told apart by brightness, so a 2-epoch model learns them."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, count).astype(np.int64)
    x = (y[:, None, None, None] * 90 + rng.integers(0, 40, (count, 12, 12, 1))).astype(np.uint8)
    return make_dataset(x, y)


def mean_loss(model, normalisation, x, y):
    with torch.no_grad():
        logits = model(to_model_input(torch.from_numpy(x), normalisation))
        return float(nn.functional.cross_entropy(logits, torch.from_numpy(y)))


def config(**overrides):
    return {"batch_size": 32, "progress": False, "augment": False, **overrides}


@pytest.fixture(scope="module")
def trained():
    data = separable_set()
    result = train_model(data.x, data.y, arch="small_resnet", num_classes=3, config=TrainConfig(epochs=2, **config()))
    return data, result


def test_retrain_uses_only_the_kept_samples():
    data = separable_set()
    flags = data.y == 2
    result = retrain_on_kept(data, flags, arch="small_resnet", config=TrainConfig(epochs=1, **config()))
    expected = fit_normalisation(data.x[~flags])
    assert np.allclose(result.normalisation.mean, expected.mean)
    assert not np.allclose(result.normalisation.mean, fit_normalisation(data.x).mean)
    assert result.model.head.out_features == 3  # the class count of the whole set, even if one class is gone


def test_unlearn_raises_the_loss_on_flagged_keeps_kept_and_leaves_the_input_alone(trained):
    data, result = trained
    before = {k: v.clone() for k, v in result.model.state_dict().items()}
    flags = np.zeros(len(data), bool)
    flags[data.y == 1] = True
    flagged_loss = mean_loss(result.model, result.normalisation, data.x[flags], data.y[flags])
    repaired, history = unlearn_relearn(result.model, result.normalisation, data, flags,
                                        unlearn_relearn_config(epochs=3, lr=0.01, **config()))
    for name, value in result.model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert len(history) == 3 and {"unlearn_loss", "relearn_loss"} <= history[0].keys()
    assert mean_loss(repaired, result.normalisation, data.x[flags], data.y[flags]) > flagged_loss + 0.5
    kept_acc = (repaired(to_model_input(torch.from_numpy(data.x[~flags]), result.normalisation)).argmax(1).numpy()
                == data.y[~flags]).mean()
    assert kept_acc > 0.9
    assert not repaired.training


def test_bad_flags_are_refused(trained):
    data, result = trained
    with pytest.raises(InputError, match="one per sample"):
        unlearn_relearn(result.model, result.normalisation, data, np.zeros(5, bool))
    with pytest.raises(InputError, match="at least 2 flagged"):
        unlearn_relearn(result.model, result.normalisation, data, np.zeros(len(data), bool))
    with pytest.raises(InputError, match="nothing to train on"):
        retrain_on_kept(data, np.ones(len(data), bool), arch="small_resnet", config=TrainConfig(**config()))
