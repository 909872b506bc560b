"""FLARE(R) (paper Eq. 10-11) and D-BR's BR module: every epoch, one pass of gradient ascent on the
flagged samples (unlearn), then one pass of cross-entropy on the kept ones (relearn), same optimiser.

Provenance of the defaults: the FLARE paper gives no optimiser settings, so those of D-BR's official
unlearn_relearn.py are used (SEED_NOTES section 2.3): SGD momentum 0.9, weight decay 5e-4, constant lr 1e-4,
20 epochs, crop + flip for the relearning pass. D-BR keeps the epoch with the best (test ACC - test ASR), an
oracle choice; here no test data is looked at (DESIGN section 4): see "Which epoch is returned" below.

Two departures in the unlearning pass (ours; the official settings stay selectable), each chosen by a criterion from
the training split alone, `flagged_acc` (below), and measured in RESULTS.md:
- the flagged images as they are, not augmented (the official code crops and flips them): D-BR on BadNets kept
  ASR 9.1% with it, 2.0% without;
- the loss is the hinge on the given label's margin, max(0, z_y - max_{j != y} z_j), descended with BatchNorm's
  running statistics frozen, instead of ascent on the cross-entropy with BatchNorm in train mode. In train mode an
  all-flagged batch is normalised by its own statistics: ascent makes the model wrong under those while the
  eval-mode model still maps the trigger to its target (Blend a2o: flagged_acc 98.4%); frozen, the cross-entropy's
  gradient vanishes on confident samples (loss 0.04, nothing unlearned). The margin's gradient does not vanish, and
  it stops for a sample once it is no longer classified as its given label, so the pass cannot run away.
Each epoch records `flagged_acc`, the eval-mode accuracy on the un-augmented flagged images with their given
labels: an attack-success estimate from the training split.

Which epoch is returned (ours, `select`): D-BR's official code keeps the epoch with the best test ACC - test ASR.
The same rule is applied here to parts of the training split the run never trains on: a seeded `holdout` fraction
of the flagged samples is left out of the unlearning pass (its accuracy with the given labels, `holdout_flagged_acc`,
estimates attack success without the bias of measuring on the very images ascended on) and a `holdout_clean`
fraction of the relearning part is left out of relearning (`holdout_clean_acc` estimates clean accuracy). The epoch
with the largest holdout_clean_acc - holdout_flagged_acc is returned (the earliest on ties); `select=last` returns
the last epoch and trains on every flagged and kept sample.
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
from ..models.evaluate import accuracy, predict
from ..models.preprocess import Normalisation
from ..models.train import SCHEDULES, TrainConfig, batch_slices, make_scheduler, torch_threads, train_epoch
from ..params import param
from .base import REQUIRED, UNUSED, Repair, Repaired
from .retrain import kept_and_flagged


UNLEARN_LOSSES = ("margin", "ce")
SELECTIONS = ("holdout", "last")


@dataclass(frozen=True)
class UnlearnRelearnParams:
    epochs: int = param(20, "official code: D-BR README, unlearn_relearn.py --epochs 20")
    batch_size: int = param(128, "official code: D-BR unlearn_relearn.py batch 128")
    lr: float = param(1e-4, "official code: D-BR unlearn_relearn.py forces lr 1e-4 every epoch "
                            "(the FLARE paper gives none)")
    momentum: float = param(0.9, "official code: D-BR unlearn_relearn.py SGD momentum 0.9")
    weight_decay: float = param(5e-4, "official code: D-BR unlearn_relearn.py SGD weight decay 5e-4")
    schedule: str = param("constant", "official code: D-BR unlearn_relearn.py keeps lr constant", choices=SCHEDULES)
    augment: bool = param(True, "official code: D-BR crops (pad 4) and flips the relearning pass")
    unlearn_augment: bool = param(False, "ours", reason="the official code also augments the unlearning pass; "
                                  "D-BR on BadNets kept ASR 9.1% with it, 2.0% without (RESULTS.md)")
    unlearn_loss: str = param("margin", "ours", choices=UNLEARN_LOSSES,
                              reason="ce = the official gradient ascent on the cross-entropy; margin = descent on "
                                     "max(0, z_y - max_other z): with cross-entropy the Blend a2o backdoor stayed "
                                     "(flagged_acc 98.4% in BN train mode, loss stuck at 0.04 with BN frozen), "
                                     "the margin unlearned it (RESULTS.md)")
    unlearn_frozen_bn: bool = param(True, "ours", reason="the official code runs the unlearning pass with BatchNorm "
                                    "in train mode (false): an all-flagged batch is then normalised by its own "
                                    "statistics, not those a test image meets (RESULTS.md, Blend a2o)")
    hflip: bool = param(True, "official code: D-BR's CIFAR-10 loaders flip (its other datasets crop only)")
    select: str = param("holdout", "ours", choices=SELECTIONS,
                        reason="the official code keeps the epoch with the best test ACC - test ASR, an oracle; "
                               "holdout applies that rule to held-out parts of the training split instead; last "
                               "= the last epoch, every sample trained on")
    holdout: float = param(0.2, "ours", reason="the flagged part's share kept out of unlearning to estimate attack "
                                               "success without bias (select=holdout)")
    holdout_clean: float = param(0.1, "ours", reason="the relearning part's share kept out of relearning to estimate "
                                                     "clean accuracy (select=holdout)")
    seed: int = param(0, "ours", reason="any fixed seed: the same seed repeats the run")


UNLEARN_OPTIONS = ("unlearn_augment", "unlearn_loss", "unlearn_frozen_bn", "select", "holdout", "holdout_clean")


def unlearn_options(params) -> dict:
    """The unlearning pass's options of a params object, as unlearn_relearn's keyword arguments."""
    return {key: getattr(params, key) for key in UNLEARN_OPTIONS}


def given_label_margin(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean of max(0, z_y - max_{j != y} z_j): how far each sample still is into its given label's region;
    zero once another class wins, so descending it unlearns without pushing past the decision boundary."""
    logits = model(inputs)
    given = logits.gather(1, targets[:, None]).squeeze(1)
    others = logits.scatter(1, targets[:, None], float("-inf")).amax(1)
    return torch.relu(given - others).mean()


def held_out(indices: np.ndarray, fraction: float, generator: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(trained on, held out): a seeded `fraction` of `indices` (rounded down) set aside, both in index order."""
    count = int(len(indices) * fraction)
    chosen = np.zeros(len(indices), bool)
    chosen[generator.choice(len(indices), size=count, replace=False)] = True
    return indices[~chosen], indices[chosen]


def _train_config(**options) -> TrainConfig:
    return TrainConfig(**{k: v for k, v in options.items() if k not in UNLEARN_OPTIONS})


def unlearn_relearn_config(**overrides) -> TrainConfig:
    """A TrainConfig with D-BR's unlearn/relearn defaults (the relearning pass's augmentation), any option
    overridable."""
    return _train_config(**{**dataclasses.asdict(UnlearnRelearnParams()), **overrides})


def unlearn_relearn(model: nn.Module, normalisation: Normalisation, dataset: Dataset, flags: np.ndarray,
                    config: TrainConfig | None = None,
                    callback: Callable[[int, nn.Module], None] | None = None, *,
                    relearn: np.ndarray | None = None, unlearn_augment: bool = False,
                    unlearn_loss: str = "margin", unlearn_frozen_bn: bool = True, select: str = "holdout",
                    holdout: float = 0.2, holdout_clean: float = 0.1) -> tuple[nn.Module, list[dict]]:
    """A repaired copy of `model` (the input is left untouched) and the per-epoch losses and accuracies.

    flags: the samples to unlearn (bool per sample); relearn: the indices to relearn on (default: every
    unflagged sample; D-BR passes its clean part only). unlearn_augment: augment the unlearning pass as the
    relearning one (`config.augment`); the default shows it the flagged images as they are. unlearn_loss: "margin"
    (descend given_label_margin) or "ce" (ascend the cross-entropy, the official loss). unlearn_frozen_bn: the
    unlearning pass normalises with the running BatchNorm statistics and leaves them as they are.
    select: "holdout" returns the epoch with the best holdout_clean_acc - holdout_flagged_acc, measured on the
    `holdout` share of the flagged and the `holdout_clean` share of the relearning samples, which are then not
    trained on (module docstring); "last" returns the last epoch. Every history entry says whether it is the epoch
    returned (`returned`).
    `callback(epoch, model)` runs after each epoch, for monitoring only: nothing it sees picks the result.
    """
    config = config or unlearn_relearn_config()
    kept, flagged = kept_and_flagged(dataset, flags)
    if relearn is not None:
        kept = np.asarray(relearn, dtype=np.int64)
    if len(batch_slices(len(flagged), config.batch_size)) == 0:
        raise InputError(f"unlearning needs at least 2 flagged samples, got {len(flagged)}")
    if unlearn_loss not in UNLEARN_LOSSES:
        raise InputError(f"unlearn_loss must be one of {', '.join(UNLEARN_LOSSES)}, got {unlearn_loss!r}")
    if len(kept) < 2:
        raise InputError(f"relearning needs at least 2 kept samples, got {len(kept)}")
    if select not in SELECTIONS:
        raise InputError(f"select must be one of {', '.join(SELECTIONS)}, got {select!r}")
    if select == "holdout":
        for name, value in (("holdout", holdout), ("holdout_clean", holdout_clean)):
            if not 0 < value < 1:
                raise InputError(f"{name} must lie strictly between 0 and 1 with select=holdout, got {value}")
        split_rng = np.random.default_rng(config.seed)
        flagged, flagged_held = held_out(flagged, holdout, split_rng)
        kept, kept_held = held_out(kept, holdout_clean, split_rng)
        if len(flagged_held) == 0 or len(kept_held) == 0:
            raise InputError(f"select=holdout holds out {len(flagged_held)} of the flagged and {len(kept_held)} of "
                             f"the relearning samples; at least one of each is needed: flag more samples, raise "
                             f"holdout / holdout_clean, or use select=last")
        if len(batch_slices(len(flagged), config.batch_size)) == 0:
            raise InputError(f"unlearning needs at least 2 flagged samples after holding out {len(flagged_held)}, "
                             f"got {len(flagged)}")
    labels = torch.from_numpy(dataset.y.astype(np.int64))
    unlearn_step = ({"objective": given_label_margin} if unlearn_loss == "margin" else {"ascend": True})
    unlearn_config = dataclasses.replace(config, augment=config.augment and unlearn_augment)
    repaired = copy.deepcopy(model).to(config.device, memory_format=torch.channels_last)
    history = []
    with torch_threads(config.num_threads):
        generator = torch.Generator().manual_seed(config.seed)
        optimizer = torch.optim.SGD(repaired.parameters(), lr=config.lr, momentum=config.momentum,
                                    weight_decay=config.weight_decay)
        # Stepped once per batch of both passes, so a cosine schedule spans the whole run.
        steps = len(batch_slices(len(flagged), config.batch_size)) + len(batch_slices(len(kept), config.batch_size))
        scheduler = make_scheduler(optimizer, config, config.epochs * steps)
        best = None  # (score, epoch, state) of the best epoch by the held-out rule

        def acc(rows):  # eval-mode accuracy of the model as it is now, given labels
            return accuracy(predict(repaired, dataset.x[rows], normalisation, batch_size=256), dataset.y[rows])

        for epoch in range(1, config.epochs + 1):
            unlearn = train_epoch(repaired, dataset.x[flagged], labels[flagged], optimizer=optimizer,
                                  scheduler=scheduler, normalisation=normalisation, config=unlearn_config,
                                  generator=generator, description=f"unlearn {epoch}/{config.epochs}",
                                  frozen_batchnorm=unlearn_frozen_bn, **unlearn_step)
            relearn = train_epoch(repaired, dataset.x[kept], labels[kept], optimizer=optimizer,
                                  scheduler=scheduler, normalisation=normalisation, config=config,
                                  generator=generator, description=f"relearn {epoch}/{config.epochs}")
            history.append({"epoch": epoch, "unlearn_loss": unlearn["loss"], "unlearn_acc": unlearn["train_acc"],
                            "relearn_loss": relearn["loss"], "relearn_acc": relearn["train_acc"],
                            "flagged_acc": acc(flagged)})
            if select == "holdout":
                entry = history[-1]
                entry.update(holdout_flagged_acc=acc(flagged_held), holdout_clean_acc=acc(kept_held))
                entry["holdout_score"] = entry["holdout_clean_acc"] - entry["holdout_flagged_acc"]
                if best is None or entry["holdout_score"] > best[0]:
                    best = (entry["holdout_score"], epoch, copy.deepcopy(repaired.state_dict()))
            if callback is not None:
                callback(epoch, repaired)
        if select == "holdout" and best[1] != config.epochs:
            repaired.load_state_dict(best[2])
    for entry in history:
        entry["returned"] = entry["epoch"] == (best[1] if select == "holdout" else config.epochs)
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
        config = _train_config(**dataclasses.asdict(params), progress=progress)
        repaired, history = unlearn_relearn(model, normalisation, dataset, flags, config, **unlearn_options(params))
        settings = {k: v for k, v in dataclasses.asdict(config).items() if k != "progress"}
        return Repaired(repaired, normalisation, history, {**settings, **unlearn_options(params)})
