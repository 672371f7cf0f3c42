"""The WeChat channel against a real HTTP server on loopback that answers like the
Official Account API: the stable-token endpoint, template messages and subscription
notifications, and their error codes."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from urllib.parse import parse_qs, urlsplit

import pytest

from herald.channels.wechat import check_fields
from herald.flows import engine

from .conftest import PROMO_YAML
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
    with sqlite3.connect(ws.root / ".herald" / "herald.db") as conn:
        return {r[0]: r[1:] for r in conn.execute(
            "SELECT recipient, status, channel, code, provider_id, reason "
            "FROM herald_deliveries")}


def suppressed(ws) -> set[tuple[str, str]]:
    with sqlite3.connect(ws.root / ".herald" / "herald.db") as conn:
        return set(conn.execute("SELECT value, channel FROM herald_suppressions"))


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
    with sqlite3.connect(ws.root / "crm.db") as conn:
        conn.execute("UPDATE people SET name = ? WHERE id = 8", ("A" * 25,))
    summary = engine.run_local(ws, "promo", run_key="wx")
    rows = ledger(ws)

    # one token for the whole run (3 chunks on 3 workers), refreshed once when expired
    token_requests = [r for r in wechat.requests if key(r) == "token"]
    assert len(token_requests) == 2
    assert token_requests[0].json() == {"grant_type": "client_credential", "appid": "wx1234",
                                        "secret": "wx-secret-1", "force_refresh": False}
    assert token_requests[1].json()["force_refresh"] is True
    retried = [token_of(r) for r in wechat.requests if key(r) == openid(3)]
    assert retried == ["T1", "T2"] and rows["3"][0] == "sent"

    assert rows["1"][:2] == ("sent", "wx") and rows["1"][3] is not None
    assert rows["2"][:3] == ("failed", "wx", "43101")
    assert rows["6"][:3] == ("failed", "wx", "43004")
    assert suppressed(ws) == {(openid(2), "wx"), (openid(6), "wx")}
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
    assert summary["deliveries"]["failed"] == 3

    # a second run (another run key) reuses the stored token: no token request
    before = len(token_requests)
    engine.run_local(ws, "promo", run_key="wx-2")
    assert len([r for r in wechat.requests if key(r) == "token"]) == before


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
    summary = engine.run_local(ws, "promo", run_key="banned", max_workers=1)
    rows = ledger(ws)
    # the run itself completes: the channel stopped, each recipient failed with the reason
    assert summary["deliveries"]["sent"] == 0 and summary["deliveries"]["failed"] == 6
    assert why in rows["1"][4] and all(why in r[4] for r in rows.values())
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
