"""`backdoor-engine triggers` and `scan --method vbd` end to end on real Fashion-MNIST (tiny budget)."""

import json

import numpy as np
import pytest

from backdoor_engine.cli import main
from backdoor_engine.data.dataset import save_npz
from backdoor_engine.data.fashion_mnist import load_fashion_mnist

TINY = ["--param", "poison_archs=[\"10-10P\"]", "--param", "poison_epochs=2", "--param", "detector_epochs=2",
        "--param", "ssl_start_epoch=0", "--param", "ssl_stop_epoch=1"]


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory):
    root = tmp_path_factory.mktemp("vbd")
    clean = root / "clean.npz"
    save_npz(load_fashion_mnist("train").subset(np.arange(2000)), clean)
    poisoned = root / "p.npz"
    assert main(["poison", "--data", str(clean), "--attack", "badnets", "--param", "pattern=square",
                 "--rate", "0.1", "--out", str(poisoned)]) == 0
    return poisoned


@pytest.fixture(scope="module")
def triggers_report(poisoned, tmp_path_factory):
    out = tmp_path_factory.mktemp("triggers") / "report"
    assert main(["triggers", "--data", str(poisoned), "--out", str(out), "--json", *TINY]) == 0
    return out


def test_triggers_writes_the_report_and_one_png_pair_per_trigger(triggers_report):
    report = json.loads((triggers_report / "report.json").read_text())
    assert report["method"] == "vbd" and report["n_samples"] == 2000
    assert report["params"]["poison_epochs"] == 2 and report["params"]["poison_archs"] == ["10-10P"]
    assert set(report["metrics"]) >= {"tpr", "fpr", "precision", "f1"}
    for trigger in report["diagnostics"]["triggers"]:
        label = trigger["label"]
        assert (triggers_report / f"trigger_class{label}.png").read_bytes()[:4] == b"\x89PNG"
        assert (triggers_report / f"mask_class{label}.png").exists()
        assert {"mask", "pattern_pixels", "p_value", "asr", "arch", "top_set", "source_asr",
                "source_class", "exceedance_p", "fill_source", "fill_source_share", "fill_checked",
                "n_fill_unflagged", "fill_leave_share", "carries_label"} <= set(trigger)
    page = (triggers_report / "report.html").read_text()
    assert "data:image/png;base64," in page
    if report["diagnostics"]["triggers"]:
        with np.load(triggers_report / "triggers.npz", allow_pickle=False) as arrays:
            label = report["diagnostics"]["triggers"][0]["label"]
            np.testing.assert_array_equal(arrays[f"mask_{label}"], report["diagnostics"]["triggers"][0]["mask"])
            assert "Trigger of class" in page and " top set, KS p=" in page and "% of class " in page
    else:
        assert "No class was found poisoned" in page


def test_scan_method_vbd_gives_the_same_detection(poisoned, triggers_report, tmp_path, capsys):
    out = tmp_path / "scan"
    capsys.readouterr()
    assert main(["scan", "--method", "vbd", "--data", str(poisoned), "--out", str(out), "--json", *TINY]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["method"] == "vbd"
    assert printed["flagged"] == json.loads((triggers_report / "report.json").read_text())["flagged"]


def test_scan_flare_without_a_model_is_a_clear_error(poisoned, tmp_path, capsys):
    assert main(["scan", "--data", str(poisoned), "--out", str(tmp_path / "r")]) == 2
    assert "--model is required" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_unknown_vbd_parameter_is_named(poisoned, tmp_path, capsys):
    assert main(["triggers", "--data", str(poisoned), "--out", str(tmp_path / "r"), "--param", "colour=3"]) == 2
    assert "vbd: unknown parameter(s) colour" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_vbd_over_streamed_shards_decodes_the_pixels_once_into_a_memory_map_and_flags_the_same(
        poisoned, triggers_report, tmp_path, capsys):
    from backdoor_engine.data.dataset import load_npz
    from backdoor_engine.data.tar_shards import write_tar_shards

    write_tar_shards(load_npz(poisoned), tmp_path / "shards", shard_size=700)
    out = tmp_path / "scan"
    capsys.readouterr()
    assert main(["scan", "--method", "vbd", "--data", str(tmp_path / "shards"), "--out", str(out), "--json",
                 *TINY]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n_samples"] == 2000 and "decode" in report["timings_s"]
    cached = np.load(out / "pixels" / "x.npy", mmap_mode="r")
    np.testing.assert_array_equal(cached, load_npz(poisoned).x)
    in_memory = np.loadtxt(triggers_report / "samples.csv", delimiter=",", skiprows=1, usecols=2, dtype=int)
    streamed = np.loadtxt(out / "samples.csv", delimiter=",", skiprows=1, usecols=2, dtype=int)
    np.testing.assert_array_equal(streamed, in_memory)
