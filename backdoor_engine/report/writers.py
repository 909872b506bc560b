"""Write report.json, samples.csv and a self-contained report.html into one folder, each atomically."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import re
from pathlib import Path

import numpy as np

from ..atomic import atomic_write, write_json_atomic
from ..data.dataset import Dataset
from ..detection import SPLIT_NAMES, Detection
from .figures import embedding_png, montage_png
from .schema import build_report


def escape_id(value) -> str:
    """A sample id as text that any UTF-8 reader takes, losslessly (`unescape_id` undoes it).

    File names are bytes: Python hands a non-UTF-8 name over as surrogate escapes (U+DC80..U+DCFF), which
    no UTF-8 file can hold. Such a byte is written as a backslash escape `\\xNN`; a control character as
    `\\xNN` too (a newline would split a csv row for line-based tools); any other lone surrogate as `\\uNNNN`;
    a backslash itself doubles (`\\\\`) so that a name holding a literal `\\x41` reads back unchanged.
    Every other character, non-ASCII ones included, is written as it is."""
    out = []
    for char in str(value):
        code = ord(char)
        if char == "\\":
            out.append("\\\\")
        elif 0xDC80 <= code <= 0xDCFF:  # surrogateescape'd byte 0x80..0xFF
            out.append(f"\\x{code - 0xDC00:02x}")
        elif 0xD800 <= code <= 0xDFFF:
            out.append(f"\\u{code:04x}")
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\x{code:02x}")
        else:
            out.append(char)
    return "".join(out)


def unescape_id(text: str) -> str:
    """The id `escape_id` wrote (bytes >= 0x80 back as surrogate escapes, as os.listdir gives them)."""
    return re.sub(r"\\(\\|x[0-9a-f]{2}|u[0-9a-f]{4})", _unescape_one, text)


def _unescape_one(match) -> str:
    token = match.group(1)
    if token == "\\":
        return "\\"
    code = int(token[1:], 16)
    return chr(0xDC00 + code) if token[0] == "x" and code >= 0x80 else chr(code)


def most_suspicious(detection: Detection, k: int) -> np.ndarray:
    """Indices of up to k samples to show: highest scores first, else the flagged ones in order."""
    if detection.scores is not None:
        order = np.argsort(-detection.scores, kind="stable")
        return order[:k]
    return np.flatnonzero(detection.flags)[:k]


def samples_csv(detection: Detection, dataset: Dataset) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    split = detection.split
    header = (["id", "label", "flagged", "score", "cluster"] + (["split"] if split is not None else [])
              + (["poison"] if dataset.poison is not None else []) + list(detection.columns))
    writer.writerow(header)
    extra = list(detection.columns.values())
    for i in range(len(dataset)):
        row = [escape_id(dataset.ids[i]), int(dataset.y[i]), int(detection.flags[i]),
               "" if detection.scores is None else f"{detection.scores[i]:.6g}",
               "" if detection.clusters is None else int(detection.clusters[i])]
        if split is not None:
            row.append(SPLIT_NAMES[split[i]])
        if dataset.poison is not None:
            row.append(int(dataset.poison[i]))
        row += [_cell(column[i]) for column in extra]
        writer.writerow(row)
    return buffer.getvalue()


def _cell(value) -> str:
    """An extra column's value: text as it is, integers as such, floats to 6 significant digits, NaN as empty."""
    if isinstance(value, str):
        return value
    if isinstance(value, (np.integer, int, np.bool_, bool)):
        return str(int(value))
    value = float(value)
    return "" if value != value else f"{value:.6g}"


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _scanned_rows(report: dict) -> list[tuple[str, str]]:
    """What was scanned, for the summary: the data's source and fingerprint, the model's arch and file."""
    rows = []
    data = report.get("data")
    if isinstance(data, dict):
        rows.append(("data", f"{data.get('source')} (fingerprint {data.get('fingerprint')})"))
    model = report.get("model")
    if isinstance(model, dict):
        where = model.get("path") or model.get("weights")
        rows.append(("model", f"{model.get('arch')}" + (f" from {where}" if where else "")
                     + (f" (fingerprint {model['fingerprint']})" if model.get("fingerprint") else "")))
    return rows


def _rate(m: dict, key: str) -> str:
    """A rate with the counts it comes from: 0.00% can hide one false positive among 54000."""
    counts = {"tpr": ("tp", "fn"), "fpr": ("fp", "tn"), "precision": ("tp", "fp")}.get(key)
    text = f"{100 * m[key]:.2f}%"
    if counts is None or not all(isinstance(m.get(c), int) for c in counts):
        return text
    hit, other = (m[c] for c in counts)
    return f"{text} ({hit}/{hit + other})"


def _verdict_html(verdict) -> str:
    """The box a person reads first: found or not, which labels, agreement, the next command."""
    if not isinstance(verdict, dict) or "headline" not in verdict:
        return ""
    lines = [f"<p><strong>{html.escape(verdict['headline'])}</strong></p>"]
    if verdict.get("agreement_mean_jaccard") is not None:
        lines.append(f"<p>Methods agree with a mean pairwise Jaccard of {verdict['agreement_mean_jaccard']:.2f}; "
                     f"samples by number of methods flagging them: {html.escape(str(verdict.get('votes_histogram')))}"
                     "</p>")
    if verdict.get("trigger_estimate"):
        peak = verdict["trigger_estimate"]["peak_pixel"]
        lines.append(f"<p>Trigger estimate (figure below): the flagged images differ most from the unflagged ones "
                     f"of the same labels around pixel (row {peak[0]}, column {peak[1]}).</p>")
    step = verdict.get("next")
    if step:
        lines.append(f"<p>Next: <code>{html.escape(step['command'])}</code><br>{html.escape(step['cost'])}</p>")
    return f'<div class="verdict">{"".join(lines)}</div>'


def report_html(report: dict, figures: list[tuple[str, bytes]], notes: list[str] = ()) -> str:
    summary = [("method", report["method"]), *_scanned_rows(report), ("samples", report["n_samples"]),
               ("flagged", report["n_flagged"])]
    summary += [(k, f"{v:.2f} s") for k, v in report["timings_s"].items()]
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in summary)
    metrics = ""
    if "metrics" in report:
        m = report["metrics"]
        metrics = ("<h2>Against ground truth</h2><table>" + "".join(
            f"<tr><th>{k.upper()}</th><td>{_rate(m, k)}</td></tr>" for k in ("tpr", "fpr", "precision", "f1"))
            + f"<tr><th>TP / FP / FN / TN</th><td>{m['tp']} / {m['fp']} / {m['fn']} / {m['tn']}</td></tr>"
            + (f"<tr><th>AUROC of the scores</th><td>{m['auroc']:.4f}</td></tr>" if m.get("auroc") is not None else "")
            + "".join(f"<tr><th>{name} part</th><td>{part['n']} samples, {part['n_poison']} poison "
                      f"({100 * part['poison_share']:.2f}%), {100 * part['share_of_all_poison']:.1f}% of all poison"
                      "</td></tr>" for name, part in m.get("split", {}).items() if name in SPLIT_NAMES)
            + "</table>")
    notes_html = _verdict_html(report.get("verdict")) + "".join(
        f'<p class="note">{html.escape(note)}</p>' for note in notes)
    sections = "".join(f"<h2>{html.escape(title)}</h2>{_img(png, title)}" for title, png in figures)
    details = html.escape(json.dumps({k: report[k] for k in ("params", "diagnostics", "versions")}, indent=2))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>backdoor-engine: {html.escape(report['method'])} scan</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#1f2933}}
table{{border-collapse:collapse}}th,td{{padding:.25em .8em;border-bottom:1px solid #e4e7eb;text-align:left}}
img{{max-width:100%}}.verdict{{background:#e8f4fd;border-left:4px solid #2680c2;padding:.4em 1em;margin-bottom:1em}}.note{{background:#fff8e1;border-left:4px solid #f0b429;padding:.6em 1em}}pre{{background:#f5f7fa;padding:1em;overflow:auto}}</style></head>
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
        titles = [f"{escape_id(dataset.ids[i])} y={dataset.y[i]}" + ("" if detection.scores is None else
                                                          f" s={detection.scores[i]:.3g}") for i in shown]
        all_figures.append(("Most suspicious samples", montage_png(dataset.images(shown), titles)))
    write_json_atomic(out_dir / "report.json", report)  # json.dump escapes every non-ASCII id (\\udcff): lossless
    # Encoded here, not by the platform's locale: ids are escaped (escape_id) so the csv is valid UTF-8; the HTML
    # shows other text (notes naming skipped files) with any undecodable byte as a backslash escape.
    with atomic_write(out_dir / "samples.csv", "wb") as f:
        f.write(samples_csv(detection, dataset).encode("utf-8"))
    with atomic_write(out_dir / "report.html", "wb") as f:
        f.write(report_html(report, all_figures, notes).encode("utf-8", "backslashreplace"))
    return report
