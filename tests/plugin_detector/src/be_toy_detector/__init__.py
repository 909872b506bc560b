"""A plugin detector: flags the samples whose suspect-model prediction disagrees with their label."""

from dataclasses import dataclass

import numpy as np

from backdoor_engine.detection import Detection
from backdoor_engine.methods import Detector
from backdoor_engine.methods.base import detector_input
from backdoor_engine.params import param


@dataclass(frozen=True)
class Params:
    margin: float = param(0.0, "ours: a test plugin; any disagreement counts")


class LabelDisagreement(Detector):
    name = "label-disagreement"
    summary = "flags samples the suspect model does not predict as their label (a test plugin)"
    params_class = Params
    needs = frozenset({"logits"})

    def fit_scan(self, data):
        logits = np.asarray(detector_input(data, "logits"), np.float32)
        own = logits[np.arange(len(logits)), data.y]
        best_other = np.where(np.arange(logits.shape[1]) == data.y[:, None], -np.inf, logits).max(axis=1)
        scores = best_other - own
        return Detection(self.name, scores > self.params.margin, params={"margin": self.params.margin},
                         scores=scores)
