"""The verdict a person reads first, at the top of every report (one method or a consensus).

  labels_summary    per label: its size, how inflated it is (its size / the median label size: an all-to-one
                    poisoning at 10% roughly doubles its target label), how many of it are flagged
  trigger_estimate  where the flagged images differ from the unflagged images of the same labels: the mean
                    absolute difference of their mean images per pixel (a patch shows as a bright square, a blend
                    as its pattern), from bounded seeded samples of both groups
  build_verdict     found or not, how many, which labels, the agreement of the methods (a consensus), and the
                    next command to run with its cost

Ground truth never enters the verdict; the report's metrics section holds it.
"""

from __future__ import annotations

import shlex

import numpy as np

ESTIMATE_SAMPLE = 2000  # images per group for the trigger estimate: bounded decoding cost at any N
MAIN_LABEL_SHARE = 0.05  # labels holding at least this share of the flagged samples are named


def class_name(label: int, class_names) -> str:
    names = tuple(class_names or ())
    return f"{label} ({names[label]})" if 0 <= label < len(names) else str(label)


def labels_summary(y: np.ndarray, flags: np.ndarray, num_classes: int, class_names=()) -> list[dict]:
    """The labels of the flagged samples, most flagged first: [{label, name, n, n_flagged, share_of_flagged,
    inflation}] for every label holding MAIN_LABEL_SHARE of them or more."""
    sizes = np.bincount(y, minlength=num_classes)
    flagged = np.bincount(y[flags], minlength=num_classes)
    present = sizes[sizes > 0]
    median = float(np.median(present)) if len(present) else 0.0
    total = int(flagged.sum())
    out = []
    for label in np.argsort(-flagged, kind="stable"):
        if total == 0 or flagged[label] < MAIN_LABEL_SHARE * total:
            break
        out.append({"label": int(label), "name": class_name(int(label), class_names), "n": int(sizes[label]),
                    "n_flagged": int(flagged[label]), "share_of_flagged": float(flagged[label] / total),
                    "inflation": float(sizes[label] / median) if median else None})
    return out


def trigger_estimate(rows, flags: np.ndarray, labels: list[int], *, seed: int = 0,
                     sample: int = ESTIMATE_SAMPLE) -> tuple[np.ndarray, np.ndarray] | None:
    """(mean flagged image, |mean flagged - mean unflagged of the same labels| per pixel, both float on
    [0, 255], H x W x C); None when either group is empty."""
    same = np.isin(rows.y, labels)
    flagged, other = np.flatnonzero(flags & same), np.flatnonzero(~flags & same)
    if len(flagged) == 0 or len(other) == 0:
        return None
    rng = np.random.default_rng(seed)
    means = []
    for group in (flagged, other):
        chosen = np.sort(rng.choice(group, min(sample, len(group)), replace=False))
        total = None
        for start in range(0, len(chosen), 256):
            block = np.asarray(rows.images(chosen[start:start + 256]), np.float64).sum(axis=0)
            total = block if total is None else total + block
        means.append(total / len(chosen))
    return means[0], np.abs(means[0] - means[1])


def estimate_png(mean_flagged: np.ndarray, difference: np.ndarray) -> bytes:
    from .figures import _pyplot, _to_png

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(5, 2.6))
    channels = mean_flagged.shape[-1]
    shown = mean_flagged[..., 0] if channels == 1 else mean_flagged / 255.0
    axes[0].imshow(shown, cmap="gray" if channels == 1 else None, vmin=0, vmax=255 if channels == 1 else 1)
    axes[0].set_title("mean flagged image", fontsize=8)
    heat = difference.mean(axis=-1)
    axes[1].imshow(heat, cmap="magma", vmin=0, vmax=max(float(heat.max()), 1e-9))
    axes[1].set_title("|flagged - unflagged| (same labels)", fontsize=8)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    return _to_png(fig)


def next_command(report: dict, out_dir, n_flagged: int, n: int) -> dict | None:
    """The purify command that removes what was flagged, with what it costs; None when nothing was flagged."""
    if n_flagged == 0:
        return None
    data = (report.get("data") or {}).get("source") or "DATA"
    model = (report.get("model") or {}).get("path") or "MODEL.pt"
    report_path = "REPORT_DIR" if out_dir is None else str(out_dir)
    command = ["backdoor-engine", "purify", "--data", str(data), "--model", str(model), "--report", report_path,
               "--strategy", "retrain", "--out", "repaired.pt"]
    return {"command": shlex.join(command),
            "cost": f"retrains a model from scratch on the {n - n_flagged:,} unflagged samples: about the cost of "
                    "the suspect model's own training (its epochs over this set); `--strategy unlearn-relearn` "
                    "instead fine-tunes the suspect model for a few epochs"}


def build_verdict(detection, rows, report: dict, *, num_classes: int, class_names=(), out_dir=None,
                  estimate: bool = True) -> tuple[dict, list[tuple[str, bytes]]]:
    """(the verdict for report.json, its figures); the figure only when out_dir is set and images exist."""
    flags = np.asarray(detection.flags, bool)
    n, n_flagged = len(flags), int(flags.sum())
    labels = labels_summary(np.asarray(rows.y), flags, num_classes, class_names)
    verdict = {"backdoor_suspected": n_flagged > 0, "n_flagged": n_flagged,
               "share_flagged": n_flagged / n if n else 0.0, "labels": labels}
    pairs = detection.diagnostics.get("jaccard")
    if isinstance(pairs, dict):
        values = [v for v in pairs.values() if v is not None]
        verdict["agreement_mean_jaccard"] = float(np.mean(values)) if values else None
        verdict["votes_histogram"] = detection.diagnostics.get("votes_histogram")
    verdict["next"] = next_command(report, out_dir, n_flagged, n)
    if n_flagged == 0:
        verdict["headline"] = f"No backdoor found: {detection.method} flags none of the {n:,} samples."
    else:
        named = ", ".join(f"{item['name']} ({item['n_flagged']:,} flagged; label {item['inflation']:.2f}x the "
                          "median label size)" if item["inflation"] is not None else item["name"] for item in labels)
        verdict["headline"] = (f"Backdoor suspected: {detection.method} flags {n_flagged:,} of {n:,} samples "
                               f"({100 * n_flagged / n:.2f}%), mostly labelled {named or 'across many labels'}.")
    figures = []
    if estimate and out_dir is not None and labels:
        found = trigger_estimate(rows, flags, [item["label"] for item in labels])
        if found is not None:
            peak = np.unravel_index(np.argmax(found[1].mean(axis=-1)), found[1].shape[:2])
            verdict["trigger_estimate"] = {"peak_pixel": [int(peak[0]), int(peak[1])],
                                           "peak_difference": float(found[1].mean(axis=-1)[peak]),
                                           "from": "mean flagged vs mean unflagged image of the same labels"}
            figures.append(("Trigger estimate from the flagged set", estimate_png(*found)))
    return verdict, figures
