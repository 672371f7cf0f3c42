"""A run's progress as chunks finish: the figures an operator watches (chunks done,
recipients processed, counts so far, ETA), one line per chunk, and the Markdown table
the Prefect artifact shows. No Prefect here: the campaign flow feeds it, the CLI draws it.

Whoever watches a run in this process (``herald run``'s progress bar) registers with
``watching``; the campaign flow calls ``begin`` / ``chunk`` / ``end`` on every watcher.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

from herald.core.db import STATUSES
from herald.flows.chunks import CARRIED, ChunkJob, ChunkResult

# The order counts are shown in: what was sent or failed first, then why others were not.
SHOWN = ("sent", "failed", "capped", "suppressed", "held_out", "no_address", "render_error",
         "quiet_hours", "deferred", "duplicate")


@dataclass
class Progress:
    """Figures of one run so far."""

    flow: str
    run_key: str
    run_id: str
    chunks: int
    recipients: int
    dry_run: bool = False
    done: int = 0
    processed: int = 0
    counts: Counter[str] = field(default_factory=Counter)
    started: float = field(default_factory=time.monotonic)

    def add(self, job: ChunkJob, result: ChunkResult) -> str:
        """Count a finished chunk; its log line."""
        self.done += 1
        self.processed += job.stop - job.start
        mine: Counter[str] = Counter()
        for status, _tier, _channel, n in result.counts:
            mine[CARRIED.get(status, status)] += n
        self.counts.update(mine)
        figures = ", ".join(f"{s.replace('_', ' ')} {mine[s]:,}" for s in SHOWN
                            if mine[s] or s in ("sent", "failed"))
        return (f"chunk {self.done}/{self.chunks} (chunk-{job.index:04d}): {figures} · "
                f"{self.processed:,}/{self.recipients:,} recipients"
                + (f" · ETA {format_eta(eta)}" if (eta := self.eta()) is not None else ""))

    @property
    def percent(self) -> float:
        if not self.recipients:
            return 100.0
        return 100.0 * self.processed / self.recipients

    def eta(self) -> float | None:
        """Seconds left at the pace so far (None before the first chunk or when done)."""
        if not self.processed or self.processed >= self.recipients:
            return None
        elapsed = time.monotonic() - self.started
        return elapsed / self.processed * (self.recipients - self.processed)

    def headline(self) -> str:
        """One line: the progress artifact's description."""
        eta = self.eta()
        return (f"{self.done}/{self.chunks} chunks · {self.processed:,}/{self.recipients:,} "
                f"recipients · {'would send' if self.dry_run else 'sent'} "
                f"{self.counts['sent']:,} · failed {self.counts['failed']:,}"
                + (f" · ETA {format_eta(eta)}" if eta is not None else ""))

    def markdown(self) -> str:
        """The figures as the Markdown table of the ``herald-FLOW-sending`` artifact."""
        eta = self.eta()
        rows = [("chunks", f"{self.done} / {self.chunks}"),
                ("recipients processed", f"{self.processed:,} / {self.recipients:,} "
                                         f"({self.percent:.0f}%)"),
                *((s, f"{self.counts[s]:,}") for s in STATUSES if s in SHOWN
                  and (self.counts[s] or s in ("sent", "failed"))),
                ("elapsed", format_eta(time.monotonic() - self.started)),
                ("ETA", format_eta(eta) if eta is not None else
                 ("done" if self.done == self.chunks else "-"))]
        title = f"# Sending {self.flow} ({self.run_key}){' - dry run' if self.dry_run else ''}"
        return (f"{title}\n\nrun `{self.run_id}`\n\n| | |\n|---|---|\n"
                + "\n".join(f"| {k} | {v} |" for k, v in rows) + "\n")


def format_eta(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


class Watcher(Protocol):
    def begin(self, progress: Progress) -> None: ...
    def chunk(self, progress: Progress, line: str) -> None: ...
    def end(self, progress: Progress) -> None: ...


_watchers: list[Watcher] = []
_lock = threading.Lock()


@contextmanager
def watching(watcher: Watcher) -> Iterator[None]:
    """Let ``watcher`` follow the runs of this process while the block runs."""
    with _lock:
        _watchers.append(watcher)
    try:
        yield
    finally:
        with _lock:
            _watchers.remove(watcher)


def notify(event: str, progress: Progress, *args: str) -> None:
    """Tell every watcher; a watcher's failure never stops a run."""
    with _lock:
        current = list(_watchers)
    for watcher in current:
        with contextlib.suppress(Exception):  # drawing progress must never fail a send
            getattr(watcher, event)(progress, *args)
