"""Guided Input Calibration (GIC; seeds/gic.txt section 4.2; no public code, SEED_NOTES section 5): move a small
auxiliary set towards the victim model's training distribution before a purification defence uses it.

    g(x) = clip(x + delta, 0, 1),   min_delta  CE(f(g(x)), y)   subject to  ||delta||_inf <= radius

with the victim model f in eval mode (BatchNorm's running statistics frozen; the model's weights never change),
Adam lr 0.1, 100 steps from delta = 0 (the paper's settings). Two readings of "g":
  per_sample  one delta per image (the paper's experiment section). All images of a batch are optimised
              together: delta is one [B, C, H, W] tensor and each Adam step is one forward and backward pass of
              the whole batch, so the cost is steps x batches passes, not steps x images.
  universal   one delta shared by every image (ours: the authors' unfinished `_vp`, "visual prompt", hook reads
              as a shared perturbation); each of the `steps` steps is a pass over the whole set in batches,
              with the gradients of the batches summed.
The calibrated set is written back as uint8 (rounding moves a pixel by at most 0.5 / 255 beyond delta).

GIC is meant for shifted sets. When the victim model already classifies the set well (`fit_warning_acc`), the
summary carries a `warning`: on such sets the purifiers measured here lost clean accuracy with GIC, and on Blend
FST's removal was undone (RESULTS.md, issue 15). It only warns; the set's kind is the user's to know.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..data.dataset import Dataset
from ..errors import InputError
from ..models.preprocess import Normalisation, check_images, normaliser
from ..models.train import frozen_copy
from ..models.preprocess import float_pixels as _pixels
from ..params import param

MODES = ("per_sample", "universal")


@dataclass(frozen=True)
class GicParams:
    radius: float = param(0.1, "paper: ||g(x) - x||_inf <= 0.1 (section 4.2), pixels in [0, 1]")
    lr: float = param(0.1, "paper: Adam, lr 0.1")
    steps: int = param(100, "paper: 100 optimisation steps")
    mode: str = param("per_sample", "paper", choices=MODES,
                      reason="one perturbation per image (section 4.2); universal = one shared by the set (ours, "
                             "the `_vp` hook's reading)")
    batch_size: int = param(256, "ours", reason="images optimised together per pass; any size gives the same "
                            "per-image result in per_sample mode (BatchNorm is frozen), only the speed changes")
    fit_warning_acc: float = param(0.5, "ours", reason="warn when the victim already scores at least this on the "
                                   "uncalibrated set: measured (RESULTS.md issue 15), GIC raised the purifiers' BA "
                                   "in most pairs on sets the victim scored 10-18% and lowered it in most on sets "
                                   "it scored 80-87%; 0.5 lies between")

    def __post_init__(self):
        if not 0 < self.radius <= 1 or not self.lr > 0 or self.steps < 1 or self.batch_size < 1:
            raise InputError(f"gic: radius must be in (0, 1], lr > 0, steps and batch_size >= 1; got "
                             f"{self.radius}, {self.lr}, {self.steps}, {self.batch_size}")
        if not 0 <= self.fit_warning_acc <= 1:
            raise InputError(f"gic: fit_warning_acc must be in [0, 1], got {self.fit_warning_acc}")
        if self.mode not in MODES:
            raise InputError(f"gic: mode must be one of {', '.join(MODES)}, got {self.mode!r}")


@dataclass
class Calibration:
    """The calibrated set (uint8, same labels and ids), the perturbations' statistics, and the victim model's
    loss and accuracy on the set before and after."""

    dataset: Dataset
    delta: np.ndarray  # float32 [N, H, W, C] (per_sample) or [1, H, W, C] (universal)
    before: dict
    after: dict
    seconds: float
    params: GicParams
    history: list[float] = field(default_factory=list)

    def warning(self) -> str | None:
        acc = self.before["acc"]
        if acc < self.params.fit_warning_acc:
            return None
        return (f"the victim model already classifies {100 * acc:.1f}% of this set (>= fit_warning_acc "
                f"{100 * self.params.fit_warning_acc:.0f}%): it looks in-distribution, and on such sets GIC lowered "
                f"the purifiers' clean accuracy in our measurements (RESULTS.md, issue 15); GIC is for shifted sets")

    def summary(self) -> dict:
        magnitude = np.abs(self.delta)
        return {"mode": self.params.mode, "n_samples": len(self.dataset), "radius": self.params.radius,
                "steps": self.params.steps, "lr": self.params.lr, "seconds": round(self.seconds, 2),
                "before": self.before, "after": self.after, "warning": self.warning(),
                "delta": {"mean_abs": float(magnitude.mean()), "max_abs": float(magnitude.max()),
                          "share_at_radius": float((magnitude >= self.params.radius - 1e-6).mean()),
                          "mean_abs_per_channel": magnitude.reshape(-1, magnitude.shape[-1]).mean(0).tolist()}}


def _loss_acc(model, x: np.ndarray, y: np.ndarray, normalisation: Normalisation, batch_size: int, device,
              delta: torch.Tensor | None = None, universal: bool = False) -> dict:
    normalise = normaliser(normalisation, device)
    total, correct = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            pixels = _pixels(x[start:start + batch_size], device)
            if delta is not None:
                shift = delta if universal else delta[start:start + batch_size]
                pixels = (pixels + shift).clamp_(0, 1)
            logits = model(normalise(pixels))
            target = torch.from_numpy(y[start:start + batch_size].astype(np.int64)).to(device)
            total += float(F.cross_entropy(logits, target, reduction="sum"))
            correct += int((logits.argmax(1) == target).sum())
    return {"loss": total / len(x), "acc": correct / len(x)}


def calibrate(model: nn.Module, normalisation: Normalisation, dataset: Dataset, params: GicParams | None = None,
              *, device: str | torch.device = "cpu", progress: bool = False) -> Calibration:
    """Calibrate `dataset` (uint8 images with labels) to `model`; the model is left as it was."""
    params = params or GicParams()
    x, y = dataset.x, np.asarray(dataset.y)
    check_images(x)
    if len(x) == 0:
        raise InputError("gic: the auxiliary set is empty")
    if x.shape[-1] != normalisation.channels:
        raise InputError(f"gic: the auxiliary set has {x.shape[-1]} channels, the model's normalisation "
                         f"{normalisation.channels}")
    device = torch.device(device)
    model = frozen_copy(model)  # eval mode, BatchNorm statistics frozen; the caller's model is left as it was
    before = _loss_acc(model, x, y, normalisation, params.batch_size, device)
    t0 = time.perf_counter()
    if params.mode == "per_sample":
        delta, history = _per_sample(model, x, y, normalisation, params, device, progress)
    else:
        delta, history = _universal(model, x, y, normalisation, params, device, progress)
    seconds = time.perf_counter() - t0
    after = _loss_acc(model, x, y, normalisation, params.batch_size, device, delta, params.mode == "universal")
    calibrated = np.empty_like(x)
    with torch.no_grad():
        for start in range(0, len(x), params.batch_size):
            pixels = _pixels(x[start:start + params.batch_size], device)
            shift = delta if params.mode == "universal" else delta[start:start + params.batch_size]
            moved = (pixels + shift).clamp_(0, 1).mul_(255).round_().to(torch.uint8)
            calibrated[start:start + params.batch_size] = moved.permute(0, 2, 3, 1).cpu().numpy()
    out = Dataset(calibrated, y, ids=dataset.ids, poison=dataset.poison)
    delta_hwc = delta.detach().permute(0, 2, 3, 1).cpu().numpy().astype(np.float32)
    return Calibration(out, delta_hwc, before, after, seconds, params, history)


def _step_batch(model, pixels, target, delta, normalise) -> torch.Tensor:
    logits = model(normalise((pixels + delta).clamp(0, 1)))
    return F.cross_entropy(logits, target, reduction="sum")


def _per_sample(model, x, y, normalisation, params: GicParams, device, progress: bool):
    from tqdm.auto import tqdm

    normalise = normaliser(normalisation, device)
    n, h, w, c = x.shape
    delta = torch.zeros((n, c, h, w), dtype=torch.float32, device=device)
    history = np.zeros(params.steps)
    batches = range(0, n, params.batch_size)
    for start in tqdm(batches, desc="gic", disable=not progress, unit="batch"):
        pixels = _pixels(x[start:start + params.batch_size], device)
        target = torch.from_numpy(y[start:start + params.batch_size].astype(np.int64)).to(device)
        # Each image's delta only meets its own loss term, so a batch of B images is B independent problems
        # solved in one pass per step (Adam is per coordinate); the sum keeps each image's gradient its own.
        part = torch.zeros_like(pixels, requires_grad=True)
        optimizer = torch.optim.Adam([part], lr=params.lr)
        for step in range(params.steps):
            loss = _step_batch(model, pixels, target, part, normalise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                part.clamp_(-params.radius, params.radius)
            history[step] += float(loss.detach())
        delta[start:start + params.batch_size] = part.detach()
    return delta, (history / n).tolist()


def _universal(model, x, y, normalisation, params: GicParams, device, progress: bool):
    from tqdm.auto import tqdm

    normalise = normaliser(normalisation, device)
    n, h, w, c = x.shape
    delta = torch.zeros((1, c, h, w), dtype=torch.float32, device=device, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=params.lr)
    history = []
    for _ in tqdm(range(params.steps), desc="gic (universal)", disable=not progress, unit="step"):
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for start in range(0, n, params.batch_size):
            pixels = _pixels(x[start:start + params.batch_size], device)
            target = torch.from_numpy(y[start:start + params.batch_size].astype(np.int64)).to(device)
            loss = _step_batch(model, pixels, target, delta, normalise) / n
            loss.backward()
            total += float(loss.detach())
        optimizer.step()
        with torch.no_grad():
            delta.clamp_(-params.radius, params.radius)
        history.append(total)
    return delta.detach(), history


def calibration_page(result: Calibration, original: Dataset, *, source: str, model: str, show: int = 8) -> str:
    """A standalone HTML page: the settings and the victim model's loss / accuracy before and after, and for a
    few images the original, the calibrated image and the perturbation (grey = 0, white / black = +/- radius)."""
    import html
    import json

    from ..report.figures import montage_png
    from ..report.writers import _img

    rows = np.linspace(0, len(original) - 1, min(show, len(original))).astype(int)
    delta = result.delta if len(result.delta) == len(original) else np.repeat(result.delta, len(original), axis=0)
    shown = np.clip(128 + 127 * delta[rows] / result.params.radius, 0, 255).astype(np.uint8)
    images = np.concatenate([original.x[rows], result.dataset.x[rows], shown])
    titles = ([f"id {original.ids[i]}, label {original.y[i]}" for i in rows] + ["calibrated"] * len(rows)
              + ["delta"] * len(rows))
    summary = result.summary()
    table = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in [
        ("auxiliary set", source), ("victim model", model), ("mode", summary["mode"]),
        ("samples", summary["n_samples"]), ("radius (L-inf, [0, 1] pixels)", summary["radius"]),
        ("steps / Adam lr", f"{summary['steps']} / {summary['lr']}"),
        ("victim loss before -> after", f"{result.before['loss']:.4f} -> {result.after['loss']:.4f}"),
        ("victim accuracy before -> after", f"{100 * result.before['acc']:.2f}% -> {100 * result.after['acc']:.2f}%"),
        ("mean |delta|", f"{summary['delta']['mean_abs']:.4f}"),
        ("share of delta at the radius", f"{100 * summary['delta']['share_at_radius']:.1f}%"),
        ("seconds", summary["seconds"])])
    warning = f'<p class="warning">{html.escape(summary["warning"])}</p>' if summary["warning"] else ""
    figure = montage_png(images, titles, columns=len(rows))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>backdoor-engine: GIC calibration</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#1f2933}}
table{{border-collapse:collapse}}th,td{{padding:.25em .8em;border-bottom:1px solid #e4e7eb;text-align:left}}
img{{max-width:100%}}pre{{background:#f5f7fa;padding:1em;overflow:auto}}
.warning{{background:#fff8e1;border-left:4px solid #f0b429;padding:.6em 1em}}</style></head>
<body><h1>GIC: auxiliary set calibrated to the victim model</h1>{warning}<table>{table}</table>
<h2>Original, calibrated, perturbation</h2>{_img(figure, "original, calibrated and perturbation")}
<h2>Summary</h2><pre>{html.escape(json.dumps(summary, indent=2))}</pre></body></html>
"""
