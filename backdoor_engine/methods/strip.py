"""STRIP (Gao et al., ACSAC 2019, "STRIP: A Defence Against Trojan Attacks on Deep Neural Networks") as a
training-set filter: superimpose every suspect image on N images drawn at random from a clean reference set,
run the suspect model on the N blends, and take the mean Shannon entropy of its N predictions. A trigger that
dominates the prediction survives the blending, so a poisoned image keeps one confident class (low entropy)
where a clean one is pulled towards the backgrounds' classes (high entropy). The threshold comes from the
reference set's own entropies at a chosen false-rejection rate (FRR); samples below it are flagged.

Stages, each a plain function composed by `Strip`:
  draw_backgrounds     the N reference images each sample is blended with (seeded, fixed per block of samples)
  superimpose          alpha x image + beta x background ([0, 1] pixels, or the normalised tensors)
  prediction_entropy   -sum_k p_k log2 p_k of each softmax prediction (0 log 0 = 0)
  strip_entropies      the batched loop: blocks of samples x N blends, forward_batch images per pass
  frr_threshold        the reference entropies' FRR quantile (order statistic, or a fitted normal's)

What the reference code does (checked):
  Paper, Eq. 2-4, Algorithm 1, Sec. 5 and Table 3: H_n = -sum_i y_i log2 y_i per perturbed copy, H_sum = the sum
    over the N = 100 copies, the normalised entropy H = H_sum / N (the mean); blend = cv2.addWeighted (footnote 2)
    with images drawn at random from the user's held-out clean set; the detection boundary is the FRR percentile
    of a normal fitted to the held-out inputs' entropies (FRR 0.5-3% in Table 3, 1% in the text); trojaned when
    H <= boundary.
  Official code, garrisongys/STRIP STRIP_CIFAR10DeepArchit_Tb.ipynb: CIFAR-10 scaled to [0, 1] floats with the
    z-score commented out, so the model reads [0, 1] pixels; superimpose = cv2.addWeighted(image, 1, background,
    1, 0) on float32 arrays, which does not saturate (blends reach 2, no clipping); backgrounds
    np.random.randint over a held-out slice of the training set, i.e. drawn with replacement and independently
    per input; EntropySum = -np.nansum(p * np.log2(p)) over the n_sample = 100 predictions, / n_sample;
    threshold scipy.stats.norm.ppf(0.01, *norm.fit(benign entropies)) (FRR 1%).
  BackdoorBench detection_pretrain/strip.py (the training-set filter; detection_infer/strip.py the same):
    STRIP(strip_alpha=1.0, N=100, defense_fpr=0.1); superimpose = input + strip_alpha x background on the
    *normalised* tensors (after the test transform), no clipping; per batch of inputs N background indices from
    random.shuffle of the clean set, one background shared by the whole batch; entropy -sum p ln p with
    p = softmax + 1e-8, mean over the N; threshold = sorted clean entropies at index int(0.1 x n_clean) (the
    clean set blended with itself); flagged: entropy < threshold.
  backdoor-toolbox other_defenses_tool_box/strip.py: input + 0.5 x background on normalised tensors, no clipping,
    the backgrounds the first N=64 batches of a shuffled clean training loader (each input its own background per
    batch), the same entropy and mean; threshold from the test split's sorted entropies at int(0.05 x n).
Ours: the blend of the official notebook in [0, 1] pixel space (then the model's own normalisation), which equals
it for a model without normalisation; blend_space="normalised" gives BackdoorBench's. Entropy in bits (the
paper's log2; the base scales every entropy alike, so flags do not depend on it). The threshold rule of
BackdoorBench (order statistic at FRR 10%) by default, the paper's normal fit selectable. A reference image is
never blended with itself when the reference entropies are measured (BackdoorBench's is, a blend that is no
perturbation). Each sample draws its own backgrounds, with replacement (the official notebook; BackdoorBench shares
one draw across a batch), from a generator fixed per block of samples, so the batch size changes no value.

Scores: 1 - entropy / log2(K) in [0, 1] (K = the model's outputs), higher = more suspicious, as Detection.scores
elsewhere; flags: entropy < threshold (strict, BackdoorBench; the paper's <= differs only on ties), so the
reference's own rejection rate is the FRR.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from statistics import NormalDist

import numpy as np
import torch
from torch import nn

from ..cluster.validation import integer
from ..detection import Detection
from ..errors import InputError
from ..models.preprocess import Normalisation, check_images, float_pixels, normaliser
from ..params import param
from .base import Detector, ReportParts, ScanData

THRESHOLD_RULES = ("quantile", "normal")
BLEND_SPACES = ("pixels", "normalised")
# Samples whose N background draws come from one generator, (seed, stream, block): the draws of a sample do not
# depend on forward_batch, and a block's index matrix stays small (DRAW_BLOCK x N) at any N.
DRAW_BLOCK = 1024
SUSPECT_STREAM, REFERENCE_STREAM = 0, 1
QUANTILES = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
FIGURE_TITLE = "STRIP: mean prediction entropy over the superimpositions, threshold dashed"


@dataclass(frozen=True)
class StripParams:
    n_superimpose: int = param(100, "paper: N = 100 perturbed copies per input (Sec. 5); the official notebook's "
                               "n_sample = 100 and BackdoorBench's N=100 (backdoor-toolbox: 64)")
    frr: float = param(0.1, "official code: BackdoorBench detection_pretrain/strip.py defense_fpr=0.1 (the paper "
                       "presets FRR 0.5-3%, its notebook 1%)")
    threshold_rule: str = param("quantile", "official code: BackdoorBench and backdoor-toolbox, the sorted reference "
                                "entropies at index floor(frr x n); 'normal' = the paper and its notebook, the frr "
                                "quantile of a normal fitted to them", choices=THRESHOLD_RULES)
    alpha: float = param(1.0, "official code: the weight of the scanned image, cv2.addWeighted(image, 1, "
                         "background, 1, 0) in garrisongys/STRIP; input + strip_alpha x background in BackdoorBench")
    beta: float = param(1.0, "official code: the weight of the background, 1 in garrisongys/STRIP, BackdoorBench "
                        "strip_alpha=1.0 (backdoor-toolbox 0.5)")
    blend_space: str = param("pixels", "official code: garrisongys/STRIP blends [0, 1] pixels (its model reads them "
                             "unnormalised); 'normalised' = BackdoorBench and backdoor-toolbox, which add the "
                             "normalised tensors", choices=BLEND_SPACES)
    clip: bool = param(False, "official code: float cv2.addWeighted does not saturate, so blends reach "
                       "alpha + beta; True clips them to [0, 1] (pixel space only)")
    forward_batch: int = param(256, "ours: blended images per forward pass, the scan's default batch; it bounds "
                               "memory at any n_superimpose and changes no value")
    seed: int = param(0, "ours: seeds the background draws (the official code leaves them unseeded); a fixed seed "
                      "makes a scan repeatable")

    def __post_init__(self):
        integer(self.n_superimpose, "n_superimpose", 1)
        integer(self.forward_batch, "forward_batch", 1)
        integer(self.seed, "seed", 0)
        if not 0 < self.frr < 1:
            raise InputError(f"frr must be in (0, 1), got {self.frr}")
        for name in ("alpha", "beta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value <= 0:
                raise InputError(f"{name} must be a finite number > 0, got {value!r}")
        if self.clip and self.blend_space != "pixels":
            raise InputError("clip applies to blend_space 'pixels' only: normalised tensors have no [0, 1] range")


def draw_backgrounds(seed: int, stream: int, block: int, n_rows: int, n_draws: int, n_reference: int,
                     first_row: int | None = None) -> np.ndarray:
    """n_rows x n_draws reference indices, uniform with replacement, from generator (seed, stream, block).

    first_row: when the rows are the reference images themselves (row r = reference image first_row + r), each
    row's own index is left out (drawn from the n_reference - 1 others)."""
    rng = np.random.default_rng([seed, stream, block])
    if first_row is None:
        return rng.integers(0, n_reference, (n_rows, n_draws))
    draws = rng.integers(0, n_reference - 1, (n_rows, n_draws))
    own = np.arange(first_row, first_row + n_rows)[:, None]
    return draws + (draws >= own)


def superimpose(images: torch.Tensor, backgrounds: torch.Tensor, alpha: float, beta: float,
                clip: bool = False) -> torch.Tensor:
    """alpha x images + beta x backgrounds (N x C x H x W each), clipped to [0, 1] when asked."""
    blended = images * alpha + backgrounds * beta
    return blended.clamp_(0.0, 1.0) if clip else blended


def prediction_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in bits of softmax(logits) per row, in float64; 0 log 0 = 0 (the official np.nansum)."""
    log_p = torch.log_softmax(logits.to(torch.float64), dim=1)
    return -(log_p.exp() * log_p).sum(dim=1) / math.log(2.0)


def frr_threshold(reference_entropies: np.ndarray, frr: float, rule: str) -> float:
    """The entropy below which `frr` of the reference is rejected.

    quantile: the sorted entropies at index floor(frr x n) (BackdoorBench's sorted[int(frr * n)], without its float
      round-down: 0.29 x 100 is 28.999... there), so exactly that many lie strictly below (ties aside);
    normal: the frr quantile of the normal fitted by maximum likelihood (scipy.stats.norm.fit: mean and population
      standard deviation), the paper's rule.
    """
    values = np.sort(np.asarray(reference_entropies, dtype=np.float64))
    if rule == "quantile":
        return float(values[min(len(values) - 1, int(math.floor(frr * len(values) + 1e-9)))])
    if rule == "normal":
        mu, sigma = float(values.mean()), float(values.std())
        return mu if sigma == 0 else NormalDist(mu, sigma).inv_cdf(frr)
    raise InputError(f"threshold_rule must be one of {', '.join(THRESHOLD_RULES)}, got {rule!r}")


def _device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def strip_entropies(model: nn.Module, normalisation: Normalisation, x, backgrounds: np.ndarray, params: StripParams,
                    *, stream: int, exclude_self: bool, bar=None) -> tuple[np.ndarray, int]:
    """Mean entropy (bits) of the model's predictions on each image of `x` blended with params.n_superimpose
    images of `backgrounds`, and the model's number of outputs K.

    Blocks of DRAW_BLOCK samples draw their backgrounds; the block's (sample, draw) pairs, sample-major, are cut
    into batches of params.forward_batch blended images, so a batch holds several samples' blends or part of
    one's. Memory: one batch of images plus a DRAW_BLOCK x N index matrix, at any N and any len(x). The per-sample
    sums are float64 and in draw order, so the batch size does not change them. Call under torch.no_grad().
    """
    n, draws_per = len(x), params.n_superimpose
    device = _device(model)
    normalise = normaliser(normalisation, device)
    sums = np.zeros(n, dtype=np.float64)
    num_outputs = None
    for block_start in range(0, n, DRAW_BLOCK):
        block_rows = min(DRAW_BLOCK, n - block_start)
        draws = draw_backgrounds(params.seed, stream, block_start // DRAW_BLOCK, block_rows, draws_per,
                                 len(backgrounds), first_row=block_start if exclude_self else None).reshape(-1)
        for start in range(0, block_rows * draws_per, params.forward_batch):
            stop = min(block_rows * draws_per, start + params.forward_batch)
            rows = np.arange(start, stop) // draws_per  # in the block
            low, high = int(rows[0]), int(rows[-1]) + 1
            own = float_pixels(np.asarray(x[block_start + low:block_start + high]), device)
            own = own[torch.from_numpy(rows - low).to(device)]
            background = float_pixels(backgrounds[draws[start:stop]], device)
            if params.blend_space == "pixels":
                inputs = normalise(superimpose(own, background, params.alpha, params.beta, params.clip))
            else:
                inputs = superimpose(normalise(own), normalise(background), params.alpha, params.beta)
            logits = model(inputs)
            if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != len(rows):
                raise InputError(f"the model must return an N x K tensor of class scores for N images, got "
                                 f"{getattr(logits, 'shape', type(logits).__name__)} for {len(rows)}")
            if num_outputs is None:
                num_outputs = int(logits.shape[1])
                if num_outputs < 2:
                    raise InputError(f"the model has {num_outputs} output: STRIP's entropy needs >= 2 classes")
            entropy = prediction_entropy(logits).cpu().numpy()
            if not np.isfinite(entropy).all():
                bad = block_start + int(rows[np.flatnonzero(~np.isfinite(entropy))[0]])
                raise InputError(f"the model returned non-finite outputs on a superimposition of sample {bad}")
            np.add.at(sums, block_start + rows, entropy)
            if bar is not None:
                bar.update(stop - start)
    return sums / draws_per, num_outputs


def _quantiles(values: np.ndarray) -> dict:
    return {f"{q:g}": float(v) for q, v in zip(QUANTILES, np.quantile(values, QUANTILES))}


class Strip(Detector):
    """STRIP, the registered `strip` detector (cuML/sklearn style).

        detection = Strip(frr=0.05).fit(model, normalisation, x, y, reference_x)
        strip.entropies_, strip.reference_entropies_ (bits), strip.threshold_, strip.flags_, strip.scores_
    """

    name = "strip"
    summary = ("STRIP: flag samples whose suspect-model predictions stay confident (low mean entropy) when they are "
               "superimposed on N clean reference images; threshold at the reference's FRR (Gao et al. 2019)")
    params_class = StripParams
    needs = frozenset({"model", "pixels", "reference"})
    seed_param = "seed"

    def fit(self, model, normalisation, x, y, reference_x, *, progress: bool = False) -> Detection:
        """model: the suspect torch model (kept in eval mode for the passes); normalisation: its Normalisation;
        x: uint8 N x H x W x C suspect images (in memory or memory-mapped); y: their N labels (per-class counts
        only); reference_x: uint8 M x H x W x C clean images the user vouches for (M >= 2)."""
        p = self.params
        n, reference_x = self._check(model, normalisation, x, y, reference_x)
        m = len(reference_x)
        from tqdm import tqdm

        was_training = model.training
        model.eval()
        timings = {}
        try:
            with torch.no_grad(), tqdm(total=p.n_superimpose * (n + m), disable=not progress, unit="img",
                                       desc="strip: superimpositions") as bar:
                began = time.perf_counter()
                reference, k = strip_entropies(model, normalisation, reference_x, reference_x, p,
                                               stream=REFERENCE_STREAM, exclude_self=True, bar=bar)
                timings["strip_reference"] = time.perf_counter() - began
                began = time.perf_counter()
                entropies, _ = strip_entropies(model, normalisation, x, reference_x, p, stream=SUSPECT_STREAM,
                                               exclude_self=False, bar=bar)
                timings["strip_suspect"] = time.perf_counter() - began
        finally:
            model.train(was_training)
        threshold = frr_threshold(reference, p.frr, p.threshold_rule)
        flags = entropies < threshold
        self.entropies_, self.reference_entropies_, self.threshold_ = entropies, reference, threshold
        self.num_outputs_, self.flags_ = k, flags
        self.scores_ = np.clip(1.0 - entropies / math.log2(k), 0.0, 1.0)
        reference_rejected = float((reference < threshold).mean())
        rule = (f"the reference entropies' {p.frr:.0%} order statistic" if p.threshold_rule == "quantile"
                else f"the {p.frr:.0%} quantile of a normal fitted to the reference entropies")
        explanation = (f"STRIP blended every sample with {p.n_superimpose} clean reference images ({m} available) "
                       f"and flagged the {int(flags.sum())} of {n} whose mean prediction entropy stays below "
                       f"{threshold:.4g} bits ({rule}; it rejects {reference_rejected:.1%} of the reference "
                       "itself): a dominating trigger keeps the prediction confident whatever it is blended with")
        labels, counts = np.unique(np.asarray(y)[flags], return_counts=True)
        self.diagnostics_ = {
            "explanation": explanation, "threshold": threshold, "threshold_rule": p.threshold_rule, "frr": p.frr,
            "reference_rejected": reference_rejected, "n_reference": m, "num_outputs": k,
            "entropy": f"mean over the {p.n_superimpose} blends of -sum p log2 p (bits, at most log2(K) = "
                       f"{math.log2(k):.4g}); score = 1 - entropy / log2(K)",
            "reference_entropy_quantiles": _quantiles(reference), "entropy_quantiles": _quantiles(entropies),
            "flagged_per_class": {str(int(label)): int(count) for label, count in zip(labels, counts)},
            "n_forward": p.n_superimpose * (n + m), "timings_s": timings}
        return Detection(self.name, flags, params=asdict(p), scores=self.scores_, diagnostics=self.diagnostics_)

    def _check(self, model, normalisation, x, y, reference_x):
        if not isinstance(model, nn.Module):
            raise InputError(f"model: expected the suspect torch model (nn.Module), got {type(model).__name__}")
        if not isinstance(normalisation, Normalisation):
            raise InputError(f"normalisation: expected a Normalisation, got {type(normalisation).__name__}")
        check_images(x, "x")
        reference_x = np.asarray(reference_x) if not isinstance(reference_x, np.ndarray) else reference_x
        check_images(reference_x, "reference_x (the clean reference set)")
        n = len(x)
        if n == 0:
            raise InputError("x is empty: nothing to scan")
        if len(reference_x) < 2:
            raise InputError(f"the clean reference set has {len(reference_x)} image(s): STRIP blends each with "
                             "others and needs at least 2 (the paper used 2000 held-out images)")
        if tuple(reference_x.shape[1:]) != tuple(x.shape[1:]):
            raise InputError(f"the clean reference images are {'x'.join(map(str, reference_x.shape[1:]))} (H x W x "
                             f"C), the scanned ones {'x'.join(map(str, x.shape[1:]))}: superimposing needs one shape")
        if x.shape[-1] != normalisation.channels:
            raise InputError(f"the images have {x.shape[-1]} channel(s) but the model's normalisation has "
                             f"{normalisation.channels}")
        y = np.asarray(y)
        if y.shape != (n,):
            raise InputError(f"y: expected {n} labels (one per image), got shape {y.shape}")
        return n, reference_x

    def fit_scan(self, data: ScanData) -> Detection:
        if data.reference is None or data.reference.pixels is None:
            raise InputError("STRIP needs a small clean reference set that you vouch for, to blend with and to set "
                             "its threshold: pass --clean DIR_OR_FILE (API: clean=Dataset)")
        if data.model is None or data.normalisation is None:
            raise InputError("STRIP runs the suspect model: pass the model and its normalisation")
        if data.pixels is None:
            raise InputError("STRIP reads the scanned images: the scan provided no pixels")
        pixels = data.pixels
        if len(pixels.x) != len(data.ids):
            raise InputError(f"the scan's pixels hold {len(pixels.x)} images for {len(data.ids)} samples")
        return self.fit(data.model, data.normalisation, pixels.x, data.y, data.reference.pixels.x,
                        progress=data.progress)

    def report(self, detection: Detection, rows, out_dir) -> ReportParts:
        d = detection.diagnostics
        notes = [d["explanation"]]
        below = math.floor(d["frr"] * d["n_reference"] + 1e-9)
        if below < 10:
            notes.append(f"The threshold rests on {below} reference image(s) below it ({d['n_reference']} in the clean "
                         f"set at FRR {d['frr']:g}): a larger clean set steadies it.")
        parts = ReportParts(notes=notes)
        if out_dir is None or not hasattr(self, "entropies_"):
            return parts
        truth = None if rows is None or rows.poison is None else np.asarray(rows.poison).astype(bool)
        parts.figures.append((FIGURE_TITLE, entropy_histograms_png(self.entropies_, self.reference_entropies_,
                                                                   self.threshold_, truth)))
        return parts


def entropy_histograms_png(entropies: np.ndarray, reference: np.ndarray, threshold: float,
                           truth: np.ndarray | None) -> bytes:
    """The scanned set's entropies (stacked clean / poisoned when ground truth is known) beside the reference's,
    on shared bins, the threshold dashed on both."""
    from ..report.figures import _pyplot, _to_png

    plt = _pyplot()
    bins = np.histogram_bin_edges(np.r_[entropies, reference, threshold], bins=40)
    fig, (scanned, clean) = plt.subplots(1, 2, figsize=(9.0, 3.2), sharex=True)
    if truth is None:
        scanned.hist(entropies, bins=bins, color="#9aa5b1", label=f"scanned ({len(entropies)})")
    else:
        scanned.hist([entropies[~truth], entropies[truth]], bins=bins, stacked=True, color=["#9aa5b1", "#d64545"],
                     label=[f"clean ({int((~truth).sum())})", f"poisoned ({int(truth.sum())})"])
    clean.hist(reference, bins=bins, color="#4a90d9", label=f"reference ({len(reference)})")
    for ax, title in ((scanned, "scanned set"), (clean, "clean reference set")):
        ax.axvline(threshold, color="k", linestyle="--", linewidth=1, label=f"threshold {threshold:.3g}")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("mean entropy over the superimpositions (bits)", fontsize=7)
        ax.set_yscale("log")
        ax.tick_params(labelsize=6)
        ax.legend(fontsize=6, loc="upper left")
    fig.tight_layout()
    return _to_png(fig)
