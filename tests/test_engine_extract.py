"""extract_features: one deterministic pass whose rows are the probes' values on the model's input."""

import numpy as np
import pytest
import torch
from torch import nn

from backdoor_engine.data import Dataset
from backdoor_engine.engine import ActivationProbes, extract_features
from backdoor_engine.errors import InputError
from backdoor_engine.models import Normalisation, build_model, to_model_input

ALL_CAPTURES = ("bn_minima", "penultimate", "logits")
NORMALISATION = Normalisation((0.4,), (0.3,))


def tiny_model(seed=0):
    torch.manual_seed(seed)
    model = build_model("small_resnet", num_classes=3, in_channels=1, input_size=8)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.5)
            module.running_var.uniform_(0.3, 3.0)
    return model


def tiny_dataset(n=37, seed=0, string_ids=False):
    rng = np.random.default_rng(seed)
    ids = np.array([f"img-{i:03d}" for i in range(n)]) if string_ids else rng.permutation(1000)[:n]
    return Dataset(rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8), rng.integers(0, 3, n), ids)


def test_rows_are_the_probes_values_on_the_normalised_images_in_dataset_order():
    model, dataset = tiny_model(), tiny_dataset()
    features = extract_features(model, dataset, NORMALISATION, batch_size=8, chunk_size=16, capture=ALL_CAPTURES,
                                channels_last=False, progress=False)
    assert np.array_equal(features.ids, dataset.ids) and np.array_equal(features.y, dataset.y)
    expected = {name: [] for name in ALL_CAPTURES}
    with torch.no_grad(), ActivationProbes(model.eval(), capture=ALL_CAPTURES) as probes:
        for start, stop in [(0, 8), (8, 16), (16, 24), (24, 32), (32, 37)]:  # chunk 16 rows, batch 8 inside
            model(to_model_input(dataset.x[start:stop], NORMALISATION))
            for name, values in probes.collect().items():
                expected[name].append(values.numpy())
    for name in ALL_CAPTURES:
        assert getattr(features, name).dtype == np.float32
        assert np.array_equal(getattr(features, name), np.concatenate(expected[name])), name
    assert features.layout == probes.layout
    assert features.metadata["n_samples"] == 37 and features.metadata["extracted_samples"] == 37
    assert features.metadata["normalisation"] == {"mean": [0.4], "std": [0.3]}


def test_penultimate_and_logits_equal_the_models_methods_on_the_whole_set():
    model, dataset = tiny_model(), tiny_dataset()
    features = extract_features(model, dataset, NORMALISATION, batch_size=16, capture=("penultimate", "logits"),
                                progress=False)
    assert features.bn_minima is None and features.layout is None
    x = to_model_input(dataset.x, NORMALISATION)
    model.eval()
    with torch.no_grad():
        assert np.allclose(features.penultimate, model.penultimate(x).numpy(), rtol=1e-5, atol=1e-5)
        assert np.allclose(features.logits, model(x).numpy(), rtol=1e-5, atol=1e-5)


def test_channels_last_and_both_kernels_give_the_same_features():
    model, dataset = tiny_model(), tiny_dataset()
    runs = [extract_features(model, dataset, NORMALISATION, batch_size=8, backend=backend, channels_last=layout,
                             capture=ALL_CAPTURES, progress=False)
            for backend, layout in [("cpp", True), ("torch", True), ("cpp", False)]]
    for run in runs[1:]:
        for name in ALL_CAPTURES:
            assert np.allclose(getattr(run, name), getattr(runs[0], name), rtol=1e-4, atol=1e-5), name


def test_the_model_gets_back_its_mode_and_parameter_tensors():
    model = tiny_model().train()
    storage_before = {name: parameter.data_ptr() for name, parameter in model.named_parameters()}
    state_before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    extract_features(model, tiny_dataset(), NORMALISATION, batch_size=8, channels_last=True, progress=False)
    assert model.training
    for name, parameter in model.named_parameters():
        assert parameter.data_ptr() == storage_before[name] and parameter.is_contiguous(), name
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state_before[name]), f"{name} changed: running statistics must not update"


def test_string_ids_and_a_model_without_batchnorm_for_logits_only():
    dataset = tiny_dataset(n=5, string_ids=True)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 6 * 6, 3))
    features = extract_features(model, dataset, NORMALISATION, capture=["logits"], head="2", progress=False)
    assert features.ids.tolist() == [f"img-{i:03d}" for i in range(5)] and features.logits.shape == (5, 3)
    with pytest.raises(InputError, match="FLARE needs BatchNorm2d"):
        extract_features(model, dataset, NORMALISATION, progress=False)


def test_bad_inputs_are_refused_by_name():
    model, dataset = tiny_model(), tiny_dataset(n=4)
    with pytest.raises(InputError, match="must be a backdoor_engine.data.Dataset"):
        extract_features(model, dataset.x, NORMALISATION)
    with pytest.raises(InputError, match="batch_size must be an integer >= 1"):
        extract_features(model, dataset, NORMALISATION, batch_size=0)
    with pytest.raises(InputError, match="chunk_size must be an integer >= 1"):
        extract_features(model, dataset, NORMALISATION, chunk_size=0)
    with pytest.raises(InputError, match="1 channels but the normalisation has 3"):
        extract_features(model, dataset, Normalisation((0.5,) * 3, (0.2,) * 3), progress=False)
    fixed_size = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2 * 10 * 10, 3))
    with pytest.raises(InputError, match="cannot run on this dataset's images"):
        extract_features(fixed_size, dataset, NORMALISATION, progress=False)
