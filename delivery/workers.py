"""Chunks in worker processes of this machine: ``task_runner: {type: processes}``.

For a campaign run's chunks (``herald.flows.chunks.run_chunk``) and a journey tick's
(``herald.journeys.engine.run_chunk``) alike. In threads, a chunk's own work (reading
its rows, screening, deciding, rendering, building messages) holds Python's interpreter
lock, so two threads of one process do it one at a time: a 1,000,000-recipient run on
two cores kept about 1.5 of them busy, Herald's process and the database together.
Worker processes each have their own lock and keep both busy (BENCHMARKS.md, e2e).

The pool is started for one run or tick and shut down with it. Its workers are spawned
(a new interpreter that imports Herald and opens the workspace folder once, never a fork
of a process running Prefect's threads) and run one chunk at a time; the run's process
hands them chunks from as many threads as ``max_workers`` allows, each waiting on its
chunk. What the workers share with the run's process:

- its stop: SIGTERM or Ctrl-C in the run's process (``herald.flows.engine``) stops the
  workers' sending too, between batches, as in threads. Workers ignore SIGINT themselves
  (a terminal's Ctrl-C reaches the whole process group, and the run's process decides);
  a SIGTERM sent to a worker stops its pool's sending and then the run's, which fails
  saying how to resume, as after a SIGTERM to the run's process.
- its logs: each record a worker's ``herald`` loggers emit is handled by the run's
  process's logger of that name, marked with the Prefect flow and task run of its chunk
  when there is one, so it reaches the Prefect UI as from a thread.
- the clock, with each chunk job (``ChunkJob.clock``).

A worker ends at once when the run's process is gone (killed): as on threads, nothing
more is sent, and a rerun does not race a worker still sending the rows it resumes.
Not shared: a fatal answer stops a channel for the chunks of its own process only (as
on Dask); anything patched into the run's process after it started (tests).
"""

from __future__ import annotations

import logging
import logging.handlers
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from typing import Any, TypeVar

from herald.core.spec import TaskRunnerSpec
from herald.delivery import dispatch

log = logging.getLogger("herald.workers")

Job = TypeVar("Job")
Result = TypeVar("Result")

# The pools of this process's runs and ticks, by run id or tick: Prefect's chunk tasks
# find theirs here.
_pools: dict[str, ChunkProcesses] = {}
_pools_lock = threading.Lock()


class ChunkProcesses:
    """``workers`` spawned processes that run chunk jobs; close() when the run ends.

    A worker that dies (killed, out of memory) breaks the pool: every chunk in it fails
    with ``BrokenProcessPool`` (the other workers are stopped by the pool, and stop
    sending between batches), and the next chunk handed over starts a new pool. A Prefect
    chunk task's retry thus resumes its chunk in fresh workers (rows already `sending`
    are never resent); the engine, which has no retries, fails the run.
    """

    def __init__(self, workers: int) -> None:
        self._context = multiprocessing.get_context("spawn")
        self._workers = workers
        self._logs: Any = self._context.Queue()
        self._level = logging.getLogger("herald").getEffectiveLevel()
        self._lock = threading.Lock()
        self._pool, self._stop = self._start()
        self._relay = threading.Thread(target=_relay, args=(self._logs,), daemon=True,
                                       name="herald-worker-logs")
        self._relay.start()

    def _start(self) -> tuple[ProcessPoolExecutor, Any]:
        # each pool its own stop event: a broken pool's workers set theirs when the pool
        # stops them, and a new pool's must start clear (unless the run stopped)
        stop = self._context.Event()
        pool = ProcessPoolExecutor(self._workers, mp_context=self._context,
                                   initializer=_start_worker,
                                   initargs=(stop, self._logs, self._level))
        dispatch.share_stop(stop)
        return pool, stop

    def run(self, chunk: Callable[[Job], Result], job: Job,
            marks: dict[str, str] | None = None) -> Result:
        """``chunk(job)`` in a worker (a module-level function: it is sent by name), waited
        for; ``marks`` are set on the records it logs (Prefect's ``flow_run_id`` and
        ``task_run_id``)."""
        with self._lock:
            pool, stop = self._pool, self._stop
        try:
            result = pool.submit(_run, chunk, job, marks or {}).result()
        except BrokenProcessPool:
            self._replace(pool)
            raise
        if stop.is_set() and not dispatch.stop_requested():
            # a worker was sent SIGTERM (its pool's workers stopped sending): the run
            # stops too, saying so, rather than completing with its rows queued
            dispatch.request_stop("SIGTERM to a worker process")
        return result

    def _replace(self, broken: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._pool is not broken:
                return  # another chunk of the broken pool replaced it already
            stop = self._stop
            self._pool, self._stop = self._start()
        broken.shutdown(wait=False, cancel_futures=True)
        dispatch.unshare_stop(stop)
        log.warning("a worker process ended abruptly; its chunks failed (rows it had "
                    "handed to a provider stay `sending`); new worker processes take the "
                    "next chunks")

    def close(self) -> None:
        """Cancel the jobs not started, wait for the running ones, stop the workers."""
        with self._lock:
            pool, stop = self._pool, self._stop
        try:
            pool.shutdown(wait=True, cancel_futures=True)
        finally:
            dispatch.unshare_stop(stop)
            self._logs.put(None)
            self._relay.join(timeout=10)
            self._logs.close()


@contextmanager
def chunk_runner(spec: TaskRunnerSpec, run_id: str, chunk: Callable[[Job], Result]
                 ) -> Iterator[Callable[[Job], Result]]:
    """How a run's (or a tick's) chunks run from this process: ``chunk`` in the calling
    thread, or, for ``processes``, in a pool of worker processes started now and kept
    for the run (found by :func:`serving` under ``run_id`` meanwhile)."""
    if spec.type != "processes":
        yield chunk
        return
    pool = ChunkProcesses(spec.workers)
    with _pools_lock:
        _pools[run_id] = pool
    try:
        yield lambda job: pool.run(chunk, job)
    finally:
        with _pools_lock:
            _pools.pop(run_id, None)
        pool.close()


def serving(run_id: str) -> ChunkProcesses | None:
    """The worker processes of run (or tick) ``run_id`` in this process, if it has
    them."""
    with _pools_lock:
        return _pools.get(run_id)


# -- in a worker process ----------------------------------------------------------------
_marks: dict[str, str] = {}  # the running chunk's, set on each record it logs


def _start_worker(stop: Any, logs: Any, level: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    dispatch.follow_stop(stop)
    threading.Thread(target=_end_with, args=(os.getppid(),), daemon=True,
                     name="herald-worker-parent").start()
    forward = logging.handlers.QueueHandler(logs)
    forward.addFilter(_mark)
    herald = logging.getLogger("herald")
    herald.handlers[:] = [forward]
    herald.setLevel(level)
    herald.propagate = False


def _end_with(parent: int) -> None:
    """End this worker at once when the run's process is gone (killed, say): as in a
    run on threads, nothing more is sent; its `queued` rows wait for the rerun, which
    must not find a worker still sending them."""
    while os.getppid() == parent:
        time.sleep(ORPHAN_CHECK_SECONDS)
    os._exit(1)


ORPHAN_CHECK_SECONDS = 0.05


def _mark(record: logging.LogRecord) -> bool:
    for name, value in _marks.items():
        setattr(record, name, value)
    return True


def _run(chunk: Callable[[Job], Result], job: Job, marks: dict[str, str]) -> Result:
    _marks.clear()
    _marks.update(marks)
    try:
        return chunk(job)
    finally:
        _marks.clear()


# -- in the run's process ---------------------------------------------------------------
def _relay(logs: Any) -> None:
    """Hand each record from the workers to this process's logger of its name."""
    while True:
        try:
            record = logs.get()
        except (EOFError, OSError):
            return
        if record is None:
            return
        logger = logging.getLogger(record.name)
        if logger.isEnabledFor(record.levelno):
            logger.handle(record)
