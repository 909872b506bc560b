"""BN-minima as a Triton GPU kernel; its PyTorch references are kernels/bn_minima.py.

One program takes one sample and a block of channels, walks H*W once in [BLOCK_C, BLOCK_P]
tiles keeping each channel's max, min and NaN count, then evaluates the closed form on those
extremes in float64, as `bn_minima_torch` does. Strides are passed in, so NCHW and channels_last
(and any sample or channel stride) are read in place: H and W only need to form one strided
axis, which both layouts do. Imported lazily by `backdoor_engine.kernels` (it imports triton);
tests run it on CPU tensors under TRITON_INTERPRET=1.
"""

import functools
import math

import torch
import triton
import triton.language as tl

from backdoor_engine.kernels.bn_minima import bn_minima_reference, bn_minima_torch

# Elements per tile (32 per thread at 4 warps); untuned: no GPU was at hand when this was written.
_TILE_ELEMENTS = 2048
_HALF_LOG_2PI = tl.constexpr(0.5 * math.log(2 * math.pi))
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _bn_minima_kernel(
    x_ptr,
    mean_ptr,  # float64 [C]
    variance_ptr,  # float64 [C], running_var + eps
    out_ptr,  # float32 [N, C], contiguous
    channels,
    positions,  # H * W
    stride_sample,
    stride_channel,
    stride_position,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    sample = tl.program_id(0).to(tl.int64)  # int64: a batch of activations can pass 2**31 elements
    channel = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_valid = channel < channels
    rows = x_ptr + sample * stride_sample + channel[:, None].to(tl.int64) * stride_channel
    high = tl.full([BLOCK_C], float("-inf"), tl.float32)
    low = tl.full([BLOCK_C], float("inf"), tl.float32)
    nan_count = tl.zeros([BLOCK_C], tl.int32)
    for start in range(0, positions, BLOCK_P):
        position = start + tl.arange(0, BLOCK_P)
        valid = channel_valid[:, None] & (position < positions)[None, :]
        tile = tl.load(rows + position[None, :].to(tl.int64) * stride_position, mask=valid, other=0.0)
        tile = tile.to(tl.float32)  # exact for float16 and bfloat16
        # tl.max and tl.min may drop NaN, so NaN (the one value unequal to itself) is counted on its own.
        nan_count += tl.sum((tile != tile).to(tl.int32), axis=1)  # noqa: PLR0124
        high = tl.maximum(high, tl.max(tl.where(valid, tile, float("-inf")), axis=1))
        low = tl.minimum(low, tl.min(tl.where(valid, tile, float("inf")), axis=1))
    mean = tl.load(mean_ptr + channel, mask=channel_valid, other=0.0)
    variance = tl.load(variance_ptr + channel, mask=channel_valid, other=1.0)
    farthest = tl.maximum(tl.abs(high.to(tl.float64) - mean), tl.abs(low.to(tl.float64) - mean))
    loglik = -_HALF_LOG_2PI - 0.5 * tl.log(variance) - farthest * farthest / (2 * variance)
    loglik = tl.where(nan_count > 0, float("nan"), loglik)
    tl.store(out_ptr + sample * channels + channel, loglik.to(tl.float32), mask=channel_valid)


# Read once at import, as triton.jit did when it decided whether the kernel is interpreted.
INTERPRETED = triton.knobs.runtime.interpret


def triton_unsupported_reason(x: torch.Tensor) -> str | None:
    """Why the Triton kernel cannot take x, or None when it can."""
    if x.device.type != "cuda" and not INTERPRETED:
        return f"x is on {x.device}; the Triton kernel takes CUDA tensors (CPU ones only under TRITON_INTERPRET=1)"
    if x.dtype not in _KERNEL_DTYPES:
        return f"x is {x.dtype}; the Triton kernel takes float32, float16 or bfloat16"
    if _position_stride(x) is None:
        return "x's H and W do not form one strided axis (neither NCHW nor channels_last); call .contiguous() first"
    return None


def bn_minima_triton(
    x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor, eps: float
) -> torch.Tensor:
    """float32 [N, C] from the Triton kernel; x must pass `triton_unsupported_reason`."""
    samples, channels, height, width = x.shape
    out = torch.empty((samples, channels), dtype=torch.float32, device=x.device)
    mean = running_mean.detach().to(x.device, torch.float64).contiguous()
    variance = running_var.detach().to(x.device, torch.float64) + eps
    block_c, block_p = _block_sizes(channels, height * width, x.stride(1))
    grid = (samples, triton.cdiv(channels, block_c))
    _bn_minima_kernel[grid](
        x.detach(), mean, variance, out, channels, height * width,
        x.stride(0), x.stride(1), _position_stride(x),
        BLOCK_C=block_c, BLOCK_P=block_p,
    )  # fmt: skip
    return out


def _position_stride(x: torch.Tensor) -> int | None:
    """The stride that walks H*W as one axis, or None when H and W do not merge."""
    _, _, height, width = x.shape
    if width == 1:
        return x.stride(2)
    if height == 1 or x.stride(2) == width * x.stride(3):
        return x.stride(3)
    return None


def _block_sizes(channels: int, positions: int, stride_channel: int) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_P): the tile's long side runs along the axis contiguous in memory, so loads coalesce."""
    if stride_channel == 1 and channels > 1:  # channels_last
        block_c = min(triton.next_power_of_2(channels), 64)
        return block_c, min(triton.next_power_of_2(positions), _TILE_ELEMENTS // block_c)
    block_p = min(triton.next_power_of_2(positions), 1024)
    return min(triton.next_power_of_2(channels), _TILE_ELEMENTS // block_p), block_p


if __name__ == "__main__":
    # Triton-tutorial style check on a GPU: the kernel against the float64 reference, then timings.
    x = torch.randn(256, 64, 56, 56, device="cuda", dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    mean, var = torch.randn(64, device="cuda"), torch.rand(64, device="cuda") + 0.1
    error = (bn_minima_triton(x, mean, var, 1e-5).double() - bn_minima_reference(x, mean, var, 1e-5)).abs().max()
    print(f"max |triton - float64 reference| = {error.item():.3g}")
    for name, function in (("triton", bn_minima_triton), ("torch closed form", bn_minima_torch)):
        milliseconds = triton.testing.do_bench(functools.partial(function, x, mean, var, 1e-5))
        print(f"{name}: {milliseconds:.3f} ms for x {tuple(x.shape)} {x.dtype} channels_last")
