"""ANP, adversarial neuron pruning (Wu & Wang, NeurIPS 2021; BackdoorBenchER's `anp`, SEED_NOTES section 5):
learn a mask in [0, 1] over every BatchNorm channel on the auxiliary set while an adversary perturbs the channels'
scales and shifts, then zero the BatchNorm weights of the channels whose mask falls at or below a threshold.

Per batch (drawn with replacement from the auxiliary set, `iterations` batches in all, BatchNorm in train mode as
the official loop): the noise on each channel's scale and shift starts uniform in +/- eps and takes one signed
gradient step (lr eps / steps) that raises the loss, kept within +/- eps; then the mask takes an SGD step on
alpha x CE(masked) + (1 - alpha) x CE(masked and perturbed) and is clipped to [0, 1]. The channels are scaled by a
forward hook on each BatchNorm layer (out - shift) x (mask + noise) + shift x (1 + noise_bias): the model is not
rebuilt, and any BatchNorm2d model works.

Pruning: the official code tries thresholds 0, 0.05, ..., 0.90 and keeps the model with the lowest test ASR whose
clean accuracy dropped by less than 10%, an oracle choice. Ours: the largest threshold whose accuracy on the
auxiliary set (no trigger needed) stays within `acc_ratio` (10%) of the unpruned model's; the per-threshold table
is in the history.
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
from ..models.preprocess import to_model_input
from ..models.train import frozen_copy, torch_threads
from ..params import param
from .base import REQUIRED, UNUSED, Repair, Repaired


@dataclass(frozen=True)
class AnpParams:
    eps: float = param(0.4, "official code: BackdoorBenchER anp_eps 0.4")
    steps: int = param(1, "official code: anp_steps 1")
    alpha: float = param(0.2, "official code: anp_alpha 0.2 (loss = 0.2 natural + 0.8 perturbed)")
    mask_lr: float = param(0.01, "official code: BackdoorBenchER's mask lr 0.01 (the original ANP used 0.2)")
    momentum: float = param(0.9, "official code: mask optimiser SGD momentum 0.9")
    iterations: int = param(2000, "official code: nb_iter 2000 batches, drawn with replacement")
    batch_size: int = param(256, "official code: batch 256")
    thresholds: str = param("0:0.05:0.90", "official code: pruning thresholds 0 to 0.90 by 0.05 (start:step:stop)")
    acc_ratio: float = param(0.1, "ours", reason="the official code keeps the lowest test ASR with a relative "
                             "clean-accuracy drop < 0.1 (an oracle); here: the largest threshold within that drop of "
                             "the auxiliary set's accuracy")
    seed: int = param(0, "ours", reason="any fixed seed: the batches and the noise")

    def __post_init__(self):
        if not self.eps >= 0 or self.steps < 1 or not 0 <= self.alpha <= 1 or not self.mask_lr > 0:
            raise InputError(f"anp: eps >= 0, steps >= 1, alpha in [0, 1] and mask_lr > 0 are needed; got {self.eps}, "
                             f"{self.steps}, {self.alpha}, {self.mask_lr}")
        if self.iterations < 1 or self.batch_size < 2 or not 0 <= self.acc_ratio < 1:
            raise InputError(f"anp: iterations >= 1, batch_size >= 2 and acc_ratio in [0, 1) are needed; got "
                             f"{self.iterations}, {self.batch_size}, {self.acc_ratio}")
        threshold_list(self.thresholds)


def threshold_list(text: str) -> list[float]:
    try:
        start, step, stop = (float(part) for part in text.split(":"))
    except ValueError:
        raise InputError(f"anp: thresholds must be start:step:stop, e.g. 0:0.05:0.90, got {text!r}") from None
    if not (0 <= start <= stop <= 1 and step > 0):
        raise InputError(f"anp: thresholds need 0 <= start <= stop <= 1 and step > 0, got {text!r}")
    return [round(v, 10) for v in np.arange(start, stop + step / 2, step)]


class ChannelPerturbation:
    """Mask and adversarial noise on every BatchNorm2d channel of `model`, applied by forward hooks."""

    def __init__(self, model: nn.Module):
        self.layers = [(name, m) for name, m in model.named_modules()
                       if isinstance(m, nn.BatchNorm2d) and m.affine]
        if not self.layers:
            raise InputError("anp prunes BatchNorm2d channels; this model has none")
        self.mask = [torch.ones(m.num_features, requires_grad=True) for _, m in self.layers]
        self.noise = [torch.zeros(m.num_features, requires_grad=True) for _, m in self.layers]
        self.noise_bias = [torch.zeros(m.num_features, requires_grad=True) for _, m in self.layers]
        self.perturbed = False
        self.handles = [m.register_forward_hook(self._hook(i)) for i, (_, m) in enumerate(self.layers)]

    def _hook(self, i: int):
        def hook(module, inputs, output):
            shift = module.bias.view(1, -1, 1, 1)
            scale = self.mask[i] + (self.noise[i] if self.perturbed else 0.0)
            bias = 1.0 + (self.noise_bias[i] if self.perturbed else 0.0)
            return (output - shift) * scale.view(1, -1, 1, 1) + shift * torch.as_tensor(bias).view(1, -1, 1, 1)
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def optimise_mask(model: nn.Module, normalisation, aux, params: AnpParams) -> tuple[dict[str, np.ndarray], list]:
    """The learned mask per BatchNorm2d layer (name -> [C] in [0, 1]) and the losses every 100 batches."""
    work = frozen_copy(model, training=True)  # the official loop keeps BatchNorm in train mode
    channels = ChannelPerturbation(work)
    mask_opt = torch.optim.SGD(channels.mask, lr=params.mask_lr, momentum=params.momentum)
    noise = channels.noise + channels.noise_bias
    noise_opt = torch.optim.SGD(noise, lr=params.eps / params.steps)
    rng = np.random.default_rng(params.seed)
    generator = torch.Generator().manual_seed(params.seed)
    labels = torch.from_numpy(np.asarray(aux.y, dtype=np.int64))
    log = []
    try:
        for iteration in range(params.iterations):
            rows = rng.integers(0, len(aux), min(params.batch_size, len(aux)))
            inputs = to_model_input(aux.x[rows], normalisation)
            targets = labels[rows]
            loss_rob = torch.zeros(())
            if params.eps > 0:
                with torch.no_grad():
                    for value in noise:
                        value.uniform_(-params.eps, params.eps, generator=generator)
                channels.perturbed = True
                for _ in range(params.steps):
                    noise_opt.zero_grad(set_to_none=True)
                    (-F.cross_entropy(work(inputs), targets)).backward()
                    with torch.no_grad():
                        for value in noise:
                            value.grad.sign_()
                    noise_opt.step()
                    with torch.no_grad():
                        for value in noise:
                            value.clamp_(-params.eps, params.eps)
                loss_rob = F.cross_entropy(work(inputs), targets)
            channels.perturbed = False
            loss_nat = F.cross_entropy(work(inputs), targets)
            loss = params.alpha * loss_nat + (1 - params.alpha) * loss_rob
            mask_opt.zero_grad(set_to_none=True)
            loss.backward()
            mask_opt.step()
            with torch.no_grad():
                for value in channels.mask:
                    value.clamp_(0, 1)
            if iteration % 100 == 0 or iteration == params.iterations - 1:
                log.append({"iteration": iteration + 1, "loss_natural": float(loss_nat.detach()),
                            "loss_perturbed": float(loss_rob.detach())})
    finally:
        channels.remove()
    return {name: m.detach().numpy().copy() for (name, _), m in zip(channels.layers, channels.mask)}, log


def pruned(model: nn.Module, masks: dict[str, np.ndarray], threshold: float) -> tuple[nn.Module, int]:
    """A copy with the BatchNorm weight of every channel whose mask is <= threshold set to 0; and their count."""
    out = copy.deepcopy(model).eval()
    modules = dict(out.named_modules())
    count = 0
    with torch.no_grad():
        for name, mask in masks.items():
            off = torch.from_numpy(mask <= threshold)
            modules[name].weight[off] = 0.0
            count += int(off.sum())
    return out, count


class Anp(Repair):
    name = "anp"
    description = "ANP: prune the BatchNorm channels whose learned mask stays low under adversarial neuron noise"
    Params = AnpParams
    uses_flags = UNUSED
    uses_aux = REQUIRED

    def repair(self, model, normalisation, dataset, flags, aux=None, *, params: AnpParams, arch, progress):
        if len(aux) < 2:
            raise InputError(f"anp: the auxiliary set holds {len(aux)} sample(s)")
        with torch_threads(None), torch.random.fork_rng(devices=[]):
            torch.manual_seed(params.seed)
            masks, log = optimise_mask(model, normalisation, aux, params)
            base = accuracy(predict(model, aux.x, normalisation, batch_size=256), aux.y)
            table, chosen = [], (0.0, copy.deepcopy(model).eval(), 0)
            for threshold in threshold_list(params.thresholds):
                candidate, count = pruned(model, masks, threshold)
                acc = accuracy(predict(candidate, aux.x, normalisation, batch_size=256), aux.y)
                table.append({"threshold": threshold, "pruned_channels": count, "aux_acc": acc})
                if acc >= (1 - params.acc_ratio) * base and threshold >= chosen[0]:
                    chosen = (threshold, candidate, count)
        threshold, repaired, count = chosen
        history = [{"stage": "mask", **entry} for entry in log] + [{"stage": "prune", **row} for row in table]
        return Repaired(repaired, normalisation, history,
                        {**asdict(params), "n_aux": len(aux), "threshold": threshold, "pruned_channels": count,
                         "aux_acc_unpruned": base, "channels": int(sum(len(m) for m in masks.values()))})
