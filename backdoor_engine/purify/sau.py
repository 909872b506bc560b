"""SAU, shared adversarial unlearning (Wei et al., NeurIPS 2023; BackdoorBench `defense/sau.py`, read at f02e353,
the same loop in BackdoorBenchER): fine-tune on the auxiliary set together with adversarial examples that fool
both the model being repaired and the frozen backdoored reference in the same way, unlearning what they share
(a backdoor is such a shared adversarial direction).

Per batch (both models in eval mode: BatchNorm statistics frozen, the official default `train_mode=False`):
  1 shared PGD on a per-image L-inf perturbation (radius 0.2, started at +0.2, 5 signed steps of 0.2), descending
    beta_1 x (-CE on the images not yet fooled, mean of both models) + beta_2 x JS(model || reference) on the
    images the two do not yet send to the same wrong class; stops early once every image is shared
  2 Adam step (amsgrad, lr 1e-4) on lambda_1 CE(x) + lambda_2 CE(x + delta) + lambda_3 x shared, where shared =
    -log(1 - p(y_ref | x + delta)) over the images whose perturbed version fools the reference (away from both
    the label and the reference's clean prediction), y_ref the reference's class for it
Official quirks kept: the perturbation is added on [0, 1] pixels without clipping to [0, 1]; the lr is constant
(the official scheduler is built but never stepped); no augmentation; the last round is kept (no test data).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..errors import InputError
from ..models.evaluate import accuracy, predict
from ..models.preprocess import float_pixels, normaliser
from ..models.train import frozen_copy, torch_threads
from ..params import param
from .base import REQUIRED, UNUSED, Repair, Repaired


@dataclass(frozen=True)
class SauParams:
    epochs: int = param(100, "official code: sau n_rounds 100 (passes over the auxiliary set)")
    batch_size: int = param(256, "official code: batch_size 256")
    lr: float = param(1e-4, "official code: Adam lr 1e-4, never scheduled (the built scheduler is not stepped)")
    weight_decay: float = param(0.0, "official code: wd 0")
    radius: float = param(0.2, "official code: trigger_norm 0.2, L-inf, on [0, 1] pixels")
    adv_lr: float = param(0.2, "official code: adv_lr 0.2 (signed steps)")
    adv_steps: int = param(5, "official code: adv_steps 5, started at the radius (pgd_init max)")
    beta_1: float = param(0.01, "official code: beta_1 0.01 (the perturbation's CE term)")
    beta_2: float = param(1.0, "official code: beta_2 1 (the perturbation's JS term)")
    lmd_1: float = param(1.0, "official code: lmd_1 1 (clean CE)")
    lmd_2: float = param(0.0, "official code: lmd_2 0 (CE on the perturbed images)")
    lmd_3: float = param(1.0, "official code: lmd_3 1 (shared adversarial unlearning)")
    seed: int = param(0, "ours", reason="any fixed seed: the batch order")

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1 or self.adv_steps < 1 or not self.lr > 0 or not self.radius > 0:
            raise InputError(f"sau: epochs, batch_size and adv_steps must be >= 1, lr and radius > 0; got "
                             f"{self.epochs}, {self.batch_size}, {self.adv_steps}, {self.lr}, {self.radius}")


def shared_perturbation(model: nn.Module, reference: nn.Module, pixels: torch.Tensor, targets: torch.Tensor,
                        normalise, params: SauParams) -> torch.Tensor:
    """Step 1: the shared adversarial perturbation of a batch of [0, 1] pixels (N, C, H, W)."""
    n = len(pixels)
    with torch.no_grad():
        clean = model(normalise(pixels)).argmax(1)
        clean_ref = reference(normalise(pixels)).argmax(1)
    delta = torch.full_like(pixels, params.radius)
    for _ in range(params.adv_steps):
        delta.requires_grad_(True)
        logits, logits_ref = model(normalise(pixels + delta)), reference(normalise(pixels + delta))
        fooled, fooled_ref = logits.argmax(1) != clean, logits_ref.argmax(1) != clean_ref
        shared = fooled & fooled_ref & (logits.argmax(1) == logits_ref.argmax(1))
        loss_adv = -(F.cross_entropy(logits, targets, reduction="none")[~fooled].sum()
                     + F.cross_entropy(logits_ref, targets, reduction="none")[~fooled_ref].sum()) / 2 / n
        p, q = F.softmax(logits, 1).clamp_min(1e-8), F.softmax(logits_ref, 1).clamp_min(1e-8)
        m = (p + q) / 2
        js = 0.5 * (p * p.log() + q * q.log()) - 0.5 * (p * m.log() + q * m.log())
        loss = params.beta_1 * loss_adv + params.beta_2 * js[~shared].sum() / n
        grad, = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            delta = (delta - params.adv_lr * grad.sign()).clamp_(-params.radius, params.radius)
        if bool(shared.all()):
            break
    return delta.detach()


def unlearning_loss(model: nn.Module, reference: nn.Module, pixels: torch.Tensor, targets: torch.Tensor,
                    delta: torch.Tensor, normalise, params: SauParams) -> torch.Tensor:
    """Step 2's loss: clean CE, perturbed CE and the shared term."""
    n = len(pixels)
    logits, per_logits = model(normalise(torch.cat([pixels, pixels + delta]))).split(n)
    with torch.no_grad():
        logits_ref, per_ref = reference(normalise(pixels)), reference(normalise(pixels + delta))
        y_ref = per_ref.argmax(1)
        fooled_ref = (y_ref != targets) & (y_ref != logits_ref.argmax(1))
    pos = F.softmax(per_logits, 1).gather(1, y_ref[:, None]).squeeze(1)[fooled_ref]
    neg = 1 - pos
    shared = (-torch.log(1e-6 + neg.clamp(max=0.999)).sum() - torch.log(1 + 1e-6 - pos.clamp(min=0.001)).sum()) / 2 / n
    return (params.lmd_1 * F.cross_entropy(logits, targets) + params.lmd_2 * F.cross_entropy(per_logits, targets)
            + params.lmd_3 * shared)


class Sau(Repair):
    name = "sau"
    description = ("SAU: fine-tune on the auxiliary set while unlearning adversarial examples shared with the "
                   "frozen backdoored model")
    Params = SauParams
    uses_flags = UNUSED
    uses_aux = REQUIRED

    def repair(self, model, normalisation, dataset, flags, aux=None, *, params: SauParams, arch, progress):
        from tqdm.auto import tqdm

        if len(aux) < 1:
            raise InputError("sau: the auxiliary set is empty")
        reference = frozen_copy(model)
        tuned = copy.deepcopy(model).eval()
        optimizer = torch.optim.Adam(tuned.parameters(), lr=params.lr, betas=(0.9, 0.999),
                                     weight_decay=params.weight_decay, amsgrad=True)
        normalise = normaliser(normalisation)
        labels = torch.from_numpy(np.asarray(aux.y, dtype=np.int64))
        generator = torch.Generator().manual_seed(params.seed)
        history = []
        with torch_threads(None):
            for epoch in tqdm(range(params.epochs), desc="sau", disable=not progress, unit="round"):
                order = torch.randperm(len(aux), generator=generator)
                total = 0.0
                for start in range(0, len(aux), params.batch_size):
                    rows = order[start:start + params.batch_size]
                    pixels = float_pixels(aux.x[rows.numpy()])
                    delta = shared_perturbation(tuned, reference, pixels, labels[rows], normalise, params)
                    loss = unlearning_loss(tuned, reference, pixels, labels[rows], delta, normalise, params)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    total += float(loss.detach()) * len(rows)
                history.append({"epoch": epoch + 1, "loss": total / len(aux),
                                "aux_acc": accuracy(predict(tuned, aux.x, normalisation, batch_size=256), aux.y)})
        return Repaired(tuned.eval(), normalisation, history, {**asdict(params), "n_aux": len(aux)})
