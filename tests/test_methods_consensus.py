"""Several detectors from one pass (`scan --method a,b` / `all`), their agreement and the combined verdict, and
the verdict at the top of every report."""

import csv
import json

import numpy as np
import pytest

from backdoor_engine.detection import Detection
from backdoor_engine.errors import InputError
from backdoor_engine.methods import available_detectors, make_detector
from backdoor_engine.methods.consensus import Consensus, combine_votes, jaccard, method_list, route_params
from backdoor_engine.report.verdict import labels_summary, trigger_estimate


def test_method_lists_are_read_from_commas_lists_and_all():
    available = available_detectors()
    assert method_list("flare", available, have_reference=False) is None
    assert method_list("ac,spectral", available, have_reference=False) == ["ac", "spectral"]
    assert method_list(["ac", "flare"], available, have_reference=False) == ["ac", "flare"]
    from backdoor_engine.methods import get_detector

    everything = method_list("all", available, have_reference=True)
    assert everything == [name for name in available if get_detector(name).needs_model()
                          and get_detector(name).in_all]
    assert {"flare", "ac", "spectral", "strip", "scale_up"} <= set(everything)
    assert not {"vbd", "fct", "trap", "scale_up_clean"} & set(everything)

    without = method_list("all", available, have_reference=False)
    assert all(not get_detector(name).needs_reference() for name in without)
    with pytest.raises(InputError, match="more than once"):
        method_list("ac,ac", available, have_reference=False)
    with pytest.raises(InputError, match="empty name"):
        method_list("ac,,spectral", available, have_reference=False)


def test_parameters_route_to_the_named_method_to_every_method_having_them_or_are_refused():
    from backdoor_engine.methods import get_detector

    members = {name: get_detector(name) for name in ("ac", "spectral")}
    own, routed = route_params(members, {"spectral.expected_rate": 0.05, "min_votes": 1, "random_state": 3})
    assert own == {"min_votes": 1}
    assert routed == {"ac": {"random_state": 3}, "spectral": {"expected_rate": 0.05}}
    with pytest.raises(InputError, match="belongs to none"):
        route_params(members, {"xi": 0.1})
    with pytest.raises(InputError, match="not one of the methods run"):
        route_params(members, {"flare.xi": 0.1})
    with pytest.raises(InputError, match="score"):  # a member's own checks still apply
        Consensus(["ac", "spectral"], {"spectral.score": "sideways"})
    with pytest.raises(InputError, match="exceeds"):
        Consensus(["ac", "spectral"], {"rule": "vote", "min_votes": 3})


def test_votes_jaccard_and_the_majority_rule():
    a = np.array([1, 1, 0, 0, 1], bool)
    b = np.array([1, 0, 0, 1, 1], bool)
    c = np.array([1, 0, 0, 0, 0], bool)
    votes, verdict = combine_votes({"a": a, "b": b, "c": c}, 2)
    assert votes.tolist() == [3, 1, 0, 1, 2] and verdict.tolist() == [True, False, False, False, True]
    assert jaccard(a, b) == pytest.approx(2 / 4) and jaccard(np.zeros(3, bool), np.zeros(3, bool)) is None
    # The default: at least half of the methods run, rounded up.
    assert [Consensus(names).min_votes for names in (["ac", "spectral"], ["ac", "spectral", "spectre"],
                                                     ["ac", "spectral", "spectre", "flare"])] == [1, 2, 2]
    assert Consensus(["ac", "spectral"], {"rule": "vote", "min_votes": 2}).min_votes == 2


def test_a_consensus_scan_runs_every_method_from_one_pass_and_writes_one_report(tmp_path, untrained_scan_inputs,
                                                                                monkeypatch):
    from backdoor_engine import api, engine

    dataset, model, normalisation = untrained_scan_inputs
    passes = []
    original = engine.extract_features

    def counted(*args, **kwargs):
        passes.append(tuple(kwargs.get("capture", ())))
        return original(*args, **kwargs)

    monkeypatch.setattr(engine, "extract_features", counted)
    out = tmp_path / "consensus"
    result = api.scan(dataset, model, normalisation, method="ac,spectral", out_dir=out, progress=False,
                      rule="vote", min_votes=1, **{"spectral.expected_rate": 0.05})
    assert passes == [("penultimate",)]  # one pass serves both methods
    singles = {name: api.scan(dataset, model, normalisation, method=name, progress=False,
                              **({"expected_rate": 0.05} if name == "spectral" else {})).detection
               for name in ("ac", "spectral")}
    d = result.detection
    # min_votes=1: the verdict is the union of the members' flags, each exactly as when run alone.
    assert np.array_equal(d.flags, singles["ac"].flags | singles["spectral"].flags)
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "consensus(ac,spectral)" and report["diagnostics"]["min_votes"] == 1
    assert set(report["diagnostics"]["per_method"]) == {"ac", "spectral"}
    assert "ac|spectral" in report["diagnostics"]["jaccard"]
    assert {"detect_ac", "detect_spectral"} <= set(report["timings_s"])
    assert report["diagnostics"]["passes"] == {"shared_single_pass": 1, "total": 1}
    with open(out / "samples.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(dataset)
    for name in ("ac", "spectral"):
        assert [int(r[f"flagged_{name}"]) for r in table] == singles[name].flags.astype(int).tolist()
    assert [int(r["votes"]) for r in table] == (singles["ac"].flags.astype(int)
                                                + singles["spectral"].flags.astype(int)).tolist()
    page = (out / "report.html").read_text()
    assert "[ac]" in page and "[spectral]" in page and "Agreement: pairwise Jaccard" in page
    assert 'class="verdict"' in page and report["verdict"]["n_flagged"] == d.n_flagged


def test_the_verdict_names_the_flagged_labels_their_inflation_and_the_next_command(tmp_path, untrained_scan_inputs):
    from backdoor_engine import api

    dataset, model, normalisation = untrained_scan_inputs
    out = tmp_path / "spectral"
    api.scan(dataset, model, normalisation, method="spectral", out_dir=out, progress=False, data_name="set.npz",
             model_info={"arch": "tiny", "path": "suspect.pt"})
    verdict = json.loads((out / "report.json").read_text())["verdict"]
    assert verdict["backdoor_suspected"] and verdict["n_flagged"] > 0
    assert "--data set.npz --model suspect.pt --report" in verdict["next"]["command"]
    assert {item["label"] for item in verdict["labels"]} <= set(range(3))
    assert "Trigger estimate" in (out / "report.html").read_text()


def test_label_inflation_and_the_trigger_estimate_find_a_planted_patch():
    class Rows:
        def __init__(self, x, y):
            self.x, self.y = x, y

        def images(self, rows):
            return self.x[rows]

    rng = np.random.default_rng(0)
    y = np.concatenate([np.repeat(np.arange(4), 100), np.zeros(100, int)])  # label 0 doubled by the poison
    x = rng.integers(0, 100, (500, 8, 8, 1)).astype(np.uint8)
    flags = np.zeros(500, bool)
    flags[400:] = True
    x[400:, 5:8, 5:8] = 255  # the trigger
    summary = labels_summary(y, flags, 4, ("a", "b", "c", "d"))
    assert summary[0]["label"] == 0 and summary[0]["name"] == "0 (a)" and summary[0]["inflation"] == 2.0
    assert len(summary) == 1 and summary[0]["share_of_flagged"] == 1.0
    mean, difference = trigger_estimate(Rows(x, y), flags, [0])
    heat = difference.mean(axis=-1)
    assert heat[5:8, 5:8].min() > 5 * heat[:5, :5].max()
    assert np.allclose(mean[5:8, 5:8], 255)


def test_no_flags_says_no_backdoor_and_proposes_no_command(tmp_path):
    from backdoor_engine.report.verdict import build_verdict

    class Rows:
        y = np.array([0, 1, 1])

    verdict, figures = build_verdict(Detection("x", np.zeros(3, bool)), Rows(), {}, num_classes=2, out_dir=None)
    assert not verdict["backdoor_suspected"] and verdict["next"] is None and figures == []
    assert verdict["headline"].startswith("No backdoor found")


def test_the_cli_accepts_method_lists_and_refuses_unknown_names(tmp_path, capsys):
    from backdoor_engine.cli import main

    with pytest.raises(SystemExit):
        main(["scan", "--data", "x.npz", "--out", str(tmp_path / "o"), "--method", "ac,nosuch"])
    assert "unknown method(s) 'nosuch'" in capsys.readouterr().err
    with pytest.raises(InputError, match="belongs to none"):
        make_detector("ac,spectral", {"xi": 1})


def test_a_method_that_refuses_the_scan_is_reported_and_the_others_still_give_the_verdict(untrained_scan_inputs,
                                                                                          monkeypatch):
    from backdoor_engine import api
    from backdoor_engine.methods.activation_clustering import ActivationClustering

    def refuse(self, data):
        raise InputError("no clusters today")

    monkeypatch.setattr(ActivationClustering, "fit_scan", refuse)
    dataset, model, normalisation = untrained_scan_inputs
    result = api.scan(dataset, model, normalisation, method="ac,spectral", progress=False)
    d = result.detection
    assert d.diagnostics["failed"] == {"ac": "no clusters today"} and d.diagnostics["methods"] == ["spectral"]
    assert d.diagnostics["min_votes"] == 1 and "Could not run: ac (no clusters today)" in d.diagnostics["explanation"]
    assert d.method == "consensus(spectral)" and "flagged_ac" not in d.columns
    monkeypatch.setattr(type(Consensus(["ac", "spectral"]).members_["spectral"]), "fit_scan", refuse)
    with pytest.raises(InputError, match="every method of the consensus refused"):
        api.scan(dataset, model, normalisation, method="ac,spectral", progress=False)


def planted_members(n=20000, rate=0.1, seed=0):
    """Flags of five members on planted truth: two precise (TPR 0.99, FPR 0.005), three noisy (TPR 0.6, FPR 0.3),
    independent given the truth."""
    rng = np.random.default_rng(seed)
    truth = rng.random(n) < rate
    rates = [(0.99, 0.005), (0.99, 0.005), (0.6, 0.3), (0.6, 0.3), (0.6, 0.3)]
    flags = np.stack([np.where(truth, rng.random(n) < tpr, rng.random(n) < fpr) for tpr, fpr in rates], axis=1)
    return truth, flags, rates


def f1(verdict, truth):
    tp = np.sum(verdict & truth)
    return 2 * tp / (verdict.sum() + truth.sum())


def test_dawid_skene_recovers_each_members_error_rates_without_labels_and_outvotes_the_noisy_majority():
    from backdoor_engine.methods.consensus import dawid_skene, flags_of_fit

    truth, flags, rates = planted_members()
    fit = dawid_skene(flags)
    assert fit["prior"] == pytest.approx(truth.mean(), abs=0.01)
    for (tpr, fpr), got_tpr, got_fpr in zip(rates, fit["tpr"], fit["fpr"]):
        assert got_tpr == pytest.approx(tpr, abs=0.03) and got_fpr == pytest.approx(fpr, abs=0.02)
    verdict = fit["posterior"] > 0.5
    _, majority = combine_votes({i: flags[:, i] for i in range(5)}, 3)
    assert f1(verdict, truth) > 0.98 and f1(majority, truth) < 0.9
    assert fit["plausible"] and np.array_equal(flags_of_fit(fit), verdict)
    # poison is the class the members flag: negated, they flag the 90% majority, which is no poison class
    negated = dawid_skene(~flags)
    assert negated["prior"] == pytest.approx(1 - fit["prior"], abs=1e-6) and not negated["plausible"]
    assert not flags_of_fit(negated).any()


def test_dawid_skene_flags_nothing_where_the_members_false_positives_are_correlated_and_there_is_no_poison():
    from backdoor_engine.methods.consensus import dawid_skene, flags_of_fit

    # the clean set of the detector table, in miniature: no poison, but half the set (the samples the model is least
    # sure of) is flagged more by the members that read its confidence (SCALE-UP, IBD-PSC, STRIP) and less by those
    # that read the features (AC, Spectral): the rates EM fitted to that scan's flags, rounded
    rng = np.random.default_rng(3)
    n = 20_000
    unsure = rng.random(n) < 0.5
    rates = [(0.99, 0.77), (0.48, 0.01), (0.18, 0.02), (0.004, 0.22), (0.09, 0.21)]  # (in the half, outside it)
    flags = np.stack([np.where(unsure, rng.random(n) < a, rng.random(n) < b) for a, b in rates], axis=1)
    fit = dawid_skene(flags)
    assert fit["prior"] == pytest.approx(0.5, abs=0.05) and not flags_of_fit(fit).any()


def test_dawid_skene_is_a_selectable_rule_that_reports_its_estimates(untrained_scan_inputs):
    from backdoor_engine import api

    dataset, model, normalisation = untrained_scan_inputs
    result = api.scan(dataset, model, normalisation, method="ac,spectral", progress=False, rule="dawid-skene")
    d = result.detection
    assert "Dawid-Skene" in d.diagnostics["rule"] and "Estimated rates" in d.diagnostics["explanation"]
    assert set(d.diagnostics["per_method"]["ac"]["estimated"]) == {"tpr", "fpr"}
    assert np.all((d.scores >= 0) & (d.scores <= 1)) and np.array_equal(d.flags, d.scores > 0.5)
    with pytest.raises(InputError, match="min_votes applies to rule=vote only"):
        Consensus(["ac", "spectral"], {"rule": "dawid-skene", "min_votes": 2})
    with pytest.raises(InputError, match="rule"):
        Consensus(["ac", "spectral"], {"rule": "median"})
    with pytest.raises(InputError, match="max_poison_share must be in"):
        Consensus(["ac", "spectral"], {"rule": "dawid-skene", "max_poison_share": 1.5})
    with pytest.raises(InputError, match="n x m flag matrix"):
        from backdoor_engine.methods.consensus import dawid_skene

        dawid_skene(np.zeros((5, 1), bool))


def test_only_methods_with_a_false_alarm_control_declare_a_presence_test():
    from backdoor_engine.methods import get_detector

    testers = {name for name in available_detectors() if get_detector(name).presence_test}
    assert testers == {"flare", "scan", "vbd"}


def test_the_presence_rule_flags_what_a_presence_test_flags_and_the_fixed_share_members_add_none(
        untrained_scan_inputs, monkeypatch):
    from backdoor_engine import api
    from backdoor_engine.methods.activation_clustering import ActivationClustering
    from backdoor_engine.methods import ReportParts
    from backdoor_engine.methods.spectral import SpectralSignatures

    dataset, model, normalisation = untrained_scan_inputs
    n = len(dataset)
    precise = np.zeros(n, bool)
    precise[:5] = True
    broad = np.zeros(n, bool)
    broad[3:n // 2] = True  # a member flagging a fixed half of the set

    def fixed(flags):
        return lambda self, data: Detection(self.name, flags.copy(), params={}, scores=flags.astype(float),
                                            diagnostics={"explanation": "planted"})

    monkeypatch.setattr(ActivationClustering, "fit_scan", fixed(precise))
    monkeypatch.setattr(SpectralSignatures, "fit_scan", fixed(broad))
    for cls in (ActivationClustering, SpectralSignatures):
        monkeypatch.setattr(cls, "report", lambda self, detection, rows, out_dir: ReportParts())
    monkeypatch.setattr(ActivationClustering, "presence_test", True)
    d = api.scan(dataset, model, normalisation, method="ac,spectral", progress=False, rule="presence").detection
    assert np.array_equal(d.flags, precise)  # the broad member's 40-odd extra flags are not added
    assert "presence test (ac)" in d.diagnostics["rule"] and "presence test (ac) flags it" in \
        d.diagnostics["explanation"]
    # both testers: their union
    monkeypatch.setattr(SpectralSignatures, "presence_test", True)
    d = api.scan(dataset, model, normalisation, method="ac,spectral", progress=False, rule="presence").detection
    assert np.array_equal(d.flags, precise | broad)
    # no tester ran: the vote, said so
    monkeypatch.setattr(ActivationClustering, "presence_test", False)
    monkeypatch.setattr(SpectralSignatures, "presence_test", False)
    d = api.scan(dataset, model, normalisation, method="ac,spectral", progress=False, rule="presence").detection
    assert np.array_equal(d.flags, precise | broad) and "fell back to this vote" in d.diagnostics["rule"]
    with pytest.raises(InputError, match="min_votes applies to rule=vote only"):
        Consensus(["ac", "spectral"], {"rule": "presence", "min_votes": 1})
