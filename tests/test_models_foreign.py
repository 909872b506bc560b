"""Users' own models: torchvision architectures plus a state-dict file (models/foreign.py)."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from backdoor_engine.data.dataset import make_dataset
from backdoor_engine.engine import extract_features
from backdoor_engine.errors import InputError
from backdoor_engine.models import Normalisation, save_checkpoint
from backdoor_engine.models.foreign import IMAGENET_MEAN, _import_torchvision, load_model
from backdoor_engine.models.registry import build_model

try:
    _import_torchvision()
except InputError as error:
    pytest.skip(str(error), allow_module_level=True)

from torchvision import models  # noqa: E402  (after the import check above)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A torchvision resnet18 with 7 classes, random weights and non-trivial BN statistics, saved both ways."""
    torch.manual_seed(1)
    model = models.resnet18(weights=None, num_classes=7)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    model.eval()
    folder = tmp_path_factory.mktemp("weights")
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, folder / "r18.safetensors")
    torch.save(state, folder / "r18.pt")
    torch.save({"state_dict": state, "epoch": 3}, folder / "r18_wrapped.pth")
    return model, folder


def _logits(model, images):
    with torch.no_grad():
        return model(images)


@pytest.mark.parametrize("file", ["r18.safetensors", "r18.pt", "r18_wrapped.pth"])
def test_weights_file_round_trips_to_the_same_logits_with_classes_read_from_the_head(trained, file):
    model, folder = trained
    loaded, meta = load_model("torchvision:resnet18", weights=folder / file, input_size=32)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(loaded, images), _logits(model, images), rtol=0, atol=0)
    assert meta["num_classes"] == 7
    assert meta["head"] == "fc"
    assert meta["input_size"] == [32, 32] and meta["in_channels"] == 3
    assert meta["normalisation"] == Normalisation(IMAGENET_MEAN, (0.229, 0.224, 0.225))
    assert meta["source"]["kind"] == "torchvision" and meta["source"]["weights"].endswith(file)
    assert meta["batchnorm2d_layers"] == 20
    assert not loaded.training


def test_head_is_found_generically_as_the_last_linear():
    _, meta = load_model("torchvision:mobilenet_v2", input_size=32)
    assert meta["head"] == "classifier.1" and meta["num_classes"] == 1000


def test_pickled_whole_model_is_refused(trained, tmp_path):
    model, _ = trained
    path = tmp_path / "whole.pt"
    torch.save(model, path)
    with pytest.raises(InputError, match="unpickling"):
        load_model("torchvision:resnet18", weights=path)


def test_nan_weight_is_refused_naming_the_tensor(trained, tmp_path):
    model, _ = trained
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    state["layer2.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    save_file(state, tmp_path / "nan.safetensors")
    with pytest.raises(InputError, match=r"layer2\.0\.conv1\.weight.*NaN"):
        load_model("torchvision:resnet18", weights=tmp_path / "nan.safetensors")


def test_state_dict_of_another_architecture_is_refused_naming_the_keys(trained, tmp_path):
    model, _ = trained
    state = dict(model.state_dict())
    del state["layer4.1.bn2.bias"]
    state["extra.weight"] = torch.zeros(2)
    torch.save(state, tmp_path / "odd.pt")
    names_both = r"missing key\(s\) \['layer4\.1\.bn2\.bias'\].*unexpected key\(s\) \['extra\.weight'\]"
    with pytest.raises(InputError, match=names_both):
        load_model("torchvision:resnet18", weights=tmp_path / "odd.pt")
    with pytest.raises(InputError, match=r"does not match torchvision:resnet34: \d+ missing key"):
        load_model("torchvision:resnet34", weights=tmp_path / "odd.pt")


def test_dataparallel_prefix_is_removed(trained, tmp_path):
    model, _ = trained
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, tmp_path / "dp.pt")
    loaded, meta = load_model("torchvision:resnet18", weights=tmp_path / "dp.pt", input_size=32)
    assert meta["num_classes"] == 7


def test_unknown_name_lists_close_names():
    with pytest.raises(InputError, match="resnet50"):
        load_model("torchvision:resnet5")


def test_mean_on_the_255_scale_is_refused():
    with pytest.raises(InputError, match=r"\[0, 1\] pixel scale"):
        load_model("torchvision:resnet18", mean=[123.675, 116.28, 103.53])


def test_input_size_too_small_for_the_architecture_is_a_clear_error():
    with pytest.raises(InputError, match="cannot run on"):
        load_model("torchvision:inception_v3", input_size=32)


def test_our_checkpoint_loads_through_the_same_entry_and_refuses_foreign_flags(tmp_path):
    model = build_model("small_resnet", num_classes=3, in_channels=1, input_size=28)
    path = tmp_path / "ours.pt"
    save_checkpoint(path, model, arch="small_resnet", num_classes=3, in_channels=1, input_size=28,
                    normalisation=Normalisation((0.5,), (0.25,)))
    loaded, meta = load_model(path)
    assert meta["head"] == "head" and meta["arch"] == "small_resnet" and meta["source"]["kind"] == "checkpoint"
    with pytest.raises(InputError, match="weights"):
        load_model(path, weights=path)


def test_layernorm_model_reaches_flare_s_batchnorm_error():
    model, meta = load_model("torchvision:convnext_tiny", input_size=32)
    assert meta["batchnorm2d_layers"] == 0
    data = make_dataset(np.zeros((2, 32, 32, 3), np.uint8), np.array([0, 1]))
    with pytest.raises(InputError, match="BatchNorm2d"):
        extract_features(model, data, meta["normalisation"], head=meta["head"], progress=False)
