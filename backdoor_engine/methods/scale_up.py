"""SCALE-UP (Guo et al., ICLR 2023, "SCALE-UP: An Efficient Black-box Input-level Backdoor Detection via
Analyzing Scaled Prediction Consistency"): amplify every image's pixel values by each factor of a scale set,
clip to the valid range, and measure the scaled prediction consistency SPC(x) = the share of scales whose
prediction equals the prediction on x itself. A trigger keeps its prediction when the image is amplified (it
saturates and still dominates) where a clean image's prediction drifts, so a high SPC is suspicious.

Two registered detectors share this file:
  scale_up        plain SPC, flagged when SPC >= threshold (needs the model and the pixels only);
  scale_up_clean  the reference code's "data-limited" mode: SPC standardised by the mean and standard deviation
                  of the SPC of a small clean set the user vouches for (`scan --clean`), flagged when
                  (SPC - mean) / std >= threshold.

Stages, each a plain function composed by `ScaleUp` / `ScaleUpClean`:
  scaled_predictions   batched: the model's prediction on every image and on each clip(scale x image) in [0, 1]
                       pixel space, then the model's own normalisation; forward_batch images per pass
  consistency          SPC: the share of scales whose prediction equals a reference class per sample (the
                       original prediction; on the clean set the official code uses the label)
  standardise          (SPC - mean) / std with the clean set's statistics (torch.std: n - 1 in the denominator)

What the reference code does (checked):
  BackdoorBox core/defenses/SCALE_UP.py (THUYimingLi/BackdoorBox): scale_set default [3, 5, 7, 9, 11], T = 0.5,
    y_pred = spc >= T (the docstring says "SPC(x) > T", the code uses >=); scaled = torch.clip(imgs x scale, 0, 1)
    on the model's input tensor, i.e. [0, 1] pixels for its unnormalised models (the normalised variant
    normalizer(clip(denormalizer(x) x scale, 0, 1)) is present, commented out). With a `valset` (the paper's
    data-limited setting) init_spc_norm computes the SPC of the clean images against their *labels* and keeps
    torch.mean / torch.std of it; test scores are then (spc - mean) / std, thresholded with the same T = 0.5.
    Its evaluation keeps only the samples whose original prediction equals their label.
  backdoor-toolbox other_defenses_tool_box/scale_up.py (vtu81): the same algorithm with scale_set [3, 5, 7],
    with_clean_data=True by default (standardised scores, statistics from a 2000-image clean "val" split, again
    against the labels), threshold 0.1, and denormalise -> scale -> clip to [0, 1] -> normalise, as here.
  Official code, JunfengGo/SCALE-UP torch_model_wrapper.py + test.py: saves the predictions at h = 1..11
    (clamp(h x img, 0, 1), no normalisation) and scores np.mean(a[i] == a[i][0]), so the unscaled prediction is
    counted as one agreeing scale of 11; AUROC only, no threshold. It also adds 0.02 x uniform noise to the
    images before scaling, which we do not (noise is not part of the method the paper describes).
Ours: BackdoorBox's defaults, the toolbox's pixel-space scaling (equal to BackdoorBox for a model that reads
[0, 1] pixels); scales=[1, 2, ..., 11] gives JunfengGo's scoring. The reference code scores only correctly
predicted test images (it knows the labels of a test set); a training set under scan is scored whole, since
poisoned samples are labelled with the class their trigger predicts.
Scores: SPC (scale_up) or the standardised SPC (scale_up_clean), higher = more suspicious, as Detection.scores
elsewhere. Values do not depend on forward_batch (each image's passes are its own).
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
from ..models.preprocess import Normalisation, check_images, float_pixels, normaliser
from ..params import param
from .base import Detector, ReportParts, ScanData

REFERENCE_CLASSES = ("label", "prediction")
QUANTILES = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0)
FIGURE_TITLE = "SCALE-UP: scaled prediction consistency (SPC), threshold dashed"
CLEAN_FIGURE_TITLE = "SCALE-UP with clean data: standardised SPC, threshold dashed"


def _scale_set(value) -> tuple[float, ...]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise InputError(f"scales must be a non-empty list of numbers > 0, got {value!r}")
    scales = tuple(value)
    if not scales or any(isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s <= 0
                         for s in scales):
        raise InputError(f"scales must be a non-empty list of finite numbers > 0, got {list(scales)!r}")
    return tuple(float(s) for s in scales)


def _threshold(value, name: str = "threshold") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{name} must be a finite number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class ScaleUpParams:
    scales: tuple = param((3, 5, 7, 9, 11), "official code: BackdoorBox core/defenses/SCALE_UP.py scale_set "
                          "[3, 5, 7, 9, 11] (backdoor-toolbox scale_up.py: [3, 5, 7]; JunfengGo/SCALE-UP: 1..11 "
                          "with the unscaled prediction counted)")
    threshold: float = param(0.5, "official code: BackdoorBox SCALE_UP.py T = 0.5, flagged when SPC >= T")
    forward_batch: int = param(256, "ours: images per forward pass, the scan's default batch; it bounds memory and "
                               "changes no value")

    def __post_init__(self):
        object.__setattr__(self, "scales", _scale_set(self.scales))
        object.__setattr__(self, "threshold", _threshold(self.threshold))
        integer(self.forward_batch, "forward_batch", 1)


@dataclass(frozen=True)
class ScaleUpCleanParams(ScaleUpParams):
    threshold: float = param(0.5, "official code: BackdoorBox SCALE_UP.py applies T = 0.5 to the standardised SPC "
                             "when given a valset (backdoor-toolbox scale_up.py: 0.1)")
    reference_class: str = param("label", "official code: BackdoorBox init_spc_norm and backdoor-toolbox compare the "
                                 "clean images' scaled predictions with their labels; 'prediction' compares them "
                                 "with the model's prediction, as for the scanned images", choices=REFERENCE_CLASSES)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); cpu for a model with neither."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def class_scores(model: nn.Module, inputs: torch.Tensor, first_row: int) -> torch.Tensor:
    """model(inputs), checked: an N x K tensor (K >= 2) of finite class scores; InputError naming the first bad
    sample (row first_row + i of the scanned images) otherwise."""
    logits = model(inputs)
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != len(inputs):
        raise InputError(f"the model must return an N x K tensor of class scores for N images, got "
                         f"{getattr(logits, 'shape', type(logits).__name__)} for {len(inputs)}")
    if logits.shape[1] < 2:
        raise InputError(f"the model has {logits.shape[1]} output: a prediction needs at least 2 classes")
    finite = torch.isfinite(logits).all(dim=1)
    if not bool(finite.all()):
        bad = first_row + int(torch.nonzero(~finite)[0, 0])
        raise InputError(f"the model returned non-finite class scores for sample {bad}")
    return logits


def check_model_inputs(model, normalisation, x, name: str = "x") -> int:
    """The number of images, after checking the model, its normalisation and uint8 N x H x W x C images `x`."""
    if not isinstance(model, nn.Module):
        raise InputError(f"model: expected the suspect torch model (nn.Module), got {type(model).__name__}")
    if not isinstance(normalisation, Normalisation):
        raise InputError(f"normalisation: expected a Normalisation, got {type(normalisation).__name__}")
    check_images(x, name)
    if len(x) == 0:
        raise InputError(f"{name} is empty: nothing to scan")
    if x.shape[-1] != normalisation.channels:
        raise InputError(f"{name}: the images have {x.shape[-1]} channel(s) but the model's normalisation has "
                         f"{normalisation.channels}")
    return len(x)


def check_reference_labels(reference_x, reference_y) -> np.ndarray:
    """The clean set's labels as int64, one per image, each >= 0."""
    y = np.asarray(reference_y)
    if y.shape != (len(reference_x),):
        raise InputError(f"reference_y: expected {len(reference_x)} labels (one per clean image), got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer) or (y < 0).any():
        raise InputError(f"reference_y: expected class ids (integers >= 0), got dtype {y.dtype}")
    return y.astype(np.int64)


def evaluation_model(model: nn.Module) -> nn.Module:
    """`model` itself when it is in eval mode, else a frozen eval copy: a pass never updates the caller's
    BatchNorm statistics nor switches its mode."""
    if not model.training:
        return model
    from ..models.train import frozen_copy

    return frozen_copy(model)


def scaled_predictions(model: nn.Module, normalisation: Normalisation, x, scales, *, forward_batch: int,
                       bar=None, original: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(N predictions on the images, N x len(scales) predictions on clip(scale x image, 0, 1)), both int64.
    `original`: the predictions on the images when already known (the scan's shared pass), not recomputed.

    The images are read forward_batch at a time (x may be memory-mapped), turned into [0, 1] floats, amplified
    and clipped there, then normalised as the model expects: memory is one batch at any N. Call under
    torch.no_grad()."""
    n = len(x)
    device = model_device(model)
    normalise = normaliser(normalisation, device)
    known, original = given_predictions(original, n)
    scaled = np.empty((n, len(scales)), dtype=np.int64)
    for start in range(0, n, forward_batch):
        stop = min(n, start + forward_batch)
        pixels = float_pixels(np.asarray(x[start:stop]), device)
        if not known:
            original[start:stop] = class_scores(model, normalise(pixels), start).argmax(dim=1).cpu().numpy()
        for column, scale in enumerate(scales):
            amplified = (pixels * scale).clamp_(0.0, 1.0)
            scaled[start:stop, column] = class_scores(model, normalise(amplified), start).argmax(dim=1).cpu().numpy()
        if bar is not None:
            bar.update((stop - start) * (len(scales) + (not known)))
    return original, scaled


def given_predictions(original, n: int) -> tuple[bool, np.ndarray]:
    """(whether the N plain predictions were given, them as int64, or an empty array to fill)."""
    if original is None:
        return False, np.empty(n, dtype=np.int64)
    original = np.asarray(original, dtype=np.int64)
    if len(original) != n:
        raise InputError(f"original: {len(original)} predictions for {n} images")
    return True, original


def shared_predictions(data: ScanData) -> np.ndarray | None:
    """The suspect model's predictions from the scan's single pass (its logits capture), or None."""
    logits = None if data.features is None else getattr(data.features, "logits", None)
    return None if logits is None else np.asarray(logits).argmax(axis=1)


def consistency(scaled: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """SPC: per row, the share of the scaled predictions equal to that row's class (float64)."""
    return (scaled == np.asarray(classes)[:, None]).mean(axis=1)


def standardise(spc: np.ndarray, reference_spc: np.ndarray) -> tuple[np.ndarray, float, float]:
    """((spc - mean) / std, mean, std) with the clean set's mean and sample standard deviation (n - 1, as
    torch.std in the reference code); InputError when the clean SPC does not vary."""
    if len(reference_spc) < 2:
        raise InputError(f"the clean reference set has {len(reference_spc)} image(s): a standard deviation of its "
                         "SPC needs at least 2")
    mean, std = float(np.mean(reference_spc)), float(np.std(reference_spc, ddof=1))
    if not std > 0:
        raise InputError(f"every clean reference image has the same SPC ({mean:g}): there is no spread to "
                         "standardise by; use scale_up (no clean data) or a larger, more varied clean set")
    return (spc - mean) / std, mean, std


def quantiles(values: np.ndarray) -> dict:
    return {f"{q:g}": float(v) for q, v in zip(QUANTILES, np.quantile(values, QUANTILES))}


def counts_by(values: np.ndarray) -> dict:
    labels, counts = np.unique(values, return_counts=True)
    return {str(int(label)): int(count) for label, count in zip(labels, counts)}


class ScaleUp(Detector):
    """SCALE-UP, the registered `scale_up` detector (cuML/sklearn style).

        detection = ScaleUp(threshold=0.6).fit(model, normalisation, x)
        scale_up.spc_, scale_up.predictions_, scale_up.scaled_predictions_ (N x scales), scale_up.flags_
    """

    name = "scale_up"
    summary = ("SCALE-UP: flag samples whose suspect-model prediction stays the same when their pixel values are "
               "amplified (x3 ... x11, clipped): scaled prediction consistency >= threshold (Guo et al. 2023)")
    params_class = ScaleUpParams
    needs = frozenset({"model", "pixels"})
    # In a scan that reads the classifier head anyway (a consensus with penultimate-feature methods), the plain
    # prediction comes from the shared pass: only the scaled copies are extra passes.
    reads_if_extracted = frozenset({"logits"})
    seed_param = None  # deterministic: nothing is drawn at random
    figure_title = FIGURE_TITLE

    def fit(self, model, normalisation, x, *, predictions: np.ndarray | None = None,
            progress: bool = False) -> Detection:
        """model: the suspect torch model; normalisation: its Normalisation; x: uint8 N x H x W x C images (in
        memory or memory-mapped); predictions: the model's N predictions on x when already known (a scan's
        shared pass), else computed here."""
        n = check_model_inputs(model, normalisation, x)
        began = time.perf_counter()
        self.predictions_, self.scaled_predictions_ = self._predict(model, normalisation, x, n, progress,
                                                                    "scale_up: amplified images", predictions)
        timings = {"scale_up": time.perf_counter() - began}
        self.plain_shared_ = predictions is not None
        self.spc_ = consistency(self.scaled_predictions_, self.predictions_)
        return self._detection(self.spc_, n, timings, {})

    def _predict(self, model, normalisation, x, n, progress, description, original=None):
        from tqdm import tqdm

        p = self.params
        with torch.no_grad(), tqdm(total=n * (len(p.scales) + (original is None)), disable=not progress, unit="img",
                                   desc=description) as bar:
            return scaled_predictions(evaluation_model(model), normalisation, x, p.scales,
                                      forward_batch=p.forward_batch, bar=bar, original=original)

    def _score_text(self) -> str:
        return "SPC"

    def _detection(self, scores: np.ndarray, n: int, timings: dict, extra: dict) -> Detection:
        p = self.params
        flags = scores >= p.threshold
        self.scores_, self.flags_, self.threshold_ = scores, flags, p.threshold
        agreement = (self.scaled_predictions_ == self.predictions_[:, None]).mean(axis=0)
        score = self._score_text()
        explanation = (f"SCALE-UP amplified every image's pixels by {', '.join(f'{s:g}' for s in p.scales)} (clipped "
                       f"to [0, 1]) and flagged the {int(flags.sum())} of {n} whose {score} >= {p.threshold:g}: a "
                       "trigger keeps its prediction when the image is amplified, a clean image's drifts")
        self.diagnostics_ = {
            "explanation": explanation, "threshold": p.threshold, "rule": f"{score} >= threshold",
            "spc": "share of the scales whose prediction equals the prediction on the image itself",
            "scales": list(p.scales),
            "agreement_per_scale": {f"{s:g}": float(a) for s, a in zip(p.scales, agreement)},
            "score_quantiles": quantiles(scores),
            "flagged_per_predicted_class": counts_by(self.predictions_[flags]),
            "n_forward": n * (len(p.scales) + (not self.plain_shared_)), "extra_passes_per_sample": len(p.scales),
            "plain_prediction": "from the scan's shared pass" if self.plain_shared_ else "computed here",
            **extra, "timings_s": timings}
        return Detection(self.name, flags, params=asdict(p), scores=scores, diagnostics=self.diagnostics_)

    def fit_scan(self, data: ScanData) -> Detection:
        model, normalisation, x = scan_inputs(data, "SCALE-UP")
        return self.fit(model, normalisation, x, predictions=shared_predictions(data), progress=data.progress)

    def report(self, detection: Detection, rows, out_dir) -> ReportParts:
        parts = ReportParts(notes=[detection.diagnostics["explanation"]])
        if out_dir is None or not hasattr(self, "scores_"):
            return parts
        truth = None if rows is None or rows.poison is None else np.asarray(rows.poison).astype(bool)
        parts.figures.append((self.figure_title, score_histogram_png(
            self.scores_, self.threshold_, truth, f"{self._score_text()} (higher = more suspicious)")))
        return parts


class ScaleUpClean(ScaleUp):
    """SCALE-UP's data-limited mode, the registered `scale_up_clean` detector: SPC standardised by the SPC
    statistics of a clean reference set.

        detection = ScaleUpClean().fit(model, normalisation, x, reference_x, reference_y)
        also: reference_spc_, reference_mean_, reference_std_
    """

    in_all = False  # a variant of scale_up: `all` runs scale_up once

    name = "scale_up_clean"
    summary = ("SCALE-UP with clean data: the scaled prediction consistency standardised by its mean and std on a "
               "clean reference set, flagged when >= threshold (Guo et al. 2023, data-limited setting)")
    params_class = ScaleUpCleanParams
    needs = frozenset({"model", "pixels", "reference"})
    figure_title = CLEAN_FIGURE_TITLE

    def fit(self, model, normalisation, x, reference_x, reference_y, *, predictions: np.ndarray | None = None,
            progress: bool = False) -> Detection:
        """As ScaleUp.fit, plus reference_x: uint8 M x H x W x C clean images the user vouches for (M >= 2) and
        reference_y: their M labels."""
        p = self.params
        n = check_model_inputs(model, normalisation, x)
        check_model_inputs(model, normalisation, reference_x, "reference_x (the clean reference set)")
        reference_y = check_reference_labels(reference_x, reference_y)
        timings = {}
        began = time.perf_counter()
        reference_pred, reference_scaled = self._predict(model, normalisation, reference_x, len(reference_x),
                                                         progress, "scale_up_clean: clean reference set")
        classes = reference_y if p.reference_class == "label" else reference_pred
        self.reference_spc_ = consistency(reference_scaled, classes)
        timings["scale_up_reference"] = time.perf_counter() - began
        began = time.perf_counter()
        self.predictions_, self.scaled_predictions_ = self._predict(model, normalisation, x, n, progress,
                                                                    "scale_up_clean: amplified images", predictions)
        self.plain_shared_ = predictions is not None
        timings["scale_up"] = time.perf_counter() - began
        self.spc_ = consistency(self.scaled_predictions_, self.predictions_)
        scores, self.reference_mean_, self.reference_std_ = standardise(self.spc_, self.reference_spc_)
        extra = {"reference_mean": self.reference_mean_, "reference_std": self.reference_std_,
                 "n_reference": len(reference_x), "reference_class": p.reference_class,
                 "reference_spc_quantiles": quantiles(self.reference_spc_), "spc_quantiles": quantiles(self.spc_),
                 "reference_flagged": float(((self.reference_spc_ - self.reference_mean_) / self.reference_std_
                                             >= p.threshold).mean())}
        detection = self._detection(scores, n, timings, extra)
        detection.diagnostics["n_forward"] += len(reference_x) * (1 + len(p.scales))
        return detection

    def _score_text(self) -> str:
        return "standardised SPC (SPC - clean mean) / clean std"

    def fit_scan(self, data: ScanData) -> Detection:
        model, normalisation, x = scan_inputs(data, "SCALE-UP with clean data")
        if data.reference is None or data.reference.pixels is None:
            raise InputError("scale_up_clean standardises by the SPC of a small clean reference set that you vouch "
                             "for: pass --clean DIR_OR_FILE (API: clean=Dataset), or use scale_up")
        return self.fit(model, normalisation, x, data.reference.pixels.x, data.reference.y,
                        predictions=shared_predictions(data), progress=data.progress)


def scan_inputs(data: ScanData, method: str):
    """(model, normalisation, images) of a scan, with errors naming what is missing."""
    if data.model is None or data.normalisation is None:
        raise InputError(f"{method} runs the suspect model: pass the model and its normalisation")
    if data.pixels is None:
        raise InputError(f"{method} reads the scanned images: the scan provided no pixels")
    x = data.pixels.x
    if len(x) != len(data.ids):
        raise InputError(f"the scan's pixels hold {len(x)} images for {len(data.ids)} samples")
    return data.model, data.normalisation, x


def value_bins(scores: np.ndarray, most: int = 60) -> np.ndarray:
    """Histogram edges: one bar centred on each value when the scores take a few evenly spaced values (SPC takes
    at most len(scales) + 1), else 40 even bins."""
    distinct = np.unique(scores)
    if len(distinct) == 1:
        return np.array([distinct[0] - 0.5, distinct[0] + 0.5])
    step = float(np.min(np.diff(distinct)))
    count = int(round((distinct[-1] - distinct[0]) / step)) + 1
    if len(distinct) <= 12 and count <= most:
        return np.linspace(distinct[0] - step / 2, distinct[-1] + step / 2, count + 1)
    return np.histogram_bin_edges(scores, bins=40)


def score_histogram_png(scores: np.ndarray, threshold: float, truth: np.ndarray | None, xlabel: str,
                        side_panel=None) -> bytes:
    """A histogram of the scores (stacked clean / poisoned when ground truth is known) with the threshold dashed;
    side_panel(ax), when given, draws a second panel beside it."""
    from ..report.figures import _pyplot, _to_png

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2 if side_panel else 1, figsize=(9.0 if side_panel else 5.0, 3.2), squeeze=False)
    ax = axes[0, 0]
    bins = value_bins(scores)
    if truth is None:
        ax.hist(scores, bins=bins, color="#9aa5b1", label=f"scanned ({len(scores)})")
    else:
        ax.hist([scores[~truth], scores[truth]], bins=bins, stacked=True, color=["#9aa5b1", "#d64545"],
                label=[f"clean ({int((~truth).sum())})", f"poisoned ({int(truth.sum())})"])
    ax.axvline(threshold, color="k", linestyle="--", linewidth=1, label=f"threshold {threshold:.3g}")
    ax.set_xlabel(xlabel, fontsize=7)
    ax.set_ylabel("samples", fontsize=7)
    ax.set_yscale("log")
    ax.set_ylim(bottom=0.5)  # a bar of one sample stays visible
    ax.tick_params(which="both", labelsize=6)
    ax.legend(fontsize=6, loc="best")
    if side_panel:
        side_panel(axes[0, 1])
    fig.tight_layout()
    return _to_png(fig)
