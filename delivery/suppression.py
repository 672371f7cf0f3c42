"""The suppression list: people and addresses never to contact, per channel or on all.

Values are compared normalised (:func:`normalize`). Operators add them (``herald
suppress add``, ``import``), providers add them (a permanent bounce, an unsubscribe),
the policy reads them for every recipient of a chunk in one batched query.
"""

from __future__ import annotations

import csv
import email.utils
import re
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from sqlalchemy import Connection, Engine, delete, insert, select, update

from herald.core.db import ALL_CHANNELS, suppressions, writing
from herald.core.errors import ConfigError, HeraldError, Problem, quoted
from herald.delivery.addresses import PHONE_LIKE, clean_address, comparable, e164
from herald.delivery.ledger import among, now

Item = tuple[str, str | None, str | None]  # (value, channel or None for all, reason)
FORM = 1  # the normalisation of values this version writes (see migrate)


def normalize(value: str, region: str | None = None) -> str:
    """How addresses and keys are compared in the suppression list: exactly as the
    policy cleans addresses (e-mail normalised with its domain in Unicode, phone numbers
    in E.164 with the workspace's ``phone_region``), then lower-cased."""
    return comparable(value, region)


LISTED_SINCE = "recipient or address put on the suppression list after the message was reserved"


def listed_since(conn: Connection, reserved: Iterable[tuple[str, str | None, str | None]],
                 region: str | None = None) -> set[str]:
    """Of messages reserved earlier and about to be sent, (key, channel, address) each,
    the keys the suppression list stops now: the key or the address listed for every
    channel or for this one. A message held back (a rerun after a stop, a journey's
    message after a stopped channel or a provider's back-off) may go out days after its
    reservation, and an unsubscribe meanwhile must still hold."""
    return {key for key, _ in stopping(conn, reserved, region)}


def stopping(conn: Connection, messages: Iterable[tuple[str, str | None, str | None]],
             region: str | None = None) -> set[tuple[str, str | None]]:
    """Of (key, channel, address) messages, the (key, channel) pairs the suppression list
    stops: the key or the address listed for every channel or for this one."""
    forms = {(key, channel): [normalize(v, region) for v in (key, address) if v]
             for key, channel, address in messages}
    listed = suppressed(conn, [f for found in forms.values() for f in found],
                        normalized=True)
    return {pair for pair, found in forms.items()
            if any({ALL_CHANNELS, pair[1]} & listed.get(f, set()) for f in found)}


def suppressed(conn: Connection, values: Iterable[str], region: str | None = None,
               normalized: bool = False) -> dict[str, set[str]]:
    """{normalized value: channels it is suppressed on ("*" for every channel)}
    (``normalized``: the values are already in their compared form)."""
    wanted = sorted({v if normalized else normalize(v, region) for v in values if v})
    out: dict[str, set[str]] = defaultdict(set)
    for part in among(conn, suppressions.c.value, wanted):
        for value, channel in conn.execute(select(suppressions.c.value,
                                                  suppressions.c.channel).where(part)):
            out[value].add(channel)
    return out


def suppress(engine: Engine, items: Iterable[tuple[str, str | None, str | None]],
             source: str, region: str | None = None) -> int:
    """Add (value, channel, reason) items in one transaction; return how many were new."""
    added = 0
    with writing(engine) as conn:
        for value, channel, reason in items:
            norm, chan = normalize(value, region), channel or ALL_CHANNELS
            if not norm:
                continue
            exists = conn.execute(select(suppressions.c.id).where(
                suppressions.c.value == norm, suppressions.c.channel == chan)).first()
            if exists:
                continue
            conn.execute(insert(suppressions).values(value=norm, channel=chan, reason=reason,
                                                     source=source, created_at=now(),
                                                     form=FORM))
            added += 1
    return added


def migrate(engine: Engine, region: str | None = None) -> int:
    """Normalise entries written before values were normalised like addresses (their
    ``form`` is null): a phone number becomes E.164, an e-mail domain Unicode; an entry
    that becomes the same as another is merged into it. Returns the entries changed."""
    with engine.connect() as conn:
        if conn.execute(select(suppressions.c.id).where(
                suppressions.c.form.is_(None)).limit(1)).first() is None:
            return 0
    changed = 0
    with writing(engine) as conn:
        old = list(conn.execute(select(suppressions.c.id, suppressions.c.value,
                                       suppressions.c.channel)
                                .where(suppressions.c.form.is_(None))))
        for row in old:
            norm = normalize(row.value, region)
            if norm != row.value and conn.execute(select(suppressions.c.id).where(
                    suppressions.c.value == norm, suppressions.c.channel == row.channel,
                    suppressions.c.id != row.id)).first():
                conn.execute(delete(suppressions).where(suppressions.c.id == row.id))
                changed += 1
                continue
            conn.execute(update(suppressions).where(suppressions.c.id == row.id)
                         .values(value=norm, form=FORM))
            changed += norm != row.value
    return changed


def unsuppress(engine: Engine, value: str, channel: str | None,
               region: str | None = None) -> int:
    query = suppressions.delete().where(suppressions.c.value == normalize(value, region))
    if channel:
        query = query.where(suppressions.c.channel == channel)
    with writing(engine) as conn:
        return int(conn.execute(query).rowcount or 0)


def list_suppressions(engine: Engine, limit: int | None = None) -> list[Any]:
    query = select(suppressions).order_by(suppressions.c.created_at, suppressions.c.id)
    if limit:
        query = query.limit(limit)
    with engine.connect() as conn:
        return list(conn.execute(query))


HEADERS = ("value", "address", "email", "phone", "key")


# "Display, Name" <addr>, then the line's other columns (after the separator)
_NAMED_ADDRESS = re.compile(r'^\s*(?P<value>"[^"]*"\s*<[^<>]*>)\s*(?:[,;\t](?P<rest>.*))?$')


def read_import(file: Path, channel: str | None, reason: str | None,
                check_channel: Callable[[str | None, str, str], None],
                region: str | None = None, keys: bool = False) -> list[Item]:
    """The items of an import file: one value per line, or CSV value[,channel[,reason]]
    separated by commas, or semicolons or tabs when no line has a comma (a header line
    and ``#`` comments skipped). A value is an e-mail address (also ``Name <addr>`` and
    ``mailto:addr``) or a phone number, or with ``keys`` a recipient key. Every line that
    yields none is refused with file:line; one refusal refuses the whole file (every
    problem is reported at once). ``check_channel(channel, where, value)`` raises for an
    unknown channel, or one the value can never be an address of."""
    try:
        raw = file.read_bytes()
    except FileNotFoundError:
        raise HeraldError(f"{file}: file not found") from None
    except IsADirectoryError:
        raise HeraldError(f"{file}: is a folder, not a file") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        bad_line = raw[:exc.start].count(b"\n") + 1
        raise HeraldError(f"{file}:{bad_line}: not valid UTF-8 (byte {exc.start} of the file; "
                          "save it as UTF-8)") from None
    lines = text.splitlines()
    data = [line for line in lines if line.strip() and not line.lstrip().startswith("#")]
    # separators are counted outside quotes: a display name's comma ("Smith, Bob" <b@…>)
    # made a semicolon file read as commas, and every line of it was refused
    bare = [re.sub(r'"[^"]*"', "", line) for line in data]
    delimiter = ","
    if not any("," in line for line in bare):
        if any(";" in line for line in bare):
            delimiter = ";"
        elif any("\t" in line for line in bare):
            delimiter = "\t"
    items: list[Item] = []
    problems: list[Problem] = []
    first = True
    at = {"value": 0, "channel": 1, "reason": 2}  # positions, unless a header names them
    for number, line in enumerate(lines, start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{file}:{number}"
        try:  # each line on its own: a stray quote cannot swallow the lines after it
            row = next(csv.reader([line], delimiter=delimiter, strict=True))
        except csv.Error:
            # a mail client's export: "Smith, Bob" <bob@shop.example>, one address with a
            # quoted display name (its comma is not a separator), maybe with more columns
            named = _NAMED_ADDRESS.match(line)
            if named and import_value(named["value"], region, keys)[0] is not None:
                rest = named["rest"]
                row = [named["value"], *(next(csv.reader([rest], delimiter=delimiter))
                                         if rest else [])]
            else:
                problems.append(Problem("unbalanced quote (a value in quotes must end with "
                                        "its quote)", file=str(file), line=number))
                first = False
                continue
        if first and row[0].strip().lower() in HEADERS:
            first = False
            names = [c.strip().lower() for c in row]
            unknown = [n for n in names if n not in (*HEADERS, "channel", "reason")]
            if unknown:
                problems.append(Problem(f"unknown column '{unknown[0]}' in the header "
                                        "(value, channel, reason)", file=str(file),
                                        line=number))
            at = {"value": 0, **{n: i for i, n in enumerate(names)
                                 if n in ("channel", "reason")}}
            at.setdefault("channel", -1)
            at.setdefault("reason", -1)
            continue  # a header line
        first = False
        if len(row) > 3:
            problems.append(Problem(f"expected value[{delimiter}channel[{delimiter}reason]]",
                                    file=str(file), line=number))
            continue

        def cell(name: str, row: list[str] = row, at: dict[str, int] = at) -> str | None:
            i = at[name]
            return (row[i].strip() or None) if 0 <= i < len(row) else None

        value, why = import_value(row[0], region, keys)
        if value is None:
            problems.append(Problem(str(why), file=str(file), line=number))
            continue
        row_channel = cell("channel") if len(row) > 1 else channel
        try:
            check_channel(row_channel, where, value)
        except HeraldError as exc:
            problems.append(Problem(str(exc).removeprefix(f"{where}: "), file=str(file),
                                    line=number))
            continue
        items.append((value, row_channel, (cell("reason") or reason) if len(row) > 1
                      else reason))
    if problems:
        raise ConfigError([*problems, Problem(f"nothing imported: {len(problems)} line"
                                              f"{'s' if len(problems) > 1 else ''} refused",
                                              file=str(file))])
    return items


def import_value(raw: str, region: str | None, keys: bool) -> tuple[str | None, str | None]:
    """(value, None) for one value an operator suppresses (``suppress add``, a line of
    ``suppress import``), or (None, why it is refused)."""
    text = raw.strip()
    if not text:
        return None, "no value (an empty first column)"
    if keys:
        if not text or any(c.isspace() or c in "<>\"'" for c in text):
            return None, f"{quoted(text)} is not a recipient key"
        return text, None
    if text.lower().startswith("mailto:"):
        text = unquote(text[len("mailto:"):].split("?", 1)[0]).strip()
    if "<" in text or ">" in text:
        name, address = email.utils.parseaddr(text)
        if not address or not text.endswith(">") or text.count("<") != 1:
            return None, f"{quoted(text)} is not an address (Name <addr> expected)"
        text = address
    if "@" in text:
        cleaned, why = clean_address("email", text, special_use=True)
        if cleaned is None:
            return None, f"{quoted(text)} is not a valid e-mail address ({why})"
        return cleaned, None
    if PHONE_LIKE.match(text):
        number, why = e164(text, region)
        if number is None:
            return None, f"{quoted(text)} is not a valid phone number ({why})"
        return number, None
    return None, (f"{quoted(text)} is neither an e-mail address nor a phone number "
                  "(recipient keys: --keys)")
