"""D-BR's backdoor-removal module (Chen et al., NeurIPS 2022, "Effective backdoor defense by exploiting
sensitivity of poisoned samples"): from the backdoored model, every epoch one pass of gradient ascent on the
poisoned part of a three-way split, then one pass of cross-entropy on its clean part; uncertain samples are
left out of both (SEED_NOTES 2.3). The loop and its defaults are FLARE(R)'s (`unlearn_relearn.py`, which
takes everything unflagged as clean); D-BR differs only in reading the split.

The split comes from an FCT report (poisoned = the 5% most transformation-sensitive, clean = the 20% least),
or from any detector's report (flagged = poisoned, unflagged = clean; `purify --clean-fraction F` keeps as
clean only the fraction F of the samples the detector scored lowest). The official code picks the epoch by test
ASR, which we never do: the same rule runs on held-out parts of the split (`select`, unlearn_relearn.py).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..detection import CLEAN, POISONED, split_sizes
from ..errors import InputError
from .base import REQUIRED, UNUSED, Repaired
from .unlearn_relearn import UnlearnRelearn, UnlearnRelearnParams, _train_config, unlearn_options, unlearn_relearn


class DBr(UnlearnRelearn):
    name = "d-br"
    description = ("D-BR: from the suspect model, each epoch gradient ascent on the split's poisoned part, then "
                   "cross-entropy on its clean part (uncertain samples left out)")
    Params = UnlearnRelearnParams
    uses_flags = REQUIRED
    uses_aux = UNUSED
    uses_split = True

    def repair(self, model, normalisation, dataset, flags, aux=None, *, params: UnlearnRelearnParams, arch,
               progress):
        split = flags
        clean = np.flatnonzero(split == CLEAN)
        if len(clean) < 2:
            raise InputError(f"D-BR relearns on the split's clean part, which holds {len(clean)} sample(s)")
        config = _train_config(**dataclasses.asdict(params), progress=progress)
        repaired, history = unlearn_relearn(model, normalisation, dataset, split == POISONED, config,
                                            relearn=clean, **unlearn_options(params))
        settings = {k: v for k, v in dataclasses.asdict(config).items() if k != "progress"}
        return Repaired(repaired, normalisation, history,
                        {**settings, **unlearn_options(params), "split": split_sizes(split)})
