"""BN-minima on the compiled CPU kernel (csrc/bn_minima.cpp); its reference is kernels/bn_minima.py."""

import torch

from backdoor_engine._ext import load_extension

# torch dtype -> the kernel's name for it; 16-bit floats travel as their raw uint16 bits.
_KERNEL_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def cpp_unsupported_reason(x: torch.Tensor) -> str | None:
    """Why the compiled kernel cannot take x, or None when it can."""
    if x.device.type != "cpu":
        return f"x is on {x.device}; the compiled kernel takes CPU tensors"
    if x.dtype not in _KERNEL_DTYPES:
        return f"x is {x.dtype}; the compiled kernel takes float32, float16 or bfloat16"
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        return "x is neither NCHW-contiguous nor channels_last; call .contiguous() first"
    if load_extension() is None:
        return "the compiled extension backdoor_engine._C is not available"
    return None


def bn_minima_cpp(
    x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor, eps: float
) -> torch.Tensor:
    """float32 [N, C] from the compiled kernel; x must pass `cpp_unsupported_reason`."""
    return bn_minima_cpp_prepared(x, *kernel_statistics(running_mean, running_var), float(eps))


def kernel_statistics(running_mean: torch.Tensor, running_var: torch.Tensor):
    """The running statistics as the kernel reads them: contiguous float64 numpy arrays on the CPU."""
    return tuple(stat.detach().to("cpu", torch.float64).contiguous().numpy() for stat in (running_mean, running_var))


def bn_minima_cpp_prepared(x: torch.Tensor, mean, var, eps: float) -> torch.Tensor:
    """The kernel call with the statistics already float64 numpy arrays (see kernels.bn_minima_for_layer)."""
    values = x.detach()
    if values.dtype != torch.float32:
        values = values.view(torch.uint16)  # a bit-level view: no copy, the kernel decodes
    return torch.from_numpy(load_extension().bn_minima(values.numpy(), mean, var, eps, _KERNEL_DTYPES[x.dtype]))
