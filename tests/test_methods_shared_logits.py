"""SCALE-UP and IBD-PSC take the plain prediction from the shared pass when a scan reads the classifier head anyway
(a consensus with penultimate-feature methods): one forward pass fewer each, and the same result as computing it
themselves, which they do when scanned alone."""

import numpy as np
import pytest

from backdoor_engine import api
from backdoor_engine.methods import make_detector


@pytest.mark.parametrize("method", ["scale_up", "ibd_psc"])
def test_the_plain_prediction_comes_from_the_shared_pass_with_the_same_result(method, untrained_scan_inputs):
    dataset, model, normalisation = untrained_scan_inputs
    reference = dataset.subset(np.arange(0, 300, 5))
    kwargs = {"clean": reference} if method == "ibd_psc" else {}
    assert make_detector(f"spectral,{method}").captures() == ("penultimate", "logits")
    assert make_detector(f"flare,{method}").captures() == ("bn_minima",)  # no head read: nothing added
    together = api.scan(dataset, model, normalisation, method=f"spectral,{method}", progress=False, **kwargs)
    alone = api.scan(dataset, model, normalisation, method=method, progress=False, **kwargs).detection
    shared = together.detection.diagnostics["member_diagnostics"][method]
    assert shared["plain_prediction"] == "from the scan's shared pass"
    assert alone.diagnostics["plain_prediction"] == "computed here"
    flags = together.detection.columns[f"flagged_{method}"].astype(bool)
    assert np.array_equal(flags, alone.flags)
    np.testing.assert_allclose(together.detection.columns[f"score_{method}"], alone.scores, atol=1e-9)
    assert alone.diagnostics["n_forward"] - shared["n_forward"] == len(dataset)
