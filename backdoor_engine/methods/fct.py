"""FCT, the feature consistency towards transformations (Chen et al., NeurIPS 2022, "Effective backdoor defense
by exploiting sensitivity of poisoned samples"): poisoned samples move more in feature space under rotation and
translation than clean ones, once a model has learned the trigger and been pushed to separate class centres.

Stages, each a plain function composed by `Fct` (provenance of every default: SEED_NOTES.md section 2, the
official SCLBD/Effective_backdoor_defense code, README commands):
  1 train_sd_model   the SD module: a fresh model trained on the suspect set itself, 2 epochs of cross-entropy
                     without augmentation, then 10 epochs of the centre-separation loss only, the same optimiser
                     and schedule carried over
  2 fct_values       FCT(x) = mean over feature dims of (f(x) - f(tau(x)))^2, f = the SD model's penultimate
                     features from the engine's single pass (a probe on its head), the transformed pass read
                     through `TransformedSource` and batched the same way, chunk by chunk (bounded memory)
  3 split_by_rank    lowest alpha_c = clean, highest alpha_p = poisoned, the rest uncertain

tau is drawn once per sample from the seed (per-sample parameters indexed by position, so a chunk or batch
size never changes a value). The official code re-draws tau when it separates the samples and compares the
new values with thresholds from an earlier draw (part sizes then only near 20% / 5%); we compute FCT once and
split it by rank. The official SD model is a ResNet-18 with a max-pool stem; ours is the engine's registered
arch (small_resnet below 32 px, resnet18 from 32 px), any other by `arch`.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..data.dataset import Dataset
from ..data.fingerprint import content_digest
from ..data.source import Batch, Source
from ..detection import CLEAN, POISONED, UNCERTAIN, Detection, split_sizes
from ..errors import InputError
from ..models.preprocess import Normalisation, fit_normalisation
from ..models.registry import available_archs, build_model, default_arch
from ..models.train import TrainConfig, train_epoch
from ..params import param
from .base import PIXELS, Detector, ReportParts, ScanData

TAU_OPS = ("rotate", "affine", "flip", "crop", "blur", "erase")
CHUNK = 16384  # samples per pair of passes: two chunk x D feature matrices in memory at a time


@dataclass(frozen=True)
class FctParams:
    arch: str | None = param(None, "ours", reason="small_resnet below 32 px, resnet18 from 32 px: the engine's "
                             "registered archs (the official SD model is a ResNet-18)")
    ce_epochs: int = param(2, "official code: README train_attack_noTrans.py --epochs 2 (checkpoint 1.tar)")
    intra_epochs: int = param(10, "official code: README finetune_attack_noTrans.py --epochs 10 (checkpoint 9.tar)")
    sd_batch_size: int = param(128, "official code: utils/args.py batch_size 128")
    lr: float = param(0.01, "official code: utils/args.py lr 0.01")
    momentum: float = param(0.9, "official code: SGD momentum 0.9")
    weight_decay: float = param(5e-4, "official code: SGD weight decay 5e-4")
    cosine_t_max: int = param(100, "official code: CosineAnnealingLR(T_max=100) stepped once per epoch, kept "
                              "across both phases")
    transforms: tuple[str, ...] = param(("rotate", "affine"), "official code: trans1 rotate, trans2 affine; "
                                        f"any sequence of {', '.join(TAU_OPS)}")
    rotation: float = param(180.0, "official code: RandomRotation(180)")
    translate: float = param(0.2, "official code: RandomAffine(degrees=0, translate=(0.2, 0.2))")
    clean_ratio: float = param(0.20, "official code: utils/args.py clean_ratio (alpha_c)")
    poison_ratio: float = param(0.05, "official code: utils/args.py poison_ratio (alpha_p)")
    pass_batch_size: int = param(256, "ours", reason="the engine's extraction batch; it does not change a value")
    seed: int = param(0, "ours", reason="any fixed seed: the same seed repeats the SD model and every tau draw "
                      "(the official code seeds 1000 for its data loader only)")

    def __post_init__(self):
        object.__setattr__(self, "transforms", tuple(self.transforms))
        unknown = [op for op in self.transforms if op not in TAU_OPS]
        if unknown or not self.transforms:
            raise InputError(f"fct: transforms must be a non-empty sequence of {', '.join(TAU_OPS)}, got "
                             f"{list(self.transforms)}")
        if self.arch is not None and self.arch not in available_archs():
            raise InputError(f"fct: unknown arch {self.arch!r}; available: {', '.join(available_archs())}")
        for name in ("ce_epochs", "intra_epochs"):
            if getattr(self, name) < 0:
                raise InputError(f"fct: {name} must be >= 0, got {getattr(self, name)}")
        if self.ce_epochs + self.intra_epochs == 0:
            raise InputError("fct: the SD model needs at least one epoch (ce_epochs + intra_epochs > 0)")
        for name in ("sd_batch_size", "pass_batch_size", "cosine_t_max"):
            if getattr(self, name) < 2:
                raise InputError(f"fct: {name} must be >= 2, got {getattr(self, name)}")
        if not (0 < self.clean_ratio < 1 and 0 < self.poison_ratio < 1 and self.clean_ratio + self.poison_ratio <= 1):
            raise InputError(f"fct: clean_ratio and poison_ratio must be in (0, 1) with a sum <= 1, got "
                             f"{self.clean_ratio} and {self.poison_ratio}")
        if not 0 <= self.rotation <= 180 or not 0 <= self.translate < 1:
            raise InputError(f"fct: rotation must be in [0, 180] degrees and translate in [0, 1), got "
                             f"{self.rotation} and {self.translate}")


# ---------------------------------------------------------------------------------------------- stage 1: SD


class _PerEpoch:
    """train_epoch steps its scheduler per batch; the official schedule steps per epoch, done by the caller."""

    def step(self) -> None:
        pass


def centre_separation_loss(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The official "intra-class" loss: mean cosine similarity between the L2-normalised centres of the classes
    present in the batch (the K x K matrix with its zeroed diagonal, averaged whole). Minimising it pushes the
    class centres apart."""
    present, inverse = torch.unique(labels, return_inverse=True)
    sums = torch.zeros(len(present), features.shape[1], dtype=features.dtype, device=features.device)
    sums = sums.index_add(0, inverse, features)
    counts = torch.bincount(inverse, minlength=len(present)).to(features.dtype)
    centres = F.normalize(sums / counts[:, None], dim=1)
    similarity = centres @ centres.T
    return (similarity * (1 - torch.eye(len(present), device=features.device))).mean()


def train_sd_model(x: np.ndarray, y: np.ndarray, *, num_classes: int, params: FctParams,
                   normalisation: Normalisation, progress: bool = False) -> tuple[nn.Module, list[dict]]:
    """The SD module on uint8 NHWC images `x` and their (possibly poisoned) labels; eval mode on return."""
    arch = params.arch or default_arch(x.shape[1:3])
    config = TrainConfig(epochs=max(params.ce_epochs, 1), batch_size=params.sd_batch_size, lr=params.lr,
                         momentum=params.momentum, weight_decay=params.weight_decay, augment=False,
                         seed=params.seed, progress=progress)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(params.seed)
        model = build_model(arch, num_classes=num_classes, in_channels=x.shape[-1], input_size=x.shape[1:3])
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=params.lr, momentum=params.momentum,
                                weight_decay=params.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=params.cosine_t_max)
    generator = torch.Generator().manual_seed(params.seed)
    labels = torch.from_numpy(np.asarray(y, dtype=np.int64))
    history = []
    total = params.ce_epochs + params.intra_epochs
    for epoch in range(1, params.ce_epochs + 1):
        started = time.perf_counter()
        metrics = train_epoch(model, x, labels, optimizer=optimizer, scheduler=_PerEpoch(), normalisation=normalisation,
                              config=config, generator=generator, description=f"fct: SD model, CE {epoch}/{total}")
        schedule.step()
        history.append({"epoch": epoch, "phase": "cross-entropy", **metrics, "seconds": time.perf_counter() - started})
    for epoch in range(params.ce_epochs + 1, total + 1):
        started = time.perf_counter()
        metrics = train_epoch(model, x, labels, optimizer=optimizer, scheduler=_PerEpoch(), normalisation=normalisation,
                              config=config, generator=generator, objective=_separation_objective,
                              description=f"fct: SD model, centre separation {epoch}/{total}")
        schedule.step()
        history.append({"epoch": epoch, "phase": "centre separation", "loss": metrics["loss"],
                        "seconds": time.perf_counter() - started})
    return model.to(memory_format=torch.contiguous_format).eval(), history


def _separation_objective(model, inputs, labels) -> torch.Tensor:
    return centre_separation_loss(model.penultimate(inputs), labels)


# --------------------------------------------------------------------------------------------- stage 2: tau


def draw_tau(n: int, image_shape, params: FctParams) -> dict[str, np.ndarray]:
    """Every sample's tau parameters, drawn once from the seed in a fixed order (torchvision's ranges)."""
    height, width = image_shape[:2]
    rng = np.random.default_rng([params.seed, 0x7A0])
    draws = {}
    for op in params.transforms:
        if op == "rotate":
            draws["angle"] = rng.uniform(-params.rotation, params.rotation, n)
        elif op == "affine":  # RandomAffine: round(uniform(-max_dx, max_dx)), max_dx = translate x width
            draws["dx"] = np.round(rng.uniform(-params.translate * width, params.translate * width, n)).astype(int)
            draws["dy"] = np.round(rng.uniform(-params.translate * height, params.translate * height, n)).astype(int)
        elif op == "flip":
            draws["flip"] = rng.random(n) < 0.5
        elif op == "crop":  # RandomCrop(size, padding=4)
            draws["crop"] = rng.integers(0, 9, (n, 2))
        elif op == "blur":  # GaussianBlur(15, sigma=(0.1, 2.0))
            draws["sigma"] = rng.uniform(0.1, 2.0, n)
        elif op == "erase":  # RandomErasing(p=1, scale=(0.2, 0.3), ratio=(0.5, 1)), value 0
            area = rng.uniform(0.2, 0.3, n) * height * width
            ratio = np.exp(rng.uniform(np.log(0.5), np.log(1.0), n))
            eh = np.clip(np.round(np.sqrt(area * ratio)), 1, height).astype(int)
            ew = np.clip(np.round(np.sqrt(area / ratio)), 1, width).astype(int)
            draws["erase"] = np.stack([eh, ew, rng.integers(0, height - eh + 1), rng.integers(0, width - ew + 1)], 1)
    return draws


def apply_tau(images: np.ndarray, draws: dict[str, np.ndarray], positions: np.ndarray,
              transforms: tuple[str, ...]) -> np.ndarray:
    """tau of uint8 NHWC `images` (the samples at `positions`), uint8 back as torchvision gives on PIL images:
    nearest-neighbour rotation and integer translation with black fill, then the others in the given order."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).to(torch.float32)
    n, channels, height, width = x.shape
    for op in transforms:
        if op == "rotate":
            x = _affine(x, np.deg2rad(draws["angle"][positions]), np.zeros(n), np.zeros(n))
        elif op == "affine":
            x = _affine(x, np.zeros(n), draws["dx"][positions], draws["dy"][positions])
        elif op == "flip":
            flip = torch.from_numpy(draws["flip"][positions])
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        elif op == "crop":
            top, left = (torch.from_numpy(draws["crop"][positions][:, k]) for k in (0, 1))
            padded = F.pad(x, (4, 4, 4, 4))
            rows = (top[:, None] + torch.arange(height))[:, None, :, None].expand(n, channels, height, width + 8)
            cols = (left[:, None] + torch.arange(width))[:, None, None, :].expand(n, channels, height, width)
            x = padded.gather(2, rows).gather(3, cols)
        elif op == "blur":
            x = _gaussian_blur(x, draws["sigma"][positions])
        elif op == "erase":
            box = torch.from_numpy(draws["erase"][positions])
            r = torch.arange(height)[None, :, None]
            c = torch.arange(width)[None, None, :]
            inside = ((r >= box[:, 2, None, None]) & (r < (box[:, 2] + box[:, 0])[:, None, None])
                      & (c >= box[:, 3, None, None]) & (c < (box[:, 3] + box[:, 1])[:, None, None]))
            x = x.masked_fill(inside[:, None], 0.0)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def _affine(x: torch.Tensor, angle: np.ndarray, dx: np.ndarray, dy: np.ndarray) -> torch.Tensor:
    """Rotate each image by `angle` (radians, counter-clockwise as PIL) about its centre, then shift it by
    (dx, dy) pixels; nearest neighbour, zeros outside (one grid_sample for the batch)."""
    n, _, height, width = x.shape
    cos, sin = np.cos(angle), np.sin(angle)
    # Output pixel p samples the input at R^-1 (p - t), in grid_sample's [-1, 1] coordinates (aspect kept).
    theta = np.zeros((n, 2, 3))
    theta[:, 0, 0], theta[:, 0, 1] = cos, -sin * height / width
    theta[:, 1, 0], theta[:, 1, 1] = sin * width / height, cos
    tx, ty = 2 * np.asarray(dx, float) / width, 2 * np.asarray(dy, float) / height
    theta[:, 0, 2] = -(cos * tx - sin * ty * height / width)
    theta[:, 1, 2] = -(sin * tx * width / height + cos * ty)
    grid = F.affine_grid(torch.from_numpy(theta).to(torch.float32), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def _gaussian_blur(x: torch.Tensor, sigma: np.ndarray, kernel: int = 15) -> torch.Tensor:
    """Per-image Gaussian blur (kernel 15, reflect padding as torchvision), as one grouped convolution."""
    n, channels, height, width = x.shape
    offsets = torch.arange(kernel, dtype=torch.float32) - kernel // 2
    weights = torch.exp(-0.5 * (offsets[None, :] / torch.from_numpy(sigma).to(torch.float32)[:, None]) ** 2)
    weights = weights / weights.sum(1, keepdim=True)  # n x kernel
    flat = x.reshape(1, n * channels, height, width)
    per_plane = weights.repeat_interleave(channels, 0)
    padded = F.pad(flat, (kernel // 2, kernel // 2, 0, 0), mode="reflect")
    flat = F.conv2d(padded, per_plane[:, None, None, :], groups=n * channels)
    padded = F.pad(flat, (0, 0, kernel // 2, kernel // 2), mode="reflect")
    flat = F.conv2d(padded, per_plane[:, None, :, None], groups=n * channels)
    return flat.reshape(n, channels, height, width)


class TransformedSource(Source):
    """`base` with tau applied to every sample as it is read: the second pass of FCT, streamed and batched
    exactly as the first (same extraction, same batches), each sample's tau fixed by its position."""

    def __init__(self, base: Source, draws: dict[str, np.ndarray], transforms: tuple[str, ...], tag: str):
        self.base, self.draws, self.transforms, self.tag = base, draws, tuple(transforms), tag
        self.ids, self.y, self.poison = base.ids, base.y, base.poison
        self.image_shape, self.listing_skipped = base.image_shape, ()

    def read(self, start: int, stop: int) -> Batch:
        batch = self.base.read(start, stop)
        return Batch(apply_tau(batch.x, self.draws, batch.kept, self.transforms), batch.kept, batch.failures)

    def fingerprint(self) -> str:
        return content_digest(f"tau|{self.tag}|{self.base.fingerprint()}", ())


# --------------------------------------------------------------------------------------- stage 2: FCT values


def fct_values(model: nn.Module, dataset: Dataset, normalisation: Normalisation, params: FctParams, *,
               progress: bool = False) -> tuple[np.ndarray, dict]:
    """FCT of every sample: its plain and transformed penultimate features from two passes of the engine's
    extraction, chunk by chunk; returns (values, timings of the two passes)."""
    from ..data.dataset import ArraySource
    from ..data.source import SourceRange
    from ..engine import extract_features

    source = ArraySource(dataset)
    draws = draw_tau(len(source), source.image_shape, params)
    tag = f"{params.transforms}|{params.rotation}|{params.translate}|{params.seed}"
    transformed = TransformedSource(source, draws, params.transforms, tag)
    values = np.empty(len(source), np.float64)
    timings = {"plain_pass": 0.0, "transformed_pass": 0.0}
    chunks = range(0, len(source), CHUNK)
    from tqdm import tqdm

    for start in tqdm(chunks, desc="fct: plain and transformed passes", disable=not progress or len(chunks) < 2,
                      unit="chunk"):
        stop = min(start + CHUNK, len(source))
        pair = []
        for key, src in (("plain_pass", source), ("transformed_pass", transformed)):
            t0 = time.perf_counter()
            features = extract_features(model, SourceRange(src, start, stop), normalisation,
                                        capture=("penultimate",), batch_size=params.pass_batch_size, progress=False)
            timings[key] += time.perf_counter() - t0
            pair.append(np.asarray(features.penultimate, dtype=np.float32))
        values[start:stop] = np.mean((pair[0] - pair[1]) ** 2, axis=1, dtype=np.float64)
    return values, timings


# ----------------------------------------------------------------------------------------- stage 3: split


def split_by_rank(values: np.ndarray, clean_ratio: float, poison_ratio: float) -> np.ndarray:
    """CLEAN for the int(N clean_ratio) lowest values, POISONED for the int(N poison_ratio) highest, UNCERTAIN
    between (ties broken by position: the parts have exactly these sizes)."""
    n = len(values)
    order = np.argsort(values, kind="stable")
    split = np.full(n, UNCERTAIN, np.int8)
    split[order[:int(n * clean_ratio)]] = CLEAN
    n_poisoned = int(n * poison_ratio)
    if n_poisoned:
        split[order[n - n_poisoned:]] = POISONED
    return split


# --------------------------------------------------------------------------------------------- the detector


class Fct(Detector):
    """Estimator: ``Fct(**params).fit(x, y, num_classes=K) -> Detection``; the registered `fct` detector.

    Fitted attributes: ``model_`` (the SD model), ``normalisation_``, ``history_`` (its per-epoch losses),
    ``values_`` (FCT per sample), ``split_`` (CLEAN / UNCERTAIN / POISONED), ``thresholds_`` (gamma_c, gamma_p).
    """

    name = "fct"
    summary = ("FCT / D-BR / D-ST's detection (NeurIPS 2022): trains its own SD model on the suspect set, ranks "
               "samples by how far rotation + translation move their features, splits clean / uncertain / poisoned")
    params_class = FctParams
    # Random access to the pixels for the SD model's 12 epochs; the two passes hold one chunk's features.
    needs = frozenset({PIXELS})
    seed_param = "seed"

    def fit(self, x, y: np.ndarray, *, num_classes: int, progress: bool = False) -> Detection:
        """x: uint8 NHWC images (array or memory-mapped) or a Dataset; y: their labels."""
        params = self.params
        y = np.asarray(y)
        if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
            raise InputError(f"y: expected {len(x)} integer labels, got shape {y.shape} of {y.dtype}")
        if len(x) < params.sd_batch_size:
            raise InputError(f"fct needs at least sd_batch_size={params.sd_batch_size} samples to train its SD model, "
                             f"got {len(x)}")
        dataset = x if isinstance(x, Dataset) else Dataset(x, y)
        timings = {}
        t0 = time.perf_counter()
        self.normalisation_ = fit_normalisation(dataset.x)
        self.model_, self.history_ = train_sd_model(dataset.x, y, num_classes=num_classes, params=params,
                                                    normalisation=self.normalisation_, progress=progress)
        timings["sd_model"] = time.perf_counter() - t0
        self.values_, pass_times = fct_values(self.model_, dataset, self.normalisation_, params, progress=progress)
        timings.update(pass_times)
        self.split_ = split_by_rank(self.values_, params.clean_ratio, params.poison_ratio)
        ordered = np.sort(self.values_)
        n = len(ordered)
        self.thresholds_ = {"gamma_c": float(ordered[max(int(n * params.clean_ratio) - 1, 0)]),
                            "gamma_p": float(ordered[n - max(int(n * params.poison_ratio), 1)])}
        sizes = split_sizes(self.split_)
        diagnostics = {
            "arch": params.arch or default_arch(dataset.image_shape), "sd_history": self.history_,
            "thresholds": self.thresholds_, "split": sizes, "timings_s": timings,
            "fct_quantiles": {str(q): float(np.quantile(self.values_, q)) for q in (0.05, 0.25, 0.5, 0.75, 0.95)},
            "note": ("FCT is computed once per sample (tau drawn from the seed) and split by rank; the official "
                     "code re-draws tau when separating, so its parts are only near alpha_c / alpha_p."),
        }
        return Detection(self.name, self.split_ == POISONED, params=asdict(params), scores=self.values_,
                         diagnostics=diagnostics, split=self.split_)

    def fit_scan(self, data: ScanData) -> Detection:
        return self.fit(data.pixels, data.pixels.y, num_classes=data.num_classes, progress=data.progress)

    def report(self, detection: Detection, rows, out_dir) -> ReportParts:
        d = detection.diagnostics
        sizes = d["split"]
        notes = [f"FCT split: {sizes['poisoned']} poisoned (FCT >= {d['thresholds']['gamma_p']:.4g}), "
                 f"{sizes['uncertain']} uncertain, {sizes['clean']} clean (FCT <= {d['thresholds']['gamma_c']:.4g}); "
                 "flagged = the poisoned part. The split is by rank: FCT flags alpha_p of any set, poisoned or not, "
                 "so read it with the histogram. " + d["note"]]
        truth = None if rows.poison is None else np.asarray(rows.poison).astype(bool)
        return ReportParts(figures=[("FCT per sample", fct_histogram_png(detection.scores, d["thresholds"], truth))],
                           notes=notes)


def fct_histogram_png(values: np.ndarray, thresholds: dict, truth: np.ndarray | None) -> bytes:
    """Histogram of log10 FCT (stacked rest / poison with ground truth), the two split thresholds dashed."""
    from ..report.figures import _pyplot, _to_png

    plt = _pyplot()
    logs = np.log10(np.maximum(values, 1e-12))
    fig, ax = plt.subplots(figsize=(7, 3.2))
    bins = np.histogram_bin_edges(logs, bins=60)
    if truth is None:
        ax.hist(logs, bins=bins, color="#9aa5b1")
    else:
        ax.hist([logs[~truth], logs[truth]], bins=bins, stacked=True, color=["#9aa5b1", "#d64545"],
                label=[f"rest ({int((~truth).sum())})", f"poison ({int(truth.sum())})"])
        ax.legend(fontsize=8)
    for key, colour in (("gamma_c", "#3e7c17"), ("gamma_p", "#d64545")):
        ax.axvline(math.log10(max(thresholds[key], 1e-12)), color=colour, linestyle="--", linewidth=1)
    ax.set_xlabel("log10 FCT (clean part left of green, poisoned part right of red)")
    ax.set_ylabel("samples")
    return _to_png(fig)
