"""What an HDBSCAN fit hands back, in plain arrays whatever the backend."""

from dataclasses import dataclass

import numpy as np

from backdoor_engine.cluster.condensed_tree import CondensedTree


@dataclass(frozen=True)
class HDBSCANResult:
    """labels: int64 [N], -1 for noise; probabilities: float64 [N], membership strength;
    condensed_tree: the condensed cluster hierarchy; single_linkage: float64 [N-1, 4] in scipy's
    linkage layout (left child, right child, mutual-reachability distance, size), the input of
    `cluster.cut_single_linkage`; backend: the library that ran ("hdbscan" or "cuml")."""

    labels: np.ndarray
    probabilities: np.ndarray
    condensed_tree: CondensedTree
    single_linkage: np.ndarray
    backend: str


def result_from_clusterer(clusterer, backend: str) -> HDBSCANResult:
    """From a fitted hdbscan.HDBSCAN or cuml HDBSCAN (both expose the hdbscan library's tree classes)."""
    return HDBSCANResult(
        labels=np.asarray(clusterer.labels_, dtype=np.int64),
        probabilities=np.asarray(clusterer.probabilities_, dtype=np.float64),
        condensed_tree=CondensedTree.from_hdbscan(clusterer),
        single_linkage=np.asarray(clusterer.single_linkage_tree_.to_numpy(), dtype=np.float64),
        backend=backend,
    )
