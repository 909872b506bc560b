"""Decoding ahead of the model: ranges of a source read by a pool of worker processes, in order.

At most `depth` ranges are in flight, so memory stays bounded however fast the workers are; the
model's forward pass overlaps the decoding of the next batches. Workers are forked (Linux): a fork
needs no `if __name__ == "__main__"` guard in the caller's script and no copy of the source's
listing, and the workers never touch torch, only PIL and numpy.

Workers die with the scanning process, however it ends: a SIGKILLed parent runs no cleanup, and a
forked worker blocked on its pipe (whose write end the other workers also hold, so EOF never comes)
would otherwise live on under init holding its copy of the parent's memory. On Linux each worker asks
the kernel for SIGKILL when its parent goes (PR_SET_PDEATHSIG); everywhere a watchdog thread in the
worker exits it once its parent pid changes (reparented).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from itertools import islice

from backdoor_engine.data.source import Batch, Source
from backdoor_engine.errors import InputError

_worker_source: Source | None = None
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
WATCHDOG_PERIOD_S = 0.5  # how long an orphaned worker may outlive its parent where prctl is unavailable


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
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_install,
                               initargs=(source, os.getpid()))
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


def _install(source: Source, parent: int) -> None:
    global _worker_source
    _worker_source = source
    _die_with_parent(parent)


def _die_with_parent(parent: int) -> None:
    """In a freshly forked worker: exit when process `parent` (the scanning process) dies."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass  # no usable libc: the watchdog below still ends an orphan
    # The parent may have died between the fork and the prctl: then no signal will ever come.
    if os.getppid() != parent:
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent,), name="parent-watchdog", daemon=True).start()


def _watch_parent(parent: int) -> None:
    # Where prctl is missing (not Linux), polling is the only way to notice being reparented.
    while os.getppid() == parent:
        time.sleep(WATCHDOG_PERIOD_S)
    os._exit(1)


def _read(start: int, stop: int) -> Batch:
    return _worker_source.read(start, stop)
