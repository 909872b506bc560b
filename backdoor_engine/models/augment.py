"""Standard training augmentation, vectorised over a batch of uint8 NHWC images.

Random crop after zero padding by 4 px, then random horizontal flip with p = 0.5: BackdoorBox's
CIFAR-10 train transform (RandomCrop(32, padding=4) + RandomHorizontalFlip). Padding happens in pixel
space before normalisation, so the border is black, as with torchvision on PIL images.
"""

import math

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


# SupContrast's two-view recipe (D-ST, SEED_NOTES 2.4): RandomResizedCrop(scale (0.2, 1)), horizontal flip,
# ColorJitter(0.4, 0.4, 0.4, 0.1) with p = 0.8, RandomGrayscale p = 0.2; on uint8 pixels as torchvision on PIL.
CROP_SCALE = (0.2, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
JITTER = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
JITTER_P, GREY_P = 0.8, 0.2
_LUMA = (0.299, 0.587, 0.114)


def strong_view(images: torch.Tensor, generator: torch.Generator, *, hflip: bool = True) -> torch.Tensor:
    """One random view per uint8 NHWC image, uint8 NHWC back, vectorised over the batch.

    Departures from torchvision, all for one batched op per stage: the crop's size is drawn once per image and
    clamped to the image (torchvision retries 10 times, then centre-crops); the jitter runs brightness,
    contrast, saturation, hue in that order (torchvision shuffles the order per call); hue rotates the YIQ
    chroma plane (torchvision goes through HSV). Saturation, hue and grayscale leave a grey image as it is.
    """
    count, height, width, channels = images.shape
    u = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    area = (CROP_SCALE[0] + (CROP_SCALE[1] - CROP_SCALE[0]) * u(count)) * height * width
    log_ratio = torch.log(torch.tensor(CROP_RATIO[0])) + u(count) * torch.log(torch.tensor(CROP_RATIO[1] / CROP_RATIO[0]))
    ratio = torch.exp(log_ratio)
    crop_w = torch.sqrt(area * ratio).round().clamp(1, width)
    crop_h = torch.sqrt(area / ratio).round().clamp(1, height)
    left = (u(count) * (width - crop_w + 1)).floor()
    top = (u(count) * (height - crop_h + 1)).floor()
    flip = (u(count) < 0.5) if hflip else torch.zeros(count, dtype=torch.bool)
    # The crop box resized to the full image: an affine map in grid_sample's [-1, 1] coordinates.
    theta = torch.zeros(count, 2, 3)
    theta[:, 0, 0] = crop_w / width * torch.where(flip, -1.0, 1.0)
    theta[:, 0, 2] = (2 * left + crop_w) / width - 1
    theta[:, 1, 1] = crop_h / height
    theta[:, 1, 2] = (2 * top + crop_h) / height - 1
    x = images.permute(0, 3, 1, 2).to(torch.float32)
    grid = torch.nn.functional.affine_grid(theta, [count, channels, height, width], align_corners=False)
    x = torch.nn.functional.grid_sample(x, grid.to(x.device), mode="bilinear", padding_mode="border",
                                        align_corners=False)
    jitter = (u(count) < JITTER_P).to(x.device)[:, None, None, None]
    x = torch.where(jitter, _colour_jitter(x, u), x)
    if channels == 3:
        grey = (u(count) < GREY_P).to(x.device)[:, None, None, None]
        x = torch.where(grey, _grey(x).expand_as(x), x)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _grey(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    weights = torch.tensor(_LUMA, device=x.device)[None, :, None, None]
    return (x * weights).sum(1, keepdim=True)


def _factor(u, count: int, spread: float, device) -> torch.Tensor:
    return (1 - spread + 2 * spread * u(count)).to(device)[:, None, None, None]


def _colour_jitter(x: torch.Tensor, u) -> torch.Tensor:
    count, channels = x.shape[:2]
    brightness, contrast, saturation, hue = JITTER
    x = (x * _factor(u, count, brightness, x.device)).clamp(0, 255)
    mean = _grey(x).mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * _factor(u, count, contrast, x.device) + mean).clamp(0, 255)
    saturation_factor, hue_shift = _factor(u, count, saturation, x.device), (2 * u(count) - 1) * hue
    if channels == 3:
        grey = _grey(x)
        x = ((x - grey) * saturation_factor + grey).clamp(0, 255)
        # Rotate the chroma (I, Q) of YIQ by 2 pi hue_shift.
        yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], device=x.device)
        angle = (2 * math.pi * hue_shift).to(x.device)
        cos, sin = torch.cos(angle), torch.sin(angle)
        rotation = torch.zeros(count, 3, 3, device=x.device)
        rotation[:, 0, 0] = 1
        rotation[:, 1, 1], rotation[:, 1, 2], rotation[:, 2, 1], rotation[:, 2, 2] = cos, -sin, sin, cos
        transform = torch.linalg.inv(yiq) @ rotation @ yiq  # count x 3 x 3
        x = torch.einsum("nij,njhw->nihw", transform, x).clamp(0, 255)
    return x
