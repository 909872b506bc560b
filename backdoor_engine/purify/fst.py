"""FST, feature shift tuning (BackdoorBenchER's `fst`, SEED_NOTES section 5): re-initialise the linear head
(uniform +/- 1/sqrt(d), rescaled to the old weight's norm), then fine-tune the whole model on the auxiliary set
with cross-entropy + alpha <W, W_old>, which pushes the new head away from the backdoored one, projecting the head
weight back to the old norm after every step. Loop and optimiser as FT (finetune.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import InputError
from ..params import param
from .base import REQUIRED, UNUSED, Repair, Repaired
from .finetune import FinetuneParams, finetune


@dataclass(frozen=True)
class FstParams(FinetuneParams):
    alpha: float = param(0.2, "official code: BackdoorBenchER fst alpha 0.2")


def head_of(model: nn.Module) -> nn.Linear:
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Linear):
        raise InputError("fst re-initialises the model's `head` (a torch.nn.Linear); this model has none")
    return head


def reinitialised(model: nn.Module, seed: int) -> tuple[nn.Module, torch.Tensor]:
    """A copy whose head weight is drawn uniform(+/- 1/sqrt(d)) and rescaled to the old norm; and the old weight."""
    import copy

    out = copy.deepcopy(model)
    head = head_of(out)
    old = head.weight.detach().clone()
    bound = 1.0 / head.in_features ** 0.5
    generator = torch.Generator().manual_seed(seed)
    fresh = (torch.rand(old.shape, generator=generator) * 2 - 1) * bound
    with torch.no_grad():
        head.weight.copy_(fresh * old.norm() / fresh.norm())
    return out, old


def fst_step(old: torch.Tensor, alpha: float):
    def step(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(model(inputs), targets) + alpha * (model.head.weight * old).sum()
        loss.backward()
        return loss
    return step


def project_head(norm: torch.Tensor):
    def after(model: nn.Module) -> None:
        with torch.no_grad():
            model.head.weight.mul_(norm / model.head.weight.norm())
    return after


class Fst(Repair):
    name = "fst"
    description = "FST: re-initialise the head, fine-tune on the auxiliary set pushing it away from the old head"
    Params = FstParams
    uses_flags = UNUSED
    uses_aux = REQUIRED

    def repair(self, model, normalisation, dataset, flags, aux=None, *, params: FstParams, arch, progress):
        start, old = reinitialised(model, params.seed)
        tuned, history = finetune(start, normalisation, aux, params, fst_step(old, params.alpha),
                                  after_step=project_head(old.norm()), progress=progress)
        return Repaired(tuned, normalisation, history, {**asdict(params), "n_aux": len(aux)})
