"""The SMS channel against real HTTP servers on loopback that answer like Twilio, Aliyun
and a generic gateway, as their documentation says; what lands in the ledger and in the
suppression list."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, time, timedelta
from email.utils import format_datetime
from urllib.parse import parse_qs, quote
from zoneinfo import ZoneInfo

import pytest

from herald.channels.sms import segments
from herald.core import clock
from herald.core.errors import RunError
from herald.flows import engine

from .helpers import PROMO_YAML, ledger_rows, suppression_rows
from .http_peer import Peer, Request, serve


def form(request: Request) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(request.body.decode()).items()}


@pytest.fixture
def twilio() -> Iterator[Peer]:
    peer = Peer(key=lambda r: form(r)["To"],
                ok_body=lambda r: {"sid": "SM" + hashlib.md5(r.body).hexdigest()[:32],
                                   "status": "queued"})
    server, found = serve(peer)
    yield found
    server.shutdown()
    server.server_close()


def sms_workspace(make_workspace, settings: str, rows: int = 12, template: str | None = None):
    files = {
        "config/herald.yaml": (
            "timezone: UTC\nphone_region: US\nsources:\n  crm: \"sqlite:///crm.db\"\n"
            f"channels:\n  text: {{type: sms, {settings}}}\nchunk_size: 40\n"),
        "config/flows/promo.yaml": PROMO_YAML.replace(
            "gold: {channels: [email, sms]}", "gold: {channels: [text]}").replace(
            "default: {channels: [sms, email]}", "default: {channels: [text]}"),
    }
    if template:
        files["templates/promo/default.sms.txt.j2"] = template
    return make_workspace(files, rows=rows)


def ledger(ws) -> dict[str, tuple]:
    return ledger_rows(ws, "status", "code", "segments", "provider_id", "reason")


def suppressed(ws) -> set[str]:
    return {r[0] for r in suppression_rows(ws)}


def number(i: int) -> str:
    return f"+1415555{i:04d}"


def test_segments_count_gsm7_and_ucs2() -> None:
    assert segments("x" * 160) == 1 and segments("x" * 161) == 2 and segments("x" * 306) == 2
    assert segments("x" * 307) == 3
    assert segments("{" * 80) == 1 and segments("{" * 81) == 2  # extension chars: 2 septets
    assert segments("您" * 70) == 1 and segments("您" * 71) == 2 and segments("您" * 134) == 2
    assert segments("您" * 135) == 3
    assert segments("a" * 69 + "😀") == 2  # an emoji is two UTF-16 units: UCS-2, 71 > 70


def test_twilio_answers(make_workspace, twilio) -> None:
    ws = sms_workspace(make_workspace, f'provider: twilio, base_url: "{twilio.url}", '
                       'account_sid: AC123, auth_token: "tok-1", sender: "+15005550006", '
                       "timeout: 1", template="{{ name }}，您的积分即将到期。" + "回T退订" * 16)
    twilio.script(number(1), ("json", 400, {"code": 21211, "message": "Invalid 'To' Phone "
                                            "Number", "status": 400}))
    twilio.script(number(2), ("json", 400, {"code": 21610, "message": "Attempt to send to "
                                            "unsubscribed recipient", "status": 400}))
    twilio.script(number(3), ("json", 429, {"code": 20429, "message": "Too Many Requests",
                                            "status": 429}, {"Retry-After": "1"}))
    twilio.script(number(4), ("json", 503, {"message": "unavailable"}))
    twilio.script(number(6), ("timeout", 1.5))
    twilio.script(number(7), ("reset",))
    twilio.script(number(9), ("json", 500, {"code": 20500, "message": "Internal Server "
                                            "Error", "status": 500}))
    twilio.script(number(11), ("status", 502))  # a gateway's, in front of Twilio
    summary = engine.run_local(ws, "promo", run_key="tw")
    rows = ledger(ws)
    assert rows["1"][:2] == ("failed", "21211") and "Invalid 'To'" in rows["1"][4]
    assert rows["2"][:2] == ("failed", "21610")
    assert suppressed(ws) == {number(2)}  # STOP: never texted again
    assert rows["3"][0] == rows["4"][0] == "sent"  # throttled, then sent
    assert rows["5"][0] == "no_address"  # every 5th person has no phone
    assert rows["8"][0] == "sent" and rows["8"][3].startswith("SM")
    body = "User 8，您的积分即将到期。" + "回T退订" * 16
    assert len(body) == 80 and rows["8"][2] == segments(body) == 2  # UCS-2 > 70: two parts
    # timed out after Twilio had the request: it may have gone out, and Twilio takes no
    # idempotency key, so it is not resent (it was, and texted twice)
    assert rows["6"][0] == "sending" and "not resent" in rows["6"][4], rows["6"]
    assert len([r for r in twilio.requests if form(r)["To"] == number(6)]) == 1
    # so is one whose connection was cut after the request, and a Twilio 20500 (its
    # reference: the message may have been processed, a retry may send it twice)
    assert rows["7"][0] == rows["9"][0] == rows["11"][0] == "sending", rows
    assert all(len([r for r in twilio.requests if form(r)["To"] == number(i)]) == 1
               for i in (7, 9, 11))
    requests = [r for r in twilio.requests if form(r)["To"] == number(8)]
    assert len(requests) == 1
    sent = form(requests[0])
    assert sent == {"To": number(8), "From": "+15005550006", "Body": body}
    assert requests[0].path == "/2010-04-01/Accounts/AC123/Messages.json"
    auth = base64.b64decode(requests[0].headers["authorization"].split()[1]).decode()
    assert auth == "AC123:tok-1"
    assert summary["deliveries"]["failed"] == 2


def test_twilio_bad_credentials_stop_the_channel(make_workspace, twilio) -> None:
    ws = sms_workspace(make_workspace, f'provider: twilio, base_url: "{twilio.url}", '
                       'account_sid: AC123, auth_token: "wrong", sender: "+15005550006", '
                       "concurrency: 1")
    for i in range(1, 13):
        twilio.script(number(i), ("json", 401, {"code": 20003, "message": "Authenticate"}))
    with pytest.raises(RunError, match=r"channel text stopped \(.*\): 10 message\(s\) not sent"):
        engine.run_local(ws, "promo", run_key="tw401")
    assert sorted(r[0] for r in ledger(ws).values()) == ["no_address"] * 2 + ["queued"] * 10
    assert len(twilio.requests) == 1  # nothing more was sent after the refusal
    assert suppressed(ws) == set()


@pytest.mark.parametrize(("code", "message"), [
    (21212, "The 'From' number +15005550006 is not a valid phone number"),
    (21601, "Phone number is not a valid SMS-capable inbound phone number"),
    (21603, "A 'From' or 'MessagingServiceSid' parameter is required to send a message"),
    (21705, "The Messaging Service is invalid")])
def test_a_wrong_sender_stops_the_channel(make_workspace, twilio, code, message) -> None:
    """Twilio's answers about the sender or the Messaging Service hold for every message:
    they failed each recipient in turn, and the rerun after fixing the sender sent
    nobody (a failed row is final under its run key)."""
    ws = sms_workspace(make_workspace, f'provider: twilio, base_url: "{twilio.url}", '
                       'account_sid: AC123, auth_token: "tok", sender: "+15005550006", '
                       "concurrency: 1")
    for i in range(1, 13):
        twilio.script(number(i), ("json", 400, {"code": code, "message": message}))
    with pytest.raises(RunError, match=r"channel text stopped \(.*\): 10 message\(s\) not sent"):
        engine.run_local(ws, "promo", run_key="from")
    assert sorted(r[0] for r in ledger(ws).values()) == ["no_address"] * 2 + ["queued"] * 10
    assert len(twilio.requests) == 1 and suppressed(ws) == set()


def test_invalid_numbers_are_recorded_never_sent(make_workspace, twilio) -> None:
    ws = sms_workspace(make_workspace, f'provider: twilio, base_url: "{twilio.url}", '
                       'account_sid: AC1, auth_token: "t", sender: "+15005550006"', rows=4)
    with sqlite3.connect(ws.root / "crm.db") as conn:
        conn.executemany("UPDATE people SET phone = ? WHERE id = ?",
                         [("12345", 1), ("(415) 555-0102", 2), ("not a number", 3)])
    engine.run_local(ws, "promo", run_key="numbers")
    rows = ledger(ws)
    assert rows["1"][0] == rows["3"][0] == "no_address"
    assert rows["1"][4] == "text: phone invalid"
    assert rows["2"][0] == "sent"  # national format, phone_region US: +14155550102
    assert sorted(form(r)["To"] for r in twilio.requests) == ["+14155550004", "+14155550102"]


SECRET = "aliyun-secret-9"


def check_aliyun(request: Request) -> dict[str, str]:
    """What Dysmsapi checks: the signature over every other parameter."""
    params = form(request)
    signature = params.pop("Signature")

    def enc(value: str) -> str:
        return quote(value, safe="~")

    query = "&".join(f"{enc(k)}={enc(v)}" for k, v in sorted(params.items()))
    to_sign = "POST&%2F&" + enc(query)
    expected = base64.b64encode(hmac.new(f"{SECRET}&".encode(), to_sign.encode(),
                                         hashlib.sha1).digest()).decode()
    assert signature == expected, "SignatureDoesNotMatch"
    return params


@pytest.fixture
def aliyun() -> Iterator[Peer]:
    peer = Peer(key=lambda r: form(r)["PhoneNumbers"],
                ok_body=lambda r: {"Code": "OK", "Message": "OK", "BizId": "900619746936498440^0",
                                   "RequestId": "F655A8D5"})
    server, found = serve(peer)
    yield found
    server.shutdown()
    server.server_close()


def test_aliyun_signed_requests_and_codes(make_workspace, aliyun, monkeypatch) -> None:
    monkeypatch.setenv("ALIYUN_SECRET", SECRET)
    ws = sms_workspace(make_workspace, f'provider: aliyun, base_url: "{aliyun.url}", '
                       'access_key_id: LTAI5tKey, access_key_secret: "${ALIYUN_SECRET}", '
                       'sign_name: 阿里云短信测试, template_code: SMS_154950909',
                       template='{"name": {{ name|tojson }}, "score": "{{ score }}"}')
    aliyun.script("14155550001", ("json", 200, {"Code": "isv.MOBILE_NUMBER_ILLEGAL",
                                                "Message": "非法手机号"}))
    aliyun.script("14155550002", ("json", 200, {"Code": "Throttling.User",
                                                "Message": "Request was denied due to user "
                                                "flow control."}))
    # the gateway's own throttling (HTTP 400) and a reused nonce are retried too; a 502
    # from a gateway in front of Aliyun may have passed the request on: not resent
    aliyun.script("14155550007", ("json", 400, {"Code": "Throttling.Api", "Message":
                                                "Request was denied due to api flow control."}))
    aliyun.script("14155550009", ("json", 400, {"Code": "SignatureNonceUsed",
                                                "Message": "The request signature nonce "
                                                "has been used."}))
    aliyun.script("14155550011", ("status", 502))
    # the per-number allowances (Aliyun's error table: this number's minute, hour or day)
    for i, level in ((3, "触发分钟级流控Permits:1"), (4, "触发小时级流控Permits:5"),
                     (6, "触发天级流控Permits:10")):
        aliyun.script(f"141555500{i:02d}", ("json", 200, {"Code": "isv.BUSINESS_LIMIT_CONTROL",
                                                          "Message": level}))
    summary = engine.run_local(ws, "promo", run_key="ali")
    rows = ledger(ws)
    assert rows["1"][:2] == ("failed", "isv.MOBILE_NUMBER_ILLEGAL")
    assert rows["8"][:2] == ("sent", None) and rows["8"][3] == "900619746936498440^0"
    for request in aliyun.requests:
        params = check_aliyun(request)
        assert params["Action"] == "SendSms" and params["SignName"] == "阿里云短信测试"
        assert params["TemplateCode"] == "SMS_154950909"
    sent = next(check_aliyun(r) for r in aliyun.requests
                if form(r)["PhoneNumbers"] == "14155550008")
    assert json.loads(sent["TemplateParam"]) == {"name": "User 8", "score": "8"}
    assert rows["2"][0] == rows["7"][0] == rows["9"][0] == "sent"  # retried, then sent
    assert rows["11"][0] == "sending" and "not resent" in rows["11"][4], rows["11"]
    assert len([r for r in aliyun.requests if form(r)["PhoneNumbers"] == "14155550011"]) == 1
    # a number over its own allowance waits until it renews (a later run of the run key),
    # without slowing the account: a minute, an hour, a day
    waits = {}
    with ws.store.connect() as conn:
        for key, made, until in conn.exec_driver_sql(
                "SELECT recipient, updated_at, not_before FROM herald_deliveries "
                "WHERE status = 'deferred'"):
            waits[key] = (datetime.fromisoformat(str(until))
                          - datetime.fromisoformat(str(made))).total_seconds()
    assert set(waits) == {"3", "4", "6"}, rows
    assert 55 < waits["3"] < 400 and 3500 < waits["4"] < 3700 and waits["6"] > 86_300, waits
    # 12 people, 2 without a phone (5 and 10), 1 refused number, 3 deferred, 1 unknown
    assert summary["deliveries"]["sent"] == 5 and summary["deliveries"]["failed"] == 1


@pytest.mark.parametrize(("status", "code", "message"), [
    (200, "isv.AMOUNT_NOT_ENOUGH", "账户余额不足"),
    (200, "isv.PRODUCT_UN_SUBSCRIPT", "产品未开通"),
    (200, "isv.DENY_IP_RANGE", "源IP地址所在的地区被禁用"),
    (200, "isv.SIGN_STATE_ILLEGAL", "签名状态不合法"),
    (200, "isv.SMS_SIGNATURE_SCENE_ILLEGAL", "签名和模板类型不一致"),
    (400, "InvalidTimeStamp.Expired", "Specified time stamp or date value is expired."),
    (400, "InvalidAccessKeyId.Inactive", "Specified access key is disabled.")])
def test_aliyun_account_answers_stop_the_channel(make_workspace, aliyun, status, code,
                                                 message) -> None:
    """Answers about the account, its key, its clock or its signature hold for every
    message: they stop the channel with the rest queued for the rerun (several of them
    failed each recipient in turn, and the rerun after the fix sent nobody)."""
    ws = sms_workspace(make_workspace, f'provider: aliyun, base_url: "{aliyun.url}", '
                       f'access_key_id: K, access_key_secret: "{SECRET}", sign_name: S, '
                       'template_code: SMS_1, concurrency: 1',
                       template='{"name": {{ name|tojson }}}')
    for i in range(1, 13):
        aliyun.script(f"1415555{i:04d}", ("json", status, {"Code": code, "Message": message}))
    with pytest.raises(RunError, match=r"channel text stopped \(.*\): 10 message\(s\) not sent"):
        engine.run_local(ws, "promo", run_key="broke")
    assert sorted(r[0] for r in ledger(ws).values()) == ["no_address"] * 2 + ["queued"] * 10
    assert len(aliyun.requests) == 1


def test_aliyun_sending_limits_pause_the_channel_until_they_renew(make_workspace,
                                                                   aliyun) -> None:
    """The day's limit set in Aliyun's console (isv.DAY_LIMIT_CONTROL) was retried after
    a minute: every follow-up run asked again for each recipient until, after 12
    attempts in about 40 minutes, each failed for good, long before the day renewed. Now
    the channel pauses until the next midnight in China (the month's limit: the first of
    the next month) and the recipients are deferred past it."""
    from herald.channels.sms import _quota_wait

    # 01:00 on 1 February in China: the day renews in 23 hours, the month on 1 March
    now = datetime(2026, 1, 31, 17, 0, tzinfo=UTC)
    assert _quota_wait("day", now) == 23 * 3600
    assert _quota_wait("month", now) == (27 * 24 + 23) * 3600
    assert _quota_wait("month", datetime(2026, 12, 31, 15, 30, tzinfo=UTC)) == 30 * 60

    ws = sms_workspace(make_workspace, f'provider: aliyun, base_url: "{aliyun.url}", '
                       f'access_key_id: K, access_key_secret: "{SECRET}", sign_name: S, '
                       'template_code: SMS_1, concurrency: 1',
                       template='{"name": {{ name|tojson }}}')
    aliyun.script("14155550003", ("json", 200, {"Code": "isv.DAY_LIMIT_CONTROL",
                                                "Message": "触发日发送限额"}))
    summary = engine.run_local(ws, "promo", run_key="quota")
    rows = ledger(ws)
    assert summary["deliveries"]["sent"] == 2  # 1 and 2, before the limit
    asked = [form(r)["PhoneNumbers"] for r in aliyun.requests]
    assert asked == ["14155550001", "14155550002", "14155550003"]  # none after it
    held = [k for k, r in rows.items() if r[0] not in ("sent", "no_address")]
    assert len(held) == 8 and all(rows[k][0] == "deferred" for k in held), rows
    with ws.store.connect() as conn:
        until = [datetime.fromisoformat(str(v)).astimezone(ZoneInfo("Asia/Shanghai"))
                 for (v,) in conn.exec_driver_sql(
                     "SELECT not_before FROM herald_deliveries WHERE status = 'deferred'")]
    # the next midnight in China on Herald's clock (the held ones a moment before it: the
    # pause's time left when each was held back)
    midnight = datetime.combine(clock.now().astimezone(ZoneInfo("Asia/Shanghai")).date()
                                + timedelta(days=1), time(), ZoneInfo("Asia/Shanghai"))
    assert all(abs((u - midnight).total_seconds()) < 60 for u in until), (until, midnight)


def test_generic_gateway(make_workspace, monkeypatch) -> None:
    server, peer = serve(Peer(key=lambda r: r.json()["to"]))
    try:
        monkeypatch.setenv("GATEWAY_TOKEN", "gw-token")
        ws = sms_workspace(make_workspace, f'provider: generic, base_url: "{peer.url}/sms", '
                           'token: "${GATEWAY_TOKEN}"')
        peer.script(number(1), ("status", 410))
        peer.script(number(2), ("status", 500))
        engine.run_local(ws, "promo", run_key="gw")
        rows = ledger(ws)
        assert rows["1"][:2] == ("failed", "410") and suppressed(ws) == {number(1)}
        assert rows["2"][0] == "sent" and rows["8"][0] == "sent" and rows["8"][2] == 1
        request = next(r for r in peer.requests if r.json()["to"] == number(8))
        assert request.headers["authorization"] == "Bearer gw-token"
        assert request.json()["text"] == "Hi User 8, score 8. Reply STOP to opt out"
    finally:
        server.shutdown()
        server.server_close()


def test_validate_warns_when_chinese_marketing_sms_lacks_opt_out(make_workspace, capsys
                                                                 ) -> None:
    from herald.flows.cli import main

    ws = make_workspace({"templates/promo/default.sms.txt.zh.j2": "{{ name }}，积分翻倍！",
                         "templates/promo/gold.sms.txt.zh.j2": "{{ name }}，积分翻倍，回T退订"})
    with pytest.raises(SystemExit) as exc:
        main(["validate", "-w", str(ws.root)])
    err = capsys.readouterr().err
    assert exc.value.code == 0  # a warning, not an error
    assert ("warning: templates/promo/default.sms.txt.zh.j2: a marketing SMS to mainland "
            "China must say how to opt out") in err
    assert "gold.sms.txt.zh.j2" not in err
    flow = (ws.root / "config/flows/promo.yaml")
    flow.write_text(flow.read_text() + "exempt: true\n")  # transactional: no opt-out needed
    with pytest.raises(SystemExit):
        main(["validate", "-w", str(ws.root)])
    assert "warning" not in capsys.readouterr().err


def move_deferrals_due(ws) -> None:
    """The deferred rows' time has come (what waiting for it would do)."""
    from sqlalchemy import update

    from herald.delivery import ledger as herald_ledger

    with ws.store.begin() as conn:
        conn.execute(update(herald_ledger.deliveries).where(
            herald_ledger.deliveries.c.status == "deferred").values(
            not_before=herald_ledger.now() - timedelta(seconds=1)))


def deferred_rows(ws) -> dict[str, tuple]:
    return ledger_rows(ws, "status", "attempts", "not_before", "updated_at", "reason")


def waited(row: tuple) -> float:
    return (datetime.fromisoformat(row[2]) - datetime.fromisoformat(row[3])).total_seconds()


def test_a_long_twilio_wait_defers_to_it_and_pauses_the_channel(make_workspace,
                                                                twilio) -> None:
    """A Retry-After longer than the run's retries (seconds, or an HTTP date) defers the
    recipient to it, never before; so does 21611 (the sender's queue is full), by 10
    minutes. (The pause these answers put on the channel: test_reliability.)"""
    ws = sms_workspace(make_workspace, f'provider: twilio, base_url: "{twilio.url}", '
                       'account_sid: AC123, auth_token: "tok-1", sender: "+15005550006", '
                       "concurrency: 3", rows=3)
    too_many = {"code": 20429, "message": "Too Many Requests", "status": 429}
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=90), usegmt=True)
    twilio.script(number(1), ("json", 429, too_many, {"Retry-After": "120"}))
    twilio.script(number(2), ("json", 429, too_many, {"Retry-After": later}))
    twilio.script(number(3), ("json", 400, {"code": 21611, "message": "This 'From' number "
                                            "has exceeded the maximum number of queued "
                                            "messages", "status": 400}))
    engine.run_local(ws, "promo", run_key="long")  # the three requests at once
    rows = deferred_rows(ws)
    assert rows["1"][:2] == ("deferred", 1) and 119 <= waited(rows["1"]) <= 122
    assert rows["2"][:2] == ("deferred", 1) and 85 <= waited(rows["2"]) <= 92
    assert rows["3"][:2] == ("deferred", 1) and 599 <= waited(rows["3"]) <= 602
    assert len(twilio.requests) == 3


def test_twilio_throttling_defers_recipients_to_a_later_run_then_gives_up(
        make_workspace, twilio) -> None:
    ws = sms_workspace(make_workspace, f'provider: twilio, base_url: "{twilio.url}", '
                       'account_sid: AC123, auth_token: "tok-1", sender: "+15005550006", '
                       "rate: 20/s", rows=6)
    too_many = {"code": 20429, "message": "Too Many Requests", "status": 429}
    twilio.script(number(3), *[("json", 429, too_many, {"Retry-After": "1"})] * 3)
    twilio.script(number(4), *[("json", 503, {"message": "unavailable"})] * 12)
    first = engine.run_local(ws, "promo", run_key="busy")
    rows = deferred_rows(ws)
    # short waits are retried in the run; still throttled after 3 attempts: deferred
    assert rows["3"][:2] == ("deferred", 3) and 59 <= waited(rows["3"]) <= 62
    assert "Twilio 20429: Too Many Requests" in rows["3"][4]
    assert first["deliveries"]["deferred"] == 2 and first["deliveries"]["failed"] == 0
    assert first["deliveries"]["sent"] == 3  # 1, 2 and 6 (number 5: no phone)
    assert datetime.fromisoformat(first["deferred_until"]) == min(
        datetime.fromisoformat(r[2]).replace(tzinfo=UTC) for r in rows.values() if r[2])

    # too early: the same run key sends nobody again
    again = engine.run_local(ws, "promo", run_key="busy")
    assert again["deliveries"]["deferred"] == 2 and again["deliveries"]["sent"] == 0
    assert len([r for r in twilio.requests if form(r)["To"] == number(3)]) == 3

    move_deferrals_due(ws)
    engine.run_local(ws, "promo", run_key="busy")
    rows = deferred_rows(ws)
    assert rows["3"][:2] == ("sent", 4)
    # the gateway stays down for number 4: deferred after each run's 3 attempts (the
    # wait doubling), until 12 attempts in all; then it fails with the reason
    assert rows["4"][:2] == ("deferred", 6) and 119 <= waited(rows["4"]) <= 122
    for _ in range(2):
        move_deferrals_due(ws)
        last = engine.run_local(ws, "promo", run_key="busy")
    rows = deferred_rows(ws)
    assert rows["4"][:2] == ("failed", 12)
    assert rows["4"][4] == "retryable, gave up after 12 attempts: Twilio 503: unavailable"
    assert last["deliveries"]["failed"] == 1 and last["deferred_until"] is None
    assert all(n == 1 for n in twilio.delivered().values())  # nobody texted twice
