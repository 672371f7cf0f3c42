"""A channel's rate limit is the provider account's: shared through the workspace
database by every process that sends on the channel, throttling included."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine, text

from herald.channels.base import ChannelContext, Message, Outcome, SendResult
from herald.channels.webhook import WebhookChannel, WebhookSettings
from herald.core.db import open_store
from herald.delivery.dispatch import send_paced
from herald.delivery.ratelimit import RateLimiter, limiter_for

from .http_peer import Peer, Request, serve


@pytest.fixture
def store(tmp_path: Path, store_url: str | None) -> Iterator[Engine]:
    engine = open_store(store_url or "sqlite:///herald.db", tmp_path)
    yield engine
    engine.dispose()


def test_claims_take_consecutive_slots_at_the_rate(store: Engine) -> None:
    limiter = RateLimiter(store, "sms", 100.0)
    assert limiter.slice_size() == 10  # a tenth of a second's worth
    assert limiter.claim(10).wait == pytest.approx(0.0, abs=0.02)  # idle: at once
    assert limiter.claim(10).wait == pytest.approx(0.1, abs=0.03)
    assert limiter.claim(50).wait == pytest.approx(0.2, abs=0.03)
    other = RateLimiter(store, "sms", 100.0)  # another process: the same slots
    assert other.claim(1).wait == pytest.approx(0.7, abs=0.05)
    assert RateLimiter(store, "email", 100.0).claim(1).wait == pytest.approx(0.0, abs=0.02)


def test_throttling_halves_the_shared_rate_and_success_restores_it_gradually(
        store: Engine) -> None:
    def cut_a_second_ago() -> None:
        with store.begin() as conn:
            conn.execute(text("UPDATE herald_rate_limits SET cut_at = cut_at - 1.5"))
        for limiter in (mine, theirs):
            limiter._cut_seen = float("-inf")

    mine, theirs = RateLimiter(store, "sms", 100.0), RateLimiter(store, "sms", 100.0)
    mine.slow_down()
    assert mine.rate == 50.0
    theirs.slow_down()  # the same burst of 429s, seen by another process: one signal
    theirs.claim(1)
    assert theirs.rate == 50.0  # every process sends at the halved rate
    mine.recover(50)  # a second's worth of sends at 50/s: +5% of the configured rate
    mine.claim(1)
    assert mine.rate == pytest.approx(55.0)
    for _ in range(100):
        theirs.recover(100)
        theirs.claim(1)
    assert theirs.rate == 100.0  # never above the configured rate
    for _ in range(10):
        cut_a_second_ago()
        mine.slow_down()
    assert mine.rate == pytest.approx(100 / 64)  # a 64th of the configured rate at least
    assert limiter_for(store, "sms", 80.0).rate == 80.0  # a new configured rate: afresh


def test_paced_sending_slows_down_at_once_and_stops_at_a_fatal_answer(
        store: Engine, tmp_path: Path) -> None:
    requested: list[int] = []

    def answer(request: httpx.Request) -> httpx.Response:
        n = int(json.loads(request.content)["recipient"])
        requested.append(n)
        if n == 3:
            return httpx.Response(429, json={"message": "slow down"})
        if n == 12:
            return httpx.Response(401, json={"message": "bad key"})
        return httpx.Response(200, json={"id": f"p{n}"})

    limiter = RateLimiter(store, "hook", 40.0)  # slices of 4, one at a time
    settings = WebhookSettings(type="webhook", url="http://hook.test/send", concurrency=1)
    context = ChannelContext(tmp_path, "promo", "k", "run",
                             transport=httpx.MockTransport(answer))
    messages = [Message(recipient=str(i), address="", kind="webhook", body="hello",
                        message_id=f"<{i}@test>") for i in range(30)]

    async def send() -> list:
        async with WebhookChannel("hook", settings, context) as channel:
            return await send_paced(channel, messages, limiter)

    results = asyncio.run(send())
    # the 429 of the first slice halved the shared rate; the sends after it recover a bit
    assert 20.0 < limiter.rate < 22.0
    assert requested == list(range(13))  # nothing handed over after the refusal
    assert [r.outcome for r in results[:3]] == [Outcome.SENT] * 3
    assert results[3].outcome is Outcome.RETRYABLE and results[3].throttled
    assert results[12].outcome is Outcome.FATAL and results[12].code == "401"
    assert all(r.outcome is Outcome.FATAL and r.detail.startswith(
        "not sent: the channel stopped") for r in results[13:])


def test_a_long_wait_asked_for_pauses_the_channel_for_every_process(store: Engine) -> None:
    """A 429 asking for 120 s, told to one process, holds every process's claims on the
    channel until then, without taking their slots; a shorter wait asked for later does
    not end it sooner."""
    mine, theirs = RateLimiter(store, "hook", 100.0), RateLimiter(store, "hook", 100.0)
    assert mine.claim(1).paused_by is None
    told = SendResult.retryable("429", "HTTP 429: too many requests", 120.0, throttled=True)
    mine.pause(told, 120.0)
    for _ in range(10):  # 500 slots asked for: none taken
        claim = theirs.claim(50)
        assert claim.wait == 0.0 and claim.paused_by is not None
        assert claim.paused_by.code == "429"
        assert claim.paused_by.detail == "HTTP 429: too many requests"
        assert 110.0 < claim.paused_for <= 120.0
    mine.pause(SendResult.retryable("429", "later", 40.0, throttled=True), 40.0)
    assert theirs.claim(1).paused_for > 110.0  # the longer wait stands
    assert RateLimiter(store, "email", 100.0).claim(1).paused_by is None  # another channel
    with store.begin() as conn:  # the wait is over
        conn.execute(text("UPDATE herald_rate_limits SET paused_until = paused_until - 121"))
    after = theirs.claim(1)
    assert after.paused_by is None
    assert after.wait < 0.05  # the claims made during the pause took no slots


def test_paced_sending_holds_back_while_another_process_paused_the_channel(
        store: Engine, tmp_path: Path) -> None:
    """Another process was told to wait 120 s: this one sends nothing either, each
    message held back (retryable after the pause, not a throttling answer of its own, so
    the shared rate stays). A long wait told to this one pauses the others."""
    requested: list[int] = []

    def answer(request: httpx.Request) -> httpx.Response:
        n = int(json.loads(request.content)["recipient"])
        requested.append(n)
        if n == 2:
            return httpx.Response(429, headers={"Retry-After": "90"},
                                  json={"message": "slow down"})
        return httpx.Response(200, json={"id": f"p{n}"})

    settings = WebhookSettings(type="webhook", url="http://hook.test/send", concurrency=1)
    context = ChannelContext(tmp_path, "promo", "k", "run",
                             transport=httpx.MockTransport(answer))
    messages = [Message(recipient=str(i), address="", kind="webhook", body="hello",
                        message_id=f"<{i}@test>") for i in range(12)]

    async def send(limiter: RateLimiter) -> list:
        async with WebhookChannel("hook", settings, context) as channel:
            return await send_paced(channel, messages, limiter)

    told = RateLimiter(store, "hook", 40.0)
    told.pause(SendResult.retryable("429", "HTTP 429: too many requests", 120.0,
                                    throttled=True), 120.0)
    here = RateLimiter(store, "hook", 40.0)
    results = asyncio.run(send(here))
    assert requested == []
    assert all(r.outcome is Outcome.RETRYABLE and not r.throttled for r in results)
    assert all(r.detail == "not sent: the provider asked the channel to wait "
               "(HTTP 429: too many requests)" and 110 < (r.retry_after or 0) <= 120
               for r in results)
    assert here.rate == 40.0

    with store.begin() as conn:  # over; then this process is told to wait 90 s
        conn.execute(text("UPDATE herald_rate_limits SET paused_until = NULL"))
    results = asyncio.run(send(here))
    assert requested == [0, 1, 2]  # nothing more asked for once told to wait
    assert results[2].throttled and results[2].retry_after == 90
    assert all(r.detail and r.detail.startswith("not sent: the provider asked the channel "
                                                "to wait") for r in results[3:])
    claim = told.claim(1)  # the other process's next claim
    assert claim.paused_by is not None and 80 < claim.paused_for <= 90


CHILD = textwrap.dedent("""
    import asyncio, sys
    from pathlib import Path
    from herald.channels.base import ChannelContext, Message
    from herald.channels.webhook import WebhookChannel, WebhookSettings
    from herald.core.db import open_store
    from herald.delivery.dispatch import send_paced
    from herald.delivery.ratelimit import limiter_for

    root, store_url, url, first, count, rate = sys.argv[1:]
    engine = open_store(store_url, Path(root))
    limiter = limiter_for(engine, "hook", float(rate))
    messages = [Message(recipient=str(i), address="", kind="webhook", body="hello",
                        message_id=f"<{i}@test>")
                for i in range(int(first), int(first) + int(count))]

    async def main():
        settings = WebhookSettings(type="webhook", url=url, concurrency=8)
        context = ChannelContext(Path(root), "promo", "k", "run")
        async with WebhookChannel("hook", settings, context) as channel:
            results = await send_paced(channel, messages, limiter)
        assert all(r.outcome.value == "sent" for r in results), results

    asyncio.run(main())
""")


def test_two_processes_share_the_channel_rate(tmp_path: Path, store_url: str | None
                                              ) -> None:
    """Two processes send 150 messages each on a 50/s channel: together at 50/s (about
    6 s), where a limit held per process would let them send at 100/s (about 3 s)."""
    arrived: list[float] = []
    lock = threading.Lock()

    def stamp(request: Request) -> dict[str, str]:
        with lock:
            arrived.append(time.monotonic())
        return {"id": f"p-{len(request.body)}"}

    server, peer = serve(Peer(ok_body=stamp))
    url = store_url or f"sqlite:///{tmp_path / 'herald.db'}"
    open_store(url, tmp_path).dispose()  # the schema, before both processes start
    python = os.path.join(os.path.dirname(sys.executable), "python")
    try:
        procs = [subprocess.Popen([python, "-c", CHILD, str(tmp_path), url,
                                   f"{peer.url}/send", str(first), "150", "50"])
                 for first in (0, 1000)]
        assert [p.wait(120) for p in procs] == [0, 0]
    finally:
        server.shutdown()
        server.server_close()
    assert len(arrived) == 300
    rate = (len(arrived) - 1) / (max(arrived) - min(arrived))
    assert 35 <= rate <= 60, f"{rate:.1f} messages a second on a 50/s channel"
