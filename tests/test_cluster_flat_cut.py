"""cut_single_linkage against the hdbscan library's single_linkage_tree_.get_clusters."""

import hdbscan as hdbscan_library
import numpy as np
import pytest

from backdoor_engine import cluster
from backdoor_engine.errors import InputError


def numbered_by_first_sample(labels: np.ndarray) -> np.ndarray:
    """The same partition and noise, clusters renumbered in order of their first sample."""
    renamed = np.full(labels.shape, -1, dtype=np.int64)
    clusters = [label for label in dict.fromkeys(labels.tolist()) if label != -1]
    for number, label in enumerate(clusters):
        renamed[labels == label] = number
    return renamed


def test_hand_linkage():
    # Samples 0+1 and 2+3 merge at distance 1, the two pairs at 2.
    linkage = np.array([[0, 1, 1.0, 2], [2, 3, 1.0, 2], [4, 5, 2.0, 4]])
    cut = cluster.cut_single_linkage
    np.testing.assert_array_equal(cut(linkage, 1.0, 1), [0, 1, 2, 3])  # merges at the cut are not joined
    np.testing.assert_array_equal(cut(linkage, 1.5, 1), [0, 0, 1, 1])
    np.testing.assert_array_equal(cut(linkage, 1.5, 3), [-1, -1, -1, -1])
    np.testing.assert_array_equal(cut(linkage, np.inf, 4), [0, 0, 0, 0])
    np.testing.assert_array_equal(cut(np.empty((0, 4)), 1.0, 1), [0])


def integer_grid_with_gaps(rng):
    # Many equal distances (ties) between grid neighbours, and empty rows that split the grid.
    grid = np.stack(np.meshgrid(np.arange(12), np.arange(12)), axis=-1).reshape(-1, 2).astype(float)
    return grid[(grid[:, 1] % 5) != 4]


def blobs_with_noise(rng):
    blobs = [rng.normal(c, s, size=(n, 2)) for n, s, c in ((200, 1.0, (0, 0)), (120, 0.4, (5, 1)), (60, 0.6, (0, 6)))]
    return np.concatenate(blobs + [rng.uniform(-4, 9, size=(50, 2))])


def high_dimensional_clusters(rng):
    centres = rng.normal(0, 4, size=(3, 10))
    return centres[rng.integers(0, 3, 300)] + rng.normal(size=(300, 10))


@pytest.mark.parametrize("make_data", [integer_grid_with_gaps, blobs_with_noise, high_dimensional_clusters])
def test_same_partition_as_the_library(make_data):
    data = make_data(np.random.default_rng(1))
    tree = hdbscan_library.HDBSCAN(min_cluster_size=8, min_samples=4).fit(data).single_linkage_tree_
    linkage = tree.to_numpy()
    distances = np.unique(linkage[:, 2])
    # Exact merge distances (ties sit there), the midpoints between them, and both ends.
    cuts = np.concatenate([distances[::7], (distances[1:] + distances[:-1])[::7] / 2, [0.0, distances[-1] * 2, np.inf]])
    kinds_of_result = set()
    for cut_distance in cuts:
        for min_cluster_size in (1, 5, 40):
            expected = numbered_by_first_sample(tree.get_clusters(cut_distance, min_cluster_size))
            ours = cluster.cut_single_linkage(linkage, cut_distance, min_cluster_size)
            np.testing.assert_array_equal(ours, expected, err_msg=f"cut {cut_distance}, min size {min_cluster_size}")
            kinds_of_result.add((ours.max() >= 1, (ours == -1).any()))
    # The cuts covered several clusters with and without noise.
    assert {(True, True), (True, False)} <= kinds_of_result


@pytest.mark.parametrize(
    "linkage, message",
    [
        (np.zeros((3, 3)), r"shape \[N-1, 4\]"),
        (np.array([[0, 3, 1.0, 2], [1, 2, 2.0, 3]]), "not earlier node ids"),  # row 0 makes node 3 itself
        (np.array([[0, 1, 1.0, 2], [0, 3, 2.0, 3]]), "child twice"),
        (np.array([[0, 1.5, 1.0, 2]]), "not earlier node ids"),
        (np.array([[0, 1, np.nan, 2]]), "NaN"),
    ],
)
def test_malformed_linkage_is_named(linkage, message):
    with pytest.raises(InputError, match=message):
        cluster.cut_single_linkage(linkage, 1.0, 1)


def test_bad_cut_arguments_are_named():
    linkage = np.array([[0, 1, 1.0, 2]])
    with pytest.raises(InputError, match="cut_distance"):
        cluster.cut_single_linkage(linkage, float("nan"), 1)
    with pytest.raises(InputError, match="min_cluster_size"):
        cluster.cut_single_linkage(linkage, 1.0, 0)
