"""FeatureSet: everything one extraction pass captured, row i belonging to sample ids[i]."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from backdoor_engine.engine.layout import FeatureLayout
from backdoor_engine.errors import InputError

# What one pass can capture, in the order FeatureSet and the feature store list them.
CAPTURES = ("bn_minima", "penultimate", "logits")


@dataclass(frozen=True, eq=False, repr=False)
class FeatureSet:
    """Per-sample features keyed by id; a capture that was not asked for is None.

    bn_minima: [N, layout.num_columns] float32 (float16 from a float16 store), the per-channel BN
    minima of every BatchNorm2d (`layout.per_layer(bn_minima)` is the official one-column-per-layer feature).
    penultimate: [N, D] float32 input of the classifier head; logits: [N, K] float32.
    metadata: fingerprints of model and dataset, preprocessing and run settings, timings.
    """

    ids: np.ndarray
    y: np.ndarray
    layout: FeatureLayout | None = None
    bn_minima: np.ndarray | None = None
    penultimate: np.ndarray | None = None
    logits: np.ndarray | None = None
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.ids)
        if np.ndim(self.ids) != 1 or np.shape(self.y) != (n,):
            raise InputError(f"ids and y must be 1-D of one length, got shapes {np.shape(self.ids)} and "
                             f"{np.shape(self.y)}")
        if (self.layout is None) != (self.bn_minima is None):
            raise InputError("bn_minima and its layout come together: give both or neither")
        for name in CAPTURES:
            values = getattr(self, name)
            if values is not None and (values.ndim != 2 or values.shape[0] != n
                                       or values.dtype not in (np.float32, np.float16)):
                raise InputError(f"{name} must be float32 or float16 [N={n}, columns], got {values.dtype} "
                                 f"{values.shape}")
        if self.bn_minima is not None and self.bn_minima.shape[1] != self.layout.num_columns:
            raise InputError(f"bn_minima has {self.bn_minima.shape[1]} columns, its layout "
                             f"{self.layout.num_columns}")

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{name}={getattr(self, name).shape}" for name in self.captured)
        return f"FeatureSet(n={len(self)}, {shapes})"

    @property
    def captured(self) -> tuple[str, ...]:
        """Names of the feature arrays this set holds."""
        return tuple(name for name in CAPTURES if getattr(self, name) is not None)
