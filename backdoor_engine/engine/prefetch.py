"""Decoding ahead of the model: ranges of a source read by a pool of worker processes, in order.

At most `depth` ranges are in flight, so memory stays bounded however fast the workers are; the
model's forward pass overlaps the decoding of the next batches. Workers are forked (Linux): a fork
needs no `if __name__ == "__main__"` guard in the caller's script and no copy of the source's
listing, and the workers never touch torch, only PIL and numpy.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from itertools import islice

from backdoor_engine.data.source import Batch, Source
from backdoor_engine.errors import InputError

_worker_source: Source | None = None


def read_ahead(source: Source, ranges: Iterable[tuple[int, int]], *, workers: int = 0,
               depth: int | None = None) -> Iterator[Batch]:
    """source.read(start, stop) for each range, in order. workers=0 reads in this process;
    otherwise `workers` processes decode up to `depth` (default 2 * workers) ranges ahead."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise InputError(f"workers must be an integer >= 0, got {workers!r}")
    if workers == 0:
        for start, stop in ranges:
            yield source.read(start, stop)
        return
    depth = 2 * workers if depth is None else depth
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise InputError(f"depth must be an integer >= 1, got {depth!r}")
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_install, initargs=(source,))
    try:
        remaining = iter(ranges)
        pending = deque(pool.submit(_read, start, stop) for start, stop in islice(remaining, depth))
        while pending:
            batch = pending.popleft().result()
            pending.extend(pool.submit(_read, start, stop) for start, stop in islice(remaining, 1))
            yield batch
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def default_workers() -> int:
    """Decode workers when the caller does not say: one per core beyond the first, at most 8."""
    return max(0, min(8, (os.cpu_count() or 1) - 1))


def _install(source: Source) -> None:
    global _worker_source
    _worker_source = source


def _read(start: int, stop: int) -> Batch:
    return _worker_source.read(start, stop)
