"""The dispatcher: sends a chunk's messages through their channels, once each.

Per channel: batches of the adapter's size, under the channel's rate limit (the
provider account's, shared by every process that sends on the channel through the
workspace database: ``herald.delivery.ratelimit``); each batch is marked ``sending`` in
the ledger just before it goes out and settled right after.

- A retryable answer is retried within the run, up to MAX_ATTEMPTS, after the provider's
  Retry-After or an exponential backoff, as long as that wait is at most
  MAX_WAIT_IN_RUN. Past that, the recipient is ``deferred`` with a ``not_before`` time
  (the provider's wait, at least DEFER_MIN and doubling with each deferral up to
  DEFER_MAX), and the next run of the run key after that time sends it, as after quiet
  hours. After MAX_TOTAL_ATTEMPTS attempts under one run key it fails with the reason.
- A throttling answer (429, a provider's rate-limit code) also halves the channel's
  shared rate, for every process (at most once a second); successful sends restore it
  gradually (AIMD).
- A permanent answer fails that recipient (and adds the address to the suppression list
  when the provider says so).
- A fatal answer stops the channel for every chunk of the run in this process. The
  messages it kept from going out (that one and the rest) stay ``queued`` with the
  reason, so that the job sends them once the channel is fixed: a campaign's rerun with
  its run key, a journey's next tick (the recipients wait at their send step).
- An unknown outcome (the provider took the message but did not answer) is never
  retried: the row stays ``sending`` with the reason, as after a crash mid-send.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from herald.channels.base import Channel, ChannelContext, Message, Outcome, SendResult
from herald.channels.registry import channel_class
from herald.core.workspace import Workspace
from herald.delivery import ledger, ledger_reads, suppression
from herald.delivery.ratelimit import RateLimiter, limiter_for

log = logging.getLogger("herald.dispatch")

MAX_ATTEMPTS = 3  # provider attempts of a message within one run
BACKOFF_SECONDS = 0.5  # the first in-run retry's wait when the provider names none
MAX_WAIT_IN_RUN = 30.0  # a longer wait (Retry-After, greylisting) defers the recipient
DEFER_MIN = timedelta(minutes=1)
DEFER_MAX = timedelta(hours=1)
MAX_TOTAL_ATTEMPTS = 12  # under one run key, across runs: then the recipient fails


# A stop asked for by a signal (SIGTERM, Ctrl-C): no new batch is handed to a provider in
# this process, nor in the worker processes sharing its stop (herald.delivery.workers);
# batches in flight finish and are settled. Unsent rows stay `queued`, and a rerun with
# the run key sends them.
_stop: Any = threading.Event()  # in a worker process, the event its run's process sets
_stop_reason: list[str] = []
_shared: list[Any] = []  # worker processes' events that this process's stop sets too


def request_stop(reason: str) -> None:
    _stop_reason[:] = [reason]
    _stop.set()
    for event in list(_shared):
        event.set()


def stop_requested() -> str | None:
    """Why sending stopped (``"SIGTERM"``), or None while it goes on. A worker process
    knows that its run stopped, not why: the run's process says why."""
    if not _stop.is_set():
        return None
    return _stop_reason[0] if _stop_reason else "a stop of the run"


def clear_stop() -> None:
    _stop.clear()
    _stop_reason.clear()
    for event in list(_shared):
        event.clear()


def share_stop(event: Any) -> None:
    """Set ``event`` (a multiprocessing event that worker processes read as their stop)
    whenever this process stops sending, already set if it has."""
    _shared.append(event)
    if _stop.is_set():
        event.set()


def unshare_stop(event: Any) -> None:
    _shared.remove(event)


def follow_stop(event: Any) -> None:
    """In a worker process: stop sending when ``event`` is set (by the run's process)."""
    global _stop
    _stop = event


# Channels a fatal answer stopped, per run: the other chunks of the run in this process
# send nothing more on them either.
_stopped: dict[tuple[str, str], str] = {}
_stopped_lock = threading.Lock()


# The reasons of the messages a fatal answer kept from going out: ``fatal: DETAIL`` for
# the one it answered, ``fatal: channel stopped: DETAIL`` for the rest.
STOPPED = "fatal: channel stopped: "


def fatal_cause(reason: str) -> str:
    """The provider's answer in a stopped channel's reason (DETAIL above)."""
    for prefix in ("fatal: ", "channel stopped: "):
        reason = reason.removeprefix(prefix)
    return reason


def forget_run(run_id: str) -> None:
    """Drop what this process kept about a finished run (the channels a fatal answer
    stopped)."""
    with _stopped_lock:
        for key in [k for k in _stopped if k[0] == run_id]:
            del _stopped[key]


@dataclass(frozen=True)
class Job:
    """Which run a dispatch belongs to."""

    flow: str
    run_key: str
    run_id: str


def open_channel(ws: Workspace, name: str, job: Job) -> Channel:
    settings = ws.channels[name]
    cls = channel_class(settings.type)
    return cls(name, settings, ChannelContext(ws.root, job.flow, job.run_key, job.run_id,
                                              ws.store))


async def dispatch(ws: Workspace, job: Job, messages: dict[str, list[Message]]
                   ) -> list[ledger.Outcome]:
    """Send every message (grouped by channel name), settling each in the ledger.
    Returns the outcomes settled, as written: a message missing from them was not handed
    to a provider (a stop) and its row is still ``queued``; so is a message settled
    ``queued`` (a fatal answer stopped its channel: the reason says so)."""
    settled: list[ledger.Outcome] = []
    await asyncio.gather(*(_send_channel(ws, job, name, msgs, settled)
                           for name, msgs in messages.items() if msgs))
    return settled


async def _send_channel(ws: Workspace, job: Job, name: str, messages: list[Message],
                        settled: list[ledger.Outcome]) -> None:
    settings = ws.channels[name]
    cls = channel_class(settings.type)
    size = settings.batch_size or cls.batch_size
    rate = settings.rate or cls.default_rate
    limiter = await asyncio.to_thread(limiter_for, ws.store, name, rate) if rate else None
    limit = settings.max_body or cls.max_body
    if limit:
        messages, too_long = _within(messages, limit)
        if too_long:
            await _settle(ws, job, too_long, settled)
    stopped: str | None = _stopped.get((job.run_id, name))
    # On Postgres a batch's settlement is written while the next batch is marked
    # `sending` and handed to the provider (the server works on it in another session
    # meanwhile); it must be written before the next settlement starts. SQLite has one
    # writer at a time: there each settlement is written before the next batch.
    overlap = ws.store.dialect.name == "postgresql"
    settling: asyncio.Task[None] | None = None
    try:
        async with open_channel(ws, name, job) as channel:
            for start in range(0, len(messages), size):
                if _stop.is_set():
                    break  # the rest stay `queued`: a rerun with the run key sends them
                batch = messages[start:start + size]
                if stopped:
                    await _settle(ws, job, [ledger.Outcome(
                        m.recipient, "queued", f"{STOPPED}{stopped}", attempts=0)
                        for m in batch], settled)
                    continue
                outcomes, fatal = await _send_batch(ws, job, channel, batch, limiter)
                if not overlap:
                    await _settle(ws, job, outcomes, settled)
                else:
                    if settling is not None:
                        previous, settling = settling, None
                        await _settled_before(previous, job, outcomes)
                    settling = asyncio.ensure_future(_settle(ws, job, outcomes, settled))
                if fatal:
                    stopped = fatal
                    with _stopped_lock:
                        _stopped[job.run_id, name] = fatal
                    log.error("channel %s stopped: %s", name, fatal)
    finally:
        if settling is not None:
            await settling


async def _settled_before(previous: asyncio.Task[None], job: Job,
                          sent: list[ledger.Outcome]) -> None:
    """Wait for the previous batch's settlement. When it failed (the store refused it
    for good), the batch sent meanwhile is not settled either: its rows stay `sending`
    (never resent) and the log names them with the previous batch's."""
    try:
        await previous
    except Exception:
        log.error("the answers to %d more message(s) of %s %s, sent while the previous "
                  "batch's were being recorded, are not recorded either: their rows stay "
                  "`sending` though the provider answered (recipients: %s)", len(sent),
                  job.flow, job.run_key, ", ".join(o.recipient for o in sent[:20]))
        raise


async def _send_batch(ws: Workspace, job: Job, channel: Channel, batch: Sequence[Message],
                      limiter: RateLimiter | None
                      ) -> tuple[list[ledger.Outcome], str | None]:
    await asyncio.to_thread(ledger.mark, ws.store, job.flow, job.run_key,
                            [m.recipient for m in batch], "sending")
    pending = list(batch)
    done: dict[str, ledger.Outcome] = {}
    later: list[tuple[Message, SendResult, int, float]] = []  # to defer (or fail)
    suppress: list[tuple[str, str | None, str | None]] = []
    fatal: str | None = None
    for attempt in range(1, MAX_ATTEMPTS + 1):
        results = await (send_paced(channel, pending, limiter) if limiter
                         else _guarded(channel, pending))
        retry: list[tuple[Message, SendResult]] = []
        waits: list[float] = []
        for message, result in zip(pending, results, strict=True):
            if result.outcome is Outcome.SENT:
                done[message.recipient] = ledger.Outcome(
                    message.recipient, "sent", code=result.code,
                    provider_id=result.provider_id, attempts=attempt,
                    segments=result.segments)
            elif result.outcome is Outcome.UNKNOWN:
                # the provider may have it: never resent blindly (the `sending` rule)
                done[message.recipient] = ledger.Outcome(
                    message.recipient, "sending",
                    f"outcome unknown, not resent: {result.detail or 'no detail'} "
                    "(check the provider's logs)", code=result.code, attempts=attempt)
            elif result.outcome is Outcome.RETRYABLE:
                wait = result.retry_after if result.retry_after is not None \
                    else BACKOFF_SECONDS * 2 ** (attempt - 1)
                if attempt < MAX_ATTEMPTS and wait <= MAX_WAIT_IN_RUN:
                    retry.append((message, result))
                    waits.append(wait)
                else:
                    later.append((message, result, attempt, wait))
            else:
                kind, status = result.outcome.value, "failed"
                if result.outcome is Outcome.FATAL:
                    status = "queued"  # the provider refused it: it did not go out
                done[message.recipient] = ledger.Outcome(
                    message.recipient, status, f"{kind}: {result.detail or 'no detail'}",
                    code=result.code, attempts=attempt)
                if result.outcome is Outcome.FATAL:
                    fatal = result.detail or "fatal provider answer"
                if result.suppress:
                    suppress.append((message.address, channel.name,
                                     f"provider: {result.code or ''} {result.detail or ''}"
                                     .strip()))
        if fatal:
            # the channel stopped: a retryable answer means the provider did not take the
            # message, so it stays queued for the rerun, and nothing is sent again now
            for message, result in retry:
                done[message.recipient] = ledger.Outcome(
                    message.recipient, "queued",
                    f"not retried, the channel stopped: {result.detail or 'no detail'}",
                    code=result.code, attempts=attempt)
            retry = []
        if not retry:
            break
        await asyncio.sleep(max(waits))
        pending = [message for message, _ in retry]
    if later:
        for outcome in await asyncio.to_thread(_defer, ws, job, later):
            done[outcome.recipient] = outcome
    if suppress:
        await asyncio.to_thread(suppression.suppress, ws.store, suppress, "provider")
    return [done[m.recipient] for m in batch], fatal


def _defer(ws: Workspace, job: Job, later: list[tuple[Message, SendResult, int, float]]
           ) -> list[ledger.Outcome]:
    """Retryable answers that outlasted the run's retries: deferred to a later run of the
    run key, or failed once the recipient has had MAX_TOTAL_ATTEMPTS attempts."""
    before = ledger_reads.attempts(ws.store, job.flow, job.run_key,
                             [m.recipient for m, *_ in later])
    at = ledger.now()
    out = []
    for message, result, attempt, wait in later:
        total = before.get(message.recipient, 0) + attempt
        detail = result.detail or "no detail"
        if total >= MAX_TOTAL_ATTEMPTS:
            out.append(ledger.Outcome(
                message.recipient, "failed",
                f"retryable, gave up after {total} attempts: {detail}", code=result.code,
                attempts=attempt))
            continue
        backoff = DEFER_MIN * 2 ** (before.get(message.recipient, 0) // MAX_ATTEMPTS)
        delay = max(min(DEFER_MAX, backoff), timedelta(seconds=wait))  # never before
        # the provider's Retry-After
        until = at + delay
        out.append(ledger.Outcome(
            message.recipient, "deferred",
            f"deferred to {until:%Y-%m-%d %H:%M:%S} UTC after {total} attempts: {detail}",
            code=result.code, attempts=attempt, not_before=until))
    return out


def body_size(message: Message) -> int:
    """What a body limit counts: the characters of the subject, text and HTML parts."""
    return len(message.body) + len(message.subject or "") + len(message.html or "")


def _within(messages: list[Message], limit: int
            ) -> tuple[list[Message], list[ledger.Outcome]]:
    """Messages within the channel's body limit, and failures for the others (never
    handed to the provider: an oversized SMS is billed in parts, a huge e-mail refused)."""
    keep, refused = [], []
    for m in messages:
        size = body_size(m)
        if size > limit:
            refused.append(ledger.Outcome(
                m.recipient, "failed", f"permanent: the message has {size:,} characters, "
                f"over the channel's limit of {limit:,} (max_body)", code="body_too_long",
                attempts=0))
        else:
            keep.append(m)
    return keep, refused


async def _guarded(channel: Channel, messages: Sequence[Message]) -> list[SendResult]:
    """Call the adapter. The base class turns an exception while sending one message into
    that message's failure; an adapter's own ``send_batch`` that raises or answers with a
    wrong length leaves the whole batch's outcome unknown: some messages may have gone
    out, so the batch fails without a retry (never twice)."""
    try:
        results = await channel.send_batch(messages)
    except Exception as exc:  # an adapter bug must not lose the batch's ledger rows
        log.exception("channel %s raised while sending", channel.name)
        detail = f"adapter raised {type(exc).__name__}; outcome unknown, not retried"
        return [SendResult.permanent("adapter_error", detail) for _ in messages]
    if len(results) != len(messages):
        detail = (f"adapter returned {len(results)} results for {len(messages)} messages; "
                  "outcome unknown, not retried")
        return [SendResult.permanent("adapter_error", detail) for _ in messages]
    return results


async def send_paced(channel: Channel, messages: Sequence[Message], limiter: RateLimiter
                     ) -> list[SendResult]:
    """Send ``messages`` under the channel's shared rate limit: in slices of about a
    tenth of a second's worth, each handed over at its claimed slot. Slices overlap when
    the provider answers slower than the rate allows, as many as the channel's
    concurrency holds. A fatal answer stops the slices not yet handed over; a throttling
    answer slows the shared rate down at once, not at the end of the batch, and one that
    asks for a long wait pauses the channel: the slices after it, here and in every
    process claiming on the channel, are held back without a request."""
    size, concurrency, slices = limiter.slice_size(), channel.concurrency(), 1
    if size < concurrency:  # whole slices in flight that fill the channel's concurrency
        slices = concurrency // size
        size = concurrency // slices
    room = asyncio.Semaphore(slices)
    fatal: list[SendResult] = []
    parts: list[asyncio.Task[list[SendResult]] | list[SendResult]] = []

    async def send(part: Sequence[Message]) -> list[SendResult]:
        try:
            results = await _guarded(channel, part)
        finally:
            room.release()
        fatal.extend(r for r in results if r.outcome is Outcome.FATAL)
        await limiter.observe(results)
        return results

    try:
        for start in range(0, len(messages), size):
            part = messages[start:start + size]
            await room.acquire()
            held = channel.held()  # its own answer's pause, or a shared one seen before
            if not fatal and held is None:
                claim = await limiter.acquire(len(part))
                if claim.paused_by is not None:  # another slice's, chunk's or process's
                    channel.pause(claim.paused_by, claim.paused_for)
                    held = channel.held()
            if fatal:
                room.release()
                parts.append([SendResult.fatal(fatal[0].code, "not sent: the channel "
                                               f"stopped: {fatal[0].detail}")] * len(part))
                continue
            if held is not None:
                room.release()
                parts.append([SendResult.held_back(*held)] * len(part))
                continue
            parts.append(asyncio.create_task(send(part)))
        await asyncio.gather(*(p for p in parts if isinstance(p, asyncio.Task)))
    except BaseException:
        for p in parts:
            if isinstance(p, asyncio.Task):
                p.cancel()
        raise
    return [r for p in parts for r in (p if isinstance(p, list) else p.result())]


async def _settle(ws: Workspace, job: Job, outcomes: list[ledger.Outcome],
                  settled: list[ledger.Outcome]) -> None:
    await asyncio.to_thread(ledger.settle, ws.store, job.flow, job.run_key, outcomes)
    settled.extend(outcomes)  # only once written: a failed settle raises before this


def group(messages: Sequence[tuple[str, Message]]) -> dict[str, list[Message]]:
    out: dict[str, list[Message]] = defaultdict(list)
    for channel, message in messages:
        out[channel].append(message)
    return out
