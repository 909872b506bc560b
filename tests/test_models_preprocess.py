import numpy as np
import pytest
import torch

from backdoor_engine.errors import InputError
from backdoor_engine.models import preprocess
from backdoor_engine.models.preprocess import Normalisation, fit_normalisation, to_model_input


def random_images(count=50, height=9, width=7, channels=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (count, height, width, channels), dtype=np.uint8)


def test_fit_normalisation_matches_numpy_statistics():
    x = random_images()
    norm = fit_normalisation(x)
    pixels = x.reshape(-1, 3).astype(np.float64) / 255
    np.testing.assert_allclose(norm.mean, pixels.mean(0), rtol=1e-12)
    np.testing.assert_allclose(norm.std, pixels.std(0), rtol=1e-10)


def test_fit_normalisation_is_independent_of_chunking(monkeypatch):
    x = random_images(count=23, channels=1)
    whole = fit_normalisation(x)
    monkeypatch.setattr(preprocess, "STATS_CHUNK", 5)
    assert fit_normalisation(x) == whole


def test_fit_normalisation_rejects_a_constant_channel():
    x = random_images()
    x[..., 1] = 7
    with pytest.raises(InputError, match="constant channel"):
        fit_normalisation(x)


def test_to_model_input_normalises_into_nchw_float32():
    x = random_images(count=4, channels=3)
    norm = Normalisation((0.1, 0.5, 0.9), (0.2, 0.3, 0.4))
    out = to_model_input(x, norm)
    assert out.dtype == torch.float32 and out.shape == (4, 3, 9, 7) and out.is_contiguous()
    expected = (x.astype(np.float64) / 255 - np.array(norm.mean)) / np.array(norm.std)
    np.testing.assert_allclose(out.numpy(), expected.transpose(0, 3, 1, 2), rtol=1e-5, atol=1e-5)


def test_to_model_input_accepts_uint8_tensors():
    x = random_images(count=2, channels=1)
    norm = Normalisation((0.3,), (0.4,))
    torch.testing.assert_close(to_model_input(torch.from_numpy(x), norm), to_model_input(x, norm))


@pytest.mark.parametrize("bad,message", [
    (np.zeros((2, 8, 8, 3), dtype=np.float32), "uint8"),
    (np.zeros((8, 8, 3), dtype=np.uint8), "N x H x W x C"),
    (np.zeros((2, 8, 8, 4), dtype=np.uint8), "N x H x W x C"),
    (np.zeros((2, 8, 8, 1), dtype=np.uint8), "channels"),
])
def test_to_model_input_rejects_bad_images(bad, message):
    with pytest.raises(InputError, match=message):
        to_model_input(bad, Normalisation((0.5,) * 3, (0.5,) * 3))


def test_normalisation_dict_round_trip():
    norm = Normalisation((0.25, 0.5, 0.75), (0.1, 0.2, 0.3))
    assert norm.to_dict() == {"mean": [0.25, 0.5, 0.75], "std": [0.1, 0.2, 0.3]}
    assert Normalisation.from_dict(norm.to_dict()) == norm


@pytest.mark.parametrize("data,message", [
    ({"mean": [0.5]}, "keys mean and std"),
    ({"mean": [0.5], "std": [0.0]}, "std"),
    ({"mean": [0.5, 0.5], "std": [0.5]}, "1 or 3 values"),
    ({"mean": ["a"], "std": [0.5]}, "numbers"),
    ([0.5, 0.5], "mapping"),
])
def test_normalisation_from_dict_rejects_bad_data(data, message):
    with pytest.raises(InputError, match=message):
        Normalisation.from_dict(data)
