"""Parameters are hostile input: NaN and infinity compare false with every bound, so they are refused by name
when parsed (params.build_params), and FLARE says what it starts before each long clustering fit."""

import math

import numpy as np
import pytest

from backdoor_engine.errors import InputError
from backdoor_engine.methods import flare as flare_module
from backdoor_engine.methods import get_detector
from backdoor_engine.methods.flare import FlareParams, search_subspace
from backdoor_engine.params import build_params
from backdoor_engine.purify import get_repair


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("name", ["xi", "n_neighbors", "min_dist"])
def test_non_finite_numbers_are_refused_for_float_and_int_fields(name, value):
    with pytest.raises(InputError, match=f"flare: {name} must be (a finite number|an integer)"):
        build_params(FlareParams, {name: value}, "flare")


def test_non_finite_numbers_are_refused_for_optional_and_list_fields():
    with pytest.raises(InputError, match="expected_rate must be a finite number"):
        get_detector("spectral")(expected_rate=math.nan)
    with pytest.raises(InputError, match="lr must be a finite number"):
        get_repair("retrain").params({"lr": math.inf})


def test_finite_values_still_pass():
    assert build_params(FlareParams, {"xi": 0.05, "n_neighbors": 15.0}, "flare").n_neighbors == 15


class Stop(Exception):
    pass


def test_search_subspace_announces_each_umap_and_hdbscan_fit_before_it_runs(monkeypatch):
    from backdoor_engine.engine.layout import FeatureLayout

    events = []
    monkeypatch.setattr(flare_module.cluster, "umap", lambda X, **kw: (events.append("umap ran"), np.zeros((len(X), 2)))[1])

    def hdbscan(embedding, **kw):
        events.append("hdbscan ran")
        raise Stop

    monkeypatch.setattr(flare_module.cluster, "hdbscan", hdbscan)
    layout = FeatureLayout(("bn1", "bn2"), (3, 2))
    features = np.random.default_rng(0).normal(size=(50, 5)).astype(np.float32)
    with pytest.raises(Stop):
        search_subspace(features, layout, FlareParams(min_cluster_size=5, pca_components=None),
                        stage=lambda name, shape: events.append((name, shape)))
    assert events == [("umap", (50, 5)), "umap ran", ("hdbscan", (50, 2)), "hdbscan ran"]
