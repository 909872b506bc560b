"""IBD-PSC (Hou et al., ICML 2024, "IBD-PSC: Input-level Backdoor Detection via Parameter-oriented Scaling
Consistency"): amplify the weight and bias of the suspect model's last BatchNorm layers by a factor, and measure
how confident the amplified models stay in the original prediction. PSC(x) = the mean, over n amplified models,
of the softmax probability of the class the unamplified model predicts for x. Amplification wrecks clean
predictions but a backdoored sample's prediction survives it (the trigger's features dominate), so a high PSC
is suspicious.

Stages, each a plain function (or the small `Amplifier`) composed by `IbdPsc`:
  batchnorm_layers   the model's BatchNorm2d layers in module order (affine ones only: their weight and bias are
                     what is amplified)
  Amplifier          one frozen eval copy of the model whose last `count` BatchNorm2d layers carry weight x scale
                     and bias x scale (set from the kept originals, so any count is exact; the caller's model is
                     never touched)
  clean_error        the error rate (prediction != label) of an amplified model on the clean reference set
  choose_start       the smallest k in 1 .. L-1 whose amplified-last-k model errs on more than xi of the clean set
  model_counts       the amplified models: the last k+1, k+2, ..., k+n layers (at most L, so the deepest repeat)
  psc_scores         batched: the original prediction, then each distinct amplified model's softmax probability
                     of it, averaged over the n models (a repeated model counted as often as it occurs)

What the reference code does (checked):
  BackdoorBox core/defenses/IBD_PSC.py (THUYimingLi/BackdoorBox) and backdoor-toolbox
    other_defenses_tool_box/IBD_PSC.py (vtu81), the same algorithm: IBD_PSC(n=5, xi=0.6, T=0.9, scale=1.5).
    count_BN_layers counts the nn.BatchNorm2d modules of named_modules(); sorted_indices = reversed(range(L)).
    scale_var_index deep-copies the model and multiplies weight.data and bias.data of the chosen BN layers by
    `scale`. prob_start(valset): for layer_index in range(1, L) it amplifies sorted_indices[:layer_index] (the
    last k layers) and returns the first k whose error on the clean set (labels != argmax) is > xi; when none
    exceeds xi it falls off the loop and returns None, and the scoring loop then crashes. Scoring: for
    layer_index in range(start, start + n) it amplifies sorted_indices[:layer_index + 1], i.e. the last k+1 ...
    k+n layers (a slice past L gives all L layers again), and psc = the mean of softmax(logits)[original_pred];
    y_pred = psc >= T (the docstring says "PSC(x) > T"). It deep-copies the model n times per batch.
    The clean set: BackdoorBox's `valset`, the toolbox's 2000-image "val" split of the test set.
Ours: the same layers, counts, scores and rule. When no k crosses xi (a model whose clean accuracy survives
amplifying all but one BN layer) we do not crash: k = L - 1 is used (every amplified model then scales all L
layers), the run is reported as start_found = false with the clean error of every k tried, and the report
says so. start_layer fixes k without a clean set (fit() then needs no reference; a scan still asks for one,
since the detector declares it). One model copy for the whole scan, its BN parameters set per model; each
distinct amplified model runs once per batch. The reference code scores only correctly predicted test images;
a training set under scan is scored whole. Softmax in float64. Values do not depend on forward_batch.
Scores: PSC in [0, 1], higher = more suspicious, as Detection.scores elsewhere.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from ..cluster.validation import integer
from ..detection import Detection
from ..errors import InputError
from ..models.preprocess import Normalisation, float_pixels, normaliser
from ..params import param
from .base import Detector, ReportParts, ScanData
from .scale_up import (check_model_inputs, check_reference_labels, class_scores, counts_by, model_device, quantiles,
                       given_predictions, scan_inputs, score_histogram_png, shared_predictions)

FIGURE_TITLE = "IBD-PSC: parameter-oriented scaling consistency (PSC), threshold dashed"


@dataclass(frozen=True)
class IbdPscParams:
    n_models: int = param(5, "official code: n = 5 amplified models (BackdoorBox core/defenses/IBD_PSC.py, "
                          "backdoor-toolbox other_defenses_tool_box/IBD_PSC.py)")
    scale: float = param(1.5, "official code: scale = 1.5, the factor on the chosen BN layers' weight and bias")
    xi: float = param(0.6, "official code: xi = 0.6, the clean error rate the start layer must exceed (prob_start)")
    threshold: float = param(0.9, "official code: T = 0.9, flagged when PSC >= T")
    start_layer: int | None = param(None, "official code: None = chosen on the clean reference set (prob_start: the "
                                    "smallest k whose last-k-amplified model errs on more than xi of it); an "
                                    "integer k in [0, L-1] fixes it, the models then amplify the last k+1 ... k+n")
    forward_batch: int = param(256, "ours: images per forward pass, the scan's default batch; it bounds memory and "
                               "changes no value")

    def __post_init__(self):
        integer(self.n_models, "n_models", 1)
        integer(self.forward_batch, "forward_batch", 1)
        if self.start_layer is not None:
            integer(self.start_layer, "start_layer", 0)
        for name in ("scale", "xi", "threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InputError(f"{name} must be a finite number, got {value!r}")
            object.__setattr__(self, name, float(value))
        if not self.scale > 0:
            raise InputError(f"scale must be > 0, got {self.scale}")
        if not 0 <= self.xi < 1:
            raise InputError(f"xi must be in [0, 1) (a clean error rate), got {self.xi}")


def batchnorm_layers(model: nn.Module) -> list[tuple[str, nn.BatchNorm2d]]:
    """(name, module) of every nn.BatchNorm2d of `model`, in named_modules() order (the reference's count_BN_layers
    and scale_var_index); InputError when there is none or one has no affine weight and bias."""
    layers = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.BatchNorm2d)]
    if not layers:
        raise InputError("IBD-PSC amplifies the suspect model's BatchNorm2d layers, and this model has none")
    for name, module in layers:
        if module.weight is None or module.bias is None:
            raise InputError(f"BatchNorm2d layer {name!r} has no weight and bias to amplify (affine=False): IBD-PSC "
                             "scales those parameters")
    return layers


class Amplifier:
    """One frozen eval copy of `model` whose last `count` BatchNorm2d layers can be amplified: weight x scale and
    bias x scale, set from the original values each time (exact for any sequence of counts)."""

    def __init__(self, model: nn.Module, scale: float):
        from ..models.train import frozen_copy

        self.model = frozen_copy(model)
        self.layers = batchnorm_layers(self.model)
        self.originals = [(module.weight.detach().clone(), module.bias.detach().clone()) for _, module in self.layers]
        self.scale = scale
        self.count = 0

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def amplify(self, count: int) -> nn.Module:
        """The copy with its last min(count, L) BatchNorm2d layers amplified, the others original."""
        count = min(int(count), self.n_layers)
        if count != self.count:
            first = self.n_layers - count
            with torch.no_grad():
                for index, ((_, module), (weight, bias)) in enumerate(zip(self.layers, self.originals)):
                    factor = self.scale if index >= first else 1.0
                    module.weight.copy_(weight * factor)
                    module.bias.copy_(bias * factor)
            self.count = count
        return self.model


def model_counts(start: int, n_models: int, n_layers: int) -> list[int]:
    """How many last BN layers each amplified model scales: k+1, ..., k+n, capped at L (the reference's
    sorted_indices[:layer_index + 1] for layer_index in range(k, k + n))."""
    return [min(n_layers, start + 1 + i) for i in range(n_models)]


def clean_error(amplifier: Amplifier, count: int, normalisation: Normalisation, reference_x, reference_y: np.ndarray,
                *, forward_batch: int, bar=None) -> float:
    """The share of the clean images whose prediction under the last-`count`-amplified model differs from their
    label. Call under torch.no_grad()."""
    model = amplifier.amplify(count)
    device = model_device(model)
    normalise = normaliser(normalisation, device)
    wrong = 0
    for start in range(0, len(reference_x), forward_batch):
        stop = min(len(reference_x), start + forward_batch)
        logits = class_scores(model, normalise(float_pixels(np.asarray(reference_x[start:stop]), device)), start)
        labels = reference_y[start:stop]
        if labels.max() >= logits.shape[1]:
            raise InputError(f"reference_y: label {int(labels.max())} is not one of the model's {logits.shape[1]} "
                             "classes")
        wrong += int((logits.argmax(dim=1).cpu().numpy() != labels).sum())
        if bar is not None:
            bar.update(stop - start)
    return wrong / len(reference_x)


def choose_start(amplifier: Amplifier, normalisation: Normalisation, reference_x, reference_y: np.ndarray, xi: float,
                 *, forward_batch: int, bar=None) -> tuple[int, dict, bool]:
    """(k, {k: clean error}, found): the smallest k in 1 .. L-1 whose last-k-amplified model errs on more than xi of
    the clean set (the reference's prob_start, strict >), searched in order and stopped there; when none does,
    k = L - 1 and found = False (the reference returns None and crashes)."""
    errors = {}
    for k in range(1, amplifier.n_layers):
        errors[k] = clean_error(amplifier, k, normalisation, reference_x, reference_y, forward_batch=forward_batch,
                                bar=bar)
        if errors[k] > xi:
            return k, errors, True
    return amplifier.n_layers - 1, errors, False


def psc_scores(amplifier: Amplifier, normalisation: Normalisation, x, counts: list[int], *, forward_batch: int,
               bar=None, original: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(N original predictions, N PSC values): per batch the unamplified copy's argmax, then for each distinct
    count the amplified model's softmax probability (float64) of that class, weighted by how often the count occurs
    in `counts` and divided by len(counts). `original`: the unamplified predictions when already known (the scan's
    shared pass), not recomputed. Memory: one batch at any N. Call under torch.no_grad()."""
    n = len(x)
    device = model_device(amplifier.model)
    normalise = normaliser(normalisation, device)
    distinct, multiplicity = np.unique(np.asarray(counts), return_counts=True)
    known, original = given_predictions(original, n)
    psc = np.zeros(n, dtype=np.float64)
    for start in range(0, n, forward_batch):
        stop = min(n, start + forward_batch)
        inputs = normalise(float_pixels(np.asarray(x[start:stop]), device))
        predicted = (torch.from_numpy(original[start:stop]).to(device) if known
                     else class_scores(amplifier.amplify(0), inputs, start).argmax(dim=1))
        rows = torch.arange(stop - start, device=device)
        total = torch.zeros(stop - start, dtype=torch.float64, device=device)
        for count, times in zip(distinct, multiplicity):
            logits = class_scores(amplifier.amplify(int(count)), inputs, start)
            total += int(times) * torch.softmax(logits.to(torch.float64), dim=1)[rows, predicted]
        original[start:stop] = predicted.cpu().numpy()
        psc[start:stop] = (total / len(counts)).cpu().numpy()
        if bar is not None:
            bar.update((stop - start) * (len(distinct) + (not known)))
    return original, psc


class IbdPsc(Detector):
    """IBD-PSC, the registered `ibd_psc` detector (cuML/sklearn style).

        detection = IbdPsc().fit(model, normalisation, x, reference_x, reference_y)
        ibd_psc.psc_, ibd_psc.predictions_, ibd_psc.start_layer_, ibd_psc.counts_, ibd_psc.clean_errors_
    The caller's model is never modified: the amplified models are one copy of it.
    """

    name = "ibd_psc"
    summary = ("IBD-PSC: flag samples whose predicted class keeps its softmax probability when the last BatchNorm "
               "layers' weight and bias are amplified x1.5: mean over 5 amplified models >= threshold; the first "
               "layer is chosen on a clean reference set (Hou et al. 2024)")
    params_class = IbdPscParams
    needs = frozenset({"model", "pixels", "reference"})
    # With the head read anyway (a consensus with penultimate-feature methods), the plain prediction comes from the
    # shared pass: only the amplified models are extra passes.
    reads_if_extracted = frozenset({"logits"})
    seed_param = None  # deterministic: nothing is drawn at random

    def fit(self, model, normalisation, x, reference_x=None, reference_y=None, *,
            predictions: np.ndarray | None = None, progress: bool = False) -> Detection:
        """model: the suspect torch model (with BatchNorm2d layers); normalisation: its Normalisation; x: uint8
        N x H x W x C images (in memory or memory-mapped); reference_x, reference_y: clean images the user vouches
        for and their labels, which choose the start layer (not needed when start_layer is given); predictions: the
        model's N predictions on x when already known (a scan's shared pass), else computed here."""
        from tqdm import tqdm

        p = self.params
        n = check_model_inputs(model, normalisation, x)
        search = p.start_layer is None
        if search:
            if reference_x is None or reference_y is None:
                raise InputError("IBD-PSC chooses its start layer on a small clean reference set that you vouch for: "
                                 "pass reference_x and reference_y (scan: --clean / clean=Dataset), or fix "
                                 "start_layer")
            check_model_inputs(model, normalisation, reference_x, "reference_x (the clean reference set)")
            reference_y = check_reference_labels(reference_x, reference_y)
        amplifier = Amplifier(model, p.scale)
        n_layers = amplifier.n_layers
        timings, errors, found, unamplified_error = {}, {}, None, None
        n_forward = 0
        with torch.no_grad():
            if search:
                began = time.perf_counter()
                with tqdm(disable=not progress, unit="img", desc="ibd_psc: start layer on the clean set") as bar:
                    unamplified_error = clean_error(amplifier, 0, normalisation, reference_x, reference_y,
                                                    forward_batch=p.forward_batch, bar=bar)
                    start, errors, found = choose_start(amplifier, normalisation, reference_x, reference_y, p.xi,
                                                        forward_batch=p.forward_batch, bar=bar)
                n_forward += len(reference_x) * (1 + len(errors))
                timings["ibd_psc_start_layer"] = time.perf_counter() - began
            else:
                start = p.start_layer
                if start >= n_layers:
                    raise InputError(f"start_layer must be in [0, {n_layers - 1}]: the model has {n_layers} "
                                     f"BatchNorm2d layer(s), got {start}")
            counts = model_counts(start, p.n_models, n_layers)
            distinct = len(set(counts))
            began = time.perf_counter()
            plain = int(predictions is None)
            with tqdm(total=n * (plain + distinct), disable=not progress, unit="img",
                      desc="ibd_psc: amplified models") as bar:
                predictions, psc = psc_scores(amplifier, normalisation, x, counts, forward_batch=p.forward_batch,
                                              bar=bar, original=predictions)
            n_forward += n * (plain + distinct)
            timings["ibd_psc"] = time.perf_counter() - began
        del amplifier
        flags = psc >= p.threshold
        self.predictions_, self.psc_, self.scores_, self.flags_ = predictions, psc, psc, flags
        self.threshold_, self.start_layer_, self.counts_ = p.threshold, start, counts
        self.clean_errors_, self.start_found_, self.n_layers_ = errors, found, n_layers
        explanation = (f"IBD-PSC amplified the weight and bias of the last {counts[0]}"
                       + (f" to {counts[-1]}" if counts[-1] != counts[0] else "")
                       + f" of the model's {n_layers} BatchNorm2d layers by {p.scale:g} ({p.n_models} models) and "
                       f"flagged the {int(flags.sum())} of {n} samples whose predicted class keeps a mean softmax "
                       f"probability >= {p.threshold:g}: a trigger's prediction survives the amplification, a clean "
                       "one's does not")
        if search and found:
            source = (f"the clean reference set: amplifying the last {start} layer(s) makes the model err on "
                      f"{errors[start]:.1%} of it (> xi = {p.xi:g})")
        elif search:
            source = (f"no start layer found: amplifying up to the last {n_layers - 1} of {n_layers} layers left the "
                      f"clean error at most {max(errors.values(), default=0.0):.1%} (<= xi = {p.xi:g}), so every "
                      f"amplified model scales all {n_layers} layers (k = {start}); the official code crashes here. "
                      "The scores may not separate: check the figure")
        else:
            source = f"given (start_layer = {start}); no clean set was used"
        self.diagnostics_ = {
            "explanation": f"{explanation}. Start layer k = {start}, from {source}.",
            "threshold": p.threshold, "rule": "PSC >= threshold",
            "psc": "mean over the amplified models of the softmax probability of the unamplified model's prediction",
            "start_layer": start, "start_source": "clean reference set" if search else "given",
            "start_found": found, "xi": p.xi, "scale": p.scale,
            "clean_error_unamplified": unamplified_error,
            "clean_error_by_amplified_layers": {str(k): e for k, e in errors.items()},
            "n_reference": None if not search else len(reference_x),
            "n_batchnorm_layers": n_layers, "amplified_layer_counts": counts,
            "amplified_layers_deepest_model": [name for name, _ in batchnorm_layers(model)][n_layers - counts[-1]:],
            "score_quantiles": quantiles(psc), "flagged_per_predicted_class": counts_by(predictions[flags]),
            "n_forward": n_forward, "extra_passes_per_sample": distinct,
            "plain_prediction": "computed here" if plain else "from the scan's shared pass", "timings_s": timings}
        return Detection(self.name, flags, params=asdict(p), scores=psc, diagnostics=self.diagnostics_)

    def fit_scan(self, data: ScanData) -> Detection:
        model, normalisation, x = scan_inputs(data, "IBD-PSC")
        if data.reference is None or data.reference.pixels is None:
            if self.params.start_layer is None:
                raise InputError("IBD-PSC chooses its start layer on a small clean reference set that you vouch for: "
                                 "pass --clean DIR_OR_FILE (API: clean=Dataset)")
            return self.fit(model, normalisation, x, predictions=shared_predictions(data), progress=data.progress)
        return self.fit(model, normalisation, x, data.reference.pixels.x, data.reference.y,
                        predictions=shared_predictions(data), progress=data.progress)

    def report(self, detection: Detection, rows, out_dir) -> ReportParts:
        d = detection.diagnostics
        notes = [d["explanation"]]
        if d["start_found"] is False:
            notes.append(f"No start layer crossed the clean error rate xi = {d['xi']:g}: every amplified model scales "
                         "all BatchNorm2d layers. Try a larger scale (--param scale=...) or fix start_layer.")
        parts = ReportParts(notes=notes)
        if out_dir is None or not hasattr(self, "scores_"):
            return parts
        truth = None if rows is None or rows.poison is None else np.asarray(rows.poison).astype(bool)
        side = None
        if self.clean_errors_:
            errors = {0: d["clean_error_unamplified"], **self.clean_errors_}

            def side(ax, errors=errors, xi=d["xi"], start=self.start_layer_):
                ks = sorted(errors)
                ax.plot(ks, [errors[k] for k in ks], marker="o", color="#4a90d9", label="clean error")
                ax.set_xticks(ks)
                ax.axhline(xi, color="k", linestyle="--", linewidth=1, label=f"xi {xi:g}")
                ax.axvline(start, color="#d64545", linestyle=":", linewidth=1, label=f"start k = {start}")
                ax.set_xlabel("last BatchNorm2d layers amplified (k)", fontsize=7)
                ax.set_ylabel("error on the clean reference set", fontsize=7)
                ax.set_ylim(-0.02, 1.02)
                ax.tick_params(which="both", labelsize=6)
                ax.legend(fontsize=6, loc="center right")
        parts.figures.append((FIGURE_TITLE, score_histogram_png(self.scores_, self.threshold_, truth,
                                                                "PSC (higher = more suspicious)", side_panel=side)))
        return parts
