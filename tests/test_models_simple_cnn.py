"""VBD's simple models: the official shapes, and pooling before the ReLU changes nothing."""

import pytest
import torch
from torch import nn

from backdoor_engine.errors import InputError
from backdoor_engine.models.simple_cnn import parse_arch, pattern_detector, poison_model


def test_parse_arch():
    assert parse_arch("10-10P") == [(10, False), (10, True)]
    assert parse_arch("64P") == [(64, True)]
    for bad in ("", "P", "10--10", "0P", "10Q", "x"):
        with pytest.raises(InputError, match="simple model arch"):
            parse_arch(bad)


@pytest.mark.parametrize("arch,fc_inputs", [("64P", 14400), ("10-10P", 1960), ("16-16P", 3136)])
def test_official_fc_sizes_on_cifar(arch, fc_inputs):
    model = poison_model(arch, in_channels=3, input_size=(32, 32), num_classes=10)
    assert model.classifier.in_features == fc_inputs
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.padding == (0, 0) and c.bias is None for c in convs)


def test_pool_before_relu_equals_relu_before_pool():
    torch.manual_seed(0)
    model = poison_model("16-16P", in_channels=1, input_size=(28, 28), num_classes=10).eval()
    x = torch.randn(4, 1, 28, 28, requires_grad=True)
    conv1, bn1, relu1, conv2, bn2, pool, relu2 = model.features
    assert isinstance(pool, nn.MaxPool2d) and isinstance(relu2, nn.ReLU)
    reference = nn.Sequential(conv1, bn1, nn.ReLU(), conv2, bn2, nn.ReLU(), pool)
    ours = model.features(x)
    theirs = reference(x)
    torch.testing.assert_close(ours, theirs)
    (g_ours,) = torch.autograd.grad(ours.sum(), x)
    (g_theirs,) = torch.autograd.grad(theirs.sum(), x)
    torch.testing.assert_close(g_ours, g_theirs)


def test_detector_has_no_batchnorm_and_dropout():
    detector = pattern_detector(in_channels=1, input_size=(28, 28))
    kinds = [type(m) for m in detector.features]
    assert nn.BatchNorm2d not in kinds and nn.Dropout in kinds
    assert detector(torch.randn(3, 1, 28, 28)).shape == (3, 1)


def test_too_small_an_image_is_refused():
    with pytest.raises(InputError, match="shrinks"):
        poison_model("16-16-16-16P", in_channels=1, input_size=(8, 8), num_classes=2)


def test_folded_batchnorm_gives_the_same_outputs_and_input_gradients():
    from backdoor_engine.engine.input_gradients import margin_gradients

    torch.manual_seed(1)
    model = poison_model("10-10P", in_channels=3, input_size=(14, 12), num_classes=5)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.2, 3)
                module.weight.uniform_(-2, 2)  # negative scales too
                module.bias.uniform_(-1, 1)
    model.eval()
    folded = model.folded()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert all(p.requires_grad for p in model.parameters())  # the original is untouched
    x = torch.randn(6, 3, 14, 12)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(margin_gradients(folded, x, 2), margin_gradients(model, x, 2), rtol=1e-4, atol=1e-6)
