"""IAD, the input-aware dynamic backdoor (Nguyen & Tran, NeurIPS 2020).

A pattern generator G and a mask generator M (small conv encoder-decoders) give every image its own
trigger: ``x' = x + (G(x) - x) * m(x)`` on the [0, 1] scale, ``m = threshold(M(x))``. Training, as the
paper's code does it (official release, mirrored by BackdoorBench ``attack/inputaware.py`` and BackdoorBox
``core/attacks/IAD.py``):

1. M alone for ``mask_epochs``: ``lambda_norm * mean(relu(m - mask_density)) + lambda_div * L_div`` with the
   diversity loss ``L_div = mean(||x1 - x2|| / (||m1 - m2|| + 1e-7))`` over two independent shuffles.
2. M frozen; G and the classifier together for ``epochs``: in each batch a fraction ``p_attack`` gets its
   own trigger and the attack label (backdoor), the next ``p_cross`` gets the trigger of *another* image and
   keeps its label (cross-trigger: it teaches that a trigger only works on its own image), the rest stays
   clean; loss = cross-entropy + ``lambda_div * L_div`` on the patterns.

After training only G and M are kept (the trigger file); they poison: each image gets its own trigger, and
the cross-trigger samples are the attack's cover samples (``cross_ratio`` of them per payload sample).

Defaults (``IADConfig``), all from BackdoorBench ``config/attack/inputaware/{default,cifar10}.yaml`` and the
reference codes: lr 0.01 for C, G, M (SGD momentum 0.9 wd 5e-4 for C, Adam betas (0.5, 0.9) for G and M),
MultiStepLR x0.1 at epochs [100, 200, 300, 400] (C), [200, 300, 400, 500] (G), [10, 20] (M); p_attack =
p_cross = 0.1, lambda_div 1, lambda_norm 100, mask_density 0.032, batch 128; generators of 16 channels /
2 down-steps for 1-channel images (their MNIST net) and 32 / 3 otherwise (CIFAR net), bilinear upsampling
(BackdoorBench; BackdoorBox uses nearest). Paper budget: 25 mask epochs then 100 epochs of joint training on
the full training set, batch 128 (BackdoorBench's CIFAR-10 config; forks of the official release set n_iters
to 100 or 600, the release itself was not read here), on a GPU.
CPU budget (``budget="cpu"``, ours): 2 mask epochs, 6 joint epochs on a seeded subset of 2,000 images. On
Fashion-MNIST with a 2-epoch small_resnet as the clean model it takes about 2 minutes on one core and the
classifier trained alongside ends at clean accuracy 0.80, backdoor success 0.67 and cross-trigger accuracy
0.59 on those images: a working but weak trigger, far from what the paper's 40x longer run reaches.

Where we differ, and why:
* The classifier starts from the given clean model (``--adv-model``) instead of from scratch: the attack
  needs only G and M, and a warm start makes a CPU budget reach a working backdoor.
* G's gradients are zeroed every step (the reference codes zero only C's, which lets G's gradient pile up
  over an epoch; we read that as a slip).
* The random crop / rotation the reference codes apply to the classifier's batch is left out (CPU budget).
* After each generator's training its BatchNorm statistics are re-estimated over the training images (plain
  average): with momentum 0.05 a short run's running statistics still remember the untrained net, so the
  eval-mode mask / pattern would not be the trained one. At the paper's budget this changes next to nothing.
* Image sides that 2^steps does not divide are padded (replicate) and cropped back; sizes the paper uses
  (28, 32) are unaffected.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from backdoor_engine.errors import InputError

from .base import check_images, check_int
from .labels import attack_labels, check_class_setup, check_labels, check_mode
from .learned import (
    check_build_inputs,
    LearnedAttack,
    Normaliser,
    as_number,
    batches,
    check_classifier,
    check_logits,
    check_max_samples,
    check_positive,
    from_unit,
    load_module,
    make_config,
    model_device,
    module_arrays,
    require,
    save_trigger_file,
    to_unit,
    training_subset,
)

EPSILON = 1e-7  # reference codes' EPSILON (divisions and the tanh scaling)
MAX_STEPS = 6


class _Block(nn.Sequential):
    """3x3 conv, BatchNorm (momentum 0.05 as in the reference generator), optional ReLU."""

    def __init__(self, in_channels: int, out_channels: int, relu: bool = True):
        layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, 3, padding=1),
                                   nn.BatchNorm2d(out_channels, eps=1e-5, momentum=0.05)]
        if relu:
            layers.append(nn.ReLU())
        super().__init__(*layers)


class IADGenerator(nn.Module):
    """Encoder-decoder of the paper's code: ``steps`` x (2 blocks + max-pool), a middle block, ``steps`` x
    (bilinear x2 + 2 blocks); output ``tanh / (2 + 1e-7) + 0.5`` in (0, 1)."""

    def __init__(self, in_channels: int, out_channels: int, channel_init: int, steps: int):
        super().__init__()
        self.steps = steps
        down: list[nn.Module] = []
        current, width = in_channels, channel_init
        for step in range(steps):
            down += [_Block(current, width), _Block(width, width), nn.MaxPool2d(2)]
            current = width
            if step < steps - 1:
                width *= 2
        self.down = nn.Sequential(*down)
        self.middle = _Block(current, current)
        up: list[nn.Module] = []
        for step in range(steps):
            last = step == steps - 1
            following = out_channels if last else current // 2
            up += [nn.Upsample(scale_factor=2, mode="bilinear"), _Block(current, current),
                   _Block(current, following, relu=not last)]
            current = following
        self.up = nn.Sequential(*up)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        unit = 2**self.steps
        pad_h, pad_w = (-height) % unit, (-width) % unit
        if pad_h or pad_w:
            images = F.pad(images, (0, pad_w, 0, pad_h), mode="replicate")
        out = self.up(self.middle(self.down(images)))[..., :height, :width]
        return torch.tanh(out) / (2 + EPSILON) + 0.5


def threshold(mask: torch.Tensor) -> torch.Tensor:
    """The reference codes' near-binary squashing of M's output."""
    return torch.tanh(mask * 20 - 10) / (2 + EPSILON) + 0.5


def default_arch(channels: int) -> tuple[int, int]:
    """(channel_init, steps): the reference MNIST generator for 1 channel, the CIFAR one otherwise."""
    return (16, 2) if channels == 1 else (32, 3)


@dataclass(frozen=True)
class IADConfig:
    """Builder settings; defaults are the paper's (see the module docstring), ``budget="cpu"`` shrinks them."""

    epochs: int = 100
    mask_epochs: int = 25
    batch_size: int = 128
    lr_classifier: float = 0.01
    lr_generator: float = 0.01
    lr_mask: float = 0.01
    milestones_classifier: tuple[int, ...] = (100, 200, 300, 400)
    milestones_generator: tuple[int, ...] = (200, 300, 400, 500)
    milestones_mask: tuple[int, ...] = (10, 20)
    lr_decay: float = 0.1
    p_attack: float = 0.1
    p_cross: float = 0.1
    lambda_div: float = 1.0
    lambda_norm: float = 100.0
    mask_density: float = 0.032
    channel_init: int | None = None  # None: default_arch(channels)
    steps: int | None = None
    max_samples: int | None = None  # None: the whole dataset

    def __post_init__(self) -> None:
        check_int(self.epochs, "epochs", 1)
        check_int(self.mask_epochs, "mask_epochs", 0)
        check_int(self.batch_size, "batch_size", 2)
        for name in ("lr_classifier", "lr_generator", "lr_mask", "lr_decay", "lambda_norm"):
            check_positive(getattr(self, name), name)
        if not as_number(self.lambda_div, "lambda_div") >= 0:
            raise InputError(f"lambda_div: expected a number >= 0, got {self.lambda_div!r}")
        for name in ("p_attack", "p_cross", "mask_density"):
            value = as_number(getattr(self, name), name)
            if not 0 < value < 1:
                raise InputError(f"{name}: expected a number in (0, 1), got {getattr(self, name)!r}")
        if float(self.p_attack) + float(self.p_cross) >= 1:
            raise InputError(f"p_attack + p_cross: expected < 1 (some samples stay clean), got "
                             f"{self.p_attack} + {self.p_cross}")
        for name in ("milestones_classifier", "milestones_generator", "milestones_mask"):
            values = getattr(self, name)
            try:
                object.__setattr__(self, name, tuple(check_int(v, name, 1) for v in values))
            except TypeError:
                raise InputError(f"{name}: expected a list of epoch numbers, got {values!r}") from None
        if self.channel_init is not None:
            check_int(self.channel_init, "channel_init", 2, 1024)
        if self.steps is not None:
            check_int(self.steps, "steps", 1, MAX_STEPS)
        check_max_samples(self.max_samples)


IAD_CPU_BUDGET = {"mask_epochs": 2, "epochs": 6, "max_samples": 2000}


def iad_config(budget: str = "paper", **overrides) -> IADConfig:
    """The paper's settings (``budget="paper"``) or the small CPU budget, with ``overrides``."""
    return make_config(IADConfig, IAD_CPU_BUDGET, budget, **overrides)


@dataclass
class IADBuild:
    """What ``build_iad`` made: the trigger file, its sha256, the classifier trained alongside G (the
    attacker's backdoored model, eval mode) and its accuracies on the training images after training:
    ``clean_acc``, ``asr`` (own trigger -> attack label, samples whose label changes) and ``cross_acc``
    (another image's trigger -> true label)."""

    path: str
    sha256: str
    classifier: nn.Module
    metrics: dict


def _diversity(inputs1, inputs2, out1, out2) -> torch.Tensor:
    """mean(||inputs1 - inputs2|| / (||out1 - out2|| + eps)), RMS distances per sample."""
    distance_in = torch.sqrt(torch.mean((inputs1 - inputs2) ** 2, dim=(1, 2, 3)))
    distance_out = torch.sqrt(torch.mean((out1 - out2) ** 2, dim=(1, 2, 3)))
    return torch.mean(distance_in / (distance_out + EPSILON))


def build_iad(
    x: np.ndarray,
    y: np.ndarray,
    out: str,
    *,
    model: nn.Module,
    normalisation,
    num_classes: int,
    mode: str = "a2o",
    target: int = 0,
    seed: int = 0,
    config: IADConfig | None = None,
    progress: Callable[[str], None] | None = None,
) -> IADBuild:
    """Train IAD's mask generator, then its pattern generator with a copy of ``model`` (the clean classifier,
    taking ``(x / 255 - mean) / std``) on the uint8 NHWC images ``x`` / labels ``y``; write the trigger file
    ``out`` (.npz). Same seed, same file (on the CPU, with the same thread count)."""
    config, image_shape = check_build_inputs(out, config, IADConfig, "iad_config", x)
    check_mode(mode)
    target, num_classes = check_class_setup(target, num_classes)
    y = check_labels(y, num_classes)
    if len(y) != len(x) or len(x) < 2:
        raise InputError(f"x, y: expected at least 2 images with one label each, got {len(x)} and {len(y)}")
    channels = image_shape[2]
    classifier, normaliser = check_classifier(model, normalisation, channels)
    channel_init, steps = default_arch(channels)
    channel_init = config.channel_init or channel_init
    steps = config.steps or steps
    say = progress or (lambda message: None)

    effective_batch = min(config.batch_size, len(x) if config.max_samples is None else min(len(x), config.max_samples))
    if int(config.p_attack * effective_batch) < 1 or int(config.p_cross * effective_batch) < 1:
        raise InputError(f"batch_size: batches of {effective_batch} images hold no backdoor or no cross-trigger "
                         f"sample at p_attack {config.p_attack} / p_cross {config.p_cross}; give a larger batch "
                         f"(>= {int(np.ceil(1 / min(config.p_attack, config.p_cross)))}) or more images")
    subset_rng, order_rng, label_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
    keep = training_subset(x, config.max_samples, subset_rng)
    x, y = x[keep], y[keep]
    device = model_device(classifier)
    normaliser = normaliser.to(device)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pattern_net = IADGenerator(channels, channels, channel_init, steps).to(device)
        mask_net = IADGenerator(channels, 1, channel_init, steps).to(device)
        classifier = copy.deepcopy(classifier).to(device)
        classifier.requires_grad_(True)

        def images(index):
            return to_unit(x[index]).to(device)

        # Stage 1: the mask generator alone.
        optimiser_m = torch.optim.Adam(mask_net.parameters(), config.lr_mask, betas=(0.5, 0.9))
        schedule_m = torch.optim.lr_scheduler.MultiStepLR(optimiser_m, list(config.milestones_mask), config.lr_decay)
        mask_net.train()
        for epoch in range(config.mask_epochs):
            for batch1, batch2 in zip(batches(len(x), config.batch_size, order_rng),
                                      batches(len(x), config.batch_size, order_rng)):
                inputs1, inputs2 = normaliser(images(batch1)), normaliser(images(batch2))
                masks1, masks2 = threshold(mask_net(inputs1)), threshold(mask_net(inputs2))
                loss_norm = torch.mean(F.relu(masks1 - config.mask_density))
                loss_div = _diversity(inputs1, inputs2, masks1, masks2)
                loss = config.lambda_norm * loss_norm + config.lambda_div * loss_div
                optimiser_m.zero_grad()
                loss.backward()
                optimiser_m.step()
            schedule_m.step()
            say(f"iad mask epoch {epoch + 1}/{config.mask_epochs}: norm {loss_norm.item():.4f} "
                f"div {loss_div.item():.3f}")
        _recalibrate(mask_net, normaliser, x, config.batch_size, device)
        mask_net.requires_grad_(False)

        # Stage 2: pattern generator and classifier together.
        optimiser_c = torch.optim.SGD(classifier.parameters(), config.lr_classifier, momentum=0.9, weight_decay=5e-4)
        optimiser_g = torch.optim.Adam(pattern_net.parameters(), config.lr_generator, betas=(0.5, 0.9))
        schedule_c = torch.optim.lr_scheduler.MultiStepLR(optimiser_c, list(config.milestones_classifier),
                                                          config.lr_decay)
        schedule_g = torch.optim.lr_scheduler.MultiStepLR(optimiser_g, list(config.milestones_generator),
                                                          config.lr_decay)
        for epoch in range(config.epochs):
            classifier.train()
            pattern_net.train()
            hits = np.zeros(4)  # backdoor hits, backdoor samples, cross hits, cross samples (this epoch)
            for batch1, batch2 in zip(batches(len(x), config.batch_size, order_rng),
                                      batches(len(x), config.batch_size, order_rng)):
                size = len(batch1)
                n_bd, n_cross = int(config.p_attack * size), int(config.p_cross * size)
                pixels1, pixels2 = images(batch1), images(batch2)
                inputs1, inputs2 = normaliser(pixels1), normaliser(pixels2)
                labels = torch.from_numpy(y[batch1]).to(device)
                bd_labels = torch.from_numpy(attack_labels(y[batch1[:n_bd]], mode, target=target,
                                                           num_classes=num_classes, rng=label_rng)).to(device)
                patterns1 = pattern_net(inputs1[:n_bd])
                masks1 = threshold(mask_net(inputs1[:n_bd]))
                backdoor = pixels1[:n_bd] + (patterns1 - pixels1[:n_bd]) * masks1
                donors = slice(n_bd, n_bd + n_cross)
                patterns2 = pattern_net(inputs2[donors])
                masks2 = threshold(mask_net(inputs2[donors]))
                cross = pixels1[donors] + (patterns2 - pixels1[donors]) * masks2
                total = torch.cat([backdoor, cross, pixels1[n_bd + n_cross :]])
                logits = classifier(normaliser(total))
                check_logits(logits, num_classes)
                loss_ce = F.cross_entropy(logits, torch.cat([bd_labels, labels[n_bd:]]))
                # Diversity between the triggers of two different images, as the reference codes pair them
                # (image i of the backdoor part with the donor image i of the cross part).
                pairs = min(n_bd, n_cross)
                loss_div = (_diversity(inputs1[:pairs], inputs2[donors][:pairs], normaliser(patterns1[:pairs]),
                                       normaliser(patterns2[:pairs])) if pairs else torch.zeros((), device=device))
                loss = loss_ce + config.lambda_div * loss_div
                optimiser_c.zero_grad()
                optimiser_g.zero_grad()
                loss.backward()
                optimiser_c.step()
                optimiser_g.step()
                predicted = logits.detach().argmax(1)
                hits += [int((predicted[:n_bd] == bd_labels).sum()), n_bd,
                         int((predicted[donors] == labels[donors]).sum()), n_cross]
            schedule_c.step()
            schedule_g.step()
            say(f"iad epoch {epoch + 1}/{config.epochs}: ce {loss_ce.item():.4f} div {float(loss_div.detach()):.3f} "
                f"backdoor acc {hits[0] / max(hits[1], 1):.2f} cross acc {hits[2] / max(hits[3], 1):.2f}")
        _recalibrate(pattern_net, normaliser, x, config.batch_size, device)
        classifier.eval()

    arrays = {
        **module_arrays("pattern", pattern_net),
        **module_arrays("mask", mask_net),
        "arch": np.array([channel_init, steps], dtype=np.int64),
        "mean": normaliser.mean.flatten().cpu().numpy(),
        "std": normaliser.std.flatten().cpu().numpy(),
    }
    record = {**dataclasses.asdict(config), "seed": int(seed), "mode": mode, "target": target,
              "num_classes": num_classes, "n_train": len(x), "channel_init": channel_init, "steps": steps}
    sha256 = save_trigger_file(out, "iad", image_shape, arrays, record)
    attack = IAD(image_shape, seed, generator=str(out))
    metrics = _training_metrics(attack, classifier, normaliser, x, y, mode=mode, target=target,
                                num_classes=num_classes, rng=label_rng)
    say(f"iad done: {metrics}")
    return IADBuild(path=str(out), sha256=sha256, classifier=classifier, metrics=metrics)


def _recalibrate(net: nn.Module, normaliser: nn.Module, x: np.ndarray, batch_size: int, device) -> None:
    """Re-estimate ``net``'s BatchNorm statistics as a plain average over ``x`` (then eval mode): with
    momentum 0.05 a short run's running statistics still remember the untrained generator, and the
    eval-mode trigger would not be the one the classifier learned."""
    norms = [module for module in net.modules() if isinstance(module, nn.BatchNorm2d)]
    saved = [module.momentum for module in norms]
    for module in norms:
        module.reset_running_stats()
        module.momentum = None  # cumulative average
    net.train()
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            net(normaliser(to_unit(x[start : start + batch_size]).to(device)))
    for module, momentum in zip(norms, saved):
        module.momentum = momentum
    net.eval()


def _predict(classifier, normaliser, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    device = model_device(classifier)
    out = []
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            out.append(classifier(normaliser(to_unit(x[start : start + batch_size]).to(device))).argmax(1).cpu())
    return torch.cat(out).numpy()


def _training_metrics(attack, classifier, normaliser, x, y, *, mode, target, num_classes, rng) -> dict:
    wanted = attack_labels(y, mode, target=target, num_classes=num_classes, rng=rng)
    changed = wanted != y
    clean = _predict(classifier, normaliser, x)
    triggered = _predict(classifier, normaliser, attack.apply(x))
    cross = _predict(classifier, normaliser, attack.apply_cover(x, rng=np.random.default_rng(0)))
    return {"clean_acc": float(np.mean(clean == y)),
            "asr": float(np.mean(triggered[changed] == wanted[changed])) if changed.any() else float("nan"),
            "cross_acc": float(np.mean(cross == y))}


def derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """donor[i] != i for every i (n >= 2): a random cyclic order, each image taking the next one's trigger."""
    order = rng.permutation(n)
    donor = np.empty(n, dtype=np.int64)
    donor[order] = np.roll(order, -1)
    return donor


@dataclass(frozen=True, eq=False, kw_only=True)
class IAD(LearnedAttack):
    """Each image gets its own trigger ``x + (G(x) - x) * m(x)`` (train and test alike). Cover samples
    (``cross_ratio`` per payload sample; the paper's p_cross / p_attack = 0.1 / 0.1 = 1) get the trigger of
    another cover image and keep their label; a lone cover image borrows from its own 180-degree rotation."""

    name = "iad"
    needs_clean_model = True  # the attacker's classifier starts from it

    cross_ratio: float = 1.0
    pattern_net: nn.Module = field(init=False, repr=False)
    mask_net: nn.Module = field(init=False, repr=False)
    normaliser: nn.Module = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not as_number(self.cross_ratio, "cross_ratio") >= 0:
            raise InputError(f"cross_ratio: expected a number >= 0, got {self.cross_ratio!r}")
        super().__post_init__()

    @classmethod
    def build_trigger(cls, dataset, spec, path, *, clean_model, budget, settings, progress) -> dict:
        model, normalisation = clean_model
        built = build_iad(np.asarray(dataset.x), np.asarray(dataset.y), path, model=model,
                          normalisation=normalisation, num_classes=dataset.num_classes, mode=spec.mode,
                          target=spec.target, seed=spec.seed, config=iad_config(budget, **settings), progress=progress)
        return {"generator": str(path), "generator_sha256": built.sha256}

    def _load(self, arrays, path):
        channels = self.image_shape[2]
        arch = require(arrays, "arch", path, shape=(2,), kind="iu")
        channel_init, steps = int(arch[0]), int(arch[1])
        if not (2 <= channel_init <= 1024 and 1 <= steps <= MAX_STEPS):
            raise InputError(f"{path}: generator arch (channel_init {channel_init}, steps {steps}) is out of range")
        mean = require(arrays, "mean", path, shape=(channels,), kind="f")
        std = require(arrays, "std", path, shape=(channels,), kind="f")
        if not (std > 0).all():
            raise InputError(f"{path}: 'std' must be positive, got {std.tolist()}")
        object.__setattr__(self, "pattern_net", load_module(IADGenerator(channels, channels, channel_init, steps),
                                                            arrays, "pattern", path))
        object.__setattr__(self, "mask_net", load_module(IADGenerator(channels, 1, channel_init, steps),
                                                         arrays, "mask", path))
        object.__setattr__(self, "normaliser", Normaliser(mean, std, channels))

    def triggers(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(pattern N x H x W x C, mask N x H x W) in [0, 1] that each image of ``x`` gets."""
        check_images(x, self.image_shape)
        patterns, masks = [], []
        with torch.no_grad():
            for start in range(0, len(x), self.batch_size):
                inputs = self.normaliser(to_unit(x[start : start + self.batch_size]))
                patterns.append(self.pattern_net(inputs).permute(0, 2, 3, 1).numpy())
                masks.append(threshold(self.mask_net(inputs))[:, 0].numpy())
        return np.concatenate(patterns), np.concatenate(masks)

    def _mix(self, x: np.ndarray, donors: np.ndarray) -> np.ndarray:
        out = np.empty_like(x)
        with torch.no_grad():
            for start in range(0, len(x), self.batch_size):
                pixels = to_unit(x[start : start + self.batch_size])
                source = self.normaliser(to_unit(donors[start : start + self.batch_size]))
                mask = threshold(self.mask_net(source))
                out[start : start + self.batch_size] = from_unit(pixels + (self.pattern_net(source) - pixels) * mask)
        return out

    def _apply(self, x, *, train, labels, rng):
        return self._mix(x, x)

    def cover_count(self, n_samples: int, rate: float) -> int:
        return int(n_samples * rate * float(self.cross_ratio))

    def apply_cover(self, x: np.ndarray, *, rng: np.random.Generator | None = None) -> np.ndarray:
        check_images(x, self.image_shape)
        rng = rng or self._default_rng()
        donors = x[:, ::-1, ::-1] if len(x) == 1 else x[derangement(len(x), rng)]
        return self._mix(x, np.ascontiguousarray(donors))
