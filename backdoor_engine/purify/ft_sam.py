"""FT-SAM: fine-tune on the auxiliary set with sharpness-aware minimisation (BackdoorBenchER's `ft-sam`,
SEED_NOTES section 5). Each batch: the gradient of the label-smoothed loss, a step of the weights to the worst
point within radius rho (ASAM, `adaptive`: scaled by |w|), the gradient there with BatchNorm's running statistics
left as they are, back to the weights, and the SGD step with that second gradient.

Official defaults and their quirks, kept: rho 2.0 constant, ASAM on, label smoothing 0.1 (0.1 / (K - 1) on each
other class, as a KL divergence), and the cosine of T_max = 100 stepped every batch, so the lr oscillates with a
period of 200 batches (`schedule_step=epoch` gives the per-epoch cosine FT uses).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..params import param
from .base import REQUIRED, UNUSED, Repair, Repaired
from .finetune import FinetuneParams, epoch_cosine, finetune


@dataclass(frozen=True)
class FtSamParams(FinetuneParams):
    rho: float = param(2.0, "official code: BackdoorBenchER ft-sam rho_max = rho_min = 2.0 (constant)")
    adaptive: bool = param(True, "official code: `adaptive` defaults to True (ASAM)")
    label_smoothing: float = param(0.1, "official code: label-smoothing loss with 0.1")
    schedule_step: str = param("batch", "official code", choices=("batch", "epoch"),
                               reason="the cosine (T_max 100) is stepped every batch, an implementation quirk "
                                      "kept as the default; epoch = per-epoch as FT")


def smoothed_loss(logits: torch.Tensor, targets: torch.Tensor, smoothing: float) -> torch.Tensor:
    """KL(target || softmax) with target 1 - smoothing on the label and smoothing / (K - 1) on the others."""
    k = logits.shape[1]
    target = torch.full_like(logits, smoothing / (k - 1)).scatter_(1, targets[:, None], 1 - smoothing)
    return F.kl_div(F.log_softmax(logits, dim=1), target, reduction="batchmean")


@contextlib.contextmanager
def running_stats_kept(model: nn.Module):
    """BatchNorm normalises with the batch's statistics as in training but leaves the running ones as they are."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum


def sam_step(rho: float, adaptive: bool, smoothing: float):
    def step(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = smoothed_loss(model(inputs), targets, smoothing)
        loss.backward()
        weights = [p for p in model.parameters() if p.grad is not None]
        with torch.no_grad():
            norm = torch.norm(torch.stack([((p.abs() if adaptive else 1.0) * p.grad).norm(2) for p in weights]), 2)
            scale = rho / (norm + 1e-12)
            moves = [(p.pow(2) if adaptive else 1.0) * p.grad * scale for p in weights]
            for p, move in zip(weights, moves):
                p.add_(move)
        model.zero_grad(set_to_none=True)
        with running_stats_kept(model):
            smoothed_loss(model(inputs), targets, smoothing).backward()
        with torch.no_grad():
            for p, move in zip(weights, moves):
                p.sub_(move)
        return loss
    return step


class FtSam(Repair):
    name = "ft-sam"
    description = "FT-SAM: fine-tune on the auxiliary set with (adaptive) sharpness-aware minimisation"
    Params = FtSamParams
    uses_flags = UNUSED
    uses_aux = REQUIRED

    def repair(self, model, normalisation, dataset, flags, aux=None, *, params: FtSamParams, arch, progress):
        per_batch = lambda epoch, step: 0.5 * params.lr * (1 + math.cos(math.pi * step / params.t_max))  # noqa: E731
        tuned, history = finetune(model, normalisation, aux, params,
                                  sam_step(params.rho, params.adaptive, params.label_smoothing),
                                  schedule=per_batch if params.schedule_step == "batch" else epoch_cosine(params),
                                  progress=progress)
        return Repaired(tuned, normalisation, history, {**asdict(params), "n_aux": len(aux)})
