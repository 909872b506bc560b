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


def relabelled_by_source(trigger=5.0, covers=0, seed=0):
    """Six labels of 400 clean samples in 10 columns: 0 (the target) and 1 look alike, 2-4 are one family, 5 is apart;
    400 poison relabelled 0, 100 drawn from each of 2-5, each its source's look plus a trigger in the first two
    columns; `covers` samples of each label 1-5 carry the trigger too and keep their label (IAD's cover samples).
    Flags: the poison drawn from 5, as a cluster that held only that part of it. Returns (X, y, truth, flags)."""
    rng = np.random.default_rng(seed)
    source = np.r_[np.repeat(np.arange(6), 400), np.repeat([2, 3, 4, 5], 100)]
    truth = np.r_[np.zeros(2400, bool), np.ones(400, bool)]
    y = np.where(truth, 0, source)
    look = np.array([[0, 0, 0], [1.5, 0, 0], [0, 6, 0], [0, 7, 1], [0, 6, 2], [0, 0, 8]], float)
    X = rng.normal(0, 1, (2800, 10))
    X[:, 2:5] += look[source]
    covered = (source > 0) & ~truth & (np.arange(2800) % 400 < covers)
    X[truth | covered, :2] += trigger
    return X.astype(np.float32), y, truth, truth & (source == 5)
