"""A channel's rate limit, the provider account's, shared by every process that sends.

A provider counts an account's messages, not a worker's: with chunks on a Dask cluster
or several Prefect workers, a ``rate: 50/s`` held per process would send at 50/s times
the number of processes. The limit therefore lives in the workspace database
(``herald_rate_limits``, one row per channel): the next free sending slot and the rate
in force. A sender claims the slots of a slice of messages in one short ``UPDATE ...
RETURNING`` (a write transaction: ``BEGIN IMMEDIATE`` on SQLite, the row's lock on
Postgres): the next slot moves on by ``n / rate`` and the answer says how long to wait
for the slice's first slot. A slice is about a tenth of a second of the rate, so one
round trip (about a millisecond) serves many messages while the provider still sees
them spread over each second, not in bursts. Slots are never saved up: after a pause
the next slot is "now", so a limit is never exceeded by a burst of unused seconds.

Time base: the database's clock (``herald.core.db.clock_sql``) for every slot, so the
processes of hosts whose clocks disagree still share one; each process turns the answer
into a local sleep. Herald's clock is not read: pacing is not a decision about "now" in
the domain, and it must follow real time even when a rehearsal sets Herald's clock.

Throttling (AIMD): a throttling answer (429, a provider's rate-limit code) halves the
shared rate, so every process slows down, whichever of them was told; the halving
happens at most once a second across processes (a burst of 429s to the requests in
flight is one signal), down to a 64th of the configured rate. Each process's successful
sends add back 5% of the configured rate per second's worth of sends, so the processes
together recover at the pace one process would. A channel idle for a minute, or whose
configured rate changed, starts again at the configured rate.

Pauses: a throttling answer that asks for a long wait (Retry-After of PAUSE_AFTER
seconds or more: 429 with Retry-After: 120) pauses the channel for every process, not
only for the chunk that was told: the row keeps until when (``paused_until``) and the
answer's code and detail. A claim during the pause takes no slot and returns the pause,
and the sender holds its messages back without a request (``SendResult.held_back``:
retried after the wait when it is short, else deferred past it), as the channel that got
the answer does itself.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from collections.abc import Sequence
from typing import NamedTuple

from sqlalchemy import Engine, text

from herald.channels.base import PAUSE_AFTER, Outcome, SendResult
from herald.core.db import clock_sql, writing

log = logging.getLogger("herald.dispatch")

SLICE_SECONDS = 0.1  # the slots claimed in one round trip: a tenth of a second's worth
IDLE_RESET = 60.0  # seconds without a claim after which a slowed rate starts afresh
RECOVERY = 0.05  # of the configured rate, per second's worth of successful sends
FLOOR = 1 / 64  # the lowest rate throttling brings, as a share of the configured one


class Claim(NamedTuple):
    """A claim's answer: the seconds to wait for the first slot, or, when the channel is
    paused, no slot (``wait`` 0) and the throttling answer that paused it with the
    seconds left."""

    wait: float
    paused_by: SendResult | None = None
    paused_for: float = 0.0


class RateLimiter:
    """The shared limit of one channel (see the module). Thread-safe; ``acquire`` and
    ``observe`` are for coroutines and do their database work in a worker thread."""

    def __init__(self, store: Engine, channel: str, rate: float) -> None:
        self.store = store
        self.channel = channel
        self.ceiling = rate
        self.rate = rate  # the shared rate in force, as of this process's last claim
        self._sent = 0  # successful sends not yet counted towards recovery
        self._cut_seen = float("-inf")  # when this process last halved the rate
        self._lock = threading.Lock()
        clock = clock_sql(store.dialect.name)
        # paused: no slot taken (next_at stays), the pause's seconds left returned
        self._claim = text(
            f"UPDATE herald_rate_limits SET next_at = CASE WHEN paused_until > {clock} "
            f"THEN next_at WHEN next_at > {clock} THEN next_at + :n / rate "
            f"ELSE {clock} + :n / rate END WHERE channel = :channel "
            f"RETURNING next_at - :n / rate - {clock}, rate, paused_until - {clock}, "
            "paused_code, paused_detail")
        self._pause = text(
            f"UPDATE herald_rate_limits SET paused_until = {clock} + :seconds, "
            "paused_code = :code, paused_detail = :detail WHERE channel = :channel AND "
            f"(paused_until IS NULL OR paused_until < {clock} + :seconds)")
        step = f"{RECOVERY} * ceiling * :sent / (CASE WHEN rate > 1 THEN rate ELSE 1 END)"
        self._recover = text(
            f"UPDATE herald_rate_limits SET rate = CASE WHEN rate + {step} > ceiling "
            f"THEN ceiling ELSE rate + {step} END WHERE channel = :channel")
        self._cut = text(
            "UPDATE herald_rate_limits SET rate = CASE WHEN rate / 2 > ceiling * "
            f"{FLOOR} THEN rate / 2 ELSE ceiling * {FLOOR} END, cut_at = {clock} "
            f"WHERE channel = :channel AND cut_at <= {clock} - 1 RETURNING rate")
        self._insert = text(
            "INSERT INTO herald_rate_limits (channel, ceiling, rate, next_at, cut_at) "
            "VALUES (:channel, :rate, :rate, 0, 0) ON CONFLICT (channel) DO NOTHING")
        with writing(store) as conn:
            conn.execute(self._insert, {"channel": channel, "rate": rate})
            conn.execute(text(
                "UPDATE herald_rate_limits SET ceiling = :rate, rate = :rate WHERE "
                f"channel = :channel AND (ceiling <> :rate OR next_at < {clock} - :idle)"),
                {"channel": channel, "rate": rate, "idle": IDLE_RESET})

    def slice_size(self) -> int:
        """How many messages to claim at once: a tenth of a second's worth, at least one."""
        return max(1, int(self.rate * SLICE_SECONDS))

    def claim(self, n: int) -> Claim:
        """Claim the next ``n`` slots: the seconds to wait for the first of them, or the
        pause in force (no slot taken)."""
        with self._lock:
            sent, self._sent = self._sent, 0
        with writing(self.store) as conn:
            if sent and self.rate < self.ceiling:
                conn.execute(self._recover, {"channel": self.channel, "sent": sent})
            row = conn.execute(self._claim, {"channel": self.channel, "n": n}).first()
            if row is None:  # the row went (a database emptied by hand): start afresh
                conn.execute(self._insert, {"channel": self.channel, "rate": self.ceiling})
                row = conn.execute(self._claim, {"channel": self.channel, "n": n}).one()
        wait, rate, paused, code, detail = row
        self.rate = float(rate)
        if paused is not None and paused > 0:
            return Claim(0.0, SendResult.retryable(code, detail or "no detail",
                                                   throttled=True), float(paused))
        return Claim(max(0.0, float(wait)))

    def pause(self, by: SendResult, seconds: float) -> None:
        """A throttling answer asked for a long wait: every process sends nothing on the
        channel for ``seconds`` (unless a longer pause is already in force)."""
        with writing(self.store) as conn:
            conn.execute(self._pause, {"channel": self.channel, "seconds": seconds,
                                       "code": by.code, "detail": by.detail})
        log.warning("channel %s: the provider asked for a wait of %.0f s; no process sends "
                    "on the channel meanwhile (%s)", self.channel, seconds, by.detail)

    def slow_down(self) -> None:
        """A throttling answer: halve the shared rate, unless some process did within
        the last second."""
        with self._lock:
            if time.monotonic() - self._cut_seen < 1.0:
                return  # this process just did: no round trip for the same burst
            self._cut_seen = time.monotonic()
        with writing(self.store) as conn:
            row = conn.execute(self._cut, {"channel": self.channel}).first()
        if row is not None:
            self.rate = float(row[0])
            log.warning("channel %s: the provider is throttling; the shared rate is now "
                        "%.3g/s (configured %.3g/s)", self.channel, self.rate, self.ceiling)

    def recover(self, sent: int) -> None:
        """``sent`` messages went through: counted towards recovery at the next claim."""
        if sent > 0:
            with self._lock:
                self._sent += sent

    async def acquire(self, n: int) -> Claim:
        """Wait until ``n`` messages may go (their slots are claimed); when the channel
        is paused, at once, saying so (no slots claimed)."""
        claim = await asyncio.to_thread(self.claim, n)
        if claim.wait > 0:
            await asyncio.sleep(claim.wait)
        return claim

    async def observe(self, results: Sequence[SendResult]) -> None:
        """Adapt the shared rate to a slice's answers; share a long wait asked for."""
        self.recover(sum(r.outcome is Outcome.SENT for r in results))
        if any(r.throttled for r in results):
            await asyncio.to_thread(self.slow_down)
            longest = max(results, key=lambda r: (r.retry_after or 0) if r.throttled else 0)
            if longest.throttled and (longest.retry_after or 0) >= PAUSE_AFTER:
                await asyncio.to_thread(self.pause, longest, longest.retry_after or 0)


_limiters: weakref.WeakKeyDictionary[Engine, dict[tuple[str, float], RateLimiter]] = \
    weakref.WeakKeyDictionary()
_limiters_lock = threading.Lock()


def limiter_for(store: Engine, channel: str, rate: float) -> RateLimiter:
    """The process's limiter of ``channel`` at ``rate`` on ``store`` (its row ensured).
    Blocking (a database write): call it from a worker thread in async code."""
    with _limiters_lock:
        found = _limiters.setdefault(store, {}).get((channel, rate))
    if found is None:
        found = RateLimiter(store, channel, rate)
        with _limiters_lock:
            found = _limiters[store].setdefault((channel, rate), found)
    return found
