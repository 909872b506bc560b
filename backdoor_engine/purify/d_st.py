"""D-ST, secure training from scratch (Chen et al., NeurIPS 2022; official ST/train_extractor.py and
ST/train_classifier.py, SEED_NOTES 2.4), from a three-way split (FCT's, or any detector's report):

  stage 1  SS-CTL: a fresh encoder (the suspect's arch, its penultimate features) with an MLP projection head
           d -> d -> ReLU -> 128, trained by supervised contrastive learning on every sample with its given
           label, two strongly augmented views each. An anchor split poisoned or uncertain keeps only its own
           other view as positive (the official row masking); columns are not masked, so a clean anchor still
           treats same-label poisoned or uncertain samples as positives, as the official code does.
  stage 2  the encoder frozen (eval mode), a new linear head trained with CE(clean part) - lambda_p CE(poisoned
           part) on augmented views; uncertain samples are left out.

The result is a model of the suspect's arch (encoder + new head) with the usual checkpoint. The last epoch is
kept (the official classifier stage keeps the best clean *test* accuracy; no test data is looked at here).
The official budget (200 + 10 epochs, batch 512, lr 0.5) is GPU-sized: it stays the default, and
benchmarks/RESULTS.md gives the CPU budget measured here.

Stage 1 is the whole cost. `encoder_path` keeps its result: written (atomically) after stage 1 when the file is
absent, read in place of stage 1 when present, so stage 2 can be re-run with another lambda or lr. The file holds the
encoder's tensors and a fingerprint of what trained it (the dataset's ids, labels and pixels, the split, the arch
and every stage-1 setting); a file with another fingerprint is refused with the settings that differ, never used silently.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from ..atomic import atomic_write
from ..data.fingerprint import content_digest, dataset_fingerprint
from ..detection import CLEAN, POISONED, UNCERTAIN, split_sizes
from ..errors import InputError
from ..models.augment import strong_view
from ..models.preprocess import fit_normalisation, to_model_input
from ..models.registry import build_model
from ..models.train import batch_slices
from ..params import param
from .base import REQUIRED, UNUSED, Repair, Repaired


@dataclass(frozen=True)
class DStParams:
    encoder_epochs: int = param(200, "official code: README train_extractor.py --epochs 200 (GPU-sized; the CPU "
                                "budget measured here is in RESULTS.md)")
    encoder_batch_size: int = param(512, "official code: README --batch_size 512")
    encoder_lr: float = param(0.5, "official code: README --learning_rate 0.5")
    encoder_momentum: float = param(0.9, "official code: SupContrast SGD momentum 0.9")
    encoder_weight_decay: float = param(1e-4, "official code: SupContrast weight decay 1e-4")
    temperature: float = param(0.1, "official code: README --temp 0.1")
    base_temperature: float = param(0.07, "official code: SupConLoss base_temperature default 0.07 (the loss is "
                                    "scaled by temperature / base_temperature)")
    warmup_epochs: int = param(10, "official code: batch > 256 forces a 10-epoch warm-up")
    warmup_from: float = param(0.01, "official code: warm-up starts at lr 0.01")
    projection_dim: int = param(128, "official code: SupConResNet head 512 -> 512 -> ReLU -> 128")
    classifier_epochs: int = param(10, "official code: README train_classifier.py --epochs 10")
    classifier_batch_size: int = param(512, "official code: README --batch_size 512")
    classifier_lr: float = param(5.0, "official code: README --learning_rate 5, constant (no --cosine, the "
                                 "60/75/90 steps never reached)")
    classifier_momentum: float = param(0.9, "official code: SGD momentum 0.9, weight decay 0")
    poison_weight: float = param(0.001, "official code: train_classifier.py loss = CE(clean) - 0.001 CE(poisoned)")
    hflip: bool = param(True, "official code: the CIFAR-10 views flip (RandomHorizontalFlip)")
    seed: int = param(0, "ours", reason="any fixed seed: the same seed repeats the run")
    encoder_path: str | None = param(None, "ours", reason="stage 1 is the cost: a path keeps its encoder (written "
                                     "when absent, read instead of stage 1 when present and trained on the same "
                                     "data, split and stage-1 settings) so stage 2 can be re-run alone")

    def __post_init__(self):
        for name in ("encoder_epochs", "classifier_epochs", "encoder_batch_size", "classifier_batch_size",
                     "projection_dim"):
            value = getattr(self, name)
            if value < 1 or (name.endswith("batch_size") and value < 2):
                raise InputError(f"d-st: {name} must be a positive integer (batch sizes >= 2), got {value}")
        if self.warmup_epochs < 0:
            raise InputError(f"d-st: warmup_epochs must be >= 0, got {self.warmup_epochs}")
        for name in ("encoder_lr", "classifier_lr", "temperature", "base_temperature", "warmup_from"):
            if not getattr(self, name) > 0:
                raise InputError(f"d-st: {name} must be > 0, got {getattr(self, name)}")
        if self.encoder_path is not None:
            object.__setattr__(self, "encoder_path", os.fspath(self.encoder_path))


# The settings that shape stage 1's result; stage 2's may change between runs that share an encoder file.
STAGE1_SETTINGS = ("encoder_epochs", "encoder_batch_size", "encoder_lr", "encoder_momentum", "encoder_weight_decay",
                   "temperature", "base_temperature", "warmup_epochs", "warmup_from", "projection_dim", "hflip", "seed")


def supcon_loss(features: torch.Tensor, labels: torch.Tensor, split: torch.Tensor, *, temperature: float,
                base_temperature: float) -> torch.Tensor:
    """SupCon over 2B normalised projections [view 1; view 2] of B samples, with D-ST's row masking: an
    anchor whose split is not CLEAN has its own other view as its only positive."""
    count = len(labels)
    positives = labels[:, None] == labels[None, :]
    suspect = split != CLEAN
    positives = torch.where(suspect[:, None], torch.eye(count, dtype=torch.bool, device=labels.device), positives)
    positives = positives.repeat(2, 2)
    not_self = ~torch.eye(2 * count, dtype=torch.bool, device=labels.device)
    positives = positives & not_self
    logits = features @ features.T / temperature
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    log_denominator = torch.logsumexp(logits.masked_fill(~not_self, float("-inf")), dim=1, keepdim=True)
    log_prob = logits - log_denominator
    mean_log_prob = (positives * log_prob).sum(1) / positives.sum(1)
    return -(temperature / base_temperature) * mean_log_prob.mean()


def encoder_lr(params: DStParams, epoch: int, batch: int, batches: int) -> float:
    """SupContrast's schedule: cosine per epoch to lr 1e-3 x lr, after a linear per-batch warm-up from
    `warmup_from` to the cosine value at the end of the warm-up (epoch counts from 1)."""
    eta_min = params.encoder_lr * 0.1 ** 3

    def cosine(e: float) -> float:
        return eta_min + (params.encoder_lr - eta_min) * (1 + math.cos(math.pi * e / params.encoder_epochs)) / 2

    if epoch <= params.warmup_epochs:
        progress = (batch + (epoch - 1) * batches) / (params.warmup_epochs * batches)
        return params.warmup_from + progress * (cosine(params.warmup_epochs) - params.warmup_from)
    return cosine(epoch - 1)


class ProjectionHead(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(dim_in, dim_in), nn.ReLU(inplace=True), nn.Linear(dim_in, dim_out))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.layers(features), dim=1)


def _views(x, indices, generator, normalisation, hflip):
    images = torch.from_numpy(np.ascontiguousarray(x[indices]))
    return to_model_input(strong_view(images, generator, hflip=hflip), normalisation).contiguous(
        memory_format=torch.channels_last)


def train_encoder(model, x, y, split, normalisation, params: DStParams, progress: bool) -> list[dict]:
    """Stage 1 on `model.penultimate` (the head is not used); returns per-epoch losses."""
    head = ProjectionHead(model.feature_dim, params.projection_dim)
    trained = [p for name, p in model.named_parameters() if not name.startswith("head.")] + list(head.parameters())
    optimizer = torch.optim.SGD(trained, lr=params.encoder_lr, momentum=params.encoder_momentum,
                                weight_decay=params.encoder_weight_decay)
    generator = torch.Generator().manual_seed(params.seed)
    labels, parts = torch.from_numpy(y.astype(np.int64)), torch.from_numpy(split.astype(np.int64))
    slices = batch_slices(len(x), params.encoder_batch_size)
    history = []
    model.train()
    for epoch in range(1, params.encoder_epochs + 1):
        started, total, seen = time.perf_counter(), 0.0, 0
        order = torch.randperm(len(x), generator=generator)
        bar = tqdm(slices, desc=f"d-st: encoder {epoch}/{params.encoder_epochs}", disable=not progress, unit="batch")
        for b, batch in enumerate(bar):
            for group in optimizer.param_groups:
                group["lr"] = encoder_lr(params, epoch, b, len(slices))
            indices = order[batch].numpy()
            both = torch.cat([_views(x, indices, generator, normalisation, params.hflip),
                              _views(x, indices, generator, normalisation, params.hflip)])
            loss = supcon_loss(head(model.penultimate(both)), labels[indices], parts[indices],
                               temperature=params.temperature, base_temperature=params.base_temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(indices)
            seen += len(indices)
            bar.set_postfix(loss=f"{total / seen:.4f}")
        history.append({"stage": "encoder", "epoch": epoch, "loss": total / seen,
                        "seconds": time.perf_counter() - started})
    return history


def train_classifier(model, x, y, split, normalisation, params: DStParams, progress: bool) -> list[dict]:
    """Stage 2: a fresh `model.head` on the frozen encoder, CE(clean) - poison_weight CE(poisoned)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(params.seed + 1)
        model.head.reset_parameters()
    optimizer = torch.optim.SGD(model.head.parameters(), lr=params.classifier_lr, momentum=params.classifier_momentum,
                                weight_decay=0.0)
    generator = torch.Generator().manual_seed(params.seed + 1)
    used = np.flatnonzero(split != UNCERTAIN)
    labels = torch.from_numpy(y.astype(np.int64))
    poisoned = torch.from_numpy(split == POISONED)
    slices = batch_slices(len(used), params.classifier_batch_size)
    history = []
    model.eval()  # frozen BatchNorm statistics, as the official encoder.eval()
    for epoch in range(1, params.classifier_epochs + 1):
        started, clean_loss, poison_loss, correct, seen = time.perf_counter(), 0.0, 0.0, 0, 0
        order = used[torch.randperm(len(used), generator=generator).numpy()]
        bar = tqdm(slices, desc=f"d-st: classifier {epoch}/{params.classifier_epochs}", disable=not progress,
                   unit="batch")
        for batch in bar:
            indices = order[batch]
            with torch.no_grad():
                features = model.penultimate(_views(x, indices, generator, normalisation, params.hflip))
            logits = model.head(features)
            targets, bad = labels[indices], poisoned[indices]
            losses = F.cross_entropy(logits, targets, reduction="none")
            # Each part's mean over the batch, as two separate CE criteria on the official clean / poisoned batches.
            clean_part = losses[~bad].mean() if (~bad).any() else losses.sum() * 0
            poison_part = losses[bad].mean() if bad.any() else losses.sum() * 0
            loss = clean_part - params.poison_weight * poison_part
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            clean_loss += clean_part.item() * len(indices)
            poison_loss += poison_part.item() * len(indices)
            correct += int((logits.argmax(1)[~bad] == targets[~bad]).sum())
            seen += len(indices)
        history.append({"stage": "classifier", "epoch": epoch, "clean_loss": clean_loss / seen,
                        "poison_loss": poison_loss / seen, "clean_acc": correct / max(int((split[used] == CLEAN).sum()), 1),
                        "seconds": time.perf_counter() - started})
    return history


def stage1_fingerprint(dataset, split: np.ndarray, arch: str, params: DStParams) -> dict:
    """What trained an encoder: the dataset's and the split's content hashes, the arch, every stage-1 setting."""
    return {"dataset": dataset_fingerprint(dataset), "split": content_digest("split", [np.asarray(split, np.int8)]),
            "arch": arch, **{name: getattr(params, name) for name in STAGE1_SETTINGS}}


def load_encoder(path: Path, model: nn.Module, fingerprint: dict) -> None:
    """Load a kept stage-1 encoder into `model` (head untouched); refuse one trained on anything else."""
    try:
        kept = torch.load(path, map_location="cpu", weights_only=True)
        stored = json.loads(kept["fingerprint"])
        state = kept["encoder"]
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same clear refusal
        raise InputError(f"d-st: encoder_path {path} is not a D-ST encoder file ({type(error).__name__}: "
                         f"{error})") from None
    differ = sorted(key for key in set(stored) | set(fingerprint) if stored.get(key) != fingerprint.get(key))
    if differ:
        raise InputError(f"d-st: the encoder in {path} was trained on other inputs or settings ({', '.join(differ)} "
                         "differ); remove the file or give another encoder_path to train stage 1 again")
    expected = {name for name in model.state_dict() if not name.startswith("head.")}
    if set(state) != expected:
        raise InputError(f"d-st: the encoder in {path} does not fit the {fingerprint['arch']} model (its tensors "
                         "differ)")
    model.load_state_dict(state, strict=False)


def save_encoder(path: Path, model: nn.Module, fingerprint: dict) -> None:
    state = {name: tensor.detach().clone().contiguous() for name, tensor in model.state_dict().items()
             if not name.startswith("head.")}
    with atomic_write(path) as file:
        torch.save({"fingerprint": json.dumps(fingerprint, sort_keys=True), "encoder": state}, file)


class DSt(Repair):
    name = "d-st"
    description = ("D-ST: secure training from scratch, a supervised-contrastive encoder that keeps suspect anchors "
                   "apart, then a head trained to fit the clean part and not the poisoned one")
    Params = DStParams
    uses_flags = REQUIRED
    uses_aux = UNUSED
    uses_split = True
    needs_arch = True
    needs_model = False

    def repair(self, model, normalisation, dataset, flags, aux=None, *, params: DStParams, arch, progress):
        split = flags
        if int((split == CLEAN).sum()) < 2:
            raise InputError(f"D-ST trains its classifier on the split's clean part, which holds "
                             f"{int((split == CLEAN).sum())} sample(s)")
        if len(dataset) < params.encoder_batch_size:
            raise InputError(f"D-ST needs at least encoder_batch_size={params.encoder_batch_size} samples, got "
                             f"{len(dataset)}")
        x, y = dataset.x, np.asarray(dataset.y)
        normalisation = fit_normalisation(x)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(params.seed)
            fresh = build_model(arch, num_classes=dataset.num_classes, in_channels=x.shape[-1],
                                input_size=x.shape[1:3])
        fresh = fresh.to(memory_format=torch.channels_last)
        kept = Path(params.encoder_path) if params.encoder_path else None
        if kept is not None and not kept.exists() and not kept.parent.is_dir():
            raise InputError(f"d-st: cannot keep the encoder at {kept}: directory {kept.parent} does not exist")
        fingerprint = stage1_fingerprint(dataset, split, arch, params) if kept else None
        if kept is not None and kept.exists():
            load_encoder(kept, fresh, fingerprint)
            history = [{"stage": "encoder", "loaded_from": str(kept)}]
        else:
            history = train_encoder(fresh, x, y, split, normalisation, params, progress)
            if kept is not None:
                save_encoder(kept, fresh, fingerprint)
        history += train_classifier(fresh, x, y, split, normalisation, params, progress)
        fresh = fresh.to(memory_format=torch.contiguous_format).eval()
        return Repaired(fresh, normalisation, history, {"arch": arch, **asdict(params), "split": split_sizes(split)})
