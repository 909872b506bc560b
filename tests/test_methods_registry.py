"""The detector registry: every method declares its needs and the provenance of every default, parameters are
checked by name and choice, and a third-party package plugs in through the `backdoor_engine.detectors` entry
point group (a real package, installed with pip into a folder for this test)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from backdoor_engine.cli import main
from backdoor_engine.errors import InputError
from backdoor_engine.methods import NEEDS, Detector, available_detectors, get_detector, make_detector
from backdoor_engine.params import param, provenance_of

PLUGIN = Path(__file__).parent / "plugin_detector"


def test_the_builtin_detectors_are_registered_with_needs_and_a_provenance_for_every_default():
    names = available_detectors()
    assert {"flare", "vbd"} <= set(names)
    for name in names:
        detector = get_detector(name)
        assert detector.name == name
        assert detector.needs and set(detector.needs) <= set(NEEDS)
        provenance = provenance_of(detector.params_class)
        assert all(text.split(":")[0].split(" ")[0] in ("paper", "official", "ours") for text in provenance.values())
        described = detector.describe()
        assert all(f"{field}=" in described for field in provenance)


def test_flare_reads_the_suspect_model_and_vbd_does_not():
    assert get_detector("flare").needs_model() and get_detector("flare").captures() == ("bn_minima",)
    assert not get_detector("vbd").needs_model()


def test_a_typo_in_a_choice_or_a_name_is_refused_naming_the_field():
    with pytest.raises(InputError, match="xi_mode must be one of"):
        make_detector("flare", {"xi_mode": "relativ"})
    with pytest.raises(InputError, match="unknown parameter.*min_cluster"):
        make_detector("flare", {"min_cluster": 10})
    with pytest.raises(InputError, match="registered: flare, vbd"):
        get_detector("flair")


def test_a_value_of_the_wrong_type_is_refused_and_null_switches_off_an_optional_default():
    with pytest.raises(InputError, match="min_cluster_size must be an integer"):
        make_detector("flare", {"min_cluster_size": "many"})
    assert make_detector("vbd", {"large_mask_fraction": None}).params.large_mask_fraction is None


def test_a_detector_that_forgets_what_it_needs_or_a_provenance_cannot_be_defined():
    @dataclass(frozen=True)
    class Bare:
        k: int = 3

    with pytest.raises(TypeError, match="no provenance"):
        type("NoProvenance", (Detector,), {"name": "x", "summary": "x", "params_class": Bare,
                                           "needs": frozenset({"logits"})})

    @dataclass(frozen=True)
    class Good:
        k: int = param(3, "paper: Sec. 2")

    with pytest.raises(TypeError, match="needs"):
        type("NoNeeds", (Detector,), {"name": "x", "summary": "x", "params_class": Good,
                                      "needs": frozenset({"gradients of the moon"})})
    with pytest.raises(TypeError, match="summary"):
        type("NoSummary", (Detector,), {"name": "x", "params_class": Good, "needs": frozenset({"logits"})})


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory):
    """The test plugin package, installed by pip (no network: no build isolation, no dependencies)."""
    target = tmp_path_factory.mktemp("site")
    build = tmp_path_factory.mktemp("build")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(PLUGIN)], check=True,
                   cwd=build, env={**os.environ, "PIP_NO_CACHE_DIR": "1"})
    return target


def _cli(args, site: Path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "backdoor_engine.cli", *args], capture_output=True, text=True,
                          env=env, timeout=600)


def test_an_installed_plugin_detector_is_listed_in_scan_help_and_runs_through_the_cli(installed_plugin, tmp_path,
                                                                                     tiny_model_and_data):
    help_text = _cli(["scan", "--help"], installed_plugin)
    assert help_text.returncode == 0, help_text.stderr
    assert "label-disagreement" in help_text.stdout and "a test plugin" in help_text.stdout
    model, data = tiny_model_and_data
    out = tmp_path / "scan"
    run = _cli(["scan", "--method", "label-disagreement", "--data", str(data), "--model", str(model),
                "--out", str(out), "--json"], installed_plugin)
    assert run.returncode == 0, run.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "label-disagreement" and report["n_samples"] == 64
    assert (out / "samples.csv").exists() and (out / "report.html").exists()


def test_without_the_plugin_the_method_is_refused_listing_the_registered_ones(tmp_path, tiny_model_and_data):
    model, data = tiny_model_and_data
    with pytest.raises(SystemExit):  # argparse's choices come from the registry
        main(["scan", "--method", "label-disagreement", "--data", str(data), "--model", str(model),
              "--out", str(tmp_path / "o")])


@pytest.fixture(scope="module")
def tiny_model_and_data(tmp_path_factory):
    from backdoor_engine.models.provenance import save_trained
    from backdoor_engine.data.dataset import make_dataset, save_npz
    from backdoor_engine.models import build_model, fit_normalisation

    folder = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    dataset = make_dataset(rng.integers(0, 256, (64, 28, 28, 1), dtype=np.uint8), rng.integers(0, 10, 64),
                           num_classes=10)
    save_npz(dataset, folder / "d.npz")
    model = build_model("small_resnet", num_classes=10, in_channels=1, input_size=28).eval()
    save_trained(folder / "m.pt", model, fit_normalisation(dataset.x), arch="small_resnet", trained_on=dataset)
    return folder / "m.pt", folder / "d.npz"


def test_scan_keywords_known_to_the_detector_base_are_exactly_those_of_api_scan():
    import inspect

    from backdoor_engine import api
    from backdoor_engine.methods.base import SCAN_KEYWORDS

    own = set(inspect.signature(api.scan).parameters) - {"dataset", "model", "normalisation", "params"}
    assert own == SCAN_KEYWORDS


def test_a_detector_parameter_named_like_a_scan_keyword_is_refused_when_the_class_is_defined():
    @dataclass(frozen=True)
    class Clashing:
        batch_size: int = param(8, "paper")

    with pytest.raises(TypeError, match="batch_size clash with scan's own keyword arguments"):
        type("Clash", (Detector,), {"name": "clash", "summary": "s", "params_class": Clashing,
                                    "needs": frozenset({"pixels"})})
