"""NPD, neural polarizer defence (Zhu et al., NeurIPS 2023; BackdoorBench `defense/npd.py`, read at f02e353): insert
a small trainable layer (models/polarizer.py: 1x1 convolution from the identity + BatchNorm) into the frozen
backdoored model and train only it, on the auxiliary set, so that targeted adversarial examples (a stand-in for
the trigger) no longer reach their target while clean images keep their labels.

Warm-up: `warm_epochs` of clean cross-entropy, SGD lr 1e-4 without momentum, the polarizer's BatchNorm in train
mode (it calibrates its statistics). Then per batch, every module in eval mode:
  1 target = the most likely wrong class of each clean image; an L2 perturbation (radius 3.0 on [0, 1] pixels,
    from zero, clipped to valid pixels) takes up to 2 signed steps of 0.1 towards it (per-image CE clamped to
    +/- 80), stopping once 60% of the batch reach the target
  2 SGD (lr 0.01, momentum 0.9, wd 5e-4, constant: the official scheduler is never stepped) on
    CE(x, y) + 0.4 CE(x_adv, clean prediction) + 0.4 mean -log(1 - p_adv(new_y)) + 0.4 mean -log(1 - p_adv(target)),
    new_y the adversarial image's top class, or its second when the top is the label
Official defaults: 50 epochs after 5 warm-up epochs, batch 128, no augmentation. The polarizer goes before the
second-to-last convolution (PreActResNet-18's layer4.1.conv1, where the official code hooks it; `layer=` names
another). The last epoch is kept; no test data picks it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch.nn import functional as F

from ..errors import InputError
from ..models.evaluate import accuracy, predict
from ..models.polarizer import attach_polarizer, default_layer
from ..models.preprocess import float_pixels, normaliser
from ..models.train import frozen_copy, torch_threads
from ..params import param
from .base import REQUIRED, UNUSED, Repair, Repaired


@dataclass(frozen=True)
class NpdParams:
    epochs: int = param(50, "official code: npd epochs 50 (after the warm-up)")
    warm_epochs: int = param(5, "official code: warm_epochs 5, SGD lr 1e-4 on clean CE")
    warm_lr: float = param(1e-4, "official code: the warm-up optimiser's lr (no momentum, no weight decay)")
    batch_size: int = param(128, "official code: batch_size 128")
    lr: float = param(0.01, "official code: SGD lr 0.01, constant (the built scheduler is never stepped)")
    momentum: float = param(0.9, "official code: momentum 0.9")
    weight_decay: float = param(5e-4, "official code: wd 5e-4")
    trigger_norm: float = param(3.0, "official code: L2 trigger_norm 3.0 on [0, 1] pixels")
    adv_lr: float = param(0.1, "official code: L2 adv_lr 0.1 (signed steps), hard-coded there")
    inner_steps: int = param(2, "official code: inner_steps 2")
    lmd1: float = param(1.0, "official code: lmd1 1.0 (clean CE)")
    lmd2: float = param(0.4, "official code: lmd2 0.4 (CE of the adversarial image to the clean prediction)")
    lmd3: float = param(0.4, "official code: lmd3 0.4 (away from the adversarial image's top wrong class)")
    lmd4: float = param(0.4, "official code: lmd4 0.4 (away from the attack's target class)")
    layer: str | None = param(None, "ours", reason="None = the second-to-last Conv2d (PreActResNet-18's "
                              "layer4.1.conv1, the official target_layer_name); any Conv2d by name")
    seed: int = param(0, "ours", reason="any fixed seed: the batch order")

    def __post_init__(self):
        if self.epochs < 1 or self.warm_epochs < 0 or self.batch_size < 2 or self.inner_steps < 1:
            raise InputError(f"npd: epochs >= 1, warm_epochs >= 0, batch_size >= 2 and inner_steps >= 1 are needed; "
                             f"got {self.epochs}, {self.warm_epochs}, {self.batch_size}, {self.inner_steps}")
        if not self.lr > 0 or not self.trigger_norm > 0:
            raise InputError(f"npd: lr and trigger_norm must be > 0, got {self.lr}, {self.trigger_norm}")


def targeted_perturbation(model, pixels, targets, normalise, params: NpdParams) -> torch.Tensor:
    """Step 1: adversarial images pushed towards `targets` within the L2 ball (pixels stay in [0, 1])."""
    delta = torch.zeros_like(pixels)
    for _ in range(params.inner_steps):
        delta.requires_grad_(True)
        logits = model(normalise((pixels + delta).clamp(0, 1)))
        loss = F.cross_entropy(logits, targets, reduction="none").clamp(-80, 80).mean()
        grad, = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            delta = delta - params.adv_lr * grad.sign()
            norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
            delta = delta * (params.trigger_norm / norms).clamp(max=1.0)
            reached = (model(normalise((pixels + delta).clamp(0, 1))).argmax(1) == targets).float().mean()
        if float(reached) > 0.6:
            break
    return (pixels + delta).clamp(0, 1).detach()


def polarizer_loss(model, pixels, labels, normalise, params: NpdParams) -> torch.Tensor:
    with torch.no_grad():
        logits = model(normalise(pixels))
        clean_prediction = logits.argmax(1)
        wrong = logits.clone()
        wrong[torch.arange(len(labels)), labels] = -10.0  # the official masking of the true class
        target = wrong.argmax(1)
    adversarial = targeted_perturbation(model, pixels, target, normalise, params)
    loss_1 = F.cross_entropy(model(normalise(pixels)), labels)
    adv_logits = model(normalise(adversarial))
    p_adv = F.softmax(adv_logits, 1)
    loss_2 = F.cross_entropy(adv_logits, clean_prediction)
    top2 = p_adv.topk(2, dim=1).indices
    new_y = torch.where(top2[:, 0] == labels, top2[:, 1], top2[:, 0])
    loss_3 = (-torch.log(1.0001 - p_adv.gather(1, new_y[:, None]).squeeze(1) + 1e-12)).mean()
    loss_4 = (-torch.log(1.0001 - p_adv.gather(1, target[:, None]).squeeze(1) + 1e-12)).mean()
    return params.lmd1 * loss_1 + params.lmd2 * loss_2 + params.lmd3 * loss_3 + params.lmd4 * loss_4


class Npd(Repair):
    name = "npd"
    description = "NPD: a neural polarizer layer trained on the auxiliary set inside the frozen suspect model"
    Params = NpdParams
    uses_flags = UNUSED
    uses_aux = REQUIRED

    def repair(self, model, normalisation, dataset, flags, aux=None, *, params: NpdParams, arch, progress):
        from tqdm.auto import tqdm

        if len(aux) < 2:
            raise InputError(f"npd: the auxiliary set holds {len(aux)} sample(s)")
        polarized = frozen_copy(model)  # only the polarizer trains
        layer = params.layer or default_layer(polarized)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(params.seed)
            polarizer = attach_polarizer(polarized, layer)
        normalise = normaliser(normalisation)
        labels = torch.from_numpy(np.asarray(aux.y, dtype=np.int64))
        generator = torch.Generator().manual_seed(params.seed)
        warm = torch.optim.SGD(polarizer.parameters(), lr=params.warm_lr)
        main = torch.optim.SGD(polarizer.parameters(), lr=params.lr, momentum=params.momentum,
                               weight_decay=params.weight_decay)
        history = []
        with torch_threads(None):
            for epoch in tqdm(range(params.warm_epochs + params.epochs), desc="npd", disable=not progress,
                              unit="epoch"):
                warming = epoch < params.warm_epochs
                order = torch.randperm(len(aux), generator=generator)
                total = 0.0
                for start in range(0, len(aux), params.batch_size):
                    rows = order[start:start + params.batch_size]
                    pixels = float_pixels(aux.x[rows.numpy()])
                    polarizer.train(warming)
                    if warming:
                        loss = F.cross_entropy(polarized(normalise(pixels)), labels[rows])
                        optimizer = warm
                    else:
                        loss = polarizer_loss(polarized, pixels, labels[rows], normalise, params)
                        optimizer = main
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    total += float(loss.detach()) * len(rows)
                polarized.eval()
                history.append({"epoch": epoch + 1, "stage": "warm-up" if warming else "polarize",
                                "loss": total / len(aux),
                                "aux_acc": accuracy(predict(polarized, aux.x, normalisation, batch_size=256), aux.y)})
        for p in polarized.parameters():
            p.requires_grad_(True)
        return Repaired(polarized.eval(), normalisation, history,
                        {**asdict(params), "layer": layer, "n_aux": len(aux)})
