"""Python's cyclic garbage collector while chunks work.

A chunk holds its 10,000 rows, decisions and messages while it works, and every few
hundred allocations CPython's collector runs; with its default thresholds the oldest
generation (every object the process has: the imported modules, SQLAlchemy's and
Prefect's) is walked again and again. Measured on a 10,000-recipient chunk on Postgres:
the collector took 12-19 µs per recipient, most of it in full collections, a fifth of
the chunk's CPU (BENCHMARKS.md). While a chunk works Herald therefore freezes what
existed before it (``gc.freeze``: the collector no longer walks it; it is all alive)
and collects the young generation every 10,000 allocations instead of 700; both are put
back when the last chunk at work in the process ends (a chunk runs in a thread of the
run, a Prefect task run or a Dask worker process: each process tunes its own). Garbage
without cycles is freed at once either way (reference counting); only cyclic garbage
waits a little longer.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

YOUNG_THRESHOLD = 10_000  # allocations between collections of the youngest generation

_lock = threading.Lock()
_inside = 0  # chunks of this process at work
_saved: tuple[int, int, int] | None = None


@contextmanager
def for_chunks() -> Iterator[None]:
    """The collector tuned while any chunk of this process is inside (chunks overlap in
    threads: the first one in tunes it, the last one out restores it). Freezing and
    thawing move whole generations: 0.1 µs for a chunk's entry and exit."""
    global _inside, _saved
    with _lock:
        if _inside == 0:
            _saved = gc.get_threshold()
            gc.freeze()
            gc.set_threshold(max(YOUNG_THRESHOLD, _saved[0]), _saved[1], _saved[2])
        _inside += 1
    try:
        yield
    finally:
        with _lock:
            _inside -= 1
            if _inside == 0 and _saved is not None:
                gc.set_threshold(*_saved)
                gc.unfreeze()
                _saved = None
