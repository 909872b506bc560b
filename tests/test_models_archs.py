import pytest
import torch
from torch import nn

from backdoor_engine.errors import InputError
from backdoor_engine.models import available_archs, build_model

SHAPES = [(1, 28, 28), (3, 32, 32)]
EXPECTED_ARCHS = {"resnet18", "preact_resnet18", "small_resnet", "vgg16_bn", "mobilenetv2"}


def test_registry_lists_the_reference_architectures():
    assert EXPECTED_ARCHS <= set(available_archs())


@pytest.mark.parametrize("arch", available_archs())
@pytest.mark.parametrize("channels,height,width", SHAPES)
def test_forward_is_head_of_penultimate(arch, channels, height, width):
    torch.manual_seed(0)
    model = build_model(arch, num_classes=7, in_channels=channels, input_size=(height, width)).eval()
    x = torch.randn(3, channels, height, width)
    with torch.no_grad():
        logits = model(x)
        features = model.penultimate(x)
        assert logits.shape == (3, 7)
        assert features.shape == (3, model.feature_dim)
        assert isinstance(model.head, nn.Linear) and model.head.out_features == 7
        torch.testing.assert_close(model.head(features), logits)
    assert any(isinstance(module, nn.BatchNorm2d) for module in model.modules())


@pytest.mark.parametrize("arch", available_archs())
def test_batchnorm_modules_are_listed_in_execution_order(arch):
    # FLARE drops the *last* BN layers in named_modules() order: it must be the order data meets them.
    model = build_model(arch, num_classes=10, in_channels=3, input_size=32).eval()
    listed = [name for name, module in model.named_modules() if isinstance(module, nn.BatchNorm2d)]
    executed = []
    for name, module in model.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            module.register_forward_pre_hook(lambda _module, _inputs, name=name: executed.append(name))
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert executed == listed


@pytest.mark.parametrize("arch", available_archs())
def test_trains_on_the_smallest_accepted_input(arch):
    model = build_model(arch, num_classes=3, in_channels=1, input_size=8)
    loss = model(torch.randn(4, 1, 8, 8)).sum()
    loss.backward()
    assert model.head.weight.grad is not None


def test_small_resnet_is_resnet20_sized():
    model = build_model("small_resnet", num_classes=10, in_channels=3, input_size=32)
    parameters = sum(p.numel() for p in model.parameters())
    assert 0.26e6 < parameters < 0.28e6
    assert model.feature_dim == 64


def test_unknown_arch_lists_available_names():
    with pytest.raises(InputError, match="unknown arch 'resnet999'.*small_resnet"):
        build_model("resnet999", num_classes=10, in_channels=3, input_size=32)


@pytest.mark.parametrize("kwargs,field", [
    ({"num_classes": 1, "in_channels": 3, "input_size": 32}, "num_classes"),
    ({"num_classes": 10, "in_channels": 2, "input_size": 32}, "in_channels"),
    ({"num_classes": 10, "in_channels": 3, "input_size": 4}, "input_size"),
    ({"num_classes": 10, "in_channels": 3, "input_size": (32, 32, 3)}, "input_size"),
])
def test_bad_build_arguments_name_the_field(kwargs, field):
    with pytest.raises(InputError, match=field):
        build_model("small_resnet", **kwargs)
