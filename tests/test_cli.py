"""The CLI as a user runs it: poison, train, eval on real Fashion-MNIST subsets."""

import json
import subprocess
import sys

import numpy as np
import pytest

from backdoor_engine.cli import main
from backdoor_engine.data.dataset import load_npz, save_npz
from backdoor_engine.data.fashion_mnist import load_fashion_mnist

ATTACK_MODES = [("badnets", "a2o"), ("badnets", "a2a"), ("badnets", "ut"), ("blend", "a2o"), ("blend", "a2a"),
                ("blend", "ut"), ("trojan", "a2o"), ("trojan", "a2a"), ("trojan", "ut"), ("wanet", "a2o"),
                ("wanet", "a2a"), ("wanet", "ut"), ("adaptive_blend", "a2o"), ("adaptive_blend", "a2a"),
                ("adaptive_blend", "ut"), ("sig", "a2o")]


@pytest.fixture(scope="module")
def fmnist_small(tmp_path_factory):
    """2000 real Fashion-MNIST training images (stratified by taking the first 2000), as an npz."""
    train = load_fashion_mnist("train")
    small = train.subset(np.arange(2000))
    path = tmp_path_factory.mktemp("data") / "fmnist2k.npz"
    save_npz(small, path)
    return path, small


@pytest.mark.parametrize("attack,mode", ATTACK_MODES)
def test_poison_writes_valid_npz_whose_mask_matches_the_rate(tmp_path, fmnist_small, attack, mode, capsys):
    path, clean = fmnist_small
    out = tmp_path / "p.npz"
    rc = main(["poison", "--data", str(path), "--attack", attack, "--mode", mode, "--rate", "0.05",
               "--target", "3", "--seed", "7", "--out", str(out)])
    assert rc == 0
    poisoned = load_npz(out)
    assert poisoned.poison is not None
    assert int(poisoned.poison.sum()) == int(len(clean) * 0.05)
    np.testing.assert_array_equal(poisoned.ids, clean.ids)
    hit = poisoned.poison.astype(bool)
    assert not np.array_equal(poisoned.x[hit], clean.x[hit]), "poisoned samples carry a trigger"
    if mode == "a2o":
        assert (poisoned.y[hit] == 3).all()
    elif mode == "a2a":
        np.testing.assert_array_equal(poisoned.y[hit], (clean.y[hit] + 1) % 10)
    else:
        assert (poisoned.y[hit] != clean.y[hit]).all()
    manifest = json.loads((tmp_path / "p.attack.json").read_text())
    assert manifest["attack"] == attack and manifest["mode"] == mode and manifest["seed"] == 7
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_poisoned"] == int(poisoned.poison.sum())


def test_clean_label_attack_rejects_other_modes(tmp_path, fmnist_small, capsys):
    path, _ = fmnist_small
    out = tmp_path / "p.npz"
    rc = main(["poison", "--data", str(path), "--attack", "sig", "--mode", "a2a", "--out", str(out)])
    assert rc == 2
    assert "clean-label" in capsys.readouterr().err
    assert not out.exists()


def test_poison_rejects_a_file_with_an_unknown_field_and_leaves_nothing(tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((4, 8, 8, 1), np.uint8), y=np.zeros(4, np.int64), labels=np.zeros(4))
    out = tmp_path / "out.npz"
    rc = main(["poison", "--data", str(bad), "--attack", "badnets", "--rate", "0.5", "--out", str(out)])
    assert rc == 2
    assert "labels" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [bad]


def test_poison_rejects_float_images_naming_x(tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((4, 8, 8, 1), np.float32), y=np.zeros(4, np.int64))
    rc = main(["poison", "--data", str(bad), "--attack", "badnets", "--rate", "0.5",
               "--out", str(tmp_path / "o.npz")])
    assert rc == 2
    assert "x" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [bad]


def test_train_then_eval_round_trip_reports_ba_and_asr(tmp_path, fmnist_small, capsys):
    path, clean = fmnist_small
    test = load_fashion_mnist("test").subset(np.arange(300))
    test_path = tmp_path / "test.npz"
    save_npz(test, test_path)
    poisoned = tmp_path / "p.npz"
    assert main(["poison", "--data", str(path), "--attack", "badnets", "--rate", "0.1", "--out", str(poisoned)]) == 0
    capsys.readouterr()
    model = tmp_path / "m.pt"
    assert main(["train", "--data", str(poisoned), "--arch", "small_resnet", "--epochs", "1", "--seed", "0",
                 "--eval-data", str(test_path), "--out", str(model)]) == 0
    trained = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0.0 <= trained["ba"] <= 1.0 and 0.0 <= trained["asr"] <= 1.0
    # eval needs no attack flags: the checkpoint carries the attack manifest of its training data.
    assert main(["eval", "--model", str(model), "--data", str(test_path), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["ba"] == pytest.approx(trained["ba"])
    assert evaluated["asr"] == pytest.approx(trained["asr"])
    assert evaluated["n_triggered"] == int((test.y != 0).sum())


def test_every_command_has_help():
    for command in ("poison", "train", "eval", "demo"):
        result = subprocess.run([sys.executable, "-m", "backdoor_engine.cli", command, "--help"],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert "usage: backdoor-engine " + command in result.stdout


def test_label_consistent_runs_pgd_with_a_clean_checkpoint(tmp_path, fmnist_small, capsys):
    path, clean = fmnist_small
    model = tmp_path / "clean.pt"
    assert main(["train", "--data", str(path), "--epochs", "1", "--out", str(model)]) == 0
    out = tmp_path / "lc.npz"
    assert main(["poison", "--data", str(path), "--attack", "label_consistent", "--rate", "0.02",
                 "--param", "steps=2", "--adv-model", str(model), "--out", str(out)]) == 0
    poisoned = load_npz(out)
    hit = poisoned.poison.astype(bool)
    assert hit.sum() == 40 and (clean.y[hit] == 0).all()
    np.testing.assert_array_equal(poisoned.y, clean.y)


def test_label_consistent_without_a_clean_model_says_what_is_missing(tmp_path, fmnist_small, capsys):
    path, _ = fmnist_small
    rc = main(["poison", "--data", str(path), "--attack", "label_consistent", "--out", str(tmp_path / "lc.npz")])
    assert rc == 2
    assert "--adv-model" in capsys.readouterr().err
