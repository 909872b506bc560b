"""FLARE's zoom stage (ours, issue 17; opt-in with FlareParams.footprint_zoom).

Where the voted flags are the all-to-one footprint but leave much of the label's excess unexplained, the rest of the
relabelled poison can sit inside a large cluster of benign classes that the whole-set embedding never divides
(measured: IAD's poison drawn from the clothing classes, inside one cluster of 5.5-6.6k clothing samples, while the
footwear-source poison split off; RESULTS.md, issue 17, session 38). Embedded and clustered on its own, that cluster
shows the trigger's population. Three plain stages, then one function that chains them:

1. `zoom_region`: the cluster to look into. From the root of the representative run's condensed tree, step into the
   child holding the most of the label's unflagged samples while it holds at least half of those its parent holds
   and at least the unexplained excess of them (room for the rest of the footprint).
2. `embed_region`: the region's rows of the run's subspace columns, embedded (UMAP, the scan's settings and seed) and
   clustered (HDBSCAN, min_cluster_size) alone.
3. `read_zoomed`: the region's tree, top-down, for the first cluster that reads as the rest of the footprint with
   the attack's cover samples (the trigger on samples that keep their true label, IAD's cross-trigger samples): the
   label at least off_label_purity of it and its excess covering half of it, the other labels spread over many
   classes (the top third of them under class_neighbour_share of its other-label members; a clean class keeps the
   few classes it is confused with, and a pure one has no others), and the label under island_rest_share of the rest
   of its split (a sub-island of the clean class splits from the rest of its class). It must hold at least
   min_cluster_size of the label's unflagged samples and at most the unexplained excess x K / (K - 1) +
   min_cluster_size of them (footprint_room: the label's own triggered samples keep it, as exclude_beside_complete
   allows). Its unflagged members of the label are flagged; its other labels are not.
   A cluster of relabelled poison alone is not read: zoomed, the label's clean class can split off as purely (on
   planted data, the clean class was read so), and nothing here tells the two apart.
"""

from __future__ import annotations

import numpy as np

from .. import cluster


def unflagged_of_label(flags: np.ndarray, y: np.ndarray, label: int) -> np.ndarray:
    return ~flags & (y == label)


def zoom_region(tree, flags: np.ndarray, y: np.ndarray, label: int, unexplained: int = 0
                ) -> tuple[int | None, list[int]]:
    """(the node to zoom into, the nodes stepped through from the root): the deepest node reached by stepping into
    the child that holds the most of `label`'s unflagged samples while it holds at least half of those its parent
    holds and at least `unexplained` of them (a smaller node cannot hold the rest of the footprint: a step past it
    follows the label's clean class alone); None where no step is taken (the root: zooming would embed the whole
    set again)."""
    wanted = unflagged_of_label(flags, y, label)
    members = cluster.all_members(tree)
    node, path = tree.root, [int(tree.root)]
    while True:
        children = cluster.cluster_children(tree, node)
        if not children:
            break
        held = [int(wanted[members[c]].sum()) for c in children]
        best = int(np.argmax(held))
        if 2 * held[best] < int(wanted[members[node]].sum()) or held[best] < unexplained:
            break
        node = children[best]
        path.append(int(node))
    return (None if node == tree.root else int(node)), path


def embed_region(X: np.ndarray, params) -> object:
    """HDBSCAN's fit of the region's rows `X` (the run's subspace columns) embedded alone with the scan's UMAP
    settings and seed."""
    from .flare import reduce_dimension

    X = reduce_dimension(X, params.pca_components, params.random_state)
    embedding = cluster.umap(X, n_neighbors=min(params.n_neighbors, len(X) - 1), min_dist=params.min_dist,
                             n_components=params.n_components, random_state=params.random_state,
                             backend=params.umap_backend)
    return cluster.hdbscan(embedding, min_cluster_size=params.min_cluster_size, backend=params.hdbscan_backend)


def read_zoomed(tree, rows: np.ndarray, flags: np.ndarray, y: np.ndarray, label: int, unexplained: int,
                params) -> tuple[np.ndarray | None, list[dict]]:
    """(the global ids of the zoomed cluster read as the rest of the footprint, or None; one row per cluster
    examined). `tree` clusters `rows` (global sample ids, in its sample order)."""
    from .flare import class_makeup, footprint_room, label_excess

    excess = label_excess(y)
    most = footprint_room(unexplained, y, params.min_cluster_size)
    wanted = unflagged_of_label(flags, y, label)
    members = cluster.all_members(tree)
    covers_options = dict(island_purity=params.off_label_purity, footprint_purity=None,
                          island_rest_share=params.island_rest_share)
    examined, frontier = [], [tree.root]
    while frontier:
        node = frontier.pop(0)
        children = cluster.cluster_children(tree, node)
        if len(children) < 2:
            continue
        groups = [rows[members[c]] for c in children]
        within = np.concatenate(groups)
        for child, group in zip(children, groups):
            mixed = class_makeup(y, group, within, excess, params.class_coverage, **covers_options)
            new = int(wanted[group].sum())
            spread = (params.class_neighbour_share is not None
                      and mixed["neighbour_share"] < params.class_neighbour_share)
            reading = "footprint with covers" if mixed["inflated"] and spread else None
            row = {"node": int(child), "size": int(len(group)), "top_label": mixed["top_label"],
                   "purity": round(mixed["purity"], 4), "neighbour_share": mixed["neighbour_share"],
                   "rest_share": mixed["rest_share"], "unflagged_of_label": new, "reading": reading}
            examined.append(row)
            if reading is None or mixed["top_label"] != label:
                frontier.append(child)
                continue
            if not params.min_cluster_size <= new <= most:
                row["reading"] = (f"{reading}, but {new} unflagged of the label is outside "
                                  f"[{params.min_cluster_size}, {int(most)}]")
                frontier.append(child)
                continue
            return group, examined
    return None, examined


def zoom_footprint(flags: np.ndarray, features: np.ndarray, layout, y: np.ndarray, run, params, *,
                   stage=None) -> tuple[np.ndarray, dict | None]:
    """(samples to add, summary or None): the zoom stage on the voted `flags`, in the representative `run`'s tree
    and subspace. Applies where the flags are the all-to-one footprint and the label's excess exceeds its flagged
    samples by at least min_cluster_size (the completion's gate)."""
    from .flare import subspace_matrix, unexplained_excess

    add = np.zeros(len(flags), bool)
    if not flags.any() or run.condensed_tree is None:
        return add, None
    makeup, unexplained = unexplained_excess(flags, y, params.island_purity)
    label = int(makeup["top_label"])
    summary = {"label": label, "unexplained": unexplained, "applied": False}
    if not makeup["inflated"] or unexplained < params.min_cluster_size:
        summary["reason"] = "the flags are not an incomplete all-to-one footprint"
        return add, summary
    node, path = zoom_region(run.condensed_tree, flags, y, label, unexplained)
    summary["path"] = path
    if node is None:
        summary["reason"] = "no cluster below the root holds most of the label's unflagged samples"
        return add, summary
    rows = cluster.members(run.condensed_tree, node)
    summary.update(region_node=node, region_size=int(len(rows)))
    if len(rows) <= 2 * params.min_cluster_size:
        summary["reason"] = "the region is too small to divide"
        return add, summary
    X = subspace_matrix(np.asarray(features)[rows], layout, run.subspace, params.reduce)
    if stage is not None:  # a UMAP of the region: said before it runs, as the runs' are
        stage("zoom", X.shape)
    fit = embed_region(X, params)
    found, examined = read_zoomed(fit.condensed_tree, rows, flags, y, label, unexplained, params)
    summary["clusters"] = examined
    if found is None:
        summary["reason"] = "no cluster of the region reads as the rest of the footprint"
        return add, summary
    add[found] = True
    add &= unflagged_of_label(flags, y, label)
    summary.update(applied=True, added=int(add.sum()))
    return add, summary
