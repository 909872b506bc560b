"""Planted all-to-one footprint for FLARE's completion (footprint_completion, complete_runs): 2,000 clean samples
over 4 labels and 400 poison relabelled 0 whose trigger shows in the first two of 12 columns."""

import numpy as np


def relabelled_half_flagged(seed=0):
    """2,000 clean samples over 4 labels (500 each) and 400 all-to-one poison relabelled 0 whose trigger
    shows in the first two columns; flags: the first half of the poison, as a cluster that held only part of it."""
    rng = np.random.default_rng(seed)
    y = np.r_[np.repeat(np.arange(4), 500), np.zeros(400, int)]
    truth = np.r_[np.zeros(2000, bool), np.ones(400, bool)]
    X = rng.normal(0, 1, (2400, 12))
    X[:2000, 2:6] += np.eye(4)[y[:2000]] * 3  # the classes' look
    X[truth, :2] += 4.0  # the trigger
    flags = np.zeros(2400, bool)
    flags[2000:2200] = True
    return X.astype(np.float32), y, truth, flags
