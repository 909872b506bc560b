"""SIBA, the sparse and invisible backdoor attack (Gao, Li, Gong, Li, Xia & Wang, IEEE TIFS 2024; FLARE's
Table I evaluates it as [9]).

The trigger is one universal perturbation ``delta`` (H x W x C) that is non-zero on at most ``k`` pixels
and bounded by ``eps`` per value, optimised against a surrogate (clean) model so that ``x + delta`` is
classified as the target class. Poisoned images (train and test alike) are ``clip(x + delta, 0, 255)``.

The optimisation follows the authors' released ``optimize_siba.py`` (read, not copied), which alternates
between the two sub-problems of the paper:
* sparsity step: on the first batch of every ``epoch_step``-th epoch the mask is re-chosen as the ``k``
  pixels with the largest batch-mean |gradient| (summed over channels) of the loss w.r.t. the trigger;
* magnitude step: every batch, ``delta -= step_decay * eps * sign(mean gradient)``, then ``delta *= mask``
  and ``delta`` is clipped to [-eps, eps];
the loss being the target-class cross-entropy of the surrogate, clamped per sample at ``beta`` so that
images already fooled stop steering the trigger; the (delta, mask) of the epoch with the lowest mean loss
is kept.

Defaults (``SIBAConfig``): the authors' README command for CIFAR-10 (k = 100 pixels of 32 x 32, eps = 8/255,
200 epochs, batch 128, step_decay 0.8, epoch_step 5) and beta = 10 (what their ``main`` passes). For other
image sizes ``k`` keeps the same fraction of pixels (100 / 1024, rounded; ours). Paper budget: those 200
epochs over the 50,000 CIFAR-10 training images against a ResNet-18 surrogate trained for 100 epochs, on a
GPU. CPU budget (``budget="cpu"``, ours): 10 epochs on a seeded subset of 2,000 images (under 2 minutes on
one core for Fashion-MNIST with a small_resnet surrogate). The surrogate here is the clean model the user gives
(``--adv-model``).

Stored in the trigger file on the 0-255 scale, rounded to integers (the data are uint8 anyway), so the
poisoned images differ from the clean ones on at most ``k`` pixels and by at most ``floor(eps)`` per value.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from backdoor_engine.errors import InputError

from .base import BLEND_CHUNK, check_int
from .labels import check_class_setup
from .learned import (
    check_build_inputs,
    LearnedAttack,
    batches,
    check_classifier,
    check_logits,
    check_max_samples,
    check_positive,
    make_config,
    model_device,
    require,
    save_trigger_file,
    scalar,
    to_unit,
    training_subset,
)

PAPER_K, PAPER_PIXELS = 100, 32 * 32


def default_k(height: int, width: int) -> int:
    """The authors' 100 pixels of 32 x 32, as the same fraction of an H x W image (at least 1)."""
    return max(1, round(PAPER_K * height * width / PAPER_PIXELS))


@dataclass(frozen=True)
class SIBAConfig:
    """Builder settings; defaults are the authors' (see the module docstring), ``budget="cpu"`` shrinks them."""

    k: int | None = None  # None: default_k(H, W)
    eps: float = 8.0  # 0-255 scale
    epochs: int = 200
    batch_size: int = 128
    step_decay: float = 0.8
    epoch_step: int = 5
    beta: float = 10.0
    max_samples: int | None = None

    def __post_init__(self) -> None:
        if self.k is not None:
            check_int(self.k, "k", 1)
        eps = check_positive(self.eps, "eps")
        if eps > 255:
            raise InputError(f"eps: expected a number in (0, 255] (0-255 scale), got {self.eps!r}")
        check_int(self.epochs, "epochs", 1)
        check_int(self.batch_size, "batch_size", 1)
        check_positive(self.step_decay, "step_decay")
        check_int(self.epoch_step, "epoch_step", 1)
        check_positive(self.beta, "beta")
        check_max_samples(self.max_samples)


SIBA_CPU_BUDGET = {"epochs": 10, "max_samples": 2000}


def siba_config(budget: str = "paper", **overrides) -> SIBAConfig:
    """The authors' settings (``budget="paper"``) or the small CPU budget, with ``overrides``."""
    return make_config(SIBAConfig, SIBA_CPU_BUDGET, budget, **overrides)


@dataclass
class SIBABuild:
    """What ``build_siba`` made: the trigger file, its sha256, and ``loss`` (best epoch's mean clamped loss)."""

    path: str
    sha256: str
    loss: float


def build_siba(
    x: np.ndarray,
    out: str,
    *,
    model: nn.Module,
    normalisation,
    target: int = 0,
    num_classes: int | None = None,
    seed: int = 0,
    config: SIBAConfig | None = None,
    progress: Callable[[str], None] | None = None,
) -> SIBABuild:
    """Optimise the sparse trigger against ``model`` (a clean surrogate taking ``(x / 255 - mean) / std``)
    on the uint8 NHWC images ``x`` towards class ``target``; write the trigger file ``out`` (.npz)."""
    config, image_shape = check_build_inputs(out, config, SIBAConfig, "siba_config", x)
    height, width, channels = image_shape
    if num_classes is not None:
        target, num_classes = check_class_setup(target, num_classes)
    target = check_int(target, "target", 0)
    k = default_k(height, width) if config.k is None else config.k
    if k > height * width:
        raise InputError(f"k: expected at most {height * width} pixels for {height} x {width} images, got {k}")
    model, normaliser = check_classifier(model, normalisation, channels)
    say = progress or (lambda message: None)

    subset_rng, order_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    x = x[training_subset(x, config.max_samples, subset_rng)]
    device = model_device(model)
    normaliser = normaliser.to(device)
    was_training = model.training
    model.eval()
    eps = float(config.eps) / 255
    step = float(config.step_decay) * eps
    delta = torch.zeros(channels, height, width, device=device)
    mask = torch.zeros(height, width, device=device)
    best = (float("inf"), delta.clone(), mask.clone())
    try:
        for epoch in range(config.epochs):
            losses = []
            for index, batch in enumerate(batches(len(x), config.batch_size, order_rng, drop_last=False)):
                pixels = to_unit(x[batch]).to(device)
                trigger = delta.expand(len(batch), -1, -1, -1).clone().requires_grad_(True)
                logits = model(normaliser(torch.clamp(pixels + trigger, 0, 1)))
                check_logits(logits, target + 1)
                goal = torch.full((len(batch),), target, dtype=torch.long, device=device)
                loss = torch.clamp(F.cross_entropy(logits, goal, reduction="none"), max=float(config.beta)).mean()
                (gradient,) = torch.autograd.grad(loss, trigger)
                gradient = gradient.mean(dim=0)
                losses.append(loss.item())
                if index == 0 and epoch % config.epoch_step == 0:
                    # Sparsity step: the k pixels whose values the loss is most sensitive to.
                    score = gradient.abs().sum(dim=0).flatten()
                    chosen = torch.argsort(score, descending=True, stable=True)[:k]
                    mask = torch.zeros(height * width, device=device)
                    mask[chosen] = 1
                    mask = mask.view(height, width)
                delta = torch.clamp((delta - step * gradient.sign()) * mask, -eps, eps)
            mean_loss = float(np.mean(losses))
            if mean_loss < best[0]:
                best = (mean_loss, delta.clone(), mask.clone())
            say(f"siba epoch {epoch + 1}/{config.epochs}: loss {mean_loss:.4f}")
    finally:
        model.train(was_training)

    best_loss, delta, mask = best
    limit = np.floor(config.eps)
    values = np.clip(np.rint(delta.permute(1, 2, 0).cpu().numpy() * 255), -limit, limit).astype(np.int16)
    mask = mask.cpu().numpy().astype(bool)
    values[~mask] = 0
    arrays = {"delta": values, "mask": mask, "eps": np.array(float(config.eps)), "k": np.array(k, dtype=np.int64)}
    record = {**dataclasses.asdict(config), "k": k, "seed": int(seed), "target": target, "n_train": len(x),
              "best_loss": best_loss}
    sha256 = save_trigger_file(out, "siba", image_shape, arrays, record)
    say(f"siba done: best mean loss {best_loss:.4f}, {int((values != 0).any(axis=2).sum())} pixels changed")
    return SIBABuild(path=str(out), sha256=sha256, loss=best_loss)


@dataclass(frozen=True, eq=False, kw_only=True)
class SIBA(LearnedAttack):
    """Adds the stored sparse trigger: ``clip(x + delta, 0, 255)``, the same at train and test time."""

    name = "siba"
    needs_clean_model = True  # the surrogate the sparse trigger is optimised against

    delta: np.ndarray = field(init=False, repr=False)
    mask: np.ndarray = field(init=False, repr=False)

    @classmethod
    def build_trigger(cls, dataset, spec, path, *, clean_model, budget, settings, progress) -> dict:
        model, normalisation = clean_model
        built = build_siba(np.asarray(dataset.x), path, model=model, normalisation=normalisation,
                           target=spec.target, num_classes=dataset.num_classes, seed=spec.seed,
                           config=siba_config(budget, **settings), progress=progress)
        return {"generator": str(path), "generator_sha256": built.sha256}

    def _load(self, arrays, path):
        height, width, _ = self.image_shape
        delta = require(arrays, "delta", path, shape=self.image_shape, kind="iu")
        mask = require(arrays, "mask", path, shape=(height, width), kind="b")
        eps, k = scalar(arrays, "eps", path), int(scalar(arrays, "k", path))
        if not 0 < eps <= 255 or not 1 <= k <= height * width:
            raise InputError(f"{path}: eps {eps} or k {k} out of range")
        if int(mask.sum()) > k:
            raise InputError(f"{path}: the mask has {int(mask.sum())} pixels, more than k = {k}")
        if np.abs(delta.astype(np.int64)).max(initial=0) > eps:
            raise InputError(f"{path}: the trigger exceeds eps = {eps}")
        if delta[~mask].any():
            raise InputError(f"{path}: the trigger is non-zero outside its mask")
        stored = delta.astype(np.int16)
        stored.flags.writeable = False
        object.__setattr__(self, "delta", stored)
        object.__setattr__(self, "mask", mask.copy())
        self.mask.flags.writeable = False

    def _apply(self, x, *, train, labels, rng):
        out = np.empty_like(x)
        for start in range(0, len(x), BLEND_CHUNK):
            chunk = x[start : start + BLEND_CHUNK].astype(np.int16)
            out[start : start + BLEND_CHUNK] = np.clip(chunk + self.delta, 0, 255).astype(np.uint8)
        return out
