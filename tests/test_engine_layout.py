"""FeatureLayout: per-layer reduction equals the official FLARE feature; subspaces are column slices."""

import numpy as np
import pytest
import torch
from torch import nn

from backdoor_engine.engine import ActivationProbes, FeatureLayout
from backdoor_engine.errors import InputError
from backdoor_engine.models import build_model


def official_per_layer_feature(model, x):
    """The official code's way: per BN, min over C*H*W of the Normal log-density of its input ([N, L])."""
    columns = []

    def hook(module, args):
        normal = torch.distributions.Normal(module.running_mean[:, None, None],
                                            (module.running_var + module.eps).sqrt()[:, None, None])
        columns.append(normal.log_prob(args[0]).flatten(1).amin(dim=1))

    norms = [module for module in model.modules() if isinstance(module, nn.BatchNorm2d)]
    handles = [norm.register_forward_pre_hook(hook) for norm in norms]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return torch.stack(columns, dim=1)


def test_slices_follow_the_channel_counts_in_order():
    layout = FeatureLayout(("a", "b", "c"), (2, 3, 1))
    assert layout.num_layers == 3 and layout.num_columns == 6
    assert layout.layer_slices == (slice(0, 2), slice(2, 5), slice(5, 6))


def test_per_layer_equals_the_official_feature_computed_the_reference_way():
    torch.manual_seed(0)
    model = build_model("small_resnet", num_classes=3, in_channels=1, input_size=8).eval()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.5)
            module.running_var.uniform_(0.3, 3.0)
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), ActivationProbes(model) as probes:
        model(x)
        minima = probes.collect()["bn_minima"]
    official = official_per_layer_feature(model, x)
    assert official.shape == (6, probes.layout.num_layers)
    from_tensor = probes.layout.per_layer(minima)
    from_numpy = probes.layout.per_layer(minima.numpy())
    assert torch.allclose(from_tensor, official, rtol=1e-5)
    assert isinstance(from_numpy, np.ndarray) and np.array_equal(from_numpy, from_tensor.numpy())


def test_drop_last_layers_keeps_the_first_layers_columns_as_a_view():
    layout = FeatureLayout(("a", "b", "c"), (2, 3, 1))
    features = np.arange(12, dtype=np.float32).reshape(2, 6)
    assert layout.drop_last_layers(features, 0).shape == (2, 6)
    kept = layout.drop_last_layers(features, 2)
    assert np.array_equal(kept, features[:, :2]) and np.shares_memory(kept, features)
    assert torch.equal(layout.drop_last_layers(torch.from_numpy(features), 1), torch.from_numpy(features[:, :5]))
    for count in (3, -1, 1.0):
        with pytest.raises(InputError, match=r"count must be an integer in \[0, 2\]"):
            layout.drop_last_layers(features, count)


def test_features_of_another_width_are_refused():
    layout = FeatureLayout(("a", "b"), (2, 3))
    with pytest.raises(InputError, match="5 columns, got \\(4, 4\\)"):
        layout.per_layer(np.zeros((4, 4), np.float32))
    with pytest.raises(InputError, match="5 columns"):
        layout.drop_last_layers(np.zeros(5, np.float32), 0)


def test_round_trips_through_a_dict_and_rejects_bad_layouts():
    layout = FeatureLayout(("bn1", "layer1.0.bn1"), (16, 16))
    assert FeatureLayout.from_dict(layout.to_dict()) == layout
    with pytest.raises(InputError, match="keys layer_names and layer_channels"):
        FeatureLayout.from_dict({"layer_names": ["a"]})
    with pytest.raises(InputError, match="one channel count per layer"):
        FeatureLayout(("a", "b"), (1,))
    with pytest.raises(InputError, match="distinct strings"):
        FeatureLayout(("a", "a"), (1, 1))
    with pytest.raises(InputError, match="integers >= 1"):
        FeatureLayout(("a",), (0,))
