"""FLARE(R) (paper Eq. 10-11) and D-BR's BR module: every epoch, one pass of gradient ascent on the
flagged samples (unlearn), then one pass of cross-entropy on the kept ones (relearn), same optimiser.

Provenance of the defaults: the FLARE paper gives no optimiser settings, so those of D-BR's official
unlearn_relearn.py are used (SEED_NOTES section 2.3): SGD momentum 0.9, weight decay 5e-4, constant lr 1e-4,
20 epochs, crop + flip for both passes. D-BR keeps the epoch with the best (test ACC - test ASR), an oracle
choice; here the last epoch is returned and no test data is looked at (DESIGN section 4).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
import numpy as np
import torch
from torch import nn

from ..data.dataset import Dataset
from ..errors import InputError
from ..models.preprocess import Normalisation
from ..models.train import TrainConfig, batch_slices, make_scheduler, torch_threads, train_epoch
from .retrain import kept_and_flagged


# D-BR's official settings (SEED_NOTES section 2.3); the rest as the trainer's defaults.
D_BR_DEFAULTS = {"epochs": 20, "lr": 1e-4, "schedule": "constant"}


def unlearn_relearn_config(**overrides) -> TrainConfig:
    """A TrainConfig with D-BR's unlearn/relearn defaults, any option overridable."""
    return TrainConfig(**{**D_BR_DEFAULTS, **overrides})


def unlearn_relearn(model: nn.Module, normalisation: Normalisation, dataset: Dataset, flags: np.ndarray,
                    config: TrainConfig | None = None,
                    callback: Callable[[int, nn.Module], None] | None = None) -> tuple[nn.Module, list[dict]]:
    """A repaired copy of `model` (the input is left untouched) and the per-epoch losses.

    `callback(epoch, model)` runs after each epoch, for monitoring only: nothing it sees picks the result.
    """
    config = config or unlearn_relearn_config()
    kept, flagged = kept_and_flagged(dataset, flags)
    if len(batch_slices(len(flagged), config.batch_size)) == 0:
        raise InputError(f"unlearning needs at least 2 flagged samples, got {len(flagged)}")
    if len(kept) < 2:
        raise InputError(f"relearning needs at least 2 kept samples, got {len(kept)}")
    labels = torch.from_numpy(dataset.y.astype(np.int64))
    repaired = copy.deepcopy(model).to(config.device, memory_format=torch.channels_last)
    history = []
    with torch_threads(config.num_threads):
        generator = torch.Generator().manual_seed(config.seed)
        optimizer = torch.optim.SGD(repaired.parameters(), lr=config.lr, momentum=config.momentum,
                                    weight_decay=config.weight_decay)
        # Stepped once per batch of both passes, so a cosine schedule spans the whole run.
        steps = len(batch_slices(len(flagged), config.batch_size)) + len(batch_slices(len(kept), config.batch_size))
        scheduler = make_scheduler(optimizer, config, config.epochs * steps)
        for epoch in range(1, config.epochs + 1):
            unlearn = train_epoch(repaired, dataset.x[flagged], labels[flagged], optimizer=optimizer,
                                  scheduler=scheduler, normalisation=normalisation, config=config,
                                  generator=generator, description=f"unlearn {epoch}/{config.epochs}", ascend=True)
            relearn = train_epoch(repaired, dataset.x[kept], labels[kept], optimizer=optimizer,
                                  scheduler=scheduler, normalisation=normalisation, config=config,
                                  generator=generator, description=f"relearn {epoch}/{config.epochs}")
            history.append({"epoch": epoch, "unlearn_loss": unlearn["loss"], "unlearn_acc": unlearn["train_acc"],
                            "relearn_loss": relearn["loss"], "relearn_acc": relearn["train_acc"]})
            if callback is not None:
                callback(epoch, repaired)
    repaired = repaired.to(memory_format=torch.contiguous_format).eval()
    return repaired, history
