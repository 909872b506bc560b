"""Flat clustering from a single-linkage tree cut at one distance (the official FLARE labelling step).

Same partition as the hdbscan library's `single_linkage_tree_.get_clusters(cut, min_cluster_size)`:
samples joined by merges at distance < cut form one group, groups smaller than min_cluster_size are
noise (-1). Label numbers differ from the library's (its union-find representatives order them):
here clusters are numbered in order of their first sample, so sample 0's cluster is 0 unless noise.
"""

import numpy as np

from backdoor_engine.cluster.validation import integer, real
from backdoor_engine.errors import InputError


def cut_single_linkage(single_linkage, cut_distance: float, min_cluster_size: int) -> np.ndarray:
    """int64 [N] labels from a float [N-1, 4] linkage (left, right, distance, size; scipy layout)."""
    linkage = _checked_linkage(single_linkage)
    cut_distance = real(cut_distance, "cut_distance")
    min_cluster_size = integer(min_cluster_size, "min_cluster_size", 1)
    n_points = linkage.shape[0] + 1
    # Row i creates node n_points + i from two earlier nodes; a merge below the cut links both
    # children to it. The links form a forest whose trees are the groups: follow each sample's
    # links to its tree's top by pointer jumping (log of the tree height in vectorised passes).
    top = np.arange(2 * n_points - 1)
    below = linkage[:, 2] < cut_distance
    merged = n_points + np.flatnonzero(below)
    top[linkage[below, 0].astype(np.int64)] = merged
    top[linkage[below, 1].astype(np.int64)] = merged
    while True:
        jumped = top[top]
        if np.array_equal(jumped, top):
            break
        top = jumped
    groups, first_sample, group_of, sizes = np.unique(
        top[:n_points], return_index=True, return_inverse=True, return_counts=True
    )
    kept = sizes >= min_cluster_size
    label_of_group = np.full(groups.size, -1, dtype=np.int64)
    kept_in_sample_order = np.flatnonzero(kept)[np.argsort(first_sample[kept], kind="stable")]
    label_of_group[kept_in_sample_order] = np.arange(kept_in_sample_order.size)
    return label_of_group[group_of]


def _checked_linkage(single_linkage) -> np.ndarray:
    linkage = np.asarray(single_linkage, dtype=np.float64)
    if linkage.ndim != 2 or linkage.shape[1] != 4:
        raise InputError(f"single_linkage must have shape [N-1, 4], got {linkage.shape}")
    if np.isnan(linkage[:, 2]).any():
        raise InputError("single_linkage distances (column 2) must not be NaN")
    children = linkage[:, :2]
    created = linkage.shape[0] + 1 + np.arange(linkage.shape[0])
    # Every child must be an integer id made before its row and used once: a tree, no cycles.
    valid = (children == np.round(children)) & (children >= 0) & (children < created[:, None])
    if not valid.all():
        row = int(np.argwhere(~valid)[0, 0])
        raise InputError(f"single_linkage row {row} has children {children[row].tolist()}, not earlier node ids")
    if np.unique(children).size != children.size:
        raise InputError("single_linkage uses a node as a child twice; it is not a tree")
    return linkage
