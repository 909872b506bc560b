"""FLARE(R) (paper Eq. 10-11) and D-BR's BR module: every epoch, one pass of gradient ascent on the
flagged samples (unlearn), then one pass of cross-entropy on the kept ones (relearn), same optimiser.

Provenance of the defaults: the FLARE paper gives no optimiser settings, so those of D-BR's official
unlearn_relearn.py are used (SEED_NOTES section 2.3): SGD momentum 0.9, weight decay 5e-4, constant lr 1e-4,
20 epochs, crop + flip for both passes. D-BR keeps the epoch with the best (test ACC - test ASR), an oracle
choice; here the last epoch is returned and no test data is looked at (DESIGN section 4).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..data.dataset import Dataset
from ..errors import InputError
from ..models.preprocess import Normalisation
from ..models.train import SCHEDULES, TrainConfig, batch_slices, make_scheduler, torch_threads, train_epoch
from ..params import param
from .base import REQUIRED, UNUSED, Repair, Repaired
from .retrain import kept_and_flagged


@dataclass(frozen=True)
class UnlearnRelearnParams:
    epochs: int = param(20, "official code: D-BR README, unlearn_relearn.py --epochs 20")
    batch_size: int = param(128, "official code: D-BR unlearn_relearn.py batch 128")
    lr: float = param(1e-4, "official code: D-BR unlearn_relearn.py forces lr 1e-4 every epoch "
                            "(the FLARE paper gives none)")
    momentum: float = param(0.9, "official code: D-BR unlearn_relearn.py SGD momentum 0.9")
    weight_decay: float = param(5e-4, "official code: D-BR unlearn_relearn.py SGD weight decay 5e-4")
    schedule: str = param("constant", "official code: D-BR unlearn_relearn.py keeps lr constant", choices=SCHEDULES)
    augment: bool = param(True, "official code: D-BR crops (pad 4) and flips for both passes")
    hflip: bool = param(True, "official code: D-BR's CIFAR-10 loaders flip (its other datasets crop only)")
    seed: int = param(0, "ours", reason="any fixed seed: the same seed repeats the run")


def unlearn_relearn_config(**overrides) -> TrainConfig:
    """A TrainConfig with D-BR's unlearn/relearn defaults, any option overridable."""
    return TrainConfig(**{**dataclasses.asdict(UnlearnRelearnParams()), **overrides})


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


class UnlearnRelearn(Repair):
    name = "unlearn-relearn"
    description = ("FLARE(R) / D-BR: from the suspect model, each epoch gradient ascent on the flagged samples "
                   "then cross-entropy on the kept ones")
    Params = UnlearnRelearnParams
    uses_flags = REQUIRED
    uses_aux = UNUSED

    def repair(self, model, normalisation, dataset, flags, aux=None, *, params: UnlearnRelearnParams, arch,
               progress):
        config = TrainConfig(**dataclasses.asdict(params), progress=progress)
        repaired, history = unlearn_relearn(model, normalisation, dataset, flags, config)
        settings = {k: v for k, v in dataclasses.asdict(config).items() if k != "progress"}
        return Repaired(repaired, normalisation, history, settings)
