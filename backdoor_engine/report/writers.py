"""Write report.json, samples.csv and a self-contained report.html into one folder, each atomically."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from pathlib import Path

import numpy as np

from ..atomic import atomic_write, write_json_atomic
from ..data.dataset import Dataset
from ..detection import Detection
from .figures import embedding_png, montage_png
from .schema import build_report


def most_suspicious(detection: Detection, k: int) -> np.ndarray:
    """Indices of up to k samples to show: highest scores first, else the flagged ones in order."""
    if detection.scores is not None:
        order = np.argsort(-detection.scores, kind="stable")
        return order[:k]
    return np.flatnonzero(detection.flags)[:k]


def samples_csv(detection: Detection, dataset: Dataset) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    header = ["id", "label", "flagged", "score", "cluster"] + (["poison"] if dataset.poison is not None else [])
    writer.writerow(header)
    for i in range(len(dataset)):
        row = [dataset.ids[i], int(dataset.y[i]), int(detection.flags[i]),
               "" if detection.scores is None else f"{detection.scores[i]:.6g}",
               "" if detection.clusters is None else int(detection.clusters[i])]
        if dataset.poison is not None:
            row.append(int(dataset.poison[i]))
        writer.writerow(row)
    return buffer.getvalue()


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def report_html(report: dict, figures: list[tuple[str, bytes]], notes: list[str] = ()) -> str:
    summary = [("method", report["method"]), ("samples", report["n_samples"]), ("flagged", report["n_flagged"])]
    summary += [(k, f"{v:.2f} s") for k, v in report["timings_s"].items()]
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in summary)
    metrics = ""
    if "metrics" in report:
        m = report["metrics"]
        metrics = ("<h2>Against ground truth</h2><table>" + "".join(
            f"<tr><th>{k.upper()}</th><td>{100 * m[k]:.2f}%</td></tr>" for k in ("tpr", "fpr", "precision", "f1"))
            + f"<tr><th>TP / FP / FN / TN</th><td>{m['tp']} / {m['fp']} / {m['fn']} / {m['tn']}</td></tr></table>")
    notes_html = "".join(f'<p class="note">{html.escape(note)}</p>' for note in notes)
    sections = "".join(f"<h2>{html.escape(title)}</h2>{_img(png, title)}" for title, png in figures)
    details = html.escape(json.dumps({k: report[k] for k in ("params", "diagnostics", "versions")}, indent=2))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>backdoor-engine: {html.escape(report['method'])} scan</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#1f2933}}
table{{border-collapse:collapse}}th,td{{padding:.25em .8em;border-bottom:1px solid #e4e7eb;text-align:left}}
img{{max-width:100%}}.note{{background:#fff8e1;border-left:4px solid #f0b429;padding:.6em 1em}}pre{{background:#f5f7fa;padding:1em;overflow:auto}}</style></head>
<body><h1>backdoor-engine scan: {html.escape(report['method'])}</h1>{notes_html}<table>{rows}</table>{metrics}{sections}
<h2>Parameters and diagnostics</h2><details><summary>show</summary><pre>{details}</pre></details></body></html>
"""


def write_report(out_dir: str | Path, detection: Detection, dataset: Dataset, *, timings_s: dict,
                 figures: list[tuple[str, bytes]] = (), notes: list[str] = (), include_scores: bool = False,
                 montage_size: int = 32, extra: dict | None = None) -> dict:
    """Write the three report files; returns the report dict (what report.json holds). `dataset` is any
    sample table (ids, y, poison, images(rows)): a Dataset or the kept rows of a streamed source.
    `notes` are shown at the top of the HTML (e.g. why nothing was flagged); `extra` adds top-level
    report fields (e.g. the skipped files)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {**build_report(detection, dataset, timings_s=timings_s, include_scores=include_scores), **(extra or {})}
    all_figures = []
    if detection.embedding is not None:
        all_figures.append(("2-D embedding", embedding_png(detection.embedding, detection.flags, dataset.poison)))
    all_figures += list(figures)
    shown = most_suspicious(detection, montage_size)
    if len(shown):
        titles = [f"{dataset.ids[i]} y={dataset.y[i]}" + ("" if detection.scores is None else
                                                          f" s={detection.scores[i]:.3g}") for i in shown]
        all_figures.append(("Most suspicious samples", montage_png(dataset.images(shown), titles)))
    write_json_atomic(out_dir / "report.json", report)
    with atomic_write(out_dir / "samples.csv", "w") as f:
        f.write(samples_csv(detection, dataset))
    with atomic_write(out_dir / "report.html", "w") as f:
        f.write(report_html(report, all_figures, notes))
    return report
