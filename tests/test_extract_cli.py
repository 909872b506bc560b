"""`backdoor-engine extract`: the single pass's features written for other tools, from a user's own model."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from backdoor_engine.cli import main
from backdoor_engine.data.dataset import load_npz, make_dataset, save_npz
from backdoor_engine.engine import FeatureStore, extract_features
from backdoor_engine.errors import InputError
from backdoor_engine.models.foreign import _import_torchvision, load_model

try:
    _import_torchvision()
except InputError as error:
    pytest.skip(str(error), allow_module_level=True)

from torchvision import models  # noqa: E402  (after the import check above)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("extract")
    rng = np.random.default_rng(0)
    data = make_dataset(rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8), rng.integers(0, 4, 10),
                        ids=np.arange(100, 110))
    save_npz(data, folder / "d.npz")
    torch.manual_seed(0)
    save_file(dict(models.resnet18(weights=None, num_classes=4).state_dict()), folder / "w.safetensors")
    return folder


def test_extract_writes_store_and_one_npz_per_capture_equal_to_extract_features(setup, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["extract", "--data", str(setup / "d.npz"), "--model", "torchvision:resnet18", "--weights",
               str(setup / "w.safetensors"), "--input-size", "32", "--out", str(out), "--batch-size", "4",
               "--workers", "0", "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_samples"] == 10 and summary["columns"]["logits"] == 4
    model, meta = load_model("torchvision:resnet18", weights=setup / "w.safetensors", input_size=32)
    expected = extract_features(model, load_npz(setup / "d.npz"), meta["normalisation"], batch_size=4,
                                capture=("bn_minima", "penultimate", "logits"), head="fc", progress=False)
    for name in ("bn_minima", "penultimate", "logits"):
        with np.load(out / f"{name}.npz", allow_pickle=False) as stored:
            np.testing.assert_array_equal(stored["ids"], np.arange(100, 110))
            np.testing.assert_array_equal(stored["y"], expected.y)
            np.testing.assert_array_equal(stored[name], getattr(expected, name))
            if name == "bn_minima":
                assert list(stored["layer_names"]) == list(expected.layout.layer_names)
                assert list(stored["layer_channels"]) == list(expected.layout.layer_channels)
    assert FeatureStore.open(out / "features").is_complete


def test_extract_of_a_torchvision_model_without_weights_is_refused(setup, tmp_path, capsys):
    rc = main(["extract", "--data", str(setup / "d.npz"), "--model", "torchvision:resnet18", "--out",
               str(tmp_path / "o")])
    assert rc == 2
    assert "needs --weights" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
