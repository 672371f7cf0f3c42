"""Herald's one clock: every decision that depends on "now" reads it.

Run keys, cap windows, quiet hours, deferrals, attribution windows and journey waits all
call :func:`now`. Real runs read the real time; tests, rehearsals (``herald run --now``)
and the demo set the clock. A set clock either stands still (``frozen``: tests) or starts
at the given moment and runs on from there (rehearsals), so durations stay real.

The clock is process-wide state. A :class:`Clock` is a small picklable value, so a chunk
job carries the clock of the run that planned it to whichever worker process runs it.

What does not read this clock: timers against the outside world (a provider's token
expiry, a Retry-After wait, a request signature's timestamp), which the provider checks
against its own real clock.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

ENV = "HERALD_NOW"  # set the clock of a process (and of Prefect runs it starts)


@dataclass(frozen=True)
class Clock:
    """The real time (``anchor`` None), or a set time that stands still or runs on."""

    anchor: datetime | None = None
    frozen: bool = False
    # the real time.time() when the clock was set: a running set clock adds what passed
    started: float = field(default_factory=time.time)

    def now(self) -> datetime:
        if self.anchor is None:
            return datetime.now(UTC)
        if self.frozen:
            return self.anchor
        return self.anchor + timedelta(seconds=time.time() - self.started)

    @property
    def is_set(self) -> bool:
        return self.anchor is not None

    def describe(self) -> str:
        if self.anchor is None:
            return "real time"
        return f"{'frozen at' if self.frozen else 'set to'} {self.anchor.isoformat()}"


REAL = Clock()
_lock = threading.Lock()
_current: Clock | None = None  # None: not decided yet (HERALD_NOW is read on first use)


def parse(text: str) -> datetime:
    """An ISO 8601 moment (``2026-12-01T10:00+08:00``; a date alone is its UTC midnight;
    no offset means UTC), as an aware UTC datetime. ValueError names what is wrong."""
    raw = text.strip()
    if not raw:
        raise ValueError("an empty time; expected ISO 8601 such as 2026-12-01T10:00+08:00")
    try:
        moment = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"'{text}' is not an ISO 8601 time "
                         "(expected e.g. 2026-12-01T10:00+08:00 or 2026-12-01)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    # caps, waits and windows reach ten years either side of now: a clock near year 1 or
    # 9999 overflowed deep inside a run instead of being refused here
    # (in UTC too: 1900-01-01T00:00+14:00 is a moment of 1899)
    if not EARLIEST_YEAR <= moment.year <= LATEST_YEAR or \
            not EARLIEST_YEAR <= moment.astimezone(UTC).year <= LATEST_YEAR:
        raise ValueError(f"'{text}' is outside the years Herald computes with "
                         f"({EARLIEST_YEAR} to {LATEST_YEAR}, in UTC)")
    return moment.astimezone(UTC)


EARLIEST_YEAR, LATEST_YEAR = 1900, 9000


def current() -> Clock:
    """The clock in force in this process."""
    global _current
    if _current is None:
        with _lock:
            if _current is None:
                value = os.environ.get(ENV, "").strip()
                _current = Clock(parse(value)) if value else REAL
    return _current


def now() -> datetime:
    """Now, as an aware UTC datetime, by Herald's clock."""
    return current().now()


def install(clock: Clock | None) -> Clock:
    """Put ``clock`` in force (None: the real time); return the one it replaces."""
    global _current
    previous = current()  # the environment's clock if none was installed yet
    with _lock:
        _current = clock or REAL
    return previous


def set_to(moment: datetime, frozen: bool = False) -> Clock:
    """Set the clock to ``moment`` (aware; naive means UTC); return the new clock."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    clock = Clock(moment.astimezone(UTC), frozen)
    install(clock)
    return clock


@contextmanager
def using(clock: Clock | None) -> Iterator[Clock]:
    """Run a block under ``clock`` (None: leave the clock as it is)."""
    if clock is None:
        yield current()
        return
    previous = install(clock)
    try:
        yield clock
    finally:
        install(previous)


def advance(delta: timedelta) -> Clock:
    """Move a set clock forward (tests and simulations of days passing)."""
    clock = current()
    if clock.anchor is None:
        raise RuntimeError("the real clock cannot be advanced; set it first")
    moved = Clock(clock.anchor + delta, clock.frozen, clock.started)
    install(moved)
    return moved
