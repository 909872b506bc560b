"""Extraction throughput on the user's own hardware: plain forward vs the engine vs the official-style extractor.

`backdoor-engine bench` and benchmarks/bench_extraction.py both time through this module. Variants run
in one process on the same batches and threads, interleaved repetition by repetition (a slower or
faster spell of a shared machine falls on every variant alike), each timed to its median:

  plain         model(x) on the normalised batch: the inference forward the extraction rides on
  engine        extract_features(...): probes on every BatchNorm2d input, the compiled kernel ("auto")
  engine_torch  the same with the torch closed-form kernel
  official      the official FLARE extractor's way (OfficialLogLikelihoodBN), its minima copied to the host

Every variant starts from uint8 NHWC batches in host memory, so each pays the same copy and
normalisation. On CUDA each timed run ends with torch.cuda.synchronize(): a timing never stops
while kernels are still queued.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from .data.dataset import Dataset, make_dataset
from .engine import extract_features
from .errors import InputError
from .kernels import bn_minima_reference
from .models.preprocess import Normalisation, to_model_input

VARIANTS = ("plain", "engine", "engine_torch", "official")
# Rows below which UMAP's neighbour graph (40 neighbours, the official setting) would be most of the data.
MIN_CLUSTER_ROWS = 100


class OfficialLogLikelihoodBN(nn.BatchNorm2d):
    """The BatchNorm2d the official FLARE code (BackdoorBox core/defenses/FLARE.py, SEED_NOTES 1.1) swaps in:
    under no_grad it builds the per-channel Normal(running_mean, sqrt(running_var + eps)), takes the
    log-density of every element of its input and keeps the minimum, then runs the ordinary BN forward.
    The minimum is kept per channel here (the official code takes it over C*H*W), so the output equals
    the engine's; the cost, the full log-density tensor, is the official one. `captured` collects one
    [N, C] tensor per layer per forward."""

    captured: list

    def forward(self, x):
        with torch.no_grad():
            self.captured.append(bn_minima_reference(x, self.running_mean, self.running_var, self.eps,
                                                     dtype=torch.float32))
        return super().forward(x)


def official_copy(model: nn.Module) -> tuple[nn.Module, list]:
    """A deep copy with every BatchNorm2d swapped for OfficialLogLikelihoodBN, recursively through
    named_children, as the official code does; the list its layers append their minima to."""
    clone = copy.deepcopy(model)
    captured: list = []

    def swap(module: nn.Module) -> None:
        for name, child in module.named_children():
            if isinstance(child, nn.BatchNorm2d):
                new = OfficialLogLikelihoodBN(child.num_features, eps=child.eps).to(child.running_mean.device)
                new.load_state_dict(child.state_dict())
                new.captured = captured
                setattr(module, name, new.eval())
            else:
                swap(child)

    swap(clone)
    return clone.eval(), captured


def make_runner(variant: str, model: nn.Module, dataset: Dataset, normalisation: Normalisation,
                batch_size: int, *, head: str = "head") -> Callable[[], None]:
    """A no-argument callable that runs `variant` once over `dataset`, on the model's device."""
    if variant not in VARIANTS:
        raise InputError(f"variant must be one of {VARIANTS}, got {variant!r}")
    device = _device_of(model)
    batches = [dataset.x[start:start + batch_size] for start in range(0, len(dataset), batch_size)]

    def inputs(batch: np.ndarray, channels_last: bool) -> torch.Tensor:
        x = to_model_input(torch.from_numpy(np.ascontiguousarray(batch)).to(device), normalisation)
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x

    if variant == "plain":
        # channels_last, as the engine runs its pass: the two differ by the probes alone.
        plain = copy.deepcopy(model).to(memory_format=torch.channels_last).eval()

        def run_plain() -> None:
            with torch.no_grad():
                for batch in batches:
                    plain(inputs(batch, True))
        return run_plain
    if variant in ("engine", "engine_torch"):
        backend = "auto" if variant == "engine" else "torch"
        return lambda: extract_features(model, dataset, normalisation, batch_size=batch_size, backend=backend,
                                        head=head, progress=False)
    official, captured = official_copy(model)

    def run_official() -> None:
        with torch.no_grad():
            for batch in batches:
                captured.clear()
                official(inputs(batch, False))
                torch.cat(captured, dim=1).cpu()  # the official code keeps its features on the host too
    return run_official


def time_interleaved(runners: dict[str, Callable[[], None]], repeats: int, *, device: torch.device,
                     warmup: bool = True) -> dict[str, list[float]]:
    """Seconds of each runner per repetition. One untimed warm-up run each first (allocator, oneDNN
    and kernel caches); repetition r starts at the r-th runner, rotating the order."""
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise InputError(f"repeats must be an integer >= 1, got {repeats!r}")
    names = list(runners)
    if warmup:
        for run in runners.values():
            run()
        _synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(repeats):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            _synchronize(device)
            began = time.perf_counter()
            runners[name]()
            _synchronize(device)
            times[name].append(time.perf_counter() - began)
    return times


def median_seconds(times: dict[str, Sequence[float]]) -> dict[str, float]:
    return {name: statistics.median(values) for name, values in times.items()}


def reference_input_shape(arch: str) -> tuple[int, int]:
    """(channels, side) a registered architecture is benchmarked at: the data it was built for,
    Fashion-MNIST 1x28x28 for small_resnet, CIFAR-10 3x32x32 for the others."""
    return (1, 28) if arch == "small_resnet" else (3, 32)


def synthetic_images(n: int, height: int, width: int, channels: int, seed: int = 0) -> np.ndarray:
    """n seeded uniform-noise uint8 images (throughput does not depend on pixel values)."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, height, width, channels), dtype=np.uint8)


def time_clustering(features: np.ndarray, rows: int, *, seed: int = 0) -> dict[str, float]:
    """Seconds of FLARE's clustering stages (cluster.umap, then cluster.hdbscan on the embedding, at the
    official settings) on `rows` rows of `features`, its rows repeated with small noise when fewer.
    One run, not a median: umap-learn's first call in a process JIT-compiles (30-50 s on a small CPU)
    and a scan pays that too, so it is counted."""
    from . import cluster

    if isinstance(rows, bool) or not isinstance(rows, int) or rows < MIN_CLUSTER_ROWS:
        raise InputError(f"--cluster-rows must be an integer >= {MIN_CLUSTER_ROWS}, got {rows!r}")
    features = np.asarray(features, dtype=np.float32)
    rng = np.random.default_rng(seed)
    matrix = features[np.arange(rows) % len(features)]
    if rows > len(features):
        # Exact duplicates would collapse into zero-distance neighbourhoods that real data does not have.
        scale = features.std(axis=0, keepdims=True) * 0.01 + 1e-6
        matrix = matrix + rng.standard_normal(matrix.shape).astype(np.float32) * scale
    began = time.perf_counter()
    embedding = cluster.umap(matrix, random_state=seed)
    umap_seconds = time.perf_counter() - began
    began = time.perf_counter()
    cluster.hdbscan(embedding, min_cluster_size=MIN_CLUSTER_ROWS)
    hdbscan_seconds = time.perf_counter() - began
    return {"umap": umap_seconds, "hdbscan": hdbscan_seconds}


def run_benchmark(model: nn.Module, normalisation: Normalisation, images: np.ndarray, *, batch_size: int,
                  repeats: int, head: str = "head", variants: Sequence[str] = ("plain", "engine", "official"),
                  cluster_rows: int | None = None) -> dict:
    """Time `variants` on `images` (uint8 NHWC) with `model` where it lies (CPU or CUDA); a dict with each
    variant's images/s, the engine's ratios to plain and official, per-repetition seconds and, with
    cluster_rows, the clustering stages' seconds."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    device = _device_of(model)
    dataset = make_dataset(images, np.zeros(len(images), np.int64))
    runners = {name: make_runner(name, model, dataset, normalisation, batch_size, head=head) for name in variants}
    times = time_interleaved(runners, repeats, device=device)
    median = median_seconds(times)
    rates = {name: len(images) / seconds for name, seconds in median.items()}
    result = {"n_images": len(images), "batch_size": batch_size, "repeats": repeats,
              "images_per_s": rates, "seconds": times}
    if {"plain", "engine"} <= set(rates):
        result["engine_vs_plain"] = rates["engine"] / rates["plain"]
    if {"official", "engine"} <= set(rates):
        result["engine_vs_official"] = rates["engine"] / rates["official"]
    if cluster_rows is not None:
        features = extract_features(model, dataset, normalisation, batch_size=batch_size, progress=False)
        result["cluster_stages_s"] = time_clustering(features.bn_minima, cluster_rows)
        result["cluster_seconds"] = sum(result["cluster_stages_s"].values())
        result["cluster_rows"] = cluster_rows
    return result


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def _device_of(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return torch.device("cpu") if parameter is None else parameter.device


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
