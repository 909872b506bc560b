"""Kernels, one dispatch point per primitive (DESIGN.md section 5).

bn_minima backends: "torch" (closed form, any device), "cpp" (compiled CPU kernel), "triton"
(GPU kernel, imported only when asked for or when x is on CUDA, so the CPU path never imports triton).
"""

import functools
import importlib
import math
import numbers
import warnings
from types import ModuleType

import torch

from backdoor_engine.errors import InputError
from backdoor_engine.kernels.bn_minima import bn_minima_reference, bn_minima_torch
from backdoor_engine.kernels.bn_minima_cpp import (
    bn_minima_cpp,
    bn_minima_cpp_prepared,
    cpp_unsupported_reason,
    kernel_statistics,
)

BN_MINIMA_BACKENDS = ("auto", "torch", "cpp", "triton")

__all__ = ["BN_MINIMA_BACKENDS", "bn_minima", "bn_minima_for_layer", "bn_minima_reference", "bn_minima_torch"]


def bn_minima(
    x: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
    backend: str = "auto",
) -> torch.Tensor:
    """Per (sample, channel) minimum over H*W of the Gaussian log-density of BatchNorm input x.

    x: [N, C, H, W] floating tensor (NCHW or channels_last); running_mean, running_var: [C].
    Returns float32 [N, C]. A NaN anywhere in x[n, c] gives NaN at [n, c], for the caller to
    report. backend: "auto" (triton for CUDA x, the compiled kernel for CPU x, when they can take
    it, else torch), "torch", "cpp", "triton".
    """
    _check_bn_inputs(x, running_mean, running_var, eps)
    chosen = _choose_backend(x, backend)
    if chosen == "triton":
        return _triton_kernel_module().bn_minima_triton(x, running_mean, running_var, eps)
    if chosen == "cpp":
        return bn_minima_cpp(x, running_mean, running_var, eps)
    return bn_minima_torch(x, running_mean, running_var, eps)


def bn_minima_for_layer(running_mean: torch.Tensor, running_var: torch.Tensor, eps: float, backend: str = "auto"):
    """`bn_minima` with one layer's statistics bound: checked and converted once, not on every call.

    Returns f(x) -> float32 [N, C]. The probes call it once per BN layer per batch; the per-call checks
    of the statistics (a few small tensor ops each) measured ~5% of a small model's forward pass.
    The statistics are read now: a later change to the module's buffers is not seen.
    """
    if backend not in BN_MINIMA_BACKENDS:
        raise InputError(f"backend must be one of {BN_MINIMA_BACKENDS}, got {backend!r}")
    channels = running_mean.shape[0] if isinstance(running_mean, torch.Tensor) and running_mean.ndim == 1 else 1
    _check_bn_inputs(torch.zeros(1, max(channels, 1), 1, 1), running_mean, running_var, eps)
    mean, var = kernel_statistics(running_mean, running_var)

    def layer_minima(x: torch.Tensor) -> torch.Tensor:
        # The shape checks bn_minima would make on x, then the same test of x it makes for the kernel.
        if (backend in ("auto", "cpp") and x.ndim == 4 and x.shape[1] == channels and x.shape[2] * x.shape[3] > 0
                and cpp_unsupported_reason(x) is None):
            return bn_minima_cpp_prepared(x, mean, var, float(eps))
        return bn_minima(x, running_mean, running_var, eps, backend=backend)

    return layer_minima


def _choose_backend(x: torch.Tensor, backend: str) -> str:
    if backend not in BN_MINIMA_BACKENDS:
        raise InputError(f"backend must be one of {BN_MINIMA_BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "triton" or (backend == "auto" and x.device.type == "cuda"):
        reason = _triton_unsupported_reason(x)
        if reason is None:
            return "triton"
        if backend == "triton":
            raise InputError(f"backend='triton' cannot run this input: {reason}")
    reason = cpp_unsupported_reason(x)  # a CUDA x that triton cannot take gets torch here
    if backend == "cpp" and reason is not None:
        raise InputError(f"backend='cpp' cannot run this input: {reason}")
    return "cpp" if reason is None else "torch"


def _triton_unsupported_reason(x: torch.Tensor) -> str | None:
    kernel_module = _triton_kernel_module()
    if kernel_module is None:
        return "triton is not installed (pip install -e '.[gpu]')"
    return kernel_module.triton_unsupported_reason(x)


@functools.cache  # one import attempt, and one warning, per process
def _triton_kernel_module() -> ModuleType | None:
    try:
        return importlib.import_module("backdoor_engine.kernels.bn_minima_triton")
    except ImportError as error:
        warnings.warn(
            f"backdoor-engine: triton is not available ({error}); CUDA tensors take the PyTorch closed form",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


def _check_bn_inputs(x, running_mean, running_var, eps) -> None:
    if not isinstance(x, torch.Tensor):
        raise InputError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 4 or not x.is_floating_point():
        raise InputError(
            f"x must be a floating-point BatchNorm2d input [N, C, H, W], got {x.dtype} of shape {tuple(x.shape)}"
        )
    channels, height, width = x.shape[1:]
    if channels == 0 or height * width == 0:
        raise InputError(f"x must have at least one channel and one spatial position, got shape {tuple(x.shape)}")
    for name, stat in (("running_mean", running_mean), ("running_var", running_var)):
        if not isinstance(stat, torch.Tensor) or tuple(stat.shape) != (channels,):
            got = tuple(stat.shape) if isinstance(stat, torch.Tensor) else type(stat).__name__
            raise InputError(f"{name} must have shape ({channels},) to match x's channels, got {got}")
        if not torch.isfinite(stat).all():
            raise InputError(f"{name} must be finite, got NaN or inf in channel {_first(~torch.isfinite(stat))}")
    if not isinstance(eps, numbers.Real) or not math.isfinite(eps) or eps < 0:
        raise InputError(f"eps must be a finite number >= 0, got {eps!r}")
    if (running_var < 0).any():
        channel = _first(running_var < 0)
        raise InputError(f"running_var must be >= 0, got {running_var[channel].item()} in channel {channel}")
    if (running_var.double() + eps <= 0).any():
        raise InputError(f"running_var + eps must be > 0, got 0 in channel {_first(running_var.double() + eps <= 0)}")


def _first(mask: torch.Tensor) -> int:
    return int(mask.nonzero()[0, 0])
