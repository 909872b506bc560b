"""Instagram-filter trigger (Liu et al., CCS 2019, ABS: "filter" trojans; the TRAP paper's "Instagram Filter"
attack): the whole image is passed through a photo filter, so the trigger is a style change whose pixel
effect differs from image to image.

The filters are pilgram's (CSSgram's Instagram look-alikes, Pillow + numpy). Default ``"1977"``: the filter
that FeatureRE (Wang et al., NeurIPS 2022, with ABS's S. Ma; its reverse_engineering.py, ``asr_test_type ==
"filter"``) applies to build its filter attack's triggered inputs (``pilgram._1977``). Other code of that line
uses ``kelvin``; every pilgram filter is available by name.

Grey (1-channel) images are replicated to RGB, filtered, and converted back with Pillow's ``convert("L")``
(ITU-R 601-2 luma, L = 0.299 R + 0.587 G + 0.114 B, rounded): the filters are defined on colour images and a
grey dataset has no other colour to give them. The same filter is the training and the test-time trigger.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from backdoor_engine.errors import InputError

from .base import Attack


def filter_names() -> tuple[str, ...]:
    """Filter names pilgram offers, with ``_1977`` spelt ``1977`` (the leading underscore only makes it a
    Python identifier)."""
    import pilgram

    names = []
    for name in dir(pilgram):
        function = getattr(pilgram, name)
        # Its submodules (css, util, types) are modules, not filters; filters are plain functions.
        if callable(function) and not isinstance(function, type) and not name.startswith("__"):
            names.append(name.lstrip("_"))
    return tuple(sorted(names))


def filter_function(name: str) -> Callable[[Image.Image], Image.Image]:
    """pilgram's filter called ``name`` (``"1977"`` or ``"_1977"`` for pilgram._1977)."""
    try:
        import pilgram
    except ImportError:  # a dependency, but say what is missing rather than fail deep inside an attack
        raise InputError("attack 'filter' needs the pilgram package (pip install pilgram)") from None
    valid = filter_names()
    key = str(name).lstrip("_")
    if key not in valid:
        raise InputError(f"filter: expected one of {list(valid)}, got {name!r}")
    return getattr(pilgram, key if hasattr(pilgram, key) else "_" + key)


def apply_filter(x: np.ndarray, name: str) -> np.ndarray:
    """Filter each uint8 H x W x C image of ``x`` (C = 1 goes through RGB and back to luma)."""
    function = filter_function(name)
    grey = x.shape[-1] == 1
    out = np.empty_like(x)
    # pilgram works on one PIL image at a time (about 1 ms for 28x28 or 32x32): no batched form exists.
    for index, image in enumerate(x):
        rgb = Image.fromarray(image[:, :, 0]).convert("RGB") if grey else Image.fromarray(image)
        filtered = function(rgb)
        if grey:
            out[index, :, :, 0] = np.asarray(filtered.convert("L"), dtype=np.uint8)
        else:
            out[index] = np.asarray(filtered.convert("RGB"), dtype=np.uint8)
    return out


@dataclass(frozen=True, eq=False, kw_only=True)
class InstagramFilter(Attack):
    """Filter trigger; deterministic, the same at train and test time."""

    name = "filter"

    filter: str = "1977"  # FeatureRE's filter attack (pilgram._1977); see the module docstring

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.filter, str):
            raise InputError(f"filter: expected a filter name (string), got {self.filter!r}")
        filter_function(self.filter)  # an unknown name fails here, not at the first apply
        object.__setattr__(self, "filter", self.filter.lstrip("_"))

    def _apply(self, x, *, train, labels, rng):
        return apply_filter(x, self.filter)
