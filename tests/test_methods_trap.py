"""TRAP (methods/trap.py, purify/backdoor_hiding.py, train --defense trap): isolation stage by stage, the dummy
class end to end."""

import json

import numpy as np
import pytest
import torch

from backdoor_engine.data.dataset import Dataset
from backdoor_engine.errors import InputError
from backdoor_engine.methods import get_detector, make_detector
from backdoor_engine.methods.trap import Isolation, TrapParams, isolate_epoch, suspicious_clusters
from backdoor_engine.models.checkpoint import load_checkpoint
from backdoor_engine.models.preprocess import fit_normalisation
from backdoor_engine.models.registry import build_model
from backdoor_engine.models.train import TrainConfig, train_model
from backdoor_engine.purify import get_repair


def test_a_cluster_is_suspicious_when_not_the_largest_and_of_one_class_or_all_classes():
    clusters = np.array([0] * 50 + [1] * 10 + [2] * 12 + [3] * 9 + [-1] * 5)
    y = np.array([0, 1, 2] * 16 + [0, 1] + [2] * 10 + [0, 1, 2] * 4 + [0, 1] * 4 + [0] + [1] * 5)
    table = {c.label: c for c in suspicious_clusters(clusters, y, 3, "one_or_all_classes")}
    assert not table[0].suspicious and "largest" in table[0].reason
    assert table[1].suspicious and table[1].n_classes == 1 and table[1].majority == 2
    assert table[2].suspicious and "all 3 classes" in table[2].reason
    assert not table[3].suspicious and table[3].n_classes == 2
    assert -1 not in table  # noise is no cluster
    loose = {c.label: c.suspicious for c in suspicious_clusters(clusters, y, 3, "not_largest")}
    assert loose == {0: False, 1: True, 2: True, 3: True}


def test_a_whole_class_that_separates_early_is_not_suspicious_but_an_inflated_relabelled_cluster_is():
    # 5 classes of 100; cluster 1 = 95 of class 1's 100 samples (a class separating early, as trousers do on
    # Fashion-MNIST); the rest is one bulk
    y = np.repeat(np.arange(5), 100)
    clusters = np.zeros(500, np.int64)
    clusters[100:195] = 1
    guarded = {c.label: c for c in suspicious_clusters(clusters, y, 5, "one_or_all_classes", 0.5)}
    assert not guarded[1].suspicious and guarded[1].rule_suspicious and guarded[1].class_share > 0.9
    assert "benign class" in guarded[1].reason
    assert suspicious_clusters(clusters, y, 5, "one_or_all_classes", None)[1].suspicious  # the paper's rule
    # all-to-one: 100 samples of other classes relabelled 0 form a cluster; label 0 now has 200 samples, 100
    # beyond the median: inflated by the cluster's size, so it stays suspicious however much of label 0 it holds
    y_poisoned = np.r_[y, np.zeros(100, np.int64)]
    clusters = np.r_[np.zeros(500, np.int64), np.ones(100, np.int64)]
    clusters[:60] = 1  # and it took 60 clean class-0 samples with it: 160 of label 0's 200
    table = {c.label: c for c in suspicious_clusters(clusters, y_poisoned, 5, "one_or_all_classes", 0.5)}
    assert table[1].suspicious and table[1].class_share > 0.5
    # a partial one-label cluster (clean-label poison of part of a class) keeps the paper's verdict
    clusters = np.zeros(500, np.int64)
    clusters[100:140] = 1
    assert suspicious_clusters(clusters, y, 5, "one_or_all_classes", 0.5)[1].suspicious


def test_a_planted_one_label_island_in_feature_space_is_isolated_and_the_bulk_is_not():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 400)
    features = rng.normal(0, 1, (400, 64)).astype(np.float32)
    features[:40] += 12
    y[:40] = 0
    for mode in ("absolute", "scaled"):
        result = isolate_epoch(features, y, 3, TrapParams(min_samples=10, eps_mode=mode), epoch=1)
        assert result.flags[:40].all() and not result.flags[40:].any(), mode
        assert result.embedding.shape == (400, 2)
    assert result.eps > 3.0  # 400 points: a coarser embedding than the reference's 50,000


def planted_island(n=1200, island=120, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    features = rng.normal(0, 1, (n, 64)).astype(np.float32)
    features[:island] += 12
    y[:island] = 0
    return features, y


def test_the_sampled_tsne_places_the_other_rows_and_flags_as_the_full_fit():
    features, y = planted_island()
    full = isolate_epoch(features, y, 3, TrapParams(min_samples=10), epoch=1)
    sampled = isolate_epoch(features, y, 3, TrapParams(min_samples=10, tsne_sample=400), epoch=1)
    assert full.flags[:120].all() and not full.flags[120:].any()
    assert (sampled.flags == full.flags).mean() >= 0.99
    assert sampled.embedding.shape == (1200, 2) and sampled.clusters.shape == (1200,)
    assert sampled.seconds["place"] > 0


def test_placing_takes_the_majority_cluster_and_mean_position_of_the_nearest_embedded_rows():
    from backdoor_engine.methods.trap import place

    reduced = np.array([[0.0], [1.0], [2.0], [10.0], [11.0], [0.4], [10.6], [1.6]], np.float32)
    rows = np.arange(5)
    embedding = np.array([[0, 0], [1, 0], [2, 0], [10, 5], [11, 5]], np.float32)
    clusters = np.array([0, 0, -1, 1, 1])
    full_embedding, full_clusters = place(reduced, rows, embedding, clusters, k=2)
    assert np.array_equal(full_embedding[:5], embedding) and np.array_equal(full_clusters[:5], clusters)
    assert full_clusters[5] == 0 and full_clusters[6] == 1
    assert full_clusters[7] == -1  # neighbours 2 (noise) and 1 (cluster 0) tie: noise, the lower label
    assert np.allclose(full_embedding[5], [0.5, 0]) and np.allclose(full_embedding[6], [10.5, 5])


def test_a_warm_start_continues_from_the_previous_epochs_embedding_of_the_same_rows(monkeypatch):
    from backdoor_engine import cluster

    features, y = planted_island(n=600, island=60)
    dataset = Dataset(np.random.default_rng(0).integers(0, 256, (600, 4, 4, 1)).astype(np.uint8), y)
    calls = []
    original = cluster.tsne

    def spy(X, **kwargs):
        calls.append(kwargs)
        return original(X, **kwargs)

    monkeypatch.setattr(cluster, "tsne", spy)
    params = TrapParams(min_samples=10, tsne_sample=300, tsne_warm_start=True, warm_iter=100)
    isolation = Isolation(dataset, fit_normalisation(dataset.x), params, num_classes=3)
    first = isolation.observe(1, features)
    second = isolation.observe(2, features + 0.01)
    assert "init" not in calls[0]
    rows = np.flatnonzero(np.isin(np.arange(600), np.random.default_rng(0).choice(600, 300, replace=False)))
    assert np.array_equal(calls[1]["init"], first.embedding[rows])
    assert calls[1]["exaggeration_iter"] == 0 and calls[1]["n_iter"] == 100
    assert first.flags[:60].all() and (second.flags == first.flags).mean() >= 0.99


def test_the_scaled_eps_follows_the_embeddings_own_length_unit():
    from backdoor_engine.methods.trap import REFERENCE_NEIGHBOUR_DISTANCE, effective_eps, neighbour_scale

    embedding = np.random.default_rng(5).normal(0, 10, (500, 2)).astype(np.float32)
    params = TrapParams()
    eps = effective_eps(embedding, params)
    assert eps == pytest.approx(3.0 * neighbour_scale(embedding, 50) / REFERENCE_NEIGHBOUR_DISTANCE)
    assert effective_eps(2 * embedding, params) == pytest.approx(2 * eps, rel=1e-5)
    assert effective_eps(2 * embedding, TrapParams(eps_mode="absolute")) == 3.0


def test_isolation_runs_as_the_trainers_callback_for_the_first_detect_epochs_only():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (128, 12, 12, 1)).astype(np.uint8)
    y = rng.integers(0, 2, 128)
    dataset = Dataset(x, y)
    isolation = Isolation(dataset, fit_normalisation(x), TrapParams(detect_epochs=2, train_epochs=3, min_samples=5))
    train_model(x, y, arch="small_resnet", num_classes=2, callback=isolation,
                config=TrainConfig(epochs=3, batch_size=32, progress=False))
    assert [r.epoch for r in isolation.results_] == [1, 2]
    detection = isolation.detection()
    assert np.array_equal(detection.flags, isolation.results_[0].flags | isolation.results_[1].flags)
    assert set(np.unique(detection.scores)) <= {0.0, 1.0, 2.0}
    assert [e["epoch"] for e in detection.diagnostics["epochs"]] == [1, 2]


def test_union_min_epochs_keeps_only_samples_flagged_in_that_many_epochs(monkeypatch):
    from backdoor_engine.methods import trap

    per_epoch = [np.array([1, 1, 0, 0, 1], bool), np.array([1, 0, 1, 0, 1], bool), np.array([1, 0, 0, 0, 0], bool)]

    def fake_isolate(features, y, num_classes, params, epoch, previous):
        flags = per_epoch[epoch - 1]
        return trap.EpochResult(epoch, flags, np.zeros(len(flags), np.int64), np.zeros((len(flags), 2)), [], 3.0)

    monkeypatch.setattr(trap, "isolate_epoch", fake_isolate)
    dataset = Dataset(np.arange(80, dtype=np.uint8).reshape(5, 4, 4, 1), np.array([0, 1, 0, 1, 0]))
    found = {}
    for k in (1, 2, 3):
        isolation = Isolation(dataset, fit_normalisation(dataset.x), TrapParams(detect_epochs=3, union_min_epochs=k))
        for epoch in (1, 2, 3):
            isolation.observe(epoch, np.zeros((5, 2), np.float32))
        found[k] = np.flatnonzero(isolation.detection().flags).tolist()
        assert isolation.detection().scores.tolist() == [3.0, 1.0, 1.0, 0.0, 2.0]
    assert found == {1: [0, 1, 2, 4], 2: [0, 4], 3: [0]}  # k = 1 is the paper's union


@pytest.mark.parametrize("given, message", [
    ({"detect_epochs": 20, "train_epochs": 10}, "detect_epochs must be in"),
    ({"union_min_epochs": 0}, "union_min_epochs must be >= 1"),
    ({"rule": "largest"}, "rule"),
    ({"eps": 0}, "must be > 0"),
    ({"tsne_sample": 60}, "tsne_sample must exceed"),
    ({"tsne_warm_start": True, "tsne_backend": "cuml"}, "tsne_warm_start needs openTSNE"),
])
def test_bad_trap_parameters_are_refused_naming_the_problem(given, message):
    with pytest.raises(InputError, match=message):
        make_detector("trap", given)


def test_trap_is_registered_needs_no_suspect_model_and_marks_the_papers_values():
    cls = get_detector("trap")
    assert not cls.needs_model()
    text = cls.describe()
    assert "eps=3.0 (paper" in text and "min_samples=50 (paper" in text and "detect_epochs=10 (paper" in text


def _tiny_model(num_classes=3):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return build_model("small_resnet", num_classes=num_classes, in_channels=1, input_size=16).eval()


def test_backdoor_hiding_adds_a_dummy_output_and_sends_the_flagged_samples_there(tmp_path):
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, 300)
    x = rng.integers(0, 50, (300, 16, 16, 1)).astype(np.uint8)
    x[:30, -4:, -4:] = 255
    y[:30] = 0
    dataset = Dataset(x, y)
    model, normalisation = _tiny_model(), fit_normalisation(x)
    flags = np.zeros(300, bool)
    flags[:30] = True
    hidden = get_repair("backdoor-hiding").apply(model, normalisation, dataset, flags, params={"epochs": 2},
                                                 progress=False)
    assert hidden.model.head.out_features == 4 and hidden.config["dummy_class"] == 3
    assert len(hidden.history) == 2 and hidden.config["n_relabelled"] == 30
    # the extractor is the suspect's, untouched
    for name, value in model.state_dict().items():
        if not name.startswith("head."):
            assert torch.equal(value, hidden.model.state_dict()[name])
    from backdoor_engine.data.attacks.harness import PoisonSpec
    from backdoor_engine.models.provenance import save_trained

    path = tmp_path / "hidden.pt"
    spec = PoisonSpec(attack="badnets", mode="a2o", rate=0.1, target=0, seed=0)
    metrics = save_trained(path, hidden.model, normalisation, arch="small_resnet", trained_on=dataset,
                           attack=spec, eval_data=dataset, dummy_class=3)
    assert {"dummy_rate_clean", "dummy_rate_triggered", "asr"} <= set(metrics)
    loaded, meta = load_checkpoint(path)
    assert meta["num_classes"] == 4 and meta["dummy_class"] == 3
    torch.save({"state_dict": torch.load(path, weights_only=True)["state_dict"],
                "meta": {**torch.load(path, weights_only=True)["meta"], "dummy_class": 1}}, tmp_path / "bad.pt")
    with pytest.raises(InputError, match="dummy_class must be the last output"):
        load_checkpoint(tmp_path / "bad.pt")


def test_the_new_head_learns_to_send_separable_flagged_features_to_the_dummy_class():
    from backdoor_engine.purify.backdoor_hiding import BackdoorHidingParams, hide

    rng = np.random.default_rng(4)
    y = rng.integers(0, 3, 600)
    features = rng.normal(0, 1, (600, 16)).astype(np.float32)
    features[np.arange(600), y] += 4  # each class along its own axis
    flags = np.zeros(600, bool)
    flags[:60] = True
    features[:60, 10] += 6  # the "trigger feature"
    y[:60] = 0
    hidden, history = hide(_tiny_model_with_dim(16), features, y, flags, 3, BackdoorHidingParams(epochs=20))
    assert history[-1]["flagged_to_dummy"] >= 0.95
    predicted = hidden.head(torch.from_numpy(features)).argmax(1).numpy()
    assert (predicted[60:] == y[60:]).mean() >= 0.95


def _tiny_model_with_dim(dim):
    model = _tiny_model()
    model.head = torch.nn.Linear(dim, 3)
    return model


def test_train_with_the_trap_defense_writes_a_dummy_class_model_and_its_isolation_report(tmp_path, capsys):
    from backdoor_engine.cli import main

    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 192)
    x = rng.integers(0, 60, (192, 16, 16, 1)).astype(np.uint8)
    x[y == 1, 4:12, 4:12] += 150
    data = tmp_path / "set.npz"
    np.savez(data, x=x, y=y)
    out = tmp_path / "m.pt"
    assert main(["train", "--data", str(data), "--epochs", "2", "--batch-size", "32", "--defense", "trap",
                 "--param", "detect_epochs=1", "--param", "min_samples=5", "--param", "hiding_epochs=2",
                 "--eval-data", str(data), "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["defense"] == "trap" and "dummy_rate_clean" in printed
    # the model before hiding is the undefended reference: its BA is reported beside the defended one
    assert 0 <= printed["undefended"]["ba"] <= 1 and "dummy_rate_clean" not in printed["undefended"]
    _, meta = load_checkpoint(out)
    assert meta["num_classes"] == 3 and meta["dummy_class"] == 2
    defense = meta["defense"]
    assert defense["name"] == "trap" and defense["isolation"]["detect_epochs"] == 1
    assert defense["undefended"] == printed["undefended"]
    assert defense["isolation_provenance"]["eps"].startswith("paper")
    report = json.loads((tmp_path / "m.trap" / "report.json").read_text())
    assert report["method"] == "trap" and len(report["diagnostics"]["epochs"]) == 1
    assert "Epoch 1: t-SNE" in (tmp_path / "m.trap" / "report.html").read_text()
    assert main(["eval", "--model", str(out), "--data", str(data), "--json"]) == 0
    assert "dummy_rate_clean" in json.loads(capsys.readouterr().out)
    assert main(["train", "--data", str(data), "--param", "eps=2", "--out", str(tmp_path / "x.pt")]) != 0
    assert "--param sets the parameters of a --defense" in capsys.readouterr().err
