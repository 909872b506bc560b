"""TRAP's backdoor hiding (section IV-B): relabel the flagged samples as a new dummy class K (0-based; the
paper's C+1), freeze the feature extractor and retrain the classifier head from scratch with K+1 outputs for
E_r epochs with cross-entropy on the clean and the relabelled samples. The backdoor's features then lead to
the dummy class instead of the attacker's target. Works after any detector's report.

The paper gives no optimiser for this stage, and nothing about augmentation. Ours: the frozen extractor runs
once over the un-augmented set (the engine's single pass, penultimate capture) and the head trains on those
features, SGD lr 0.01 / momentum 0.9 / wd 5e-4 / batch 128 (the D-BR / BackdoorBench recipe), the last epoch
kept. The checkpoint has K+1 outputs and records `dummy_class = K`; `eval` counts a clean image predicted as
the dummy as an error and reports how often triggered images land there.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..errors import InputError
from ..params import param
from .base import REQUIRED, UNUSED, Repair, Repaired


@dataclass(frozen=True)
class BackdoorHidingParams:
    epochs: int = param(10, "paper: E_r = 10 epochs of retraining the classifier")
    lr: float = param(0.01, "ours", reason="the paper gives none; D-BR / BackdoorBench's SGD lr 0.01")
    momentum: float = param(0.9, "ours", reason="the paper gives none; D-BR / BackdoorBench's SGD momentum")
    weight_decay: float = param(5e-4, "ours", reason="the paper gives none; D-BR / BackdoorBench's weight decay")
    batch_size: int = param(128, "ours", reason="the paper gives none; D-BR / BackdoorBench's batch 128")
    seed: int = param(0, "ours", reason="any fixed seed: the head's initialisation and the batch order")

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise InputError(f"backdoor-hiding: epochs and batch_size must be >= 1 and lr > 0, got {self.epochs}, "
                             f"{self.batch_size}, {self.lr}")


def hide(model: nn.Module, features: np.ndarray, y: np.ndarray, flags: np.ndarray, num_classes: int,
         params: BackdoorHidingParams) -> tuple[nn.Module, list[dict]]:
    """A copy of `model` whose head is a fresh Linear(D, num_classes + 1) trained on `features` (the frozen
    extractor's output for every sample) with the flagged samples relabelled as class `num_classes`."""
    dummy = num_classes
    hidden = copy.deepcopy(model).eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(params.seed)
        hidden.head = nn.Linear(hidden.head.in_features, num_classes + 1)
    targets = torch.from_numpy(np.where(flags, dummy, y).astype(np.int64))
    inputs = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    optimizer = torch.optim.SGD(hidden.head.parameters(), lr=params.lr, momentum=params.momentum,
                                weight_decay=params.weight_decay)
    generator = torch.Generator().manual_seed(params.seed)
    history = []
    for epoch in range(1, params.epochs + 1):
        order = torch.randperm(len(inputs), generator=generator)
        total, correct = 0.0, 0
        for start in range(0, len(order), params.batch_size):
            batch = order[start:start + params.batch_size]
            logits = hidden.head(inputs[batch])
            loss = F.cross_entropy(logits, targets[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
            correct += int((logits.argmax(1) == targets[batch]).sum())
        with torch.no_grad():
            predicted = hidden.head(inputs).argmax(1)
        history.append({"epoch": epoch, "loss": total / len(order), "train_acc": correct / len(order),
                        "flagged_to_dummy": float((predicted[torch.from_numpy(flags)] == dummy).float().mean())
                        if flags.any() else None})
    return hidden.eval(), history


class BackdoorHiding(Repair):
    name = "backdoor-hiding"
    description = ("TRAP: relabel the flagged samples as a new dummy class and retrain only the classifier head "
                   "(K+1 outputs) on the frozen features")
    Params = BackdoorHidingParams
    uses_flags = REQUIRED
    uses_aux = UNUSED

    def repair(self, model, normalisation, dataset, flags, aux=None, *, params: BackdoorHidingParams, arch,
               progress):
        from ..engine import extract_features

        if not isinstance(getattr(model, "head", None), nn.Linear):
            raise InputError("backdoor-hiding retrains the model's `head` (a torch.nn.Linear); this model has none")
        num_classes = max(dataset.num_classes, model.head.out_features)
        features = extract_features(model, dataset, normalisation, capture=("penultimate",),
                                    progress=progress).penultimate
        hidden, history = hide(model, np.asarray(features), np.asarray(dataset.y), flags, num_classes, params)
        return Repaired(hidden, normalisation, history,
                        {**asdict(params), "dummy_class": num_classes, "n_relabelled": int(flags.sum())})
