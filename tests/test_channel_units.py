"""Each HTTP adapter on its own, with the transport injected through its context
(``httpx.MockTransport``): the requests it builds and how it reads each documented answer
and the undocumented ones. The real-peer tests (test_channel_*.py) cover the wire; these
pin the classification, and the base class's batch rules, without a server."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest
from sqlalchemy import create_engine

from herald.channels.base import (
    Channel,
    ChannelContext,
    ChannelSettings,
    Message,
    Outcome,
    SendResult,
)
from herald.channels.sms import SmsChannel, SmsSettings
from herald.channels.webhook import WebhookChannel, WebhookSettings
from herald.channels.wechat import WechatChannel, WechatSettings
from herald.core.db import ensure_schema

Handler = Callable[[httpx.Request], httpx.Response]


def context(tmp_path: Path, handler: Handler, store: Any = None) -> ChannelContext:
    return ChannelContext(tmp_path, "promo", "k1", "run-1", store,
                          httpx.MockTransport(handler))


def message(i: int = 1, body: str = "Hello", address: str = "+8613800138000") -> Message:
    return Message(recipient=str(i), address=address, kind="sms", body=body,
                   message_id=f"<m{i}@herald>")


def send(channel: Channel, *messages: Message) -> list[SendResult]:
    async def go() -> list[SendResult]:
        async with channel:
            return await channel.send_batch(list(messages))
    return asyncio.run(go())


def twilio(tmp_path: Path, handler: Handler) -> SmsChannel:
    settings = SmsSettings(type="sms", provider="twilio", account_sid="AC1",
                           auth_token="tok", sender="+15005550006",
                           base_url="https://api.twilio.test")
    return SmsChannel("sms", settings, context(tmp_path, handler))


def test_twilio_request_and_documented_answers(tmp_path: Path) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        to = parse_qs(request.content.decode())["To"][0]
        if to.endswith("1"):
            return httpx.Response(201, json={"sid": "SM123", "status": "queued"})
        if to.endswith("2"):
            return httpx.Response(400, json={"code": 21211, "message": "Invalid 'To'"})
        if to.endswith("3"):
            return httpx.Response(429, json={"code": 20429, "message": "Too Many Requests"},
                                  headers={"Retry-After": "7"})
        return httpx.Response(400, json={"code": 21610, "message": "unsubscribed"})

    results = send(twilio(tmp_path, handler), *(message(i, address=f"+1415555000{i}")
                                                for i in range(1, 5)))
    assert seen[0].url.path == "/2010-04-01/Accounts/AC1/Messages.json"
    assert seen[0].headers["Authorization"].startswith("Basic ")
    assert [r.outcome for r in results] == [Outcome.SENT, Outcome.PERMANENT,
                                            Outcome.RETRYABLE, Outcome.PERMANENT]
    assert results[0].provider_id == "SM123" and results[0].segments == 1
    assert results[1].code == "21211" and not results[1].suppress
    assert results[2].retry_after == 7.0 and results[2].throttled
    assert results[3].suppress  # STOP: the number goes on the suppression list


@pytest.mark.parametrize("answer", [
    httpx.Response(200, text="<html><body>Bad gateway</body></html>",
                   headers={"content-type": "text/html"}),
    httpx.Response(201, json={"status": "queued"}),  # no sid
    httpx.Response(200, text=""),
])
def test_twilio_success_needs_a_sid(tmp_path: Path, answer: httpx.Response) -> None:
    [result] = send(twilio(tmp_path, lambda _r: answer), message())
    assert result.outcome is Outcome.PERMANENT and result.code == "unexpected_answer"
    assert "not retried" in (result.detail or "")


def test_aliyun_answers_and_an_html_page(tmp_path: Path) -> None:
    answers = iter([
        httpx.Response(200, json={"Code": "OK", "BizId": "900619746936498440^0"}),
        httpx.Response(200, json={"Code": "isv.MOBILE_NUMBER_ILLEGAL", "Message": "bad"}),
        httpx.Response(200, json={"Code": "isv.AMOUNT_NOT_ENOUGH", "Message": "balance"}),
        httpx.Response(200, text="<html>proxy</html>", headers={"content-type": "text/html"}),
    ])
    settings = SmsSettings(type="sms", provider="aliyun", access_key_id="LTAI",
                           access_key_secret="secret", sign_name="Shop",
                           template_code="SMS_1", base_url="https://dysmsapi.test")
    channel = SmsChannel("sms", settings, context(tmp_path, lambda _r: next(answers)))
    body = json.dumps({"name": "Li"})
    first = send(channel, message(1, body))
    assert first[0].outcome is Outcome.SENT and first[0].provider_id.startswith("9006")
    assert send(channel, message(2, body))[0].outcome is Outcome.PERMANENT
    assert send(channel, message(3, body))[0].outcome is Outcome.FATAL
    assert send(channel, message(4, body))[0].code == "unexpected_answer"


def test_webhook_signs_and_reads_answers(tmp_path: Path) -> None:
    statuses = iter([200, 503, 410, 401])

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers["Idempotency-Key"]
        assert request.headers["X-Herald-Signature"].startswith("sha256=")
        return httpx.Response(next(statuses), json={"id": "evt-1"})

    settings = WebhookSettings(type="webhook", url="https://hooks.test/in", secret="s3cret",
                               concurrency=1)
    channel = WebhookChannel("hook", settings, context(tmp_path, handler))
    results = send(channel, *(message(i) for i in range(1, 5)))
    assert [r.outcome for r in results] == [Outcome.SENT, Outcome.RETRYABLE,
                                            Outcome.PERMANENT, Outcome.FATAL]
    assert results[0].provider_id == "evt-1" and results[2].suppress


def test_wechat_token_then_send_and_an_answer_without_errcode(tmp_path: Path) -> None:
    store = create_engine(f"sqlite:///{tmp_path / 'h.db'}")
    ensure_schema(store)
    sends = iter([httpx.Response(200, json={"errcode": 0, "errmsg": "ok", "msgid": 42}),
                  httpx.Response(200, json={"errcode": 43004, "errmsg": "require subscribe"}),
                  httpx.Response(200, text="<html>gateway</html>",
                                 headers={"content-type": "text/html"})])

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/cgi-bin/stable_token":
            assert json.loads(request.content)["force_refresh"] is False
            return httpx.Response(200, json={"access_token": "T1", "expires_in": 7200})
        assert request.url.params["access_token"] == "T1"
        return next(sends)

    settings = WechatSettings(type="wechat", appid="wx1", secret="sec", message="template",
                              template_id="TPL", base_url="https://api.weixin.test",
                              concurrency=1)  # answers in order
    channel = WechatChannel("wx", settings, context(tmp_path, handler, store))
    body = json.dumps({"thing1": "Points", "number2": 120})
    results = send(channel, *(message(i, body, address=f"openid-{i}") for i in (1, 2, 3)))
    assert results[0].outcome is Outcome.SENT and results[0].provider_id == "42"
    assert results[1].outcome is Outcome.PERMANENT and results[1].suppress
    assert results[2].code == "unexpected_answer"
    store.dispose()


class Counting(Channel):
    """A channel whose provider answers fatally on the second message."""

    type_name = "counting"
    kinds = frozenset({"sms"})
    Settings = ChannelSettings

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.handed: list[str] = []

    async def send_one(self, message: Message) -> SendResult:
        self.handed.append(message.recipient)
        if message.recipient == "2":
            return SendResult.fatal("401", "bad credentials")
        return SendResult.sent()


def test_the_base_sends_nothing_more_after_a_fatal_answer(tmp_path: Path) -> None:
    channel = Counting("c", ChannelSettings(type="counting"),
                       ChannelContext(tmp_path, "promo", "k", "r"))
    results = send(channel, *(message(i) for i in range(1, 6)))
    assert channel.handed == ["1", "2"]  # concurrency 1: in order, then nothing more
    assert [r.outcome for r in results] == [Outcome.SENT] + [Outcome.FATAL] * 4
    assert results[4].detail == "not sent: the channel stopped: bad credentials"


def test_a_body_over_the_channels_limit_fails_unsent(make_workspace) -> None:
    from herald.flows.engine import run_local

    from .helpers import HERALD_YAML, outbox_messages

    config = HERALD_YAML.replace("sms: {type: outbox, kind: sms}",
                                 "sms: {type: outbox, kind: sms, max_body: 40}")
    ws = make_workspace({"config/herald.yaml": config,
                         "config/flows/promo.yaml": (
                             "name: promo\naudience: {source: crm, segment: people, "
                             "params: {min_score: 0}, key: id, tier: tier}\n"
                             "tiers: {default: {channels: [sms]}}\n"),
                         # "Hi User 9, score 9." fits 40 characters; ids from 10 do not
                         "templates/promo/default.sms.txt.j2":
                             "Hi {{ name }}, score {{ score }}.{{ ' padding' * (id // 10 * 3) }}"},
                        rows=12)
    summary = run_local(ws, "promo", run_key="k")
    with ws.store.connect() as conn:
        rows = {r.recipient: r for r in conn.exec_driver_sql(
            "SELECT recipient, status, code, reason FROM herald_deliveries")}
    too_long = {k for k, r in rows.items() if r.code == "body_too_long"}
    assert too_long == {"11", "12"}  # 10 has no phone (every 5th)
    assert all(rows[k].status == "failed" and "over the channel's limit of 40"
               in rows[k].reason for k in too_long)
    assert summary["deliveries"]["sent"] == outbox_messages(ws) == 8
