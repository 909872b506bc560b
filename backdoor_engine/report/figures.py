"""Plots for the HTML report, rendered to PNG bytes (headless Agg backend)."""

from __future__ import annotations

import io
import warnings

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _to_png(fig) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # A file name in a script the font lacks (CJK, ...) shows as boxes; a warning per glyph is only noise.
        warnings.filterwarnings("ignore", message="Glyph .* missing from font", category=UserWarning)
        fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return buffer.getvalue()


def embedding_png(embedding: np.ndarray, flags: np.ndarray, truth: np.ndarray | None = None) -> bytes:
    """2-D embedding coloured by flag, and beside it by ground truth when known."""
    plt = _pyplot()
    panels = [("flagged by the detector", np.asarray(flags, bool))]
    if truth is not None:
        panels.append(("ground truth: poisoned", np.asarray(truth, bool)))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 5), squeeze=False)
    size = max(0.5, min(6.0, 20000 / max(len(embedding), 1)))
    for ax, (title, marked) in zip(axes[0], panels):
        ax.scatter(*embedding[~marked].T, s=size, c="#9aa5b1", linewidths=0, label=f"no ({(~marked).sum()})")
        ax.scatter(*embedding[marked].T, s=size, c="#d64545", linewidths=0, label=f"yes ({marked.sum()})")
        ax.set_title(title)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(loc="best", markerscale=4 / size ** 0.5)
    return _to_png(fig)


def _image_grid(images, titles: list[str], *, columns: int, cell: tuple[float, float], fontsize: int):
    """A figure with uint8 H x W x C images in rows of `columns`, a caption above each; returns (fig, used axes)."""
    plt = _pyplot()
    rows = (max(len(images), 1) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(cell[0] * columns, cell[1] * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    used = list(axes.flat[:len(images)])
    for ax, image, title in zip(used, images, titles):
        _show(ax, image, title, fontsize)
    return fig, used


def montage_png(images: np.ndarray, titles: list[str], *, columns: int = 8) -> bytes:
    """A grid of uint8 N x H x W x C images with a caption under each."""
    fig, _ = _image_grid(images, titles, columns=columns, cell=(1.5, 1.7), fontsize=7)
    return _to_png(fig)


def subspace_search_png(steps: list[dict]) -> bytes:
    """FLARE's subspace loop: the largest lambda gap found with each number of dropped layers vs the threshold."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.2))
    dropped = [s["dropped_layers"] for s in steps]
    gaps = [max(s["gaps"], default=0.0) for s in steps]
    # Red: the subspace the labelling used; amber: a stable split whose splits were all benign classes (excused).
    colours = ["#9aa5b1" if not s["split"] else "#e0a43a" if s.get("excused") else "#d64545" for s in steps]
    ax.bar(dropped, gaps, color=colours)
    if any(s.get("excused") for s in steps):
        ax.bar([0], [0], color="#e0a43a", label="stable split of benign classes only (excused)")
    # One dashed segment per bar: a line plot would not show with a single step.
    ax.hlines([s["threshold"] for s in steps], np.subtract(dropped, 0.4), np.add(dropped, 0.4), colors="k",
              linestyles="--", label="threshold (xi)")
    ax.set_xlabel("trailing BN layers dropped")
    ax.set_ylabel("largest lambda gap on the walk")
    ax.set_xticks(dropped)
    ax.legend()
    return _to_png(fig)


def condensed_tree_png(tree, marks: dict[int, tuple[str, str]] | None = None, *, max_depth: int = 6) -> bytes:
    """HDBSCAN's condensed tree as an icicle plot: one bar per cluster from the lambda where it appears
    (top) to the lambda where it divides or empties (bottom), width = its size; `marks` colours chosen
    nodes {node: (colour, label)} (the stable cluster, the flagged one). Clusters deeper than
    `max_depth` below the root are left out to keep the plot readable."""
    from ..cluster import birth_lambda, cluster_children, persistence

    plt = _pyplot()
    marks = marks or {}
    fig, ax = plt.subplots(figsize=(8, 4.2))
    root = tree.root
    size_of = {root: root}
    rows = tree.child >= root
    size_of.update(zip(tree.child[rows].tolist(), tree.child_size[rows].tolist()))
    # Depth-first, children side by side under their parent, each as wide as its size.
    finite = tree.lambda_val[np.isfinite(tree.lambda_val)]
    deepest = float(finite.max()) if finite.size else 1.0
    stack = [(root, 0.0, 0)]
    labelled = set()
    while stack:
        node, left, depth = stack.pop()
        top = birth_lambda(tree, node)
        bottom = min(top + persistence(tree, node), deepest)  # duplicate samples leave at lambda = inf
        colour, label = marks.get(node, ("#9aa5b1", None))
        width = size_of[node]
        ax.add_patch(plt.Rectangle((left, top), width, bottom - top, facecolor=colour, edgecolor="white",
                                   linewidth=0.5, label=label if label and label not in labelled else None))
        if label:
            labelled.add(label)
        children = cluster_children(tree, node)
        if depth < max_depth and children:
            offset = left + (width - sum(size_of[c] for c in children)) / 2
            for child in children:
                stack.append((child, offset, depth + 1))
                offset += size_of[child]
    ax.set_xlim(0, root)
    ax.set_ylim(deepest, 0.0)
    ax.set_xlabel("samples (width = cluster size)")
    ax.set_ylabel("lambda = 1 / distance (down = denser)")
    if labelled:
        ax.legend(loc="lower right")
    return _to_png(fig)


def _mask_outline(ax, mask: np.ndarray, colour: str = "#e02424") -> None:
    """Outline the mask's pixels along their edges (pixel (r, c) spans [c-0.5, c+0.5] x [r-0.5, r+0.5])."""
    from matplotlib.collections import LineCollection

    padded = np.pad(np.asarray(mask, bool), 1)
    segments = []
    for r, c in np.argwhere(padded[1:-1, 1:-1]):
        pr, pc = r + 1, c + 1
        if not padded[pr - 1, pc]:
            segments.append([(c - 0.5, r - 0.5), (c + 0.5, r - 0.5)])
        if not padded[pr + 1, pc]:
            segments.append([(c - 0.5, r + 0.5), (c + 0.5, r + 0.5)])
        if not padded[pr, pc - 1]:
            segments.append([(c - 0.5, r - 0.5), (c - 0.5, r + 0.5)])
        if not padded[pr, pc + 1]:
            segments.append([(c + 0.5, r - 0.5), (c + 0.5, r + 0.5)])
    ax.add_collection(LineCollection(segments, colors=colour, linewidths=1.2))


def _show(ax, image: np.ndarray, title: str, fontsize: int = 8) -> None:
    gray = image.shape[-1] == 1
    ax.imshow(image[..., 0] if gray else image, cmap="gray" if gray else None, vmin=0, vmax=255,
              interpolation="nearest")
    # Titles carry sample ids, i.e. file names: `$...$` in one must show as typed, not be parsed as mathtext.
    ax.set_title(title, fontsize=fontsize, parse_math=False, usetex=False)
    ax.axis("off")


def _on_checkerboard(pixels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The pattern where the mask is set, a grey checkerboard (transparency) elsewhere."""
    height, width, channels = pixels.shape
    rows, cols = np.indices((height, width))
    checker = np.where((rows + cols) % 2 == 0, 150, 110).astype(np.uint8)[:, :, None].repeat(channels, axis=2)
    return np.where(np.asarray(mask, bool)[:, :, None], pixels, checker)


def _mask_image(mask: np.ndarray, channels: int) -> np.ndarray:
    return (np.asarray(mask, bool)[:, :, None] * 255).astype(np.uint8).repeat(channels, axis=2)


def trigger_png(pixels: np.ndarray, mask: np.ndarray) -> bytes:
    """An extracted trigger on its own, its mask outlined."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(2.6, 2.6))
    _show(ax, _on_checkerboard(pixels, mask), "pattern")
    _mask_outline(ax, mask)
    return _to_png(fig)


def mask_png(mask: np.ndarray) -> bytes:
    """The binary trigger mask (white = trigger pixel)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(2.6, 2.6))
    _show(ax, _mask_image(mask, 1), "mask")
    return _to_png(fig)


def trigger_panel_png(pixels: np.ndarray, mask: np.ndarray, samples: np.ndarray, titles: list[str],
                      *, columns: int = 8) -> bytes:
    """The pattern and the mask, then flagged samples with the mask's pixels outlined in red (the paper's Fig. 5)."""
    images = [_on_checkerboard(pixels, mask), _mask_image(mask, pixels.shape[-1]), *samples]
    fig, used = _image_grid(images, ["extracted pattern", "mask", *titles], columns=columns, cell=(1.6, 1.8),
                            fontsize=8)
    for ax in used:
        _mask_outline(ax, mask)
    return _to_png(fig)


def class_histograms_png(panels: list[dict], truth: np.ndarray | None, *, xlabel: str) -> bytes:
    """A grid of per-class score histograms (log counts), stacked clean / poisoned when ground truth is known.
    Each panel: title, scores, rows (the class's rows, to read `truth`), and optionally threshold,
    threshold_label and threshold_style ("--" by default)."""
    plt = _pyplot()
    columns = min(3, len(panels))
    lines = (len(panels) + columns - 1) // columns
    fig, axes = plt.subplots(lines, columns, figsize=(4.2 * columns, 3.0 * lines), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, panel in zip(axes.flat, panels):
        ax.axis("on")
        scores = panel["scores"]
        bins = np.histogram_bin_edges(scores, bins=40)
        if truth is None:
            ax.hist(scores, bins=bins, color="#9aa5b1")
        else:
            poisoned = truth[panel["rows"]]
            ax.hist([scores[~poisoned], scores[poisoned]], bins=bins, stacked=True, color=["#9aa5b1", "#d64545"],
                    label=[f"clean ({int((~poisoned).sum())})", f"poisoned ({int(poisoned.sum())})"])
        if panel.get("threshold") is not None:
            style = panel.get("threshold_style", "--")
            ax.axvline(panel["threshold"], color="k" if style == "--" else "#6b7785", linestyle=style, linewidth=1,
                       label=panel.get("threshold_label"))
        ax.set_title(panel["title"], fontsize=9)
        ax.set_xlabel(xlabel, fontsize=7)
        ax.set_yscale("log")
        ax.tick_params(labelsize=6)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, loc="upper right")
    fig.tight_layout()
    return _to_png(fig)
