"""Condensed-tree functions on a hand-checkable tree and on real trees from the hdbscan library."""

import hdbscan as hdbscan_library
import numpy as np
import pytest
from hdbscan._hdbscan_tree import compute_stability

from backdoor_engine import cluster
from backdoor_engine.cluster import CondensedTree, Split
from backdoor_engine.errors import InputError

# Ten samples (root 10). Root -> cluster 11 (6 samples) and 12 (3) at lambda 1, sample 9 at 0.5;
# 11 -> sample 0 at 2, clusters 13 (3) and 14 (2) at 3; 13 -> samples 1, 2, 3 at 4, 5, 6;
# 14 -> samples 4, 5 at 7; 12 -> samples 6, 7, 8 at 1.5, 2.5, 3.5.
HAND_ROWS = [
    (10, 11, 1.0, 6), (10, 12, 1.0, 3), (10, 9, 0.5, 1),
    (11, 0, 2.0, 1), (11, 13, 3.0, 3), (11, 14, 3.0, 2),
    (13, 1, 4.0, 1), (13, 2, 5.0, 1), (13, 3, 6.0, 1),
    (14, 4, 7.0, 1), (14, 5, 7.0, 1),
    (12, 6, 1.5, 1), (12, 7, 2.5, 1), (12, 8, 3.5, 1),
]  # fmt: skip


def tree_from_rows(rows, lambda_scale=1.0) -> CondensedTree:
    parent, child, lambda_val, child_size = (np.array(column) for column in zip(*rows))
    return CondensedTree(parent, child, lambda_val * lambda_scale, child_size)


@pytest.fixture(scope="module")
def hand_tree():
    return tree_from_rows(HAND_ROWS)


def test_hand_tree_stabilities(hand_tree):
    # (lambda - birth) * size summed over each cluster's rows; births 0, 1, 1, 3, 3.
    assert cluster.cluster_stabilities(hand_tree) == {10: 9.5, 11: 11.0, 12: 4.5, 13: 6.0, 14: 8.0}


def test_hand_tree_start_and_walk(hand_tree):
    assert hand_tree.root == 10
    assert cluster.largest_first_level_cluster(hand_tree) == 11
    # 11 (born at 1) loses its largest child 13 at 3; 13 (born at 3) loses sample 1, the first of
    # its equal-size rows, at 4; sample 1 has no children, so the walk ends there.
    assert cluster.lambda_gaps(hand_tree, 11, depth=3) == [
        Split(parent=11, child=13, lambda_val=3.0, child_size=3, gap=2.0),
        Split(parent=13, child=1, lambda_val=4.0, child_size=1, gap=1.0),
    ]
    assert cluster.lambda_gaps(hand_tree, 10, depth=1) == [Split(10, 11, 1.0, 6, 1.0)]


def test_second_step_of_the_walk_can_be_a_single_sample():
    # Root 10 -> 11 (9 samples) at 1; 11 -> 12 (5) and 13 (4) at 1.2; 12's samples leave at 4..6.
    rows = [(10, 11, 1.0, 9), (10, 9, 1.0, 1), (11, 12, 1.2, 5), (11, 13, 1.2, 4)]
    rows += [(12, sample, 4.0 + 0.5 * sample, 1) for sample in range(5)]
    rows += [(13, sample, 2.0, 1) for sample in range(5, 9)]
    tree = tree_from_rows(rows)
    # Gap 0.2 at the first step, then 12 (born at 1.2) first loses sample 0 at 4: gap 2.8.
    first, second = cluster.lambda_gaps(tree, 11, depth=3)
    assert first.child == 12 and first.gap == pytest.approx(0.2)
    assert second == Split(parent=12, child=0, lambda_val=4.0, child_size=1, gap=pytest.approx(2.8))


def test_gaps_relative_to_the_lambda_range_are_unchanged_by_rescaling(hand_tree):
    scaled = tree_from_rows(HAND_ROWS, lambda_scale=10.0)
    # lambda range 7 - 0.5 = 6.5; the first gap (2.0) is 0.3077 of it, in either unit.
    assert cluster.lambda_range(hand_tree) == 6.5
    relative = [[step.gap / cluster.lambda_range(tree) for step in cluster.lambda_gaps(tree, 11, 3)]
                for tree in (hand_tree, scaled)]
    np.testing.assert_allclose(relative[0], relative[1])
    assert relative[0][0] == pytest.approx(2.0 / 6.5)


def test_bad_arguments_are_named(hand_tree):
    with pytest.raises(InputError, match="node 99 is not in the condensed tree"):
        cluster.lambda_gaps(hand_tree, 99, 3)
    with pytest.raises(InputError, match="start must be an integer"):
        cluster.lambda_gaps(hand_tree, None, 3)
    with pytest.raises(InputError, match="depth must be"):
        cluster.lambda_gaps(hand_tree, 11, 0)
    with pytest.raises(InputError, match="one length"):
        CondensedTree([10, 10], [1], [0.5], [1])


def test_no_cluster_under_the_root_gives_no_start():
    tree = tree_from_rows([(3, 0, 1.0, 1), (3, 1, 2.0, 1), (3, 2, 2.0, 1)])
    assert cluster.largest_first_level_cluster(tree) is None


# ---- real trees from the hdbscan library ----


def blobs_of_unequal_density(rng):
    sizes, spreads, centres = (300, 200, 100), (1.0, 0.3, 0.6), ((0, 0), (6, 0), (0, 7))
    return np.concatenate([rng.normal(c, s, size=(n, 2)) for n, s, c in zip(sizes, spreads, centres)])


def touching_blobs_with_noise(rng):
    first, second = rng.normal((0, 0, 0), 1.0, size=(300, 3)), rng.normal((3.5, 0, 0), 0.7, size=(200, 3))
    far, noise = rng.normal((12, 0, 0), 1.0, size=(100, 3)), rng.uniform(-5, 15, size=(60, 3))
    return np.concatenate([first, second, far, noise])


def with_exact_duplicates(rng):
    # More duplicates than min_samples: zero core distance, so infinite lambdas in the tree.
    return np.concatenate([np.full((40, 2), 3.0), rng.normal(0, 1, size=(200, 2)), rng.normal(8, 1, size=(150, 2))])


@pytest.fixture(scope="module", params=[blobs_of_unequal_density, touching_blobs_with_noise, with_exact_duplicates])
def real_clusterer(request):
    data = request.param(np.random.default_rng(0))
    return hdbscan_library.HDBSCAN(min_cluster_size=15, min_samples=10).fit(data)


def test_stabilities_equal_the_library_computation(real_clusterer):
    tree = CondensedTree.from_hdbscan(real_clusterer)
    reference = {int(key): value for key, value in compute_stability(real_clusterer.condensed_tree_.to_numpy()).items()}
    ours = cluster.cluster_stabilities(tree)
    assert ours.keys() == reference.keys() and len(ours) >= 3
    np.testing.assert_allclose([ours[key] for key in reference], list(reference.values()), rtol=1e-12)


def test_start_is_the_largest_cluster_under_the_root(real_clusterer):
    tree = CondensedTree.from_hdbscan(real_clusterer)
    start = cluster.largest_first_level_cluster(tree)
    under_root = (tree.parent == tree.root) & (tree.child >= tree.root)
    assert start == tree.child[under_root][np.argmax(tree.child_size[under_root])]


def official_first_large_drop(tree: CondensedTree, node, xi, depth):
    """SEED_NOTES 1.3 transcribed: a stack, at most depth iterations, the largest child row
    (first on ties); None for a childless node where the official code raises."""
    stack, iterations = [node], 0
    while stack and iterations < depth:
        current = stack.pop()
        current_lambda = tree.lambda_val[np.flatnonzero(tree.child == current)[0]]
        children = np.flatnonzero(tree.parent == current)
        if children.size == 0:
            return None
        largest = children[np.argmax(tree.child_size[children])]
        if tree.lambda_val[largest] - current_lambda > xi:
            return int(tree.child[largest])
        stack.append(tree.child[largest])
        iterations += 1
    return None


def test_the_walk_stops_where_the_official_loop_does(real_clusterer):
    tree = CondensedTree.from_hdbscan(real_clusterer)
    start = cluster.largest_first_level_cluster(tree)
    gaps = [step.gap for step in cluster.lambda_gaps(tree, start, depth=4)]
    assert len(gaps) >= 2
    # Thresholds at, just under and just over every gap, where strictness and order matter.
    for xi in [0.0] + [g * f for g in gaps for f in (0.999, 1.0, 1.001)]:
        for depth in (1, 2, 3, 4):
            drop = next((step.child for step in cluster.lambda_gaps(tree, start, depth) if step.gap > xi), None)
            assert drop == official_first_large_drop(tree, start, xi, depth)


def test_hand_tree_children_persistence_and_members(hand_tree):
    assert cluster.cluster_children(hand_tree, 10) == [11, 12]  # largest first
    assert cluster.cluster_children(hand_tree, 13) == []
    # Divides at 3 after appearing at 1; leaves last until their last sample leaves.
    assert cluster.persistence(hand_tree, 11) == 2.0
    assert cluster.persistence(hand_tree, 13) == 3.0 and cluster.persistence(hand_tree, 12) == 2.5
    assert cluster.persistence(hand_tree, 10) == 1.0
    np.testing.assert_array_equal(cluster.members(hand_tree, 11), [0, 1, 2, 3, 4, 5])
    np.testing.assert_array_equal(cluster.members(hand_tree, 14), [4, 5])
    np.testing.assert_array_equal(cluster.members(hand_tree, 10), np.arange(10))
    with pytest.raises(InputError, match="no rows"):
        cluster.persistence(hand_tree, 3)


def test_members_match_the_library_leaves_and_partition_the_tree(real_clusterer):
    tree = CondensedTree.from_hdbscan(real_clusterer)
    records = real_clusterer.condensed_tree_.to_numpy()
    for leaf in real_clusterer.condensed_tree_._select_clusters():  # the library's chosen clusters
        direct = records["child"][(records["parent"] == leaf) & (records["child_size"] == 1)]
        below = [c for c in records["child"][records["parent"] == leaf] if c >= tree.root]
        expected = np.concatenate([direct] + [cluster.members(tree, c) for c in below])
        np.testing.assert_array_equal(cluster.members(tree, leaf), np.sort(expected))
    children = cluster.cluster_children(tree, tree.root)
    parts = [cluster.members(tree, c) for c in children]
    left_root = records["child"][(records["parent"] == tree.root) & (records["child_size"] == 1)]
    assert sum(map(len, parts)) + len(left_root) == tree.root
    assert len(np.unique(np.concatenate(parts + [left_root]))) == tree.root


def test_all_members_at_once_equal_members_node_by_node(real_clusterer, hand_tree):
    for tree in (CondensedTree.from_hdbscan(real_clusterer), hand_tree):
        every = cluster.all_members(tree)
        nodes = np.unique(np.r_[tree.root, tree.child[tree.child >= tree.root]])
        assert sorted(every) == nodes.tolist()
        for node in nodes:
            np.testing.assert_array_equal(every[int(node)], cluster.members(tree, int(node)))
