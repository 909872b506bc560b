"""Standard training augmentation, vectorised over a batch of uint8 NHWC images.

Random crop after zero padding by 4 px, then random horizontal flip with p = 0.5: BackdoorBox's
CIFAR-10 train transform (RandomCrop(32, padding=4) + RandomHorizontalFlip). Padding happens in pixel
space before normalisation, so the border is black, as with torchvision on PIL images.
"""

import torch

CROP_PADDING = 4


def random_crop_flip(images: torch.Tensor, generator: torch.Generator, *, padding: int = CROP_PADDING,
                     hflip: bool = True) -> torch.Tensor:
    """Each image shifted by a random offset in [-padding, padding]^2 (zeros fill in), flipped at random.

    One gather for the whole batch; random draws come from `generator` (on the CPU) only.
    """
    count, height, width, _ = images.shape
    padded = torch.nn.functional.pad(images, (0, 0, padding, padding, padding, padding))
    top = torch.randint(0, 2 * padding + 1, (count, 1), generator=generator).to(images.device)
    left = torch.randint(0, 2 * padding + 1, (count, 1), generator=generator).to(images.device)
    rows = top + torch.arange(height, device=images.device)
    cols = torch.arange(width, device=images.device).expand(count, width)
    if hflip:
        flipped = (torch.rand(count, 1, generator=generator) < 0.5).to(images.device)
        cols = torch.where(flipped, width - 1 - cols, cols)
    cols = left + cols
    batch = torch.arange(count, device=images.device)[:, None, None]
    return padded[batch, rows[:, :, None], cols[:, None, :]]
