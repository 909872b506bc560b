"""Million-image scanning on one machine: a synthetic image folder scanned end to end, as a user runs it.

    # folders of 20k, 60k and 200k PNGs (32x32) built from a poisoned Fashion-MNIST npz, augmented
    python benchmarks/bench_streaming_scan.py build --data badnets.npz --root runs/folders --sizes 20000 60000 200000
    # listing time and decode-only throughput (no model), 0 and 1 decode workers
    python benchmarks/bench_streaming_scan.py decode --root runs/folders --sizes 60000 --workers 0 --out ...
    # `backdoor-engine scan` of each, its RSS sampled every 0.2 s
    python benchmarks/bench_streaming_scan.py scan --model badnets6.pt --root runs/folders \
        --sizes 20000 60000 200000 --out benchmarks/results/streaming_scan.jsonl

Row i of a folder is row (i mod N) of the npz: the first copy as it is, later copies with brightness
x U(0.9, 1.1) and Gaussian pixel noise (sigma 3), then every image resized to 32x32 (bilinear); the
scan resizes them back to the model's 28x28. Ground truth (truth.npz beside the folder) follows the
copied row; it is read only to report TPR/FPR. Each scan runs `backdoor-engine scan` in a fresh process
(feature store in float16, the default decode workers); the sampler reads VmRSS (all resident pages,
memory-mapped feature files included) and RssAnon (heap) of the scan process and, separately, the sum
of VmRSS over its decode workers. rss_curve_mb rows: (seconds, VmRSS, RssAnon, workers' VmRSS).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 32


def _write_block(task) -> None:
    x, rows, copies, names, folder, seed = task
    rng = np.random.default_rng(seed)
    for image, copy, name in zip(x, copies, names):
        pixels = image.astype(np.float32)
        if copy:
            pixels = pixels * rng.uniform(0.9, 1.1) + rng.normal(0, 3, pixels.shape)
        pixels = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)[..., 0]
        Image.fromarray(pixels).resize((SIZE, SIZE), Image.Resampling.BILINEAR).save(folder / name, format="PNG")


def build(data: str, root: Path, size: int, workers: int) -> None:
    from backdoor_engine.data.dataset import load_npz

    target = root / str(size)
    if target.exists():
        print(f"{target} exists, kept")
        return
    dataset = load_npz(data)
    n = len(dataset)
    rows = np.arange(size) % n
    copies = np.arange(size) // n
    staging = root / f".{size}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    for label in range(dataset.num_classes):
        (staging / f"{label:02d}").mkdir(parents=True)
    names = [f"{dataset.y[r]:02d}/{i:07d}.png" for i, r in enumerate(rows)]
    block = 5000
    tasks = [(dataset.x[rows[s:s + block]], rows[s:s + block], copies[s:s + block], names[s:s + block], staging, s)
             for s in range(0, size, block)]
    began = time.perf_counter()
    with ProcessPoolExecutor(workers) as pool:
        for done, _ in enumerate(pool.map(_write_block, tasks), 1):
            print(f"\r{size}: {min(done * block, size):,} images written", end="", flush=True)
    np.savez(root / f"truth{size}.npz", ids=np.array(names), poison=dataset.poison[rows])
    staging.rename(target)
    print(f"\n{target}: {size:,} PNGs in {time.perf_counter() - began:.0f} s")


def _rss_kb(pid: int, field: str = "VmRSS") -> int:
    """VmRSS (all resident pages) or RssAnon (heap: what does not come from mapped files) in kB."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
    except (FileNotFoundError, StopIteration, ProcessLookupError):
        return 0


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except FileNotFoundError:
        return []


def scan(model: str, root: Path, size: int, out_dir: Path, extra: list[str]) -> dict:
    out_dir = out_dir / str(size)
    shutil.rmtree(out_dir, ignore_errors=True)
    command = ["backdoor-engine", "scan", "--data", str(root / str(size)), "--model", model, "--out", str(out_dir),
               "--dtype", "float16", "--json", *extra]
    began = time.perf_counter()
    # The report goes to a file: read from a pipe only after the scan ends, it would fill the pipe and block it.
    printed = out_dir.parent / f"{size}.report.json"
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(printed, "w") as stdout:
        child = subprocess.Popen(command, stdout=stdout, stderr=subprocess.DEVNULL)
    curve, peak, anon_peak, workers_peak = [], 0, 0, 0
    while child.poll() is None:
        rss, anon = _rss_kb(child.pid), _rss_kb(child.pid, "RssAnon")
        workers = sum(_rss_kb(c) for c in _children(child.pid))
        peak, anon_peak, workers_peak = max(peak, rss), max(anon_peak, anon), max(workers_peak, workers)
        curve.append((round(time.perf_counter() - began, 1), rss // 1024, anon // 1024, workers // 1024))
        time.sleep(0.2)
    seconds = time.perf_counter() - began
    if child.returncode:
        raise SystemExit(f"scan of {size} failed (rc {child.returncode})")
    report = json.loads(printed.read_text())
    truth = np.load(root / f"truth{size}.npz")
    poison = dict(zip(truth["ids"].tolist(), truth["poison"].tolist()))
    flagged = set(report["flagged"])
    positives = sum(poison.values())
    tp = sum(poison[i] for i in flagged)
    fp = len(flagged) - tp
    manifest = json.loads((out_dir / "features" / "manifest.json").read_text())
    # The chunks, or the one consolidated matrix that replaces them once the scan memory-maps it.
    store_bytes = sum(p.stat().st_size for pattern in ("bn_minima.*.npy", "all.bn_minima.npy")
                      for p in (out_dir / "features").glob(pattern))
    return {"size": size, "wall_s": round(seconds, 1), "images_per_s_end_to_end": round(size / seconds, 1),
            "timings_s": report["timings_s"], "extract_images_per_s": round(size / report["timings_s"]["extract"], 1),
            "peak_rss_mb": peak // 1024, "peak_rss_anon_mb": anon_peak // 1024,
            "decode_workers_peak_rss_mb": workers_peak // 1024,
            "rss_curve_mb": curve[:: max(1, len(curve) // 200)], "n_flagged": len(flagged),
            "tpr": tp / positives if positives else None, "fpr": fp / (size - positives),
            "n_sample": report["diagnostics"]["sampled"]["n_sample"], "skipped": len(report["skipped"]),
            "store_dtype": manifest["dtype"], "store_mb": round(store_bytes / 2**20, 1), "extra_args": extra,
            "cores": os.cpu_count(), "python": platform.python_version()}


def decode(root: Path, size: int, workers: int) -> dict:
    """Listing time and decode-only throughput (no model) of a folder at 28x28, as a scan reads it."""
    from backdoor_engine.data import ImageFolderSource
    from backdoor_engine.engine.prefetch import read_ahead

    began = time.perf_counter()
    source = ImageFolderSource(root / str(size), image_size=28, channels=1)
    listed = time.perf_counter() - began
    began = time.perf_counter()
    count = sum(len(batch.kept) for batch in read_ahead(source, [(s, min(s + 256, size)) for s in range(0, size, 256)],
                                                          workers=workers))
    seconds = time.perf_counter() - began
    return {"size": size, "mode": "decode", "workers": workers, "list_s": round(listed, 2),
            "decode_s": round(seconds, 1), "decode_images_per_s": round(count / seconds, 1)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["build", "scan", "decode"])
    p.add_argument("--data", help="poisoned npz (build)")
    p.add_argument("--model", help="checkpoint (scan)")
    p.add_argument("--root", required=True)
    p.add_argument("--sizes", type=int, nargs="+", default=[20000, 60000, 200000])
    p.add_argument("--workers", type=int, default=2, help="PNG writers (build), decode workers (decode)")
    p.add_argument("--out", help="jsonl (scan)")
    p.add_argument("--scan-out", default="runs/stream_scans")
    p.add_argument("--scan-arg", action="append", default=[], help="extra scan flag, repeatable")
    args = p.parse_args()
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    for size in args.sizes:
        if args.mode == "build":
            build(args.data, root, size, args.workers)
            continue
        if args.mode == "decode":
            row = decode(root, size, args.workers)
        else:
            row = scan(args.model, root, size, Path(args.scan_out), args.scan_arg)
        print(json.dumps({k: v for k, v in row.items() if k != "rss_curve_mb"}), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    sys.exit(main())
