"""t-SNE on the CPU with openTSNE (FFT-accelerated from 10k samples, Barnes-Hut below: library default)."""

import logging
import os

import numpy as np


def tsne_opentsne(X: np.ndarray, *, n_components: int, perplexity: float, random_state: int | None,
                  init: np.ndarray | None = None, exaggeration_iter: int | None = None,
                  n_iter: int | None = None) -> np.ndarray:
    """float32 [N, n_components] embedding of float32 X [N, D]; openTSNE's defaults otherwise (PCA
    initialisation, 250 exaggerated + 500 iterations, exact neighbours below 1000 samples and Annoy above),
    on every core this process may use. `init`: start from this embedding at its own scale."""
    from openTSNE import TSNE

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    options = {}
    if exaggeration_iter is not None:
        options["early_exaggeration_iter"] = exaggeration_iter
    if n_iter is not None:
        options["n_iter"] = n_iter
    model = TSNE(n_components=n_components, perplexity=perplexity, random_state=random_state, n_jobs=cores,
                 **options)
    if init is None:
        return np.ascontiguousarray(model.fit(X), dtype=np.float32)
    # openTSNE warns on any initial embedding wider than std 1e-4, the scale of a fresh start; continuing from
    # an earlier fit at its own scale is the point here.
    logger = logging.getLogger("openTSNE.tsne")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return np.ascontiguousarray(model.fit(X, initialization=init), dtype=np.float32)
    finally:
        logger.setLevel(level)
