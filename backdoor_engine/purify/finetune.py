"""FT: fine-tune the suspect model on a small clean auxiliary set (BackdoorBenchER's `ft`, SEED_NOTES section 5),
and the loop FT-SAM and FST share with it.

The loop: SGD (lr 0.01, momentum 0.9, weight decay 5e-4), random crop (pad 4) + flip, batch 256, 100 epochs, the
lr on a cosine of T_max = 100 epochs stepped once per epoch (official). With a shorter epoch budget the schedule
keeps T_max = 100, as the official code would run it cut short (the lr then stays near its start); `t_max=epochs`
anneals over the budget instead. Each strategy supplies only its batch step (`step(model, inputs, targets)` ->
loss, after which the optimiser steps). The last epoch is kept: no test data picks it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..data.dataset import Dataset
from ..errors import InputError
from ..models.augment import random_crop_flip
from ..models.evaluate import accuracy, predict
from ..models.preprocess import Normalisation, to_model_input
from ..models.train import batch_slices, torch_threads
from ..params import param
from .base import REQUIRED, UNUSED, Repair, Repaired


@dataclass(frozen=True)
class FinetuneParams:
    epochs: int = param(100, "official code: BackdoorBenchER ft, 100 epochs")
    lr: float = param(0.01, "official code: BackdoorBenchER ft, SGD lr 0.01")
    momentum: float = param(0.9, "official code: SGD momentum 0.9")
    weight_decay: float = param(5e-4, "official code: SGD weight decay 5e-4")
    batch_size: int = param(256, "official code: cifar10.yaml batch 256")
    t_max: int = param(100, "official code: CosineAnnealingLR(T_max=100) stepped per epoch; kept at 100 when "
                       "fewer epochs are run, as the official code would run them")
    augment: bool = param(True, "official code: RandomCrop(pad 4) + horizontal flip")
    hflip: bool = param(True, "official code: the CIFAR-10 transform flips")
    seed: int = param(0, "ours", reason="any fixed seed: the same seed repeats the run")

    def __post_init__(self):
        if self.epochs < 1 or self.t_max < 1 or self.batch_size < 2 or not self.lr > 0:
            raise InputError(f"epochs and t_max must be >= 1, batch_size >= 2 and lr > 0; got {self.epochs}, "
                             f"{self.t_max}, {self.batch_size}, {self.lr}")


Step = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy_step(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    loss = F.cross_entropy(model(inputs), targets)
    loss.backward()
    return loss


def epoch_cosine(params) -> Callable[[int, int], float]:
    """lr(epoch, step): the official per-epoch cosine of T_max epochs."""
    return lambda epoch, step: 0.5 * params.lr * (1 + math.cos(math.pi * min(epoch, params.t_max) / params.t_max))


def finetune(model: nn.Module, normalisation: Normalisation, aux: Dataset, params, step: Step = cross_entropy_step,
             *, parameters=None, after_step: Callable[[nn.Module], None] | None = None,
             schedule: Callable[[int, int], float] | None = None,
             progress: bool = False) -> tuple[nn.Module, list[dict]]:
    """A tuned copy of `model` (the input untouched) and the per-epoch history; `step` computes a batch's
    loss and its gradients (it may run several passes, as SAM does); the optimiser then steps and
    `after_step(model)` runs (e.g. a projection). `parameters(model)` selects what is optimised [all];
    `schedule(epoch, step)` gives each batch's lr (0-based epoch and global batch count) [epoch_cosine]."""
    from tqdm.auto import tqdm

    if len(aux) < 2:
        raise InputError(f"the auxiliary set holds {len(aux)} sample(s); fine-tuning needs at least 2")
    tuned = copy.deepcopy(model).train()
    labels = torch.from_numpy(np.asarray(aux.y, dtype=np.int64))
    weights = list(tuned.parameters()) if parameters is None else list(parameters(tuned))
    optimizer = torch.optim.SGD(weights, lr=params.lr, momentum=params.momentum, weight_decay=params.weight_decay)
    schedule = schedule or epoch_cosine(params)
    generator = torch.Generator().manual_seed(params.seed)
    history, global_step = [], 0
    with torch_threads(None):
        for epoch in range(params.epochs):
            tuned.train()
            order = torch.randperm(len(aux), generator=generator)
            total, seen = 0.0, 0
            for batch in tqdm(batch_slices(len(aux), params.batch_size), desc=f"tune {epoch + 1}/{params.epochs}",
                              disable=not progress, leave=False):
                rows = order[batch]
                images = torch.from_numpy(np.ascontiguousarray(aux.x[rows.numpy()]))
                if params.augment:
                    images = random_crop_flip(images, generator, hflip=params.hflip)
                inputs = to_model_input(images, normalisation)
                lr = schedule(epoch, global_step)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                global_step += 1
                optimizer.zero_grad(set_to_none=True)
                loss = step(tuned, inputs, labels[rows])
                optimizer.step()
                if after_step is not None:
                    after_step(tuned)
                total += float(loss.detach()) * len(rows)
                seen += len(rows)
            tuned.eval()
            history.append({"epoch": epoch + 1, "lr": lr, "loss": total / max(seen, 1),
                            "aux_acc": accuracy(predict(tuned, aux.x, normalisation, batch_size=256), aux.y)})
    return tuned.eval(), history


class Finetune(Repair):
    name = "ft"
    description = "FT: fine-tune the suspect model on a small clean auxiliary set (cross-entropy, SGD)"
    Params = FinetuneParams
    uses_flags = UNUSED
    uses_aux = REQUIRED

    def repair(self, model, normalisation, dataset, flags, aux=None, *, params: FinetuneParams, arch, progress):
        tuned, history = finetune(model, normalisation, aux, params, progress=progress)
        return Repaired(tuned, normalisation, history, {**asdict(params), "n_aux": len(aux)})
