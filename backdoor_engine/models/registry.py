"""Architecture names -> constructors, with the checks every caller needs."""

from collections.abc import Callable, Sequence

from ..errors import InputError
from .base import ImageClassifier
from .mobilenetv2 import mobilenetv2
from .preact_resnet import preact_resnet18
from .resnet import resnet18, small_resnet
from .vgg import vgg11_bn, vgg16_bn, vgg19_bn

ARCHITECTURES: dict[str, Callable[..., ImageClassifier]] = {
    "resnet18": resnet18,
    "preact_resnet18": preact_resnet18,
    "small_resnet": small_resnet,
    "vgg11_bn": vgg11_bn,
    "vgg16_bn": vgg16_bn,
    "vgg19_bn": vgg19_bn,
    "mobilenetv2": mobilenetv2,
}
SUPPORTED_CHANNELS = (1, 3)
# Smallest side the architectures are checked at: VGG's five ceil-mode pools and the ResNets'
# three stride-2 stages still leave a non-empty map, and training BN needs more than one value.
MIN_INPUT_SIDE = 8


def available_archs() -> list[str]:
    return sorted(ARCHITECTURES)


def image_size_pair(input_size: int | Sequence[int]) -> tuple[int, int]:
    """`input_size` as (height, width); an int means a square image."""
    if isinstance(input_size, int) and not isinstance(input_size, bool):
        pair = (input_size, input_size)
    elif isinstance(input_size, Sequence) and not isinstance(input_size, str) and len(input_size) == 2:
        pair = tuple(input_size)
    else:
        raise InputError(f"input_size must be an int or (height, width), got {input_size!r}")
    if not all(isinstance(side, int) and not isinstance(side, bool) and side >= MIN_INPUT_SIDE for side in pair):
        raise InputError(f"input_size sides must be integers >= {MIN_INPUT_SIDE}, got {input_size!r}")
    return pair


def build_model(arch: str, *, num_classes: int, in_channels: int,
                input_size: int | Sequence[int]) -> ImageClassifier:
    """A freshly initialised `arch` for images of `in_channels` x `input_size` and `num_classes` classes.

    Initialisation draws from torch's global RNG: seed it (or fork it) around the call to repeat it.
    """
    if not isinstance(arch, str) or arch not in ARCHITECTURES:
        raise InputError(f"unknown arch {arch!r}; available: {', '.join(available_archs())}")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
        raise InputError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if in_channels not in SUPPORTED_CHANNELS:
        raise InputError(f"in_channels must be 1 or 3, got {in_channels!r}")
    image_size_pair(input_size)
    return ARCHITECTURES[arch](num_classes=num_classes, in_channels=in_channels)


# Methods that train their own model pick it by input size unless told: the small ResNet below 32 px (28 x 28
# Fashion-MNIST), ResNet-18 from 32 px (CIFAR-10 and up), the reference models of the seed papers.
SMALL_INPUT_SIDE = 32


def default_arch(image_shape) -> str:
    """small_resnet for images under 32 px a side, resnet18 otherwise."""
    return "small_resnet" if min(image_shape[:2]) < SMALL_INPUT_SIDE else "resnet18"
