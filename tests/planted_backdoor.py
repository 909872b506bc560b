"""A planted backdoor for the input-level detectors (SCALE-UP, IBD-PSC): a tiny hand-built BatchNorm network and
8 x 8 grey images whose triggered copies keep their prediction under pixel or BatchNorm amplification while clean
ones lose it.

Images: class c in {0, 1, 2} has pixel rows 2c, 2c+1 bright (b ~ U[0.84, 0.9]), the two other bands dark (a level
d ~ U[0.05, 0.25] per image) and rows 6-7 black. The trigger: a white 2 x 2 patch at rows 6-7, columns 6-7.
Network (input normalised with mean 0.5, std 0.25, undone by conv1's weights and bias):
  conv1 (8 x 8 kernel): feature c = mean of band c, feature 3 = mean of the patch
  bn1: subtracts 0.3 (bands) / 0.5 (patch) through its running mean, relu: h_c = band c - 0.3, h_t = patch - 0.5
  three identity blocks (1 x 1 conv without bias, identity BatchNorm2d, relu): 4 BatchNorm2d layers in all,
    positively homogeneous, so amplifying the last k of them multiplies the features by scale^k
  linear: class c scores 2 h_c (class 0 also 30 h_t); a fourth "sink" class 3 scores 6 (h_0 + h_1 + h_2) - 3.
A clean image is its class (2 h_c > 6 h_c - 3); once the features grow (brighter pixels or amplified BatchNorm)
the sink wins; a triggered image scores 15 for class 0 at once and keeps it whatever is amplified.
"""

import numpy as np
import torch
from torch import nn

from backdoor_engine.models.preprocess import Normalisation

NORMALISATION = Normalisation((0.5,), (0.25,))
TARGET, SINK = 0, 3


def planted_model() -> nn.Module:
    eps = 1e-5
    conv1 = nn.Conv2d(1, 4, kernel_size=8, bias=True)
    weight = torch.zeros(4, 1, 8, 8)
    for band in range(3):
        weight[band, 0, 2 * band:2 * band + 2, :] = 0.25 / 16
    weight[3, 0, 6:8, 6:8] = 0.25 / 4
    blocks = [conv1]
    with torch.no_grad():
        conv1.weight.copy_(weight)
        conv1.bias.fill_(0.5)  # mean(pixel) = 0.25 x mean(normalised) + 0.5
    for depth in range(4):
        if depth:
            conv = nn.Conv2d(4, 4, kernel_size=1, bias=False)
            with torch.no_grad():
                conv.weight.copy_(torch.eye(4).view(4, 4, 1, 1))
            blocks.append(conv)
        bn = nn.BatchNorm2d(4, eps=eps)
        with torch.no_grad():
            bn.running_mean.copy_(torch.tensor([0.3, 0.3, 0.3, 0.5]) if depth == 0 else torch.zeros(4))
            bn.running_var.fill_(1.0 - eps)
        blocks += [bn, nn.ReLU()]
    head = nn.Linear(4, 4)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[2.0, 0, 0, 30], [0, 2, 0, 0], [0, 0, 2, 0], [6, 6, 6, 0]]))
        head.bias.copy_(torch.tensor([0.0, 0, 0, -3]))
    return nn.Sequential(*blocks, nn.Flatten(), head).eval()


def clean_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n clean 8 x 8 x 1 uint8 images (classes 0, 1, 2 in turn) and their labels."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    x = np.zeros((n, 8, 8, 1))
    bright, dark = rng.uniform(0.84, 0.9, n), rng.uniform(0.05, 0.25, n)
    for band in range(3):
        level = np.where(y == band, bright, dark)[:, None, None]
        x[:, 2 * band:2 * band + 2, :, 0] = level + rng.uniform(-0.02, 0.02, (n, 2, 8))
    return np.round(np.clip(x, 0, 1) * 255).astype(np.uint8), y.astype(np.int64)


def add_trigger(x: np.ndarray) -> np.ndarray:
    out = x.copy()
    out[:, 6:8, 6:8, :] = 255
    return out


def poisoned_set(n: int = 300, rate: float = 0.1, seed: int = 0):
    """(x, y, truth): n images, `rate` of them triggered and relabelled to the target class, rows shuffled."""
    x, y = clean_images(n, seed)
    rng = np.random.default_rng(seed + 1)
    truth = np.zeros(n, bool)
    truth[rng.choice(n, int(rate * n), replace=False)] = True
    x[truth] = add_trigger(x[truth])
    y[truth] = TARGET
    return x, y, truth


def predict(model: nn.Module, pixels01: torch.Tensor) -> torch.Tensor:
    """The model's logits on float [0, 1] N x C x H x W pixels (normalised here): the direct computation the tests
    compare against."""
    mean, std = NORMALISATION.mean[0], NORMALISATION.std[0]
    with torch.no_grad():
        return model((pixels01 - mean) / std)
