"""Addresses: the one home of cleaning e-mail addresses and phone numbers.

The contact policy (what a run sends to) and preview (what it shows) read a recipient's
address for a channel through :class:`Addresses`, so they cannot drift apart; the
suppression list normalises its values with the same functions (:func:`comparable`), so
a value matches the address it names whatever form it was written in (``+86 138 0013
8000`` and ``13800138000`` with ``phone_region: CN``; a domain in punycode or in
Unicode). E-mail addresses are checked for syntax (no DNS); special-use domains follow
the workspace's setting.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from email_validator import EmailNotValidError, validate_email

from herald.core.workspace import Workspace

__all__ = ["Addresses", "clean_address", "comparable", "e164"]


class Addresses:
    """A workspace's address rules, per configured channel."""

    def __init__(self, ws: Workspace) -> None:
        self.ws = ws
        self.region = ws.config.phone_region
        self.special_use = ws.config.email.allow_special_use_domains

    def of(self, channel: str, row: Mapping[str, Any]) -> tuple[str | None, str | None]:
        """The recipient's cleaned address for ``channel`` (from the channel's address
        column), or (None, why not)."""
        return self.clean(channel, row.get(self.ws.address_column(channel)))

    def clean(self, channel: str, value: object) -> tuple[str | None, str | None]:
        """``value`` cleaned as an address of ``channel``, or (None, why not)."""
        return clean_address(self.ws.channel_kind(channel), value, self.region,
                             self.special_use)

    def comparable(self, channel: str, address: str) -> str:
        """The compared form (:func:`comparable`) of an address :meth:`clean` returned,
        without parsing it again: a cleaned phone number is already in E.164, a cleaned
        e-mail address only needs lower-casing."""
        kind = self.ws.channel_kind(channel)
        if kind == "sms":
            return address
        if kind == "email":
            return address.lower()
        return comparable(address, self.region)


# what a phone number written by a person may contain: digits and separators
PHONE_LIKE = re.compile(r"^\+?[\d\s().\-/]{6,32}$")


# Cleaning is pure and costs tens of microseconds a value (email_validator's and
# phonenumbers' parsers): the same values come back (a recipient key that is also an
# address, a shared address, preview after a run), so recent results are kept by value.
# The caches are small (a few MB): the contact policy keeps a chunk's own forms itself.
CACHE_SIZE = 1 << 12


def clean_address(kind: str, value: object, region: str | None = None,
                  special_use: bool = False) -> tuple[str | None, str | None]:
    """(address, None) when usable, else (None, why not). E-mail addresses are checked
    for syntax only (no DNS) and normalized; a special-use domain (.test, .invalid,
    localhost, ...) is refused unless ``special_use``. Phone numbers become E.164
    (``region``: the country of numbers written without a country code)."""
    if value is None:
        return None, "empty"
    return _clean(kind, str(value), region, special_use)


@lru_cache(maxsize=CACHE_SIZE)
def _clean(kind: str, value: str, region: str | None, special_use: bool
           ) -> tuple[str | None, str | None]:
    text = value.strip()
    if not text:
        return None, "empty"
    if len(text) > 512:
        return None, "too long"
    if kind == "email":
        try:
            return validate_email(text, check_deliverability=False).normalized, None
        except EmailNotValidError:
            if not special_use or not _special_use(text):
                return None, "invalid"
        # a special-use domain, allowed here: check the syntax with a public suffix added
        try:
            checked = validate_email(f"{text}.com", check_deliverability=False)
        except EmailNotValidError:
            return None, "invalid"
        return checked.normalized.removesuffix(".com"), None
    if kind == "sms":
        return e164(text, region)
    return text, None


def _special_use(address: str) -> bool:
    from email_validator import SPECIAL_USE_DOMAIN_NAMES

    domain = address.rpartition("@")[2].lower().rstrip(".")
    return any(domain == d or domain.endswith(f".{d}") for d in SPECIAL_USE_DOMAIN_NAMES)


@lru_cache(maxsize=CACHE_SIZE)
def e164(text: str, region: str | None) -> tuple[str | None, str | None]:
    """A phone number in E.164 (``+8613812345678``), or (None, why not)."""
    import phonenumbers

    try:
        number = phonenumbers.parse(text, region)
    except phonenumbers.NumberParseException:
        return None, "invalid" if region or text.startswith("+") else \
            "invalid (no country code, and no phone_region in herald.yaml)"
    if not phonenumbers.is_valid_number(number):
        return None, "invalid"
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164), None


@lru_cache(maxsize=CACHE_SIZE)
def comparable(value: str, region: str | None = None) -> str:
    """The form in which a recipient key or an address is compared (suppression list,
    deduplication): an e-mail address cleaned and lower-cased (its domain in Unicode,
    whether written in punycode or not), a phone number in E.164, anything else (a
    recipient key) trimmed and lower-cased. A recipient key that reads as a valid phone
    number compares as that number, on both sides of every comparison."""
    text = value.strip()
    if "@" in text:
        address, _ = clean_address("email", text, special_use=True)
        return (address or text).lower()
    if PHONE_LIKE.match(text) and sum(c.isdigit() for c in text) >= 6:
        number, _ = e164(text, region)
        if number:
            return number
    return text.lower()
