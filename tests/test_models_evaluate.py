import numpy as np
import pytest
import torch
from torch import nn

from backdoor_engine.errors import InputError
from backdoor_engine.models import accuracy, attack_success_rate, build_model, predict, to_model_input
from backdoor_engine.models.preprocess import Normalisation

NORM = Normalisation((0.5,), (0.25,))


def test_predict_is_the_eval_mode_argmax_over_batches():
    torch.manual_seed(0)
    model = build_model("small_resnet", num_classes=5, in_channels=1, input_size=12)
    model.train()
    x = np.random.default_rng(0).integers(0, 256, (11, 12, 12, 1), dtype=np.uint8)
    pred = predict(model, x, NORM, batch_size=4)
    assert model.training, "predict must restore the caller's train mode"
    model.eval()
    with torch.no_grad():
        expected = model(to_model_input(x, NORM)).argmax(1).numpy()
    assert pred.dtype == np.int64
    np.testing.assert_array_equal(pred, expected)


def test_predict_leaves_batchnorm_statistics_untouched():
    model = build_model("small_resnet", num_classes=5, in_channels=1, input_size=12)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    predict(model, np.full((6, 12, 12, 1), 200, dtype=np.uint8), NORM)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_accuracy():
    assert accuracy(np.array([1, 2, 3, 4]), np.array([1, 2, 0, 4])) == 0.75


def test_attack_success_rate_targeted_and_untargeted():
    pred = np.array([0, 0, 3, 1])
    y_attack = np.array([0, 0, 0, 2])
    y_true = np.array([1, 0, 3, 2])
    assert attack_success_rate(pred, y_attack, y_true, "a2o") == 0.5
    assert attack_success_rate(pred, y_attack, y_true, "a2a") == 0.5
    assert attack_success_rate(pred, None, y_true, "ut") == 0.5


@pytest.mark.parametrize("call,message", [
    (lambda: accuracy(np.array([1, 2]), np.array([1])), "one length"),
    (lambda: accuracy(np.array([]), np.array([])), "empty"),
    (lambda: attack_success_rate(np.array([1]), np.array([1]), np.array([1]), "badnets"), "mode"),
    (lambda: attack_success_rate(np.array([1]), None, np.array([1]), "a2o"), "y_attack"),
    (lambda: attack_success_rate(np.array([1]), np.array([1]), None, "ut"), "y_true"),
])
def test_metric_errors(call, message):
    with pytest.raises(InputError, match=message):
        call()


def test_predict_rejects_float_images():
    with pytest.raises(InputError, match="uint8"):
        predict(nn.Linear(1, 1), np.zeros((1, 8, 8, 1), dtype=np.float32), NORM)
