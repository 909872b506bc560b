"""HDBSCAN's condensed tree as plain arrays, and the FLARE walk down it (SEED_NOTES section 1.3).

Layout (the `hdbscan` library's): one row per edge, `parent` -> `child`, with the lambda = 1 / distance
at which the child left the parent and the child's size. Ids below the root are samples (size 1);
the root is the number of samples and cluster ids count up from it.
"""

from dataclasses import dataclass

import numpy as np

from backdoor_engine.cluster.validation import integer
from backdoor_engine.errors import InputError


@dataclass(frozen=True)
class CondensedTree:
    """parent, child, child_size: int64 [E]; lambda_val: float64 [E]."""

    parent: np.ndarray
    child: np.ndarray
    lambda_val: np.ndarray
    child_size: np.ndarray

    def __post_init__(self):
        columns = {
            "parent": self.parent,
            "child": self.child,
            "lambda_val": self.lambda_val,
            "child_size": self.child_size,
        }
        for name, values in columns.items():
            dtype = np.float64 if name == "lambda_val" else np.int64
            object.__setattr__(self, name, np.asarray(values, dtype=dtype))
        lengths = {name: getattr(self, name).shape for name in columns}
        if len(set(lengths.values())) != 1 or self.parent.ndim != 1 or self.parent.size == 0:
            raise InputError(f"condensed tree columns must be non-empty 1-D arrays of one length, got shapes {lengths}")
        if np.isnan(self.lambda_val).any():
            raise InputError("condensed tree lambda_val must not be NaN")

    @property
    def root(self) -> int:
        """Id of the root cluster, which is also the number of samples."""
        return int(self.parent.min())

    def is_cluster(self, node: int) -> bool:
        return node >= self.root

    @classmethod
    def from_hdbscan(cls, clusterer) -> "CondensedTree":
        """From a fitted hdbscan.HDBSCAN (or cuML's, which exposes the same class)."""
        records = clusterer.condensed_tree_.to_numpy()
        return cls(records["parent"], records["child"], records["lambda_val"], records["child_size"])


@dataclass(frozen=True)
class Split:
    """One step down the tree: `parent`'s largest child row, and gap = the child's lambda minus the
    lambda at which `parent` was born (how long parent lasted before its largest child left it)."""

    parent: int
    child: int
    lambda_val: float
    child_size: int
    gap: float


def birth_lambda(tree: CondensedTree, node: int) -> float:
    """Lambda at which node appeared: its own row's lambda_val (first such row), 0 for the root."""
    if node == tree.root:
        return 0.0
    rows = np.flatnonzero(tree.child == node)
    if rows.size == 0:
        raise InputError(f"node {node} is not in the condensed tree (root {tree.root})")
    return float(tree.lambda_val[rows[0]])


def cluster_stabilities(tree: CondensedTree) -> dict[int, float]:
    """Stability of every cluster id (root included), computed as the hdbscan library does:
    sum over a cluster's child rows of (lambda_val - birth lambda of the cluster) * child_size."""
    root = tree.root
    births = np.full(int(max(tree.child.max(), root)) + 1, np.nan)
    # A node's birth is the smallest lambda among the rows that have it as child.
    order = np.lexsort((tree.lambda_val, tree.child))
    first = np.ones(order.size, dtype=bool)
    first[1:] = tree.child[order][1:] != tree.child[order][:-1]
    births[tree.child[order][first]] = tree.lambda_val[order][first]
    births[root] = 0.0
    contributions = (tree.lambda_val - births[tree.parent]) * tree.child_size
    totals = np.bincount(tree.parent - root, weights=contributions, minlength=int(tree.parent.max()) - root + 1)
    return {root + offset: float(total) for offset, total in enumerate(totals)}


def largest_first_level_cluster(tree: CondensedTree) -> int | None:
    """The official FLARE start: child of the row with the largest child_size (first on ties), which
    is the largest cluster under the root. None when the root has no cluster children."""
    row = int(np.argmax(tree.child_size))
    child = int(tree.child[row])
    return child if tree.is_cluster(child) else None


def lambda_gaps(tree: CondensedTree, start: int, depth: int) -> list[Split]:
    """The walk of the official first_large_drop without its stopping test (methods/flare.py's
    `walk_for_stable_split` applies one): from start, at most depth steps, each to the current
    node's largest child row (sample rows included, first on ties). Stops early at a node without
    children (the official code crashes there)."""
    depth = integer(depth, "depth", 1)
    steps = []
    current = integer(start, "start", 0)
    current_birth = birth_lambda(tree, current)
    for _ in range(depth):
        rows = np.flatnonzero(tree.parent == current)
        if rows.size == 0:
            break
        largest = rows[np.argmax(tree.child_size[rows])]
        step = Split(
            parent=current,
            child=int(tree.child[largest]),
            lambda_val=float(tree.lambda_val[largest]),
            child_size=int(tree.child_size[largest]),
            gap=float(tree.lambda_val[largest]) - current_birth,
        )
        steps.append(step)
        current, current_birth = step.child, step.lambda_val
    return steps


def lambda_range(tree: CondensedTree) -> float:
    """Largest finite lambda minus smallest lambda: the scale of `xi_mode="relative"`. Scaling the
    data by s scales every lambda by 1/s, so gaps measured against it do not depend on units."""
    finite = tree.lambda_val[np.isfinite(tree.lambda_val)]
    return float(finite.max() - tree.lambda_val.min()) if finite.size else 0.0


def cluster_children(tree: CondensedTree, node: int) -> list[int]:
    """The clusters `node` divides into (two, or more on ties), largest first; [] for a leaf."""
    rows = np.flatnonzero((tree.parent == node) & (tree.child >= tree.root))
    rows = rows[np.argsort(-tree.child_size[rows], kind="stable")]
    return tree.child[rows].tolist()


def persistence(tree: CondensedTree, node: int) -> float:
    """FLARE's cluster stability (paper Def. IV.1): the lambda at which `node` divides into clusters
    minus the lambda at which it appeared. A leaf never divides: it lasts until its last sample leaves."""
    rows = tree.parent == node
    if not rows.any():
        raise InputError(f"node {node} has no rows in the condensed tree (a sample, or not in the tree)")
    divides = rows & (tree.child >= tree.root)
    end = tree.lambda_val[divides].max() if divides.any() else tree.lambda_val[rows].max()
    return float(end) - birth_lambda(tree, node)


def members(tree: CondensedTree, node: int) -> np.ndarray:
    """Sorted sample ids under `node`: every sample that leaves it or any cluster below it."""
    inside = np.zeros(int(max(tree.child.max(), tree.root)) + 1, dtype=bool)
    inside[node] = True
    frontier = np.array([node])
    while frontier.size:
        below = tree.child[np.isin(tree.parent, frontier)]
        inside[below] = True
        frontier = below[below >= tree.root]
    return np.flatnonzero(inside[: tree.root])


def all_members(tree: CondensedTree) -> dict[int, np.ndarray]:
    """members() of every cluster node at once, children before parents: one pass up the tree instead of a walk
    down it per node (what visits every node would otherwise pay once per node)."""
    points = tree.child < tree.root
    kids: dict[int, list[int]] = {}
    for parent, child in zip(tree.parent[~points].tolist(), tree.child[~points].tolist()):
        kids.setdefault(parent, []).append(child)
    order = [int(tree.root)]
    for node in order:  # grows while it is read: breadth first from the root
        order += kids.get(node, [])
    by_parent = np.argsort(tree.parent[points], kind="stable")
    parents, samples = tree.parent[points][by_parent], tree.child[points][by_parent]
    starts = np.searchsorted(parents, order)
    ends = np.searchsorted(parents, order, side="right")
    out: dict[int, np.ndarray] = {}
    for node, start, end in reversed(list(zip(order, starts, ends))):
        out[node] = np.sort(np.concatenate([samples[start:end]] + [out[c] for c in kids.get(node, [])]))
    return out
