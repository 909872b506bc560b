"""Hostile input and faults at the command line (issue 12): every case ends in a clear error (exit 2) before
any work, and leaves nothing behind. Tiny npz files and untrained small models keep each case fast."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import backdoor_engine.api as api
from backdoor_engine.cli import main
from backdoor_engine.data.dataset import make_dataset, save_npz
from backdoor_engine.models import Normalisation, build_model, save_checkpoint

N = 60


def write_npz(path, *, y=None, seed=0, poison=True):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (N, 8, 8, 1), dtype=np.uint8)
    y = np.arange(N) % 10 if y is None else np.asarray(y)
    marks = (np.arange(N) < 6).astype(np.uint8) if poison else None
    save_npz(make_dataset(x, y.astype(np.int64), poison=marks), path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    torch.manual_seed(0)
    model = build_model("small_resnet", num_classes=10, in_channels=1, input_size=8).eval()
    save_checkpoint(root / "m.pt", model, arch="small_resnet", num_classes=10, in_channels=1, input_size=8,
                    normalisation=Normalisation((0.5,), (0.25,)))
    return {"data": write_npz(root / "d.npz"), "model": root / "m.pt", "root": root}


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.fixture
def no_work(monkeypatch):
    """Fails the test if training, extraction or a scan starts: the refusal must come first."""
    def must_not_run(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    for name in ("train", "scan", "purify"):
        monkeypatch.setattr(api, name, must_not_run)


def test_eval_of_a_checkpoint_with_nan_weights_is_refused(tmp_path, files, capsys):
    payload = torch.load(files["model"], weights_only=True)
    payload["state_dict"]["head.bias"][3] = float("nan")
    torch.save(payload, tmp_path / "nan.pt")
    rc, out, err = run(capsys, "eval", "--model", tmp_path / "nan.pt", "--data", files["data"], "--json")
    assert rc == 2 and out == ""
    assert "'head.bias' holds NaN or infinite values" in err


def test_scan_out_naming_an_existing_file_is_refused_before_the_model_is_read(tmp_path, files, capsys, no_work):
    existing = tmp_path / "report.txt"
    existing.write_text("keep me")
    rc, _, err = run(capsys, "scan", "--data", files["data"], "--model", files["model"], "--out", existing,
                     "--method", "spectral")
    assert rc == 2 and "names an existing file" in err
    assert existing.read_text() == "keep me"


@pytest.mark.parametrize("flag,value", [("--workers", "-1"), ("--batch-size", "0"), ("--actors", "0")])
def test_scan_with_a_bad_count_leaves_no_output_folder(tmp_path, files, capsys, flag, value):
    out = tmp_path / "out"
    rc, _, err = run(capsys, "scan", "--data", files["data"], "--model", files["model"], "--out", out,
                     "--method", "spectral", flag, value)
    assert rc == 2 and f"{flag} must be >=" in err
    assert not out.exists()


def _read_only_folder(tmp_path):
    """A folder nobody may write in: chmod works for ordinary users; root writes anywhere except, e.g., sysfs."""
    if os.geteuid() != 0:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    if os.path.isdir("/sys") and not os.access("/sys", os.W_OK) or os.path.isdir("/sys/kernel"):
        return Path("/sys/kernel")
    pytest.skip("running as root without a read-only folder to write into")


def test_train_out_in_a_read_only_folder_is_refused_before_training(tmp_path, files, capsys, no_work):
    folder = _read_only_folder(tmp_path)
    rc, _, err = run(capsys, "train", "--data", files["data"], "--epochs", "1", "--out", folder / "m.pt")
    assert rc == 2 and "cannot write in" in err


@pytest.mark.parametrize("argv,message", [
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--batch-size", "-3"], "--batch-size must be >= 1"),
    (["--lr", "nan"], "--lr must be a finite number > 0"),
    (["--image-size", "4", "4"], "input_size sides must be integers >= 8"),
])
def test_train_with_a_bad_number_is_refused_before_training(tmp_path, files, capsys, no_work, argv, message):
    rc, _, err = run(capsys, "train", "--data", files["data"], "--out", tmp_path / "m.pt", *argv)
    assert rc == 2 and message in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command,out", [
    ("poison", "missing/dir/p.npz"), ("poison", "p.txt"), ("train", "a_folder"), ("purify", "m.npz"),
    ("triggers", "a_file"), ("extract", "a_file"), ("demo", "a_file"), ("scan", "a_file"),
])
def test_every_command_checks_its_output_location_first(tmp_path, files, capsys, no_work, command, out):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "a_folder").mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())
    args = {"poison": ["--data", files["data"], "--attack", "badnets"],
            "train": ["--data", files["data"]],
            "purify": ["--data", files["data"], "--model", files["model"]],
            "triggers": ["--data", files["data"]],
            "extract": ["--data", files["data"], "--model", files["model"]],
            "demo": [],
            "scan": ["--data", files["data"], "--model", files["model"]]}[command]
    rc, _, err = run(capsys, command, *args, "--out", tmp_path / out)
    assert rc == 2 and "--out" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_demo_with_negative_epochs_writes_nothing(tmp_path, capsys):
    rc, _, err = run(capsys, "demo", "--epochs", "-1", "--out", tmp_path / "demo")
    assert rc == 2 and "--epochs must be >= 1" in err
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize("label", [10, 1000])
def test_scan_refuses_labels_outside_the_models_classes(tmp_path, files, capsys, no_work, label):
    data = write_npz(tmp_path / "bad.npz", y=np.r_[np.arange(N - 1) % 10, label])
    rc, _, err = run(capsys, "scan", "--data", data, "--model", files["model"], "--out", tmp_path / "out",
                     "--method", "spectral")
    assert rc == 2 and f"label {label} at index {N - 1}" in err and "10 classes" in err
    assert not (tmp_path / "out").exists()


def test_labels_of_a_trillion_are_refused_when_the_data_is_read(tmp_path, files, capsys, no_work):
    data = write_npz(tmp_path / "huge.npz", y=np.r_[np.arange(N - 1) % 10, 10**12])
    for argv in (["scan", "--data", data, "--model", files["model"], "--out", tmp_path / "out", "--method",
                  "spectral"], ["train", "--data", data, "--out", tmp_path / "m.pt"]):
        rc, _, err = run(capsys, *argv)
        assert rc == 2 and "1000000000000" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["huge.npz"]


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_scan_refuses_a_non_finite_parameter(tmp_path, files, capsys, no_work, value):
    rc, _, err = run(capsys, "scan", "--data", files["data"], "--model", files["model"], "--out", tmp_path / "out",
                     "--param", f"xi={value}")
    assert rc == 2 and "xi must be a finite number" in err


def test_poison_at_a_rate_that_rounds_to_no_sample_is_refused(tmp_path, files, capsys):
    rc, out, err = run(capsys, "poison", "--data", files["data"], "--attack", "badnets", "--rate", "0.01",
                       "--out", tmp_path / "p.npz")
    assert rc == 2 and out == "" and "rounds to 0 poisoned samples" in err
    assert list(tmp_path.iterdir()) == []


def test_scan_report_names_the_data_and_model_and_purify_refuses_another_datasets_report(tmp_path, files,
                                                                                         capsys):
    out = tmp_path / "scan"
    rc, _, _ = run(capsys, "scan", "--data", files["data"], "--model", files["model"], "--out", out,
                   "--method", "spectral", "--json")
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["source"] == str(files["data"]) and len(report["data"]["fingerprint"]) == 32
    assert report["model"]["arch"] == "small_resnet" and report["model"]["path"] == str(files["model"])
    page = (out / "report.html").read_text()
    assert str(files["data"]) in page and report["data"]["fingerprint"] in page and "small_resnet" in page
    m = report["metrics"]
    assert f"({m['fp']}/{m['fp'] + m['tn']})" in page and f"({m['tp']}/{m['tp'] + m['fn']})" in page

    other = write_npz(tmp_path / "other.npz", seed=1)  # same size, same default ids 0..N-1, other pixels
    rc, _, err = run(capsys, "purify", "--data", other, "--model", files["model"], "--report", out,
                     "--strategy", "retrain", "--epochs", "1", "--out", tmp_path / "fixed.pt")
    assert rc == 2 and "report of another dataset" in err
    assert not (tmp_path / "fixed.pt").exists()


def test_rerunning_an_extraction_says_how_much_it_resumes(tmp_path, files, capsys):
    argv = ["extract", "--data", files["data"], "--model", files["model"], "--out", tmp_path / "x",
            "--workers", "0"]
    rc, _, err = run(capsys, *argv)
    assert rc == 0 and "resuming" not in err
    rc, _, err = run(capsys, *argv)
    assert rc == 0 and f"resuming from {tmp_path / 'x' / 'features'}: {N} of {N} samples already extracted" in err


def test_links_outside_an_image_folder_are_followed_only_with_allow_outside_links(tmp_path, capsys):
    from PIL import Image

    rng = np.random.default_rng(0)
    for label in ("0", "1"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for k in range(3):
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(tmp_path / "images" / label / f"{k}.png")
    Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(tmp_path / "outside.png")
    (tmp_path / "images" / "1" / "link.png").symlink_to(tmp_path / "outside.png")
    torch.manual_seed(0)
    model = build_model("small_resnet", num_classes=2, in_channels=1, input_size=8).eval()
    save_checkpoint(tmp_path / "m.pt", model, arch="small_resnet", num_classes=2, in_channels=1, input_size=8,
                    normalisation=Normalisation((0.5,), (0.25,)))
    counts = []
    for extra, out in (([], "plain"), (["--allow-outside-links"], "allowed")):
        rc, printed, _ = run(capsys, "extract", "--data", tmp_path / "images", "--model", tmp_path / "m.pt",
                             "--out", tmp_path / out, "--workers", "0", "--json", *extra)
        assert rc == 0
        counts.append(json.loads(printed)["n_samples"])
    assert counts == [6, 7]


def test_run_demo_refuses_non_positive_epochs_before_writing(tmp_path):
    from backdoor_engine.demo import run_demo
    from backdoor_engine.errors import InputError

    with pytest.raises(InputError, match="epochs must be an integer >= 1"):
        run_demo(tmp_path / "demo", epochs=-1)
    assert not (tmp_path / "demo").exists()
