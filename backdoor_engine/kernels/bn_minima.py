"""BN-minima: the PyTorch references every compiled backend is tested against.

For a BatchNorm2d input x [N, C, H, W] and the layer's running statistics, the FLARE feature of
sample n, channel c is  min over (h, w) of log N(x[n, c, h, w]; running_mean[c], running_var[c] + eps).
A Gaussian log-density is lowest at the value farthest from the mean, which is the channel's max
or min, so the minimum has the closed form
    -0.5 * log(2 * pi * v) - max((xmax - m)^2, (xmin - m)^2) / (2 * v),   v = running_var + eps.
Inputs are assumed checked by `backdoor_engine.kernels.bn_minima`.
"""

import math

import torch


def bn_minima_reference(
    x: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """The official FLARE code's way: every element's Normal log-density, then the min over H*W.

    Computed and returned in `dtype`: float64 is the accuracy yardstick, float32 is what the
    official code runs.
    """
    mean = running_mean.to(x.device, dtype)[:, None, None]
    scale = (running_var.to(x.device, dtype) + eps).sqrt()[:, None, None]
    # validate_args=False: NaN activations must reach the output, not raise inside torch.
    normal = torch.distributions.Normal(mean, scale, validate_args=False)
    return normal.log_prob(x.detach().to(dtype)).flatten(2).amin(dim=2)


def bn_minima_torch(
    x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor, eps: float
) -> torch.Tensor:
    """The closed form on per-(sample, channel) extremes: float32 [N, C], on x's device."""
    low, high = torch.aminmax(x.detach().flatten(2), dim=2)  # exact in any input precision
    mean = running_mean.to(x.device, torch.float64)
    variance = running_var.to(x.device, torch.float64) + eps
    farthest = torch.maximum((high.double() - mean).abs(), (low.double() - mean).abs())
    return (-0.5 * torch.log(2 * math.pi * variance) - farthest.square() / (2 * variance)).float()
