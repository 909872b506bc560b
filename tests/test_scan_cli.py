"""`backdoor-engine scan` end to end on real Fashion-MNIST: report.json, samples.csv, report.html."""

import csv
import json

import numpy as np
import pytest

from backdoor_engine.cli import main
from backdoor_engine.data.dataset import load_npz, save_npz
from backdoor_engine.data.fashion_mnist import load_fashion_mnist


@pytest.fixture(scope="module")
def poisoned_and_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("scan")
    clean = root / "clean.npz"
    save_npz(load_fashion_mnist("train").subset(np.arange(1500)), clean)
    poisoned, model = root / "p.npz", root / "m.pt"
    assert main(["poison", "--data", str(clean), "--attack", "badnets", "--rate", "0.1", "--out", str(poisoned)]) == 0
    assert main(["train", "--data", str(poisoned), "--epochs", "1", "--out", str(model)]) == 0
    return poisoned, model


def test_scan_writes_the_three_report_files(tmp_path, poisoned_and_model, capsys):
    poisoned, model = poisoned_and_model
    capsys.readouterr()
    out = tmp_path / "report"
    rc = main(["scan", "--data", str(poisoned), "--model", str(model), "--out", str(out), "--json",
               "--param", "max_dropped_layers=1", "--param", "min_cluster_size=50"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    report = json.loads((out / "report.json").read_text())
    assert printed == report
    assert report["method"] == "flare" and report["n_samples"] == 1500
    assert report["params"]["min_cluster_size"] == 50 and report["params"]["reduce"] == "channel"
    assert set(report["metrics"]) >= {"tpr", "fpr", "precision", "f1"}
    assert report["timings_s"]["extract"] > 0 and report["timings_s"]["detect"] > 0
    assert 1 <= len(report["diagnostics"]["steps"]) <= 2
    rows = list(csv.DictReader((out / "samples.csv").open()))
    assert len(rows) == 1500
    truth = load_npz(poisoned).poison
    assert [int(r["poison"]) for r in rows] == truth.tolist()
    assert sorted(int(r["id"]) for r in rows if r["flagged"] == "1") == sorted(report["flagged"])
    # How each sample was flagged: a stage for every flagged row and none for the others.
    stages = {"vote", "neighbours", "completion", "residual", "settle"}
    assert {r["flagged_by"] for r in rows if r["flagged"] == "1"} <= stages
    assert {r["flagged_by"] for r in rows if r["flagged"] == "0"} <= {""}
    assert all(0 <= int(r["runs_clustered"]) <= 5 and 0 <= int(r["runs_voted"]) <= 5 for r in rows)
    page = (out / "report.html").read_text()
    assert "Stable-subspace search" in page and "data:image/png;base64," in page


def test_scan_of_a_model_without_batchnorm_is_a_clear_error(tmp_path, poisoned_and_model, capsys):
    poisoned, _ = poisoned_and_model
    import torch

    from backdoor_engine.api import scan
    from backdoor_engine.errors import InputError
    from backdoor_engine.models import Normalisation

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(10))
    model(torch.zeros(1, 1, 28, 28))
    with pytest.raises(InputError, match="BatchNorm2d"):
        scan(load_npz(poisoned), model, Normalisation((0.5,), (0.25,)), out_dir=tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("strategy", ["retrain", "unlearn-relearn"])
def test_purify_after_scan_writes_a_checkpoint_with_its_record(tmp_path, poisoned_and_model, capsys, strategy):
    from backdoor_engine.models.checkpoint import load_checkpoint

    poisoned, model = poisoned_and_model
    report = tmp_path / "report.json"
    ids = load_npz(poisoned).ids
    flagged = ids[load_npz(poisoned).poison.astype(bool)][:40].tolist()
    report.write_text(json.dumps({"n_samples": 1500, "flagged": flagged}))
    out = tmp_path / "repaired.pt"
    capsys.readouterr()
    rc = main(["purify", "--data", str(poisoned), "--model", str(model), "--report", str(report),
               "--strategy", strategy, "--epochs", "1", "--eval-data", str(poisoned), "--out", str(out)])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_flagged"] == 40 and 0 <= summary["ba"] <= 1 and "asr" in summary
    _, meta = load_checkpoint(out)
    assert meta["purify"]["strategy"] == strategy and meta["purify"]["n_removed_or_unlearned"] == 40
    assert len(meta["purify"]["history"]) == 1


def test_purify_refuses_a_report_of_another_dataset(tmp_path, poisoned_and_model, capsys):
    poisoned, model = poisoned_and_model
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"n_samples": 1500, "flagged": ["no-such-id"]}))
    out = tmp_path / "repaired.pt"
    rc = main(["purify", "--data", str(poisoned), "--model", str(model), "--report", str(report), "--out", str(out)])
    assert rc == 2 and "does not have" in capsys.readouterr().err and not out.exists()
    report.write_text(json.dumps({"n_samples": 99, "flagged": []}))
    assert main(["purify", "--data", str(poisoned), "--model", str(model), "--report", str(report),
                 "--out", str(out)]) == 2
    assert "another dataset" in capsys.readouterr().err


def _append_corrupt_sample(shard):
    import io
    import tarfile

    with tarfile.open(shard, "a") as tar:
        for name, data in (("zzzz.png", b"\x89PNG\r\n\x1a\n truncated"), ("zzzz.cls", b"3")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_a_streamed_scan_of_tar_shards_flags_what_the_in_memory_scan_flags_and_lists_the_corrupt_file(
        tmp_path, poisoned_and_model, capsys):
    from backdoor_engine.data import write_tar_shards

    poisoned, model = poisoned_and_model
    dataset = load_npz(poisoned)
    shards = write_tar_shards(dataset, tmp_path / "shards", shard_size=600)
    _append_corrupt_sample(shards[-1])
    settings = ["--param", "max_dropped_layers=1", "--param", "min_cluster_size=50", "--json"]
    assert main(["scan", "--data", str(poisoned), "--model", str(model), "--out", str(tmp_path / "a"), *settings]) == 0
    assert main(["scan", "--data", str(tmp_path / "shards"), "--model", str(model), "--out", str(tmp_path / "b"),
                 "--workers", "1", "--dtype", "float32", *settings]) == 0
    capsys.readouterr()
    in_memory = json.loads((tmp_path / "a" / "report.json").read_text())
    streamed = json.loads((tmp_path / "b" / "report.json").read_text())
    assert streamed["n_samples"] == 1500
    assert streamed["skipped"] == [{"id": "shard-000002.tar/zzzz", "reason": streamed["skipped"][0]["reason"]}]
    assert "unreadable image" in streamed["skipped"][0]["reason"]
    # Lossless PNG shards, the same model: the same samples flagged, named by shard and key.
    assert sorted(int(name.split("/")[1]) for name in streamed["flagged"]) == sorted(in_memory["flagged"])
    assert (tmp_path / "b" / "features" / "manifest.json").exists()
    assert "could not be read and were skipped" in (tmp_path / "b" / "report.html").read_text()


def test_a_streamed_image_folder_scan_clusters_a_sample_and_says_so(tmp_path, poisoned_and_model, capsys):
    from backdoor_engine.data import write_image_folder

    poisoned, model = poisoned_and_model
    write_image_folder(load_npz(poisoned), tmp_path / "folder")
    out = tmp_path / "r"
    assert main(["scan", "--data", str(tmp_path / "folder"), "--model", str(model), "--out", str(out), "--json",
                 "--dtype", "float16", "--param", "max_dropped_layers=1", "--param", "min_cluster_size=50",
                 "--param", "exact_max_samples=1000", "--param", "sample_size=1000"]) == 0
    capsys.readouterr()
    report = json.loads((out / "report.json").read_text())
    assert report["n_samples"] == 1500 and report["skipped"] == []
    assert report["diagnostics"]["sampled"]["n_sample"] == 1000
    page = (out / "report.html").read_text()
    assert "clustered a stratified sample of 1,000 of the 1,500" in page
    assert "2-D embedding of the clustered sample" in page
    rows = list(csv.DictReader((out / "samples.csv").open()))
    assert len(rows) == 1500 and all(0.0 <= float(r["score"]) <= 1.0 for r in rows)


def test_a_consensus_scan_from_the_cli_takes_a_clean_set_seeds_every_method_and_prints_the_verdict(
        tmp_path, poisoned_and_model, capsys):
    poisoned, model = poisoned_and_model
    clean = tmp_path / "reference.npz"
    save_npz(load_fashion_mnist("test").subset(np.arange(200)), clean)
    out = tmp_path / "consensus"
    capsys.readouterr()
    rc = main(["scan", "--data", str(poisoned), "--model", str(model), "--out", str(out), "--method",
               "ac,spectral,strip", "--clean", str(clean), "--seed", "3", "--param", "strip.n_superimpose=4",
               "--param", "spectral.expected_rate=0.1"])
    assert rc == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "consensus(ac,spectral,strip)"
    assert report["params"]["ac"]["random_state"] == 3 and report["params"]["strip"]["seed"] == 3
    assert report["params"]["strip"]["n_superimpose"] == 4 and report["diagnostics"]["min_votes"] == 2
    assert "reference" in report["timings_s"] and report["verdict"]["headline"] in printed
    assert report["verdict"]["n_flagged"] == report["n_flagged"]
    # One shared pass, plus STRIP's 4 blends of each sample and of each of the 200 reference images.
    assert report["diagnostics"]["passes"] == {"shared_single_pass": 1, "strip": round(4 * 1700 / 1500, 3),
                                               "total": round(1 + 4 * 1700 / 1500, 3)}
    # A method that reads no clean set refuses one; one that needs it says so without it.
    assert main(["scan", "--data", str(poisoned), "--model", str(model), "--out", str(tmp_path / "x"),
                 "--method", "ac", "--clean", str(clean)]) == 2
    assert "does not read a clean reference set" in capsys.readouterr().err
    assert main(["scan", "--data", str(poisoned), "--model", str(model), "--out", str(tmp_path / "y"),
                 "--method", "strip"]) == 2
    assert "--clean" in capsys.readouterr().err
