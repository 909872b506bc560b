"""File names are hostile input too: the report writes any sample id losslessly and never parses it as markup."""

import csv
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from backdoor_engine.cli import main
from backdoor_engine.data.dataset import make_dataset
from backdoor_engine.detection import Detection
from backdoor_engine.models import Normalisation, build_model, save_checkpoint
from backdoor_engine.report.writers import escape_id, unescape_id, write_report

NON_UTF8 = os.fsdecode(b"caf\xe9_\xff.png")  # Latin-1 bytes: surrogate escapes in Python
HOSTILE_IDS = [NON_UTF8, "$\\nosuchcmd$_1.png", "a\\x41b\n\tc.png", "naïve_日本.png", "plain.png", "$$.png"]


@pytest.mark.parametrize("sample_id", HOSTILE_IDS + ["\\", "\\\\xff", "\udcff\\"])
def test_escaped_ids_read_back_unchanged_and_encode_as_utf8(sample_id):
    text = escape_id(sample_id)
    text.encode("utf-8")  # no surrogate left
    assert "\n" not in text and unescape_id(text) == sample_id


def test_report_with_non_utf8_and_mathtext_ids_is_written_and_lossless(tmp_path):
    n = len(HOSTILE_IDS)
    x = np.random.default_rng(0).integers(0, 256, (n, 8, 8, 1), dtype=np.uint8)
    dataset = make_dataset(x, np.arange(n) % 2, ids=np.array(HOSTILE_IDS))
    flags = np.ones(n, bool)
    detection = Detection("test", flags, scores=np.linspace(1, 0, n))
    report = write_report(tmp_path, detection, dataset, timings_s={"detect": 0.1})
    rows = list(csv.DictReader((tmp_path / "samples.csv").open(encoding="utf-8", newline="")))
    assert [unescape_id(r["id"]) for r in rows] == HOSTILE_IDS
    assert json.loads((tmp_path / "report.json").read_text())["flagged"] == HOSTILE_IDS == report["flagged"]
    page = (tmp_path / "report.html").read_bytes().decode("utf-8")
    assert "Most suspicious samples" in page


def test_scan_of_an_image_folder_with_hostile_file_names_writes_its_report(tmp_path, capsys):
    root = tmp_path / "images"
    names = [os.fsencode(NON_UTF8), b"$\\nosuchcmd$_1.png", b"ok.png"]
    rng = np.random.default_rng(0)
    for label in ("0", "1"):
        (root / label).mkdir(parents=True)
        for k in range(4):
            for name in names:
                path = os.path.join(os.fsencode(root / label), b"%d_" % k + name)
                with open(path, "wb") as f:
                    Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(f, format="PNG")
    torch.manual_seed(0)
    model = build_model("small_resnet", num_classes=2, in_channels=1, input_size=8).eval()
    save_checkpoint(tmp_path / "m.pt", model, arch="small_resnet", num_classes=2, in_channels=1, input_size=8,
                    normalisation=Normalisation((0.5,), (0.25,)))
    out = tmp_path / "out"
    rc = main(["scan", "--data", str(root), "--model", str(tmp_path / "m.pt"), "--out", str(out), "--method",
               "spectral", "--workers", "0", "--json"])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    rows = list(csv.DictReader((out / "samples.csv").open(encoding="utf-8", newline="")))
    ids = {unescape_id(r["id"]) for r in rows}
    assert len(rows) == 24 and set(map(str, report["flagged"])) <= ids
    assert any(os.fsencode(i).endswith(b"caf\xe9_\xff.png") for i in ids)
    assert (out / "report.html").stat().st_size > 0


def test_flags_from_report_checks_the_recorded_fingerprint_and_accepts_older_reports(tmp_path):
    from backdoor_engine.data.dataset import as_source
    from backdoor_engine.errors import InputError
    from backdoor_engine.report.reading import flags_from_report

    rng = np.random.default_rng(0)
    scanned = make_dataset(rng.integers(0, 256, (5, 8, 8, 1), dtype=np.uint8), np.arange(5) % 2)
    other = make_dataset(rng.integers(0, 256, (5, 8, 8, 1), dtype=np.uint8), np.arange(5) % 2)
    base = {"n_samples": 5, "flagged": [1, 3]}
    for name, data in (("older", None), ("same", {"source": "s.npz", "fingerprint": as_source(scanned).fingerprint(),
                                                  "fingerprint_of": "ArraySource"})):
        (tmp_path / f"{name}.json").write_text(json.dumps({**base, **({} if data is None else {"data": data})}))
        assert flags_from_report(scanned, tmp_path / f"{name}.json").tolist() == [False, True, False, True, False]
    with pytest.raises(InputError, match="report of another dataset \\(s.npz\\)"):
        flags_from_report(other, tmp_path / "same.json")
