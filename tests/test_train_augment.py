import torch

from backdoor_engine.models.augment import random_crop_flip


def distinct_images(count=64, height=10, width=12):
    """Pixel values that identify their position (never 0), so crops and flips are recognisable."""
    grid = (torch.arange(height * width) % 250 + 1).to(torch.uint8).view(1, height, width, 1)
    return grid.expand(count, height, width, 1).contiguous()


def test_shape_and_dtype_are_kept():
    images = torch.randint(0, 256, (5, 28, 28, 3), dtype=torch.uint8)
    out = random_crop_flip(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == torch.uint8


def window(padded, top, left, height, width, flip):
    crop = padded[top:top + height, left:left + width]
    return crop.flip(1) if flip else crop


def test_every_output_is_a_shifted_and_possibly_flipped_copy():
    images = distinct_images()
    out = random_crop_flip(images, torch.Generator().manual_seed(1), padding=2)
    padded = torch.nn.functional.pad(images[0], (0, 0, 2, 2, 2, 2))
    shifts, flips = set(), 0
    for sample in out:
        matches = [(top, left, flip) for top in range(5) for left in range(5) for flip in (False, True)
                   if torch.equal(sample, window(padded, top, left, 10, 12, flip))]
        assert matches, "each output must be a window of the zero-padded image"
        top, left, flip = matches[0]
        shifts.add((top, left))
        flips += flip
    assert len(shifts) > 5, "crops must land at varied offsets"
    assert 10 < flips < 54, "about half the images must be flipped"
    assert (out == 0).any(), "shifted crops must bring in the zero padding"


def test_hflip_off_never_flips_and_padding_zero_is_identity():
    images = distinct_images(count=16)
    generator = torch.Generator().manual_seed(2)
    assert torch.equal(random_crop_flip(images, generator, padding=0, hflip=False), images)
    flipped_only = random_crop_flip(images, generator, padding=0, hflip=True)
    assert any(torch.equal(sample, images[0].flip(1)) for sample in flipped_only)


def test_same_generator_seed_same_augmentation():
    images = torch.randint(0, 256, (8, 16, 16, 1), dtype=torch.uint8)
    first = random_crop_flip(images, torch.Generator().manual_seed(5))
    second = random_crop_flip(images, torch.Generator().manual_seed(5))
    assert torch.equal(first, second)
