"""One plain `.npz` per captured array, for tools that read numpy rather than the feature store.

    bn_minima.npz    ids [N], y [N] int64, bn_minima [N, sum C] float32, layer_names [L] str, layer_channels [L] int64
    penultimate.npz  ids, y, penultimate [N, D]
    logits.npz       ids, y, logits [N, K]

Rows are in the feature set's order (the source's, less unreadable samples). No object arrays:
`np.load(path, allow_pickle=False)` reads every file. Each file is written atomically.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from backdoor_engine.atomic import atomic_write
from backdoor_engine.engine.feature_set import FeatureSet


def write_capture_npz(features: FeatureSet, directory: str | os.PathLike) -> dict[str, str]:
    """Write DIRECTORY/<capture>.npz for every capture `features` holds; {capture: path}."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in features.captured:
        arrays = {"ids": np.asarray(features.ids), "y": np.asarray(features.y, dtype=np.int64),
                  name: np.asarray(getattr(features, name))}
        if name == "bn_minima":
            arrays["layer_names"] = np.asarray(features.layout.layer_names, dtype=str)
            arrays["layer_channels"] = np.asarray(features.layout.layer_channels, dtype=np.int64)
        path = directory / f"{name}.npz"
        # A file object (not a name) keeps np.savez from appending ".npz" to the temp name.
        with atomic_write(path) as file:
            np.savez(file, **arrays)
        written[name] = str(path)
    return written
