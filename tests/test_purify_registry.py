"""The repair registry, the provenance of every strategy's defaults, plugins, and the purify command."""

import dataclasses
import importlib.metadata
import json
import re
import sys
import types
from dataclasses import dataclass

import numpy as np
import pytest
import torch

import backdoor_engine.purify as purify_registry
from backdoor_engine import api
from backdoor_engine.data.attacks import harness
from backdoor_engine.models.provenance import save_trained
from backdoor_engine.cli import main
from backdoor_engine.data import make_dataset
from backdoor_engine.data.dataset import save_npz
from backdoor_engine.errors import InputError
from backdoor_engine.models.checkpoint import load_checkpoint
from backdoor_engine.models.train import TrainConfig
from backdoor_engine.params import PROVENANCE_KINDS, build_params, choices_of, param, provenance_of
from backdoor_engine.purify import (ENTRY_POINT_GROUP, REQUIRED, UNUSED, Repair, Repaired, available_repairs,
                                    broken_repairs, get_repair)


def test_the_registry_lists_every_built_in_strategy():
    assert {"retrain", "unlearn-relearn", "d-br", "d-st", "backdoor-hiding"} <= set(available_repairs())
    assert get_repair("retrain").name == "retrain"


def test_an_unknown_strategy_is_refused_listing_the_registered_ones():
    with pytest.raises(InputError, match="unknown purify strategy 'retrian'; registered: anp, backdoor-hiding, d-br, d-st, fst, ft, ft-sam, npd, retrain, sau, unlearn-relearn"):
        get_repair("retrian")


@pytest.mark.parametrize("name", available_repairs())
def test_every_default_of_every_strategy_says_where_it_comes_from(name):
    strategy = get_repair(name)
    provenance = provenance_of(strategy.Params)
    assert list(provenance) == [f.name for f in dataclasses.fields(strategy.Params)]
    for field, text in provenance.items():
        kind = next(k for k in PROVENANCE_KINDS if text.startswith(k))
        if kind == "ours":
            assert len(text) > len("ours: ") + 10, f"{name}.{field}: an 'ours' default must say why"
    assert strategy.description.strip() and "\n" not in strategy.description


def test_a_typo_in_a_choice_is_refused_naming_the_field_and_its_choices():
    with pytest.raises(InputError, match=r"'unlearn-relearn': schedule must be one of 'cosine', 'constant', "
                                         r"got 'cosin'"):
        get_repair("unlearn-relearn").params({"schedule": "cosin"})
    # Case is forgiven; the listed spelling is kept.
    assert get_repair("unlearn-relearn").params({"schedule": "Cosine"}).schedule == "cosine"


@dataclass(frozen=True)
class _Example:
    xi_mode: str = param("relative", "ours", reason="scale-free threshold", choices=("relative", "absolute"))
    xi: float = param(0.02, "paper: FLARE Sec. 4")
    depth: int = param(3, "official code: flare.py")
    layers: list = param([1, 2], "paper")


def test_build_params_refuses_unknown_names_and_coerces_the_rest():
    with pytest.raises(InputError, match=r"flare: unknown parameter\(s\) x; known: xi_mode, xi, depth, layers"):
        build_params(_Example, {"x": 1}, "flare")
    with pytest.raises(InputError, match="flare: xi_mode must be one of 'relative', 'absolute', got 'relativ'"):
        build_params(_Example, {"xi_mode": "relativ"}, "flare")
    with pytest.raises(InputError, match="depth must be an integer, got 2.5"):
        build_params(_Example, {"depth": 2.5}, "flare")
    built = build_params(_Example, {"xi": 1, "depth": 4.0}, "flare")
    assert built.xi == 1.0 and isinstance(built.xi, float) and built.depth == 4 and isinstance(built.depth, int)
    assert build_params(_Example, None, "flare").layers is not _Example().layers  # a fresh list per instance
    assert choices_of(_Example) == {"xi_mode": ("relative", "absolute")}
    assert provenance_of(_Example)["xi_mode"] == "ours: scale-free threshold"


@pytest.mark.parametrize("provenance,reason,message", [
    ("ours", None, "needs a reason"),
    ("guess", None, "must start with one of"),
    ("papers", None, "must start with one of"),
])
def test_a_default_without_valid_provenance_is_refused_when_the_class_is_defined(provenance, reason, message):
    with pytest.raises(TypeError, match=message):
        param(1, provenance, reason=reason)
    with pytest.raises(TypeError, match="not among its own choices"):
        param("c", "paper", choices=("a", "b"))


def test_a_params_field_without_provenance_is_named():
    @dataclass
    class Loose:
        good: int = param(1, "paper")
        bare: int = 2

    with pytest.raises(TypeError, match="bare have no provenance"):
        provenance_of(Loose)


# A plugin strategy: re-estimates BatchNorm statistics on a small clean set (no flags, an aux set required).
@dataclass(frozen=True)
class _RecalibrateParams:
    batch_size: int = param(64, "ours", reason="small enough for an auxiliary set of a few hundred images")


class _Recalibrate(Repair):
    name = "bn-recalibrate"
    description = "re-estimate BatchNorm statistics on a clean auxiliary set"
    Params = _RecalibrateParams
    uses_flags = UNUSED
    uses_aux = REQUIRED

    def repair(self, model, normalisation, dataset, flags, aux=None, *, params, arch, progress):
        import copy

        from backdoor_engine.models.preprocess import to_model_input

        repaired = copy.deepcopy(model)
        for module in repaired.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.reset_running_stats()
                module.momentum = None  # cumulative average over the aux batches
        repaired.train()
        with torch.no_grad():
            for start in range(0, len(aux), params.batch_size):
                repaired(to_model_input(torch.from_numpy(aux.x[start:start + params.batch_size]), normalisation))
        return Repaired(repaired.eval(), normalisation, [{"n_aux": len(aux)}], dataclasses.asdict(params))


class _NoProvenance(_Recalibrate):
    name = "loose"

    @dataclass(frozen=True)
    class Params:
        batch_size: int = 64


@pytest.fixture
def plugins(monkeypatch):
    """Entry points as an installed package would declare them: one good plugin, one that fails to import, one
    without provenance. The registry's plugin cache is reset around the test."""
    module = types.ModuleType("fake_repair_plugin")
    module.Recalibrate, module.NoProvenance = _Recalibrate, _NoProvenance
    monkeypatch.setitem(sys.modules, "fake_repair_plugin", module)
    entries = [importlib.metadata.EntryPoint("bn-recalibrate", "fake_repair_plugin:Recalibrate", ENTRY_POINT_GROUP),
               importlib.metadata.EntryPoint("missing", "no_such_module_xyz:Strategy", ENTRY_POINT_GROUP),
               importlib.metadata.EntryPoint("loose", "fake_repair_plugin:NoProvenance", ENTRY_POINT_GROUP)]
    real = importlib.metadata.entry_points

    def entry_points(**selection):
        if selection.get("group") == ENTRY_POINT_GROUP:
            return importlib.metadata.EntryPoints(entries)
        return real(**selection)

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    monkeypatch.setattr(purify_registry, "_PLUGINS", None)
    monkeypatch.setattr(purify_registry, "_BROKEN", {})


def test_a_plugin_registered_through_an_entry_point_is_found_and_broken_ones_are_named(plugins):
    assert "bn-recalibrate" in available_repairs()
    assert isinstance(get_repair("bn-recalibrate"), _Recalibrate)
    broken = broken_repairs()
    assert set(broken) == {"missing", "loose"}
    assert "no_such_module_xyz" in broken["missing"] and "no provenance" in broken["loose"]
    with pytest.raises(InputError, match="'missing' is a plugin that failed to load .*no_such_module_xyz"):
        get_repair("missing")


def separable_set(count=96, seed=0):
    """Three classes told apart by brightness."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, count).astype(np.int64)
    x = (y[:, None, None, None] * 90 + rng.integers(0, 40, (count, 12, 12, 1))).astype(np.uint8)
    return make_dataset(x, y)


@pytest.fixture(scope="module")
def suspect(tmp_path_factory):
    """A tiny dataset, a checkpoint trained on it that records a BadNets attack, and a scan report flagging class 2."""
    folder = tmp_path_factory.mktemp("purify")
    data = separable_set()
    save_npz(data, folder / "data.npz")
    trained = api.train(data, arch="small_resnet", config=TrainConfig(epochs=1, batch_size=32, progress=False))
    save_trained(folder / "suspect.pt", trained.model, trained.normalisation, arch="small_resnet",
                     trained_on=data, extra={"train": {"note": "fixture"}}, attack=harness.PoisonSpec("badnets"))
    flagged = data.ids[data.y == 2].tolist()
    (folder / "report.json").write_text(json.dumps({"n_samples": len(data), "flagged": flagged}))
    return folder, data


def test_cli_purify_writes_a_checkpoint_recording_strategy_settings_provenance_and_eval(tmp_path, suspect, capsys):
    folder, data = suspect
    out = tmp_path / "fixed.pt"
    rc = main(["purify", "--data", str(folder / "data.npz"), "--model", str(folder / "suspect.pt"),
               "--report", str(folder / "report.json"), "--strategy", "unlearn-relearn", "--epochs", "1",
               "--param", "batch_size=32", "--param", "schedule=cosine", "--eval-data", str(folder / "data.npz"),
               "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["n_flagged"] == int((data.y == 2).sum()) and 0.0 <= summary["ba"] <= 1.0 and "asr" in summary
    _, meta = load_checkpoint(out)
    record = meta["purify"]
    assert record["strategy"] == "unlearn-relearn" and record["n_removed_or_unlearned"] == summary["n_flagged"]
    assert record["config"]["epochs"] == 1 and record["config"]["batch_size"] == 32
    assert record["config"]["schedule"] == "cosine" and record["config"]["lr"] == 1e-4
    assert record["param_provenance"]["lr"].startswith("official code")
    assert len(record["history"]) == 1
    assert meta["attack"]["attack"] == "badnets"  # carried over, so `eval` of the repaired model needs no flags
    assert meta["eval"]["ba"] == summary["ba"] and meta["eval"]["data"] == str(folder / "data.npz")


@pytest.mark.parametrize("extra,message", [
    (["--aux", "DATA"], "'retrain' takes no auxiliary clean set"),
    (["--param", "schedule=cosin"], "schedule must be one of"),
    (["--param", "epoch=1"], r"unknown parameter\(s\) epoch; known: epochs"),
    (["--epochs", "1", "--param", "epochs=2"], "epochs is given both as --epochs and as --param"),
])
def test_cli_purify_refuses_bad_options_before_reading_anything_and_writes_nothing(tmp_path, suspect, capsys, extra,
                                                                                   message):
    folder, _ = suspect
    out = tmp_path / "fixed.pt"
    extra = [str(folder / "data.npz") if item == "DATA" else item for item in extra]
    rc = main(["purify", "--data", str(folder / "data.npz"), "--model", str(folder / "suspect.pt"),
               "--report", str(folder / "report.json"), "--strategy", "retrain", *extra, "--out", str(out)])
    assert rc == 2
    assert re.search(message, capsys.readouterr().err)
    assert not out.exists()


def test_cli_purify_runs_an_aux_plugin_and_names_a_broken_one(tmp_path, suspect, plugins, capsys):
    folder, data = suspect
    out = tmp_path / "recalibrated.pt"
    rc = main(["purify", "--data", str(folder / "data.npz"), "--model", str(folder / "suspect.pt"),
               "--strategy", "bn-recalibrate", "--aux", str(folder / "data.npz"), "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    model, meta = load_checkpoint(out)
    assert meta["purify"]["aux"] == str(folder / "data.npz") and meta["purify"]["report"] is None
    assert meta["purify"]["history"] == [{"n_aux": len(data)}]
    suspect_model, _ = load_checkpoint(folder / "suspect.pt")
    means = [name for name in model.state_dict() if name.endswith("running_mean")]
    assert means and not any(torch.equal(model.state_dict()[name], suspect_model.state_dict()[name])
                             for name in means)
    capsys.readouterr()
    # A strategy that does not use flags refuses a report rather than ignoring it.
    assert main(["purify", "--data", str(folder / "data.npz"), "--model", str(folder / "suspect.pt"),
                 "--report", str(folder / "report.json"), "--strategy", "bn-recalibrate",
                 "--aux", str(folder / "data.npz"), "--out", str(tmp_path / "x.pt")]) == 2
    assert "does not use a scan's flags" in capsys.readouterr().err
    assert main(["purify", "--data", str(folder / "data.npz"), "--model", str(folder / "suspect.pt"),
                 "--strategy", "missing", "--out", str(tmp_path / "y.pt")]) == 2
    assert "failed to load" in capsys.readouterr().err
