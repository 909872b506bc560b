"""FLARE, ours (opt-in, `source_minority`): the footprint's label as a minority inside one source class's cluster.

An all-to-one model does not always carry its poison out of the source class: in the chosen subspace the
relabelled samples of one source class can stay inside that class's cluster (IAD subset seed 9: 80 samples
labelled 0, all poison, among 816 trousers, in every run's tree). A clean cluster of one class holds other
labels too, but spread over the classes that look like it. The relabelled poison shows instead as the footprint's
label far ahead of every other off-label (80 against 1 there; the clean pullovers' label-0 share, 23-30, trailed
another off-label at 44-117). Stages:
  label_minorities   in one run's tree, the nodes that are mostly one other class and whose members with the
                     footprint's label outnumber every other off-label `ratio` times: those members
  minority_members   where the flags are the all-to-one footprint, the label's unflagged samples that most of
                     the runs' trees put in such a node
Development rows and their numbers: benchmarks/RESULTS.md, issue 17, session 40.
"""

from __future__ import annotations

import numpy as np

from ..cluster import condensed_tree as ct


def label_minorities(tree, y: np.ndarray, label: int, *, purity: float, ratio: float,
                     min_members: int) -> tuple[np.ndarray, list[dict]]:
    """(mask of `label`'s samples in a minority node of `tree`, those nodes): nodes whose largest label is another
    class at >= `purity` of the node and whose `label` members are >= `min_members` and >= `ratio` times the count
    of every other label besides that class."""
    found = np.zeros(len(y), bool)
    nodes = []
    n_labels = max(label + 1, int(y.max()) + 1)
    for node, rows in ct.all_members(tree).items():
        counts = np.bincount(y[rows], minlength=n_labels)
        host = int(np.argmax(counts))
        if host == label or counts[host] < purity * len(rows) or counts[label] < min_members:
            continue
        others = np.delete(counts, [host, label])
        nearest = int(others.max()) if len(others) else 0
        if counts[label] < ratio * nearest:
            continue
        found[rows[y[rows] == label]] = True
        nodes.append({"node": int(node), "size": int(len(rows)), "host": host, "members": int(counts[label]),
                      "next_off_label": nearest})
    return found, nodes


def minority_members(flags: np.ndarray, runs: list, y: np.ndarray, params) -> tuple[np.ndarray, dict | None]:
    """(samples to add, summary or None): where `flags` are the all-to-one footprint (flagged_makeup's "inflated"),
    its label's unflagged samples that the trees of most runs (those with a tree) put in a minority node."""
    from .flare import flagged_makeup

    add = np.zeros(len(flags), bool)
    trees = [r.condensed_tree for r in runs if r.condensed_tree is not None]
    if not flags.any() or not trees:
        return add, None
    makeup = flagged_makeup(flags, y, params.island_purity)
    label = int(makeup["top_label"])
    summary = {"label": label, "applied": False}
    if not makeup["inflated"]:
        summary["reason"] = "the flags are not the all-to-one footprint"
        return add, summary
    votes = np.zeros(len(flags), np.int64)
    per_run = []
    for tree in trees:
        found, nodes = label_minorities(tree, y, label, purity=params.island_purity,
                                        ratio=params.minority_ratio, min_members=params.minority_min_members)
        votes += found
        per_run.append(nodes)
    add = (2 * votes > len(trees)) & ~flags & (y == label)
    summary.update(applied=bool(add.any()), added=int(add.sum()), runs=len(trees), nodes=per_run)
    if not add.any():
        summary["reason"] = "no minority of the label in most runs' trees"
    return add, summary
