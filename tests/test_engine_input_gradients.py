"""Batched margin gradients equal the one-sample-at-a-time reference."""

import pytest
import torch

from backdoor_engine.engine.input_gradients import class_margin, margin_gradients, margin_gradients_per_sample
from backdoor_engine.errors import InputError
from backdoor_engine.models.simple_cnn import poison_model


def _model(arch="10-10P", channels=3, size=(13, 11)):
    torch.manual_seed(0)
    model = poison_model(arch, in_channels=channels, input_size=size, num_classes=7)
    with torch.no_grad():  # non-trivial BN statistics
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
    return model.eval()


def test_class_margin():
    logits = torch.tensor([[1.0, 3.0, 2.0], [5.0, -1.0, 4.5]])
    torch.testing.assert_close(class_margin(logits, torch.tensor([1, 2])), torch.tensor([1.0, -0.5]))


@pytest.mark.parametrize("arch,channels,size", [("10-10P", 3, (13, 11)), ("64P", 1, (28, 28)), ("16-16P", 3, (9, 9))])
def test_batched_equals_per_sample(arch, channels, size):
    model = _model(arch, channels, size)
    x = torch.randn(9, channels, *size)
    classes = torch.randint(0, 7, (9,))
    for chosen in (classes, 3):
        torch.testing.assert_close(margin_gradients(model, x, chosen), margin_gradients_per_sample(model, x, chosen))
    assert all(p.grad is None for p in model.parameters())


def test_channels_last_inputs_give_the_same_gradients():
    model = _model().to(memory_format=torch.channels_last)
    x = torch.randn(5, 3, 13, 11)
    torch.testing.assert_close(margin_gradients(model, x.contiguous(memory_format=torch.channels_last), 2),
                               margin_gradients_per_sample(model, x, 2))


def test_train_mode_is_refused():
    model = _model().train()
    with pytest.raises(InputError, match="eval mode"):
        margin_gradients(model, torch.randn(2, 3, 13, 11), 0)
