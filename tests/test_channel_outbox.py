"""The outbox channel: files a person can open, written safely from many threads."""

from __future__ import annotations

import asyncio
import json
import resource
import threading
from email import message_from_bytes
from email.policy import default as default_policy

from herald.channels.base import ChannelContext, Message, Outcome
from herald.channels.outbox import OutboxChannel, OutboxSettings, safe_name


def outbox(tmp_path, kind: str, name: str = "ch") -> OutboxChannel:
    return OutboxChannel(name, OutboxSettings(type="outbox", kind=kind),
                         ChannelContext(tmp_path, "promo", "2026-11-22", "r1"))


def msg(key: str, kind: str = "sms", **extra) -> Message:
    return Message(recipient=key, address=f"{key}@example.com" if kind == "email" else "+1",
                   kind=kind, body=f"body {key}", message_id=f"<{key}@herald>", **extra)


def test_email_becomes_an_eml_file_with_both_parts(tmp_path) -> None:
    ch = outbox(tmp_path, "email", "email")
    m = msg("7", "email", subject="您好，Li", html="<p>hi</p>")
    (result,) = asyncio.run(ch.send_batch([m]))
    assert result.outcome is Outcome.SENT
    path = tmp_path / ".herald/outbox/promo/2026-11-22/email/7.eml"
    assert result.provider_id == str(path.relative_to(tmp_path))
    parsed = message_from_bytes(path.read_bytes(), policy=default_policy)
    assert parsed["Subject"] == "您好，Li" and parsed["To"] == "7@example.com"
    assert parsed["Message-ID"] == "<7@herald>"
    assert parsed.get_body(("plain",)).get_content().strip() == "body 7"
    assert parsed.get_body(("html",)).get_content().strip() == "<p>hi</p>"
    assert not list(path.parent.glob("*.part"))


def test_other_kinds_become_json_lines(tmp_path) -> None:
    ch = outbox(tmp_path, "wechat", "wechat")
    results = asyncio.run(ch.send_batch([msg("1", "wechat"), msg("2", "wechat")]))
    assert [r.outcome for r in results] == [Outcome.SENT, Outcome.SENT]
    lines = (tmp_path / ".herald/outbox/promo/2026-11-22/wechat.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["recipient"] for r in records] == ["1", "2"]
    assert records[0]["kind"] == "wechat" and records[0]["body"] == "body 1"


def test_concurrent_writers_never_interleave_or_lose_lines(tmp_path) -> None:
    long_body = "长" * 3000  # lines well past a pipe buffer's atomic size

    def writer(t: int) -> None:
        ch = outbox(tmp_path, "sms")
        batch = [Message(recipient=f"{t}-{i}", address="+1", kind="sms", body=long_body,
                         message_id=f"<{t}-{i}@herald>") for i in range(200)]
        asyncio.run(ch.send_batch(batch))

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = (tmp_path / ".herald/outbox/promo/2026-11-22/ch.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line parses: none interleaved
    assert len(records) == 1200
    assert len({r["recipient"] for r in records}) == 1200
    assert all(r["body"] == long_body for r in records)


def test_unsafe_keys_get_safe_distinct_names(tmp_path) -> None:
    keys = ["../../etc/passwd", "a/b", "a_b", "a b", ".hidden", "李雷", "x" * 300]
    names = [safe_name(k) for k in keys]
    assert len(set(names)) == len(keys)
    assert all("/" not in n and not n.startswith(".") and len(n) <= 90 for n in names)
    assert safe_name("a_b") == "a_b"  # already safe: unchanged
    ch = outbox(tmp_path, "email", "email")
    batch = [Message(recipient=k, address="x@example.com", kind="email", body="b",
                     subject="s") for k in keys[:2]]
    asyncio.run(ch.send_batch(batch))
    written = sorted(p.name for p in (tmp_path / ".herald/outbox").rglob("*.eml"))
    assert len(written) == 2
    assert all(p.is_relative_to(tmp_path / ".herald/outbox")
               for p in (tmp_path / ".herald/outbox").rglob("*.eml"))


def test_an_address_email_cannot_carry_is_a_permanent_failure(tmp_path) -> None:
    ch = outbox(tmp_path, "email", "email")
    bad = Message(recipient="1", address="a b@@example.com", kind="email", body="b",
                  subject="s")
    (result,) = asyncio.run(ch.send_batch([bad]))
    assert (result.outcome, result.code) == (Outcome.PERMANENT, "invalid_address")


def test_a_long_unsubscribe_url_stays_one_readable_header() -> None:
    """Folding a URL longer than a line would write it as RFC 2047 encoded words, which
    mail clients do not read as a link: Herald's own headers stay on one line."""
    from herald.channels.mime import build_email

    url = "https://news.shop.example/unsubscribe/u/" + "MQBlbWFpbABqb3VybmV5On" * 4
    message = Message(recipient="1", address="a@example.com", kind="email", body="Hi",
                      subject="Hello", headers={"List-Unsubscribe": f"<{url}>"})
    raw = build_email(message, "Shop <news@shop.example>").as_bytes()
    assert f"List-Unsubscribe: <{url}>\r\n".encode() in raw
    assert message_from_bytes(raw, policy=default_policy)["List-Unsubscribe"] == f"<{url}>"


def test_a_folder_that_cannot_be_written_is_fatal_and_writes_nothing(tmp_path) -> None:
    (tmp_path / ".herald").mkdir()
    (tmp_path / ".herald/outbox").write_text("")
    for kind in ("email", "sms"):
        results = asyncio.run(outbox(tmp_path, kind).send_batch(
            [msg(str(i), kind) for i in range(3)]))
        assert [r.outcome for r in results] == [Outcome.FATAL] * 3
        assert results[0].code == "outbox_unwritable"
        assert ".herald/outbox is a file, not a folder" in str(results[0].detail)
    assert (tmp_path / ".herald/outbox").read_text() == ""


def test_lines_written_before_the_disk_filled_are_sent_the_rest_are_not(tmp_path) -> None:
    ch = outbox(tmp_path, "sms")
    asyncio.run(ch.send_batch([msg("0")]))  # the file exists: the limit counts from it
    path = tmp_path / ".herald/outbox/promo/2026-11-22/ch.jsonl"
    line = path.stat().st_size
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    # room for two more whole lines and half of a third (Python ignores SIGXFSZ: the
    # write stops short, then fails with EFBIG, as on a full disk)
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(line * 3.5), hard))
    try:
        results = asyncio.run(ch.send_batch([msg(str(i)) for i in range(1, 6)]))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert [r.outcome for r in results] == [Outcome.SENT] * 2 + [Outcome.FATAL] * 3
    whole = [json.loads(x)["recipient"] for x in path.read_bytes().split(b"\n")[:-1]]
    assert whole == ["0", "1", "2"]
