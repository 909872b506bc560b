"""`backdoor-engine bench`: one JSON object comparing plain forward, engine and official-style extraction."""

import json

import pytest

from backdoor_engine.cli import main
from backdoor_engine.errors import InputError
from backdoor_engine.models.foreign import _import_torchvision

REQUIRED = ("model", "device", "threads", "batch_size", "plain_images_per_s", "engine_images_per_s",
            "official_style_images_per_s", "engine_vs_plain", "engine_vs_official", "versions")


def _bench(capsys, *argv):
    rc = main(["bench", *argv, "--json"])
    captured = capsys.readouterr()
    return rc, captured


def _check_result(result):
    assert set(REQUIRED) <= set(result)
    for key in ("plain_images_per_s", "engine_images_per_s", "official_style_images_per_s"):
        assert result[key] > 0
    assert result["engine_vs_plain"] == pytest.approx(result["engine_images_per_s"] / result["plain_images_per_s"],
                                                      rel=1e-2)
    assert result["engine_vs_official"] == pytest.approx(
        result["engine_images_per_s"] / result["official_style_images_per_s"], rel=1e-2)
    assert "torch" in result["versions"]


def test_bench_on_a_registered_arch_prints_one_json_object_with_consistent_rates(capsys):
    rc, captured = _bench(capsys, "--arch", "small_resnet", "--images", "16", "--repeats", "2", "--batch-size", "8")
    assert rc == 0
    assert len(captured.out.strip().splitlines()) == 1
    result = json.loads(captured.out)
    _check_result(result)
    assert result["model"] == "small_resnet" and result["batch_size"] == 8 and result["images"] == 16
    assert result["input_size"] == [28, 28] and result["device"] == "cpu"
    assert all(len(times) == 2 for times in result["seconds"].values())


def test_bench_needs_exactly_one_of_arch_and_model(capsys):
    rc, captured = _bench(capsys, "--images", "4")
    assert rc == 2 and "--arch" in captured.err and captured.out == ""


def test_bench_on_a_torchvision_model_at_a_chosen_input_size(capsys):
    try:
        _import_torchvision()
    except InputError as error:
        pytest.skip(str(error))
    rc, captured = _bench(capsys, "--model", "torchvision:resnet18", "--input-size", "32", "--images", "8",
                          "--repeats", "1", "--batch-size", "8")
    assert rc == 0
    result = json.loads(captured.out)
    _check_result(result)
    assert result["model"] == "torchvision:resnet18" and result["input_size"] == [32, 32]
    assert "torchvision" in result["versions"]


def test_bench_on_a_layernorm_model_gives_flare_s_batchnorm_error(capsys):
    try:
        _import_torchvision()
    except InputError as error:
        pytest.skip(str(error))
    rc, captured = _bench(capsys, "--model", "torchvision:convnext_tiny", "--input-size", "32", "--images", "2",
                          "--repeats", "1", "--batch-size", "2")
    assert rc == 2
    assert "BatchNorm2d" in captured.err and captured.out == ""
