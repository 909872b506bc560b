"""Inputs and the error bound shared by the BN-minima kernel tests (cpp and Triton backends)."""

import torch

from backdoor_engine.kernels import bn_minima_reference

FLOAT32_EPS = torch.finfo(torch.float32).eps


def batchnorm_input(shape, dtype, layout, seed=0, spread=1.0):
    """Activations around per-channel statistics, some channels entirely negative or positive."""
    generator = torch.Generator().manual_seed(seed)
    c = shape[1]
    mean = torch.randn(c, generator=generator) * 2
    var = torch.rand(c, generator=generator) * 4 + 0.01
    offset = (torch.rand(c, generator=generator) - 0.5) * 20
    noise = spread * var.sqrt()[:, None, None] * torch.randn(shape, generator=generator)
    x = mean[:, None, None] + offset[:, None, None] + noise
    return x.to(dtype).contiguous(memory_format=layout), mean, var


def assert_close_to_reference(out, x, mean, var, eps):
    """Within 2x the official float32 computation's own error, plus 2 float32 ulps of the value."""
    exact = bn_minima_reference(x, mean, var, eps)
    official_float32 = bn_minima_reference(x, mean, var, eps, dtype=torch.float32).double()
    torch_error = (official_float32 - exact).abs().max()
    bound = 2 * torch_error + 2 * FLOAT32_EPS * exact.abs()
    assert out.dtype == torch.float32 and out.shape == exact.shape
    excess = (out.double() - exact).abs() - bound
    assert (excess <= 0).all(), f"max error beyond bound {excess.max().item():.3g} (torch fp32 error {torch_error:.3g})"
