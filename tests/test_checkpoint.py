import os
import pickle

import numpy as np
import pytest
import torch

from backdoor_engine.errors import InputError
from backdoor_engine.models import Normalisation, build_model, load_checkpoint, save_checkpoint

NORM = Normalisation((0.2, 0.4, 0.6), (0.3, 0.3, 0.3))


class NotAWeight:
    """A custom class: unpickling it would run arbitrary code paths, so loading must refuse."""


def trained_looking_model(arch="small_resnet", seed=0):
    torch.manual_seed(seed)
    model = build_model(arch, num_classes=4, in_channels=3, input_size=(20, 24))
    with torch.no_grad():  # non-default BN statistics, so a round trip that dropped buffers would show
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean") or name.endswith("running_var"):
                buffer.uniform_(0.5, 1.5)
    return model.eval()


def save(path, model, **overrides):
    arguments = {"arch": "small_resnet", "num_classes": 4, "in_channels": 3, "input_size": (20, 24),
                 "normalisation": NORM, **overrides}
    save_checkpoint(path, model, **arguments)


@pytest.mark.parametrize("arch", ["small_resnet", "mobilenetv2"])
def test_round_trip_gives_identical_outputs_and_meta(tmp_path, arch):
    model = trained_looking_model(arch)
    extra = {"train": {"seed": 3, "history": [{"epoch": 1, "loss": 0.5}]}, "ba": 0.91, "attack": None}
    save(tmp_path / "model.pt", model, arch=arch, extra=extra)
    loaded, meta = load_checkpoint(tmp_path / "model.pt")
    assert not loaded.training
    x = torch.randn(5, 3, 20, 24)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert meta["arch"] == arch and meta["num_classes"] == 4 and meta["in_channels"] == 3
    assert meta["input_size"] == [20, 24]
    assert meta["normalisation"] == NORM
    assert meta["format_version"] == 1
    assert {key: meta[key] for key in extra} == extra
    assert os.listdir(tmp_path) == ["model.pt"]


def test_saved_file_holds_only_tensors_and_plain_types(tmp_path):
    save(tmp_path / "model.pt", trained_looking_model())
    payload = torch.load(tmp_path / "model.pt", weights_only=True)
    assert set(payload) == {"state_dict", "meta"}
    assert all(isinstance(value, torch.Tensor) for value in payload["state_dict"].values())
    assert payload["meta"]["normalisation"] == NORM.to_dict()


def test_loading_leaves_the_global_rng_alone(tmp_path):
    save(tmp_path / "model.pt", trained_looking_model())
    torch.manual_seed(7)
    expected = torch.rand(1)
    torch.manual_seed(7)
    load_checkpoint(tmp_path / "model.pt")
    assert torch.equal(torch.rand(1), expected)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_checkpoint(tmp_path / "absent.pt")


@pytest.mark.parametrize("content", [b"", b"plain text, not a checkpoint\n", os.urandom(512)])
def test_non_checkpoint_bytes(tmp_path, content):
    (tmp_path / "junk.pt").write_bytes(content)
    with pytest.raises(InputError, match="junk.pt"):
        load_checkpoint(tmp_path / "junk.pt")


def test_npz_file_is_not_a_checkpoint(tmp_path):
    np.savez(tmp_path / "data.npz", x=np.zeros((2, 8, 8, 1), dtype=np.uint8))
    with pytest.raises(InputError, match="not a torch checkpoint"):
        load_checkpoint(tmp_path / "data.npz")


def test_plain_tensor_file_is_not_an_engine_checkpoint(tmp_path):
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(InputError, match="expected keys state_dict and meta"):
        load_checkpoint(tmp_path / "tensor.pt")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note on the legacy format
@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_pickled_custom_class_is_refused(tmp_path, writer):
    payload = {"state_dict": {}, "meta": {"arch": NotAWeight()}}
    path = tmp_path / "custom.pt"
    if writer == "torch":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(InputError, match="unpickling"):
        load_checkpoint(path)


@pytest.mark.parametrize("key", ["arch", "num_classes", "in_channels", "input_size", "normalisation",
                                 "format_version"])
def test_missing_meta_key_is_named(tmp_path, key):
    save(tmp_path / "model.pt", trained_looking_model())
    payload = torch.load(tmp_path / "model.pt", weights_only=True)
    del payload["meta"][key]
    torch.save(payload, tmp_path / "broken.pt")
    with pytest.raises(InputError, match=f"missing '{key}'"):
        load_checkpoint(tmp_path / "broken.pt")


def edit_meta(tmp_path, **changes):
    save(tmp_path / "model.pt", trained_looking_model())
    payload = torch.load(tmp_path / "model.pt", weights_only=True)
    payload["meta"].update(changes)
    torch.save(payload, tmp_path / "edited.pt")
    return tmp_path / "edited.pt"


def test_unknown_arch(tmp_path):
    with pytest.raises(InputError, match="unknown arch 'resnet1000'"):
        load_checkpoint(edit_meta(tmp_path, arch="resnet1000"))


def test_state_dict_mismatch(tmp_path):
    # The weights are a small_resnet's; meta claiming resnet18 or another class count must not load.
    with pytest.raises(InputError, match="does not match the architecture"):
        load_checkpoint(edit_meta(tmp_path, arch="resnet18"))
    with pytest.raises(InputError, match=r"declares num_classes 5 but its classifier head.weight has shape \(4, 64\)"):
        load_checkpoint(edit_meta(tmp_path, num_classes=5))


@pytest.mark.parametrize("changes,message", [
    ({"num_classes": 10**12}, r"num_classes is 1000000000000; expected 2\.\.100000"),
    ({"num_classes": "10"}, "num_classes must be an integer"),
    ({"in_channels": 3.0}, "in_channels must be an integer"),
    ({"input_size": [10**6, 24]}, "input_size .* exceeds 8192 pixels"),
])
def test_declared_metadata_outside_sane_bounds_is_refused_before_the_model_is_built(tmp_path, changes, message,
                                                                                   monkeypatch):
    import backdoor_engine.models.checkpoint as checkpoint

    def must_not_build(*args, **kwargs):
        raise AssertionError("the model was built from unchecked metadata")

    path = edit_meta(tmp_path, **changes)
    monkeypatch.setattr(checkpoint, "build_quietly", must_not_build)
    with pytest.raises(InputError, match=message):
        load_checkpoint(path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_checkpoint_with_non_finite_weights_is_refused_naming_the_tensor(tmp_path, bad):
    save(tmp_path / "model.pt", trained_looking_model())
    payload = torch.load(tmp_path / "model.pt", weights_only=True)
    payload["state_dict"]["head.weight"][0, 0] = bad
    torch.save(payload, tmp_path / "nan.pt")
    with pytest.raises(InputError, match="'head.weight' holds NaN or infinite values"):
        load_checkpoint(tmp_path / "nan.pt")


def test_unpicklable_checkpoint_refusal_names_the_global_and_warns_against_weights_only_false(tmp_path):
    torch.save({"state_dict": {}, "meta": {"x": NotAWeight()}}, tmp_path / "evil.pt")
    with pytest.raises(InputError) as caught:
        load_checkpoint(tmp_path / "evil.pt")
    message = str(caught.value)
    assert "NotAWeight" in message and "Do not load it with weights_only=False" in message
    assert "likely succeed" not in message


def test_unsupported_format_version(tmp_path):
    with pytest.raises(InputError, match="format_version 2"):
        load_checkpoint(edit_meta(tmp_path, format_version=2))


def test_bad_normalisation_in_meta(tmp_path):
    with pytest.raises(InputError, match="normalisation"):
        load_checkpoint(edit_meta(tmp_path, normalisation={"mean": [0.5], "std": [0.5]}))


@pytest.mark.parametrize("extra,message", [
    ({"arch": "vgg16_bn"}, "reserved"),
    ({"config": {"device": torch.device("cpu")}}, r"extra\['config'\]\['device'\] is a device"),
    ({"scores": np.zeros(3)}, "ndarray"),
    ({"ba": float("nan")}, "finite"),
])
def test_extra_must_be_plain_and_not_reserved(tmp_path, extra, message):
    with pytest.raises(InputError, match=message):
        save(tmp_path / "model.pt", trained_looking_model(), extra=extra)
    assert os.listdir(tmp_path) == []


def test_saving_weights_of_another_architecture_is_refused(tmp_path):
    with pytest.raises(InputError, match="does not match"):
        save(tmp_path / "model.pt", trained_looking_model(), arch="resnet18")
    assert os.listdir(tmp_path) == []


def test_failed_write_keeps_the_previous_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    save(path, trained_looking_model(seed=0))
    original = path.read_bytes()

    def failing_save(obj, file):
        file.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save(path, trained_looking_model(seed=1))
    assert path.read_bytes() == original
    assert os.listdir(tmp_path) == ["model.pt"]


def test_missing_directory(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        save(tmp_path / "no" / "model.pt", trained_looking_model())
