"""The WeChat channel against a real HTTP server on loopback that answers like the
Official Account API: the stable-token endpoint, template messages and subscription
notifications, and their error codes."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlsplit
from zoneinfo import ZoneInfo

import pytest

from herald.channels.wechat import check_fields, token_forces
from herald.core.db import ensure_schema
from herald.core.errors import RunError
from herald.flows import engine

from .helpers import PROMO_YAML, ledger_rows, suppression_rows, table_rows
from .http_peer import Peer, Request, serve


def key(request: Request) -> str:
    return "token" if request.path.startswith("/cgi-bin/stable_token") else \
        str(request.json()["touser"])


def token_of(request: Request) -> str:
    return parse_qs(urlsplit(request.path).query)["access_token"][0]


@pytest.fixture
def wechat() -> Iterator[Peer]:
    peer = Peer(key=key, ok_body=lambda r: {"errcode": 0, "errmsg": "ok",
                                            "msgid": 200228332 + len(r.body)})
    server, found = serve(peer)
    yield found
    server.shutdown()
    server.server_close()


def openid(i: int) -> str:
    return f"user{i}@example.com"  # the test CRM's e-mail column stands in for openids


def wechat_ws(make_workspace, peer: Peer, message: str, monkeypatch, rows: int = 12,
              extra: str = ""):
    monkeypatch.setenv("WECHAT_SECRET", "wx-secret-1")
    return make_workspace({
        "config/herald.yaml": (
            "timezone: UTC\nsources:\n  crm: \"sqlite:///crm.db\"\nchannels:\n"
            f"  wx: {{type: wechat, appid: wx1234, secret: \"${{WECHAT_SECRET}}\", "
            f"message: {message}, template_id: TPL-POINTS, base_url: \"{peer.url}\", "
            f"address: email, link: pages/points/index{extra}}}\n"
            "  sms: {type: outbox, kind: sms}\nchunk_size: 4\nmax_workers: 3\n"),
        "config/flows/promo.yaml": PROMO_YAML.replace(
            "gold: {channels: [email, sms]}", "gold: {channels: [wx, sms]}").replace(
            "default: {channels: [sms, email]}", "default: {channels: [wx, sms]}"),
        "templates/promo/default.wechat.txt.j2":
            '{"thing1": {{ name|tojson }}, "number2": "{{ score }}"}',
    }, rows=rows)


def ledger(ws) -> dict[str, tuple]:
    return ledger_rows(ws, "status", "channel", "code", "provider_id", "reason")


def suppressed(ws) -> set[tuple[str, str]]:
    return set(suppression_rows(ws, "value", "channel"))


def test_subscription_notifications_one_shared_token_and_answers(
        make_workspace, wechat, monkeypatch) -> None:
    ws = wechat_ws(make_workspace, wechat, "subscribe", monkeypatch)
    wechat.script("token", ("json", 200, {"access_token": "T1", "expires_in": 7200}),
                  ("json", 200, {"access_token": "T2", "expires_in": 7200}))
    wechat.script(openid(2), ("json", 200, {"errcode": 43101,
                                            "errmsg": "user refuse to accept the msg"}))
    wechat.script(openid(3), ("json", 200, {"errcode": 42001,
                                            "errmsg": "access_token expired"}))
    wechat.script(openid(4), ("json", 200, {"errcode": -1, "errmsg": "system error"}))
    wechat.script(openid(6), ("json", 200, {"errcode": 43004, "errmsg": "require subscribe"}))
    wechat.script(openid(9), ("json", 200, {"errcode": 40003, "errmsg": "invalid openid"}))
    wechat.script(openid(11), ("status", 502))  # a gateway's, in front of WeChat
    with sqlite3.connect(ws.root / "crm.db") as conn:
        conn.execute("UPDATE people SET name = ? WHERE id = 8", ("A" * 25,))
    summary = engine.run_local(ws, "promo", run_key="wx")
    rows = ledger(ws)

    # one token for the whole run (3 chunks on 3 workers), refreshed once when expired
    token_requests = [r for r in wechat.requests if key(r) == "token"]
    assert len(token_requests) == 2
    assert token_requests[0].json() == {"grant_type": "client_credential", "appid": "wx1234",
                                        "secret": "wx-secret-1", "force_refresh": False}
    assert token_requests[1].json()["force_refresh"] is False  # normal mode refreshes
    retried = [token_of(r) for r in wechat.requests if key(r) == openid(3)]
    assert retried == ["T1", "T2"] and rows["3"][0] == "sent"

    assert rows["1"][:2] == ("sent", "wx") and rows["1"][3] is not None
    assert rows["2"][:3] == ("failed", "wx", "43101") and "no consent" in rows["2"][4]
    assert rows["6"][:3] == ("failed", "wx", "43004")
    # not following: suppressed; 43101 on a subscription notification only says the
    # user's one-time consent is used up, and they may give another: not suppressed
    assert suppressed(ws) == {(openid(6), "wx")}
    # an openid WeChat does not know for this account (another account's, say: a wrong
    # appid makes them all so) fails without being suppressed for good
    assert rows["9"][:3] == ("failed", "wx", "40003") and "appid" in rows["9"][4]
    # a 502 from a gateway may have passed the request on: not resent (no idempotency key)
    assert rows["11"][0] == "sending" and "not resent" in rows["11"][4], rows["11"]
    assert len([r for r in wechat.requests if key(r) == openid(11)]) == 1
    assert rows["4"][0] == "sent"  # system busy: retried
    assert rows["8"][:3] == ("failed", "wx", "data")
    assert "thing1: 25 characters, thing allows 20" in rows["8"][4]
    assert rows["7"][:2] == ("sent", "sms")  # no openid: falls back to the next channel
    sent = next(r.json() for r in wechat.requests if key(r) == openid(1))
    assert sent == {"touser": openid(1), "template_id": "TPL-POINTS",
                    "page": "pages/points/index",
                    "data": {"thing1": {"value": "User 1"}, "number2": {"value": "1"}}}
    assert all(r.path.startswith("/cgi-bin/message/subscribe/bizsend")
               for r in wechat.requests if key(r) != "token")
    assert summary["deliveries"]["failed"] == 4

    # a second run (another run key) reuses the stored token: no token request
    before = len(token_requests)
    engine.run_local(ws, "promo", run_key="wx-2")
    assert len([r for r in wechat.requests if key(r) == "token"]) == before


RUN_IN_A_PROCESS = textwrap.dedent("""
    import json, sys
    from herald.flows import engine
    from herald.core.workspace import Workspace
    summary = engine.run_local(Workspace.open(sys.argv[1]), "promo", run_key="slow")
    print(json.dumps(summary["deliveries"]))
""")


def test_a_slow_first_token_with_several_chunks_at_default_concurrency_does_not_hang(
        make_workspace, wechat, monkeypatch) -> None:
    """As a new workspace meets WeChat: no token cached yet, 4 chunks on 4 workers, each
    with the default 16 requests in flight, and a token endpoint that takes a second.
    Waiting for the token lock on executor threads hung this run for good on any machine
    with fewer than 12 CPUs; the run goes in a process of its own so a hang fails the
    test (and is killed) instead of hanging the suite."""
    ws = wechat_ws(make_workspace, wechat, "subscribe", monkeypatch, rows=200)
    config = ws.root / "config/herald.yaml"
    config.write_text(config.read_text().replace("chunk_size: 4\nmax_workers: 3",
                                                 "chunk_size: 50\nmax_workers: 4"))
    wechat.script("token", ("timeout", 1.0,
                            ("json", 200, {"access_token": "T1", "expires_in": 7200})))
    try:
        done = subprocess.run([sys.executable, "-c", RUN_IN_A_PROCESS, str(ws.root)],
                              capture_output=True, text=True, timeout=60, check=True)
    except subprocess.TimeoutExpired:
        pytest.fail("the run hung: chunks waiting for the WeChat token never finished")
    deliveries = json.loads(done.stdout.strip().splitlines()[-1])
    rows = ledger(ws)
    assert len(rows) == 200 and deliveries["sending"] == 0 == deliveries["queued"]
    wx_sent = [k for k, r in rows.items() if r[:2] == ("sent", "wx")]
    assert len(wx_sent) == 200 - 200 // 7  # every 7th person has no openid: sms instead
    assert all(token_of(r) == "T1" for r in wechat.requests if key(r) != "token")
    # one token request for the process: every task of every chunk awaited that one
    assert len([r for r in wechat.requests if key(r) == "token"]) == 1


def forces(ws) -> list[tuple]:
    return table_rows(ws, "herald_channel_token_forces", "account", "day", "count")


def test_a_refused_token_is_renewed_in_normal_mode_then_forced_once(
        make_workspace, wechat, monkeypatch, caplog) -> None:
    ws = wechat_ws(make_workspace, wechat, "subscribe", monkeypatch, rows=1)
    wechat.script("token", *(("json", 200, {"access_token": t, "expires_in": 7200})
                             for t in ("T1", "T2", "T3")))
    expired = ("json", 200, {"errcode": 40001, "errmsg": "invalid credential, access_token "
                             "is invalid or not latest"})
    wechat.script(openid(1), expired, expired)
    engine.run_local(ws, "promo", run_key="force")
    modes = [r.json()["force_refresh"] for r in wechat.requests if key(r) == "token"]
    assert modes == [False, False, True]  # normal, normal again, then forced
    assert [token_of(r) for r in wechat.requests if key(r) == openid(1)] == ["T1", "T2", "T3"]
    assert ledger(ws)["1"][0] == "sent"
    today = datetime.now(ZoneInfo("Asia/Shanghai")).date().isoformat()
    assert forces(ws) == [("wx1234", today, 1)]
    assert "force-refresh mode" in caplog.text


@pytest.mark.parametrize(("count", "seconds_ago", "why"), [
    (20, 3600, "20 force refreshes were used today (WeChat allows 20 a day)"),
    (3, 10, "(WeChat allows one every 30 s)")])
def test_force_refresh_stays_within_wechats_limits(count, seconds_ago, why, make_workspace,
                                                   wechat, monkeypatch) -> None:
    ws = wechat_ws(make_workspace, wechat, "subscribe", monkeypatch, rows=1,
                   extra=", timeout: 1")
    at = datetime.now(UTC)
    ensure_schema(ws.store)
    with ws.store.begin() as conn:
        conn.execute(token_forces.insert().values(
            account="wx1234", day=at.astimezone(ZoneInfo("Asia/Shanghai")).date().isoformat(),
            count=count, last_at=at - timedelta(seconds=seconds_ago)))
    wechat.script("token", *(("json", 200, {"access_token": t, "expires_in": 7200})
                             for t in ("T1", "T2")))
    expired = ("json", 200, {"errcode": 42001, "errmsg": "access_token expired"})
    wechat.script(openid(1), expired, expired)
    with pytest.raises(RunError, match="channel wx stopped"):
        engine.run_local(ws, "promo", run_key="limits")
    assert [r.json()["force_refresh"] for r in wechat.requests if key(r) == "token"] == [
        False, False]  # never forced beyond the limits
    status, _, code, _, reason = ledger(ws)["1"]  # kept for a rerun once a token works
    assert (status, code) == ("queued", "40001") and why in reason


@pytest.mark.parametrize(("errcode", "errmsg", "why"), [
    (40037, "invalid template_id", "invalid or banned"),
    (45009, "reach max api daily quota limit", "daily API quota is used up")])
def test_template_messages_and_a_banned_template_or_the_quota_stops_the_channel(
        errcode, errmsg, why, make_workspace, wechat, monkeypatch) -> None:
    ws = wechat_ws(make_workspace, wechat, "template", monkeypatch, rows=6,
                   extra=", concurrency: 1")
    wechat.script("token", ("json", 200, {"access_token": "T1", "expires_in": 7200}))
    for i in range(1, 7):
        wechat.script(openid(i), ("json", 200, {"errcode": errcode, "errmsg": errmsg}))
    with pytest.raises(RunError, match=rf"channel wx stopped \(.*{why}.*\): 6 message"):
        engine.run_local(ws, "promo", run_key="banned", max_workers=1)
    rows = ledger(ws)
    # the channel stopped and the run failed: each recipient kept queued with the reason
    assert all(r[0] == "queued" and why in r[4] for r in rows.values())
    sends = [r for r in wechat.requests if key(r) != "token"]
    assert len(sends) == 1  # the channel stopped for the whole run after the answer
    assert all(r.path.startswith("/cgi-bin/message/template/send") for r in sends)
    assert sends[0].json()["url"] == "pages/points/index"


def test_field_limits() -> None:
    assert check_fields({"thing1": "x" * 20, "number2": "12.5", "amount3": "¥100.00",
                         "phone_number4": "+86 138 0000 0000", "letter5": "abc",
                         "time6": "2026-11-22 10:00"}, "subscribe") == []
    problems = check_fields({"thing1": "x" * 21, "number2": "12a", "phrase3": "太长的短语了",
                             "bogus4": "x", "letter5": "ab1"}, "subscribe")
    assert problems == ["thing1: 21 characters, thing allows 20",
                        "number2: '12a' is not a valid number",
                        "phrase3: 6 characters, phrase allows 5",
                        "bogus4: unknown field type 'bogus' (one of amount, car_number, "
                        "character_string, const, date, letter, name, number, phone_number, "
                        "phrase, symbol, thing, time)",
                        "letter5: 'ab1' is not a valid letter"]
    assert check_fields({"first": "x" * 200}, "template") == []
    assert check_fields({"first": "x" * 201}, "template") == [
        "first: 201 characters (template fields: 200 at most)"]


@pytest.mark.parametrize("busy", [
    ("json", 200, {"errcode": -1, "errmsg": "system error"}),
    ("status", 502),
    ("timeout", 2.0)], ids=["errcode -1", "gateway 502", "no answer"])
def test_a_busy_token_endpoint_is_tried_again_not_a_stopped_channel(
        busy, make_workspace, wechat, monkeypatch) -> None:
    """WeChat's -1 ('system busy, retry'), a gateway's 502 or no answer from
    stable_token said nothing about the credentials, yet stopped the channel and failed
    the run: the message is tried again and sent."""
    ws = wechat_ws(make_workspace, wechat, "subscribe", monkeypatch, rows=1,
                   extra=", timeout: 1")
    wechat.script("token", busy, ("json", 200, {"access_token": "T1", "expires_in": 7200}))
    engine.run_local(ws, "promo", run_key="busy")
    assert ledger(ws)["1"][0] == "sent"
    assert [token_of(r) for r in wechat.requests if key(r) == openid(1)] == ["T1"]
