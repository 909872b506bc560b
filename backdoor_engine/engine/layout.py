"""Which columns of the BN-minima matrix belong to which BatchNorm2d layer.

The matrix holds every layer's per-channel minima side by side, layers in `named_modules()` order.
Both FLARE feature reductions and its subspace search come from it without another forward pass:
`per_layer` gives the official code's one column per layer (the min over a layer's channels is
its min over C*H*W), and `drop_last_layers` slices off the trailing layers the search excludes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from backdoor_engine.errors import InputError


@dataclass(frozen=True)
class FeatureLayout:
    """Names and channel counts of the BatchNorm2d layers whose minima fill the columns, in order."""

    layer_names: tuple[str, ...]
    layer_channels: tuple[int, ...]

    def __post_init__(self) -> None:
        names, channels = tuple(self.layer_names), tuple(self.layer_channels)
        if not names or len(names) != len(channels):
            raise InputError(f"a layout needs one channel count per layer and at least one layer, "
                             f"got {len(names)} names and {len(channels)} counts")
        if not all(isinstance(name, str) for name in names) or len(set(names)) != len(names):
            raise InputError(f"layer names must be distinct strings, got {names}")
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in channels):
            raise InputError(f"layer channel counts must be integers >= 1, got {channels}")
        object.__setattr__(self, "layer_names", names)
        object.__setattr__(self, "layer_channels", channels)

    @property
    def num_layers(self) -> int:
        return len(self.layer_names)

    @property
    def num_columns(self) -> int:
        return sum(self.layer_channels)

    @property
    def layer_slices(self) -> tuple[slice, ...]:
        """The column range of each layer."""
        ends = np.cumsum(self.layer_channels).tolist()
        return tuple(slice(end - count, end) for end, count in zip(ends, self.layer_channels))

    def layer_of_column(self, column: int) -> str:
        """Name of the BN layer that column `column` belongs to."""
        if not 0 <= column < self.num_columns:
            raise InputError(f"column must be in [0, {self.num_columns}), got {column}")
        return self.layer_names[int(np.searchsorted(np.cumsum(self.layer_channels), column, side="right"))]

    def per_layer(self, features: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """[N, L]: each layer's minimum over its channels, the official FLARE feature (reduce="layer")."""
        self._check(features)
        if isinstance(features, torch.Tensor):
            return torch.stack([features[:, columns].amin(dim=1) for columns in self.layer_slices], dim=1)
        starts = [columns.start for columns in self.layer_slices]
        return np.minimum.reduceat(np.asarray(features), starts, axis=1)

    def drop_last_layers(self, features: np.ndarray | torch.Tensor, count: int) -> np.ndarray | torch.Tensor:
        """The columns of the first L - count layers (a view): FLARE's subspace without re-extracting."""
        self._check(features)
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or not 0 <= count < self.num_layers:
            raise InputError(f"count must be an integer in [0, {self.num_layers - 1}] so at least one of the "
                             f"{self.num_layers} layers is left, got {count!r}")
        kept_layers = self.num_layers - int(count)
        return features[:, :self.layer_slices[kept_layers - 1].stop]

    def to_dict(self) -> dict:
        return {"layer_names": list(self.layer_names), "layer_channels": list(self.layer_channels)}

    @classmethod
    def from_dict(cls, data: Mapping) -> FeatureLayout:
        if not isinstance(data, Mapping) or set(data) != {"layer_names", "layer_channels"}:
            keys = sorted(data) if isinstance(data, Mapping) else type(data).__name__
            raise InputError(f"a layout must be a mapping with keys layer_names and layer_channels, got {keys}")
        return cls(tuple(data["layer_names"]), tuple(data["layer_channels"]))

    def _check(self, features) -> None:
        if not isinstance(features, (np.ndarray, torch.Tensor)) or features.ndim != 2 \
                or features.shape[1] != self.num_columns:
            shape = tuple(features.shape) if isinstance(features, (np.ndarray, torch.Tensor)) else type(features).__name__
            raise InputError(f"features must be a 2-D array with this layout's {self.num_columns} columns, got {shape}")
