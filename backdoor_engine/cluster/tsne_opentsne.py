"""t-SNE on the CPU with openTSNE (FFT-accelerated from 10k samples, Barnes-Hut below: library default)."""

import os

import numpy as np


def tsne_opentsne(X: np.ndarray, *, n_components: int, perplexity: float, random_state: int | None) -> np.ndarray:
    """float32 [N, n_components] embedding of float32 X [N, D]; openTSNE's defaults otherwise (PCA
    initialisation, 750 iterations, exact neighbours below 1000 samples and Annoy above), on every
    core this process may use."""
    from openTSNE import TSNE

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    model = TSNE(n_components=n_components, perplexity=perplexity, random_state=random_state, n_jobs=cores)
    return np.ascontiguousarray(model.fit(X), dtype=np.float32)
