"""Frequency caps: scopes, rolling and calendar windows, priority and exempt flows."""

from __future__ import annotations

from datetime import datetime, timedelta

from herald.audiences.store import Recipient
from herald.delivery import ledger
from herald.delivery.policy import SEND, Policy, in_holdout
from herald.flows.engine import run_local

BASE = """\
timezone: UTC
sources: {crm: "sqlite:///crm.db"}
channels:
  email: {type: outbox, kind: email}
  sms: {type: outbox, kind: sms}
caps:
%s
"""

FLOW = """\
name: %(name)s
audience: {source: crm, segment: people, params: {min_score: 0}, key: id, tier: tier,
           timezone: tz}
tiers:
  default: {channels: [email, sms]}
priority: %(priority)d
exempt: %(exempt)s
caps: %(caps)s
"""

SQL = (
    "SELECT id, name, email, phone, tier, locale, score, "
    "CASE WHEN id % 2 = 0 THEN 'Asia/Shanghai' ELSE 'America/New_York' END AS tz "
    "FROM people WHERE score >= :min_score ORDER BY id"
)

TEMPLATES = {
    f"templates/{flow}/default.{part}.j2": "Hi {{ name }}"
    for flow in ("promo", "urgent", "receipt")
    for part in ("email.subject", "email.txt", "sms.txt")
}


def workspace(
    make_workspace,
    caps: str = "  []",
    flows: dict | None = None,
    rows: int = 10,
    store: str | None = None,
):
    files = {"config/herald.yaml": BASE % caps, "audiences/people.sql": SQL, **TEMPLATES}
    for name, (priority, exempt, flow_caps) in (flows or {"promo": (0, False, "[]")}).items():
        files[f"config/flows/{name}.yaml"] = FLOW % {
            "name": name,
            "priority": priority,
            "exempt": str(exempt).lower(),
            "caps": flow_caps,
        }
    return make_workspace(files, rows=rows, store=store)


def recipient(key: int, tier: str = "gold", tz: str = "UTC") -> Recipient:
    return Recipient(
        key,
        str(key),
        tier,
        {
            "id": key,
            "name": "x",
            "tier": tier,
            "tz": tz,
            "email": f"u{key}@example.com",
            "phone": None,
        },
    )


def history(
    ws, entries: list[tuple[str, str, str, datetime]], priority: int = 0, counted: bool = True
) -> None:
    """Write sent messages (recipient, flow, channel, when) into the ledger."""
    with ws.store.begin() as conn:
        for i, (key, flow, channel, at) in enumerate(entries):
            ledger.write_entries(
                conn,
                [ledger.Entry(key, "gold", "sent", channel)],
                flow=flow,
                run_key=f"h{i}-{key}",
                run_id="history",
                package_id="p",
                priority=priority,
                counted=counted,
                at=at,
            )


def decide(ws, flow: str, rows: list[Recipient], at: datetime) -> dict[str, tuple[str, str]]:
    policy = Policy(ws, ws.flow(flow))
    with ws.store.connect() as conn:
        return {
            d.recipient.key: (d.status, d.reason or d.channel or "")
            for d in policy.decide(conn, rows, at)
        }


# ``now`` (conftest): Herald's clock frozen at 16:30 UTC on several dates, which is already
# 00:30 of the next day in Shanghai and still the same day in New York.


def test_rolling_window(make_workspace, store_url, now) -> None:
    ws = workspace(make_workspace, "  - {max: 2, per: 12h}", store=store_url)
    history(
        ws,
        [
            ("1", "other", "email", now - timedelta(hours=3)),
            ("1", "other", "sms", now - timedelta(hours=11)),
            ("2", "other", "email", now - timedelta(hours=3)),
            ("2", "other", "sms", now - timedelta(hours=13)),
        ],
    )  # outside the window
    got = decide(ws, "promo", [recipient(1), recipient(2)], now)
    assert got["1"] == ("capped", "cap max 2 per 12h (all channels)")
    assert got["2"][0] == SEND


def test_calendar_day_is_the_recipients_local_day(make_workspace, store_url, now) -> None:
    ws = workspace(make_workspace, "  - {max: 1, per: day}", store=store_url)
    an_hour_ago = now - timedelta(hours=1)  # 15:30 UTC: the same day in New York and Shanghai
    history(ws, [("1", "other", "email", an_hour_ago), ("2", "other", "email", an_hour_ago)])
    got = decide(
        ws, "promo", [recipient(1, tz="America/New_York"), recipient(2, tz="Asia/Shanghai")], now
    )
    assert got["1"] == ("capped", "cap max 1 per day (all channels)")  # still the same day
    assert got["2"][0] == SEND  # already the next day in Shanghai


def test_calendar_week_starts_monday(make_workspace, store_url, now) -> None:
    ws = workspace(make_workspace, "  - {max: 1, per: week}", store=store_url)
    monday = (now - timedelta(days=now.weekday())).replace(hour=9, minute=0)
    history(
        ws,
        [
            ("1", "other", "email", monday - timedelta(hours=10)),  # Sunday
            ("2", "other", "email", monday - timedelta(hours=2)),
        ],
    )  # Monday 07:00
    got = decide(ws, "promo", [recipient(1), recipient(2)], monday)
    assert got["1"][0] == SEND
    assert got["2"][0] == "capped"


def test_scopes_channel_flow_and_tier(make_workspace, store_url, now) -> None:
    caps = (
        "  - {channel: email, max: 1, per: 1d}\n"
        "  - {flow: promo, max: 1, per: 7d}\n"
        "  - {tier: vip, max: 1, per: 30d}"
    )
    ws = workspace(make_workspace, caps, store=store_url)
    yesterday = now - timedelta(hours=20)
    history(
        ws,
        [
            ("1", "other", "email", yesterday),  # email cap: falls back to sms
            ("2", "promo", "sms", now - timedelta(days=3)),  # flow cap
            ("3", "other", "sms", now - timedelta(days=10)),  # tier cap, vip only
            ("4", "other", "sms", now - timedelta(days=10)),
        ],
    )
    one = recipient(1)
    one.data["phone"] = "+14155550001"
    got = decide(ws, "promo", [one, recipient(2), recipient(3, tier="vip"), recipient(4)], now)
    assert got["1"] == (SEND, "sms")
    assert got["2"] == ("capped", "cap max 1 per 7d (flow promo)")
    assert got["3"] == ("capped", "cap max 1 per 30d (tier vip)")
    assert got["4"][0] == SEND


def test_every_cap_rule_is_counted_by_one_query_each_in_its_own_window(
    make_workspace, store_url, now
) -> None:
    """Rolling and calendar rules, scoped and not, over recipients in two time zones: a
    chunk reads the ledger for all of them at once, and each rule still counts only its
    own window (a calendar day from each recipient's own midnight) and scope."""
    from sqlalchemy import event

    caps = (
        "  - {tier: vip, max: 1, per: week}\n"
        "  - {max: 1, per: day}\n"
        "  - {channel: sms, max: 1, per: 30d}\n"
        "  - {max: 2, per: 12h}"
    )
    ws = workspace(make_workspace, caps, store=store_url)
    an_hour_ago = now - timedelta(hours=1)  # the same local day in New York and Shanghai
    week_start = (now - timedelta(days=now.weekday())).replace(hour=0, minute=10)
    history(
        ws,
        [
            ("1", "other", "email", an_hour_ago),  # New York: still today, capped
            ("2", "other", "email", an_hour_ago),  # Shanghai: already tomorrow, sent
            ("3", "other", "sms", now - timedelta(days=20)),  # its only channel capped
            ("4", "other", "email", week_start),  # a vip this week (UTC)
            ("5", "other", "email", week_start),  # not a vip: no weekly cap
            ("6", "other", "email", now - timedelta(hours=30)),  # yesterday everywhere
            ("6", "other", "email", now - timedelta(hours=31)),
        ],
    )
    rows = [recipient(1, tz="America/New_York"), recipient(2, tz="Asia/Shanghai"),
            recipient(3), recipient(4, tier="vip"), recipient(5), recipient(6)]
    rows[2].data.update(email=None, phone="+14155550003")
    statements: list[str] = []

    def seen(conn, cursor, statement, *args) -> None:
        statements.append(statement)

    event.listen(ws.store, "before_cursor_execute", seen)
    try:
        got = decide(ws, "promo", rows, now)
    finally:
        event.remove(ws.store, "before_cursor_execute", seen)
    assert got["1"] == ("capped", "cap max 1 per day (all channels)")
    assert got["2"] == (SEND, "email")
    assert got["3"][0] == "capped" and "sms: cap max 1 per 30d (channel sms)" in got["3"][1]
    assert got["4"] == ("capped", "cap max 1 per week (tier vip)")
    # 5's message this week counts under no rule of a gold recipient once it is older
    # than today (on a Monday it is today's, which the daily rule counts)
    assert got["5"] == ((SEND, "email") if now.weekday() else
                        ("capped", "cap max 1 per day (all channels)"))
    assert got["6"] == (SEND, "email")  # two yesterday: outside the 12h and the day
    counting = [s for s in statements if "count(" in s.lower()]
    assert len(counting) == 1, counting


def test_priority_counts_only_messages_of_equal_or_higher_priority(
    make_workspace, store_url, now
) -> None:
    flows = {"promo": (0, False, "[]"), "urgent": (10, False, "[]")}
    ws = workspace(make_workspace, "  - {max: 1, per: 1d}", flows, store=store_url)
    history(ws, [("1", "promo", "email", now - timedelta(hours=1))], priority=0)
    history(ws, [("2", "urgent", "email", now - timedelta(hours=1))], priority=10)
    assert decide(ws, "urgent", [recipient(1)], now)["1"][0] == SEND  # promo is lower
    assert decide(ws, "urgent", [recipient(2)], now)["2"][0] == "capped"
    assert decide(ws, "promo", [recipient(1), recipient(2)], now) == {
        "1": ("capped", "cap max 1 per 1d (all channels)"),
        "2": ("capped", "cap max 1 per 1d (all channels)"),
    }


def test_exempt_flows_are_not_capped_and_not_counted(make_workspace, store_url, now) -> None:
    flows = {"promo": (0, False, "[]"), "receipt": (0, True, "[]")}
    ws = workspace(make_workspace, "  - {max: 1, per: 1d}", flows, rows=6, store=store_url)
    history(ws, [(str(i), "promo", "email", now - timedelta(hours=1)) for i in range(1, 4)])
    receipts = run_local(ws, "receipt", run_key="r1")
    assert receipts["deliveries"]["sent"] == 6 and receipts["deliveries"]["capped"] == 0
    promo = run_local(ws, "promo", run_key="p1")
    # 1-3 were capped by the earlier promo; 4-6 got only (uncounted) receipts
    assert promo["deliveries"]["capped"] == 3 and promo["deliveries"]["sent"] == 3


def test_holdout_draw_is_stable_and_proportional() -> None:
    drawn = [in_holdout("winback", str(i), 0.1) for i in range(20000)]
    assert 1800 <= sum(drawn) <= 2200
    assert drawn == [in_holdout("winback", str(i), 0.1) for i in range(20000)]
    assert drawn != [in_holdout("welcome", str(i), 0.1) for i in range(20000)]
    assert not any(in_holdout("winback", str(i), 0.0) for i in range(1000))


def test_addresses_are_parsed_once_per_value() -> None:
    """A chunk asks for a phone number's E.164 form for the address, then for its
    suppression-list form: the parser runs once for the value, and the answers match."""
    from herald.delivery.addresses import clean_address, comparable, e164

    number = "+86 138 0013 9017"
    e164.cache_clear()
    assert clean_address("sms", number) == ("+8613800139017", None)
    assert clean_address("sms", f" {number} ") == ("+8613800139017", None)
    assert comparable("+8613800139017") == "+8613800139017"
    parsed = e164.cache_info()
    assert comparable("+8613800139017") == "+8613800139017"
    assert clean_address("sms", number) == ("+8613800139017", None)
    assert e164.cache_info().misses == parsed.misses  # answered from the cache
    assert clean_address("sms", "12") == (None, "invalid (no country code, and no "
                                                "phone_region in herald.yaml)")
    assert clean_address("sms", "138 0013 9017", "CN") == ("+8613800139017", None)
    assert clean_address("email", None) == (None, "empty")


def test_a_cleaned_addresss_compared_form_is_the_suppression_lists(make_workspace) -> None:
    """The policy compares a cleaned address without parsing it again: the form it uses
    is the one the suppression list stores for any spelling of that address."""
    from herald.delivery.addresses import Addresses, comparable

    from .helpers import HERALD_YAML

    ws = make_workspace({"config/herald.yaml": HERALD_YAML.replace(
        "caps: []", "caps: []\nphone_region: CN\nemail: {allow_special_use_domains: true}")})
    addresses = Addresses(ws)
    for channel, raw in [("sms", "138 0013 9017"), ("sms", "+86 (138) 0013-9017"),
                         ("email", "Ann.Lee@Shop.Example.COM"), ("email", "bob@xn--bcher-kva.de"),
                         ("email", "Zoe@bücher.de"), ("email", "Max@Printer.Test")]:
        address, why = addresses.clean(channel, raw)
        assert address is not None, (raw, why)
        assert addresses.comparable(channel, address) == comparable(raw, "CN") \
            == comparable(address, "CN"), raw


def test_an_email_address_is_kept_in_the_form_a_message_can_carry() -> None:
    """A non-ASCII local part passed screening and the dry run, then failed the real
    send (no message can carry it without SMTPUTF8): refused at screening, saying why.
    An internationalized domain is kept in its IDNA form, which headers and the SMTP
    envelope carry (it went out as an RFC 2047 word inside the address)."""
    from herald.channels.base import Message
    from herald.channels.mime import build_email
    from herald.delivery.addresses import clean_address

    for local in ("\uff45\uff56\uff45", "用户", "zoë"):
        assert clean_address("email", f"{local}@shop.example") == (
            None, "invalid (non-ASCII before the @, which the e-mail channels cannot send)")
    assert clean_address("email", "a b@shop.example") == (None, "invalid")
    address, why = clean_address("email", "Zoe@Bücher.de")
    assert (address, why) == ("Zoe@xn--bcher-kva.de", None)
    sent = build_email(Message("1", address, "email", "hi", "Hi"), "shop@example.com",
                       None, {})
    assert sent["To"] == "Zoe@xn--bcher-kva.de" and b"=?utf-8?" not in bytes(sent)


def test_special_use_email_domains_are_a_workspace_setting(make_workspace) -> None:
    from herald.delivery.addresses import clean_address

    special = ["a@shop.test", "a@x.invalid", "a@localhost", "a@printer.local"]
    for address in special:  # the default, for production: refused
        assert clean_address("email", address) == (None, "invalid")
        assert clean_address("email", address, special_use=True) == (address, None)
    assert clean_address("email", "A@Shop.Example.com") == ("A@shop.example.com", None)
    assert clean_address("email", "a b@x.test", special_use=True) == (None, "invalid")
    from .helpers import HERALD_YAML

    ws = make_workspace({"config/herald.yaml": HERALD_YAML.replace(
        "caps: []", "caps: []\nemail: {allow_special_use_domains: true}")})
    assert ws.config.email.allow_special_use_domains is True
