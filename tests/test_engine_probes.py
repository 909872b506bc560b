"""Probes: outputs untouched, BN minima equal to the reference on the real BN inputs, clean hook removal."""

import pytest
import torch
from torch import nn

from backdoor_engine.engine import ActivationProbes
from backdoor_engine.errors import InputError
from backdoor_engine.kernels import bn_minima_reference
from backdoor_engine.models import build_model

ALL_CAPTURES = ("bn_minima", "penultimate", "logits")


def model_with_running_statistics(seed=0):
    """small_resnet whose BNs hold non-trivial running statistics (and one a non-default eps)."""
    torch.manual_seed(seed)
    model = build_model("small_resnet", num_classes=4, in_channels=3, input_size=8).eval()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.5)
            module.running_var.uniform_(0.3, 3.0)
    model.layer2[0].bn1.eps = 0.1  # far from 1e-5: the probes must use the module's own eps
    return model


def images(n=5, seed=1):
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def bn_inputs_of_plain_forward(model, x):
    """{BN name: its input}, recorded by plain saving hooks, in named_modules order."""
    saved, handles = {}, []
    for name, module in model.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            handles.append(module.register_forward_pre_hook(
                lambda module, args, name=name: saved.__setitem__(name, args[0].clone())))
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return saved


def hook_counts(model):
    return sum(len(module._forward_pre_hooks) + len(module._forward_hooks) for module in model.modules())


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
def test_model_outputs_are_bit_identical_with_probes(memory_format):
    model = model_with_running_statistics()
    x = images().contiguous(memory_format=memory_format)
    with torch.no_grad():
        plain = model(x)
        with ActivationProbes(model, capture=ALL_CAPTURES):
            probed = model(x)
    assert torch.equal(plain, probed)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_minima_equal_the_reference_on_the_inputs_a_plain_forward_feeds_each_bn(backend):
    model = model_with_running_statistics()
    x = images()
    inputs = bn_inputs_of_plain_forward(model, x)
    with torch.no_grad(), ActivationProbes(model, backend=backend) as probes:
        model(x)
        minima = probes.collect()["bn_minima"]
    norms = dict(model.named_modules())
    assert probes.layout.layer_names == tuple(inputs)
    assert minima.dtype == torch.float32 and minima.shape == (5, probes.layout.num_columns)
    for name, columns in zip(probes.layout.layer_names, probes.layout.layer_slices):
        norm = norms[name]
        expected = bn_minima_reference(inputs[name], norm.running_mean, norm.running_var, norm.eps)
        assert torch.allclose(minima[:, columns].double(), expected, rtol=1e-5, atol=1e-6), name
    eps_layer = probes.layout.layer_names.index("layer2.0.bn1")
    norm = norms["layer2.0.bn1"]
    default_eps = bn_minima_reference(inputs["layer2.0.bn1"], norm.running_mean, norm.running_var, 1e-5)
    assert not torch.allclose(minima[:, probes.layout.layer_slices[eps_layer]].double(), default_eps, rtol=1e-3)


def test_penultimate_and_logits_equal_the_models_own_methods():
    model = model_with_running_statistics()
    x = images()
    with torch.no_grad():
        with ActivationProbes(model, capture=("penultimate", "logits")) as probes:
            model(x)
            captured = probes.collect()
        assert set(captured) == {"penultimate", "logits"}
        assert torch.equal(captured["penultimate"], model.penultimate(x))
        assert torch.equal(captured["logits"], model(x))


def test_collect_resets_so_each_batch_is_its_own():
    model = model_with_running_statistics()
    with torch.no_grad(), ActivationProbes(model, capture=ALL_CAPTURES) as probes:
        model(images(4, seed=1))
        first = probes.collect()
        model(images(2, seed=2))
        second = probes.collect()
        with pytest.raises(InputError, match="did not run"):
            probes.collect()
    assert [values.shape[0] for values in first.values()] == [4, 4, 4]
    assert [values.shape[0] for values in second.values()] == [2, 2, 2]


def test_hooks_are_removed_on_exit_and_after_an_error():
    model = model_with_running_statistics()
    before = hook_counts(model)
    with ActivationProbes(model, capture=ALL_CAPTURES) as probes:
        assert probes.layout.num_layers == 21  # stem + 9 blocks x 2 + 2 projection shortcuts
        assert hook_counts(model) == before + 22  # one per BN, one on the head
    assert hook_counts(model) == before
    with pytest.raises(RuntimeError, match="boom"), ActivationProbes(model, capture=ALL_CAPTURES):
        raise RuntimeError("boom")
    assert hook_counts(model) == before


def test_nan_activation_is_reported_with_the_first_layer_it_reaches():
    model = model_with_running_statistics()
    with torch.no_grad():
        model.layer2[0].conv1.weight[0, 0, 0, 0] = float("nan")
    before = hook_counts(model)
    with pytest.raises(InputError, match="BatchNorm2d 'layer2.0.bn1'.*NaN or infinite"), torch.no_grad():
        with ActivationProbes(model) as probes:
            model(images())
            probes.collect()  # checked once per batch, for all layers
    assert hook_counts(model) == before


def test_a_model_without_batchnorm2d_is_refused_for_flare_but_fine_for_logits():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    with pytest.raises(InputError, match="FLARE needs BatchNorm2d layers.*Sequential has none"):
        ActivationProbes(model)
    with torch.no_grad(), ActivationProbes(model, capture=("logits",), head="3") as probes:
        out = model(images())
        assert torch.equal(probes.collect()["logits"], out)
    assert probes.layout is None


def test_unknown_head_names_the_linear_modules():
    model = model_with_running_statistics()
    with pytest.raises(InputError, match=r"head 'fc' is not a submodule.*\['head'\]"):
        ActivationProbes(model, capture=("logits",), head="fc")


def test_a_batchnorm_that_runs_twice_or_never_is_refused():
    class SharedNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.norm = nn.BatchNorm2d(3)
            self.unused = nn.BatchNorm2d(3)

        def forward(self, x, twice):
            x = self.norm(self.conv(x))
            return self.norm(x) if twice else x

    model = SharedNorm().eval()
    with torch.no_grad(), ActivationProbes(model) as probes:
        with pytest.raises(InputError, match="'norm' ran twice"):
            model(images(), twice=True)
    with torch.no_grad(), ActivationProbes(model) as probes:
        model(images(), twice=False)
        with pytest.raises(InputError, match=r"\['unused'\] did not run"):
            probes.collect()


def test_batchnorm_without_running_statistics_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3, track_running_stats=False))
    with pytest.raises(InputError, match="'1' keeps no running statistics"):
        ActivationProbes(model)


@pytest.mark.parametrize("capture", [(), ("bn_minima", "bn_minima"), ("gradients",)])
def test_capture_names_are_checked(capture):
    with pytest.raises(InputError, match="capture must name"):
        ActivationProbes(model_with_running_statistics(), capture=capture)


def test_collect_outside_the_context_is_refused():
    probes = ActivationProbes(model_with_running_statistics())
    with pytest.raises(InputError, match="context manager"):
        probes.collect()
