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
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import Any

from email_validator import EmailNotValidError, validate_email

from herald.core.workspace import Workspace

__all__ = ["Addresses", "clean_address", "comparable", "compared_form", "e164"]


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
        return compared_form(self.ws.channel_kind(channel), address, self.region)


def compared_form(kind: str, address: str, region: str | None) -> str:
    """:meth:`Addresses.comparable` for a channel of ``kind``."""
    if kind == "sms":
        return address
    if kind == "email":
        return address.lower()
    return comparable(address, region)


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
        # no SMTPUTF8: a message to a non-ASCII local part ('ｅｖｅ@…') cannot be built
        # by the e-mail channels, so it is refused here, where a dry run sees it too; an
        # internationalized domain is kept in its ASCII (IDNA) form, the form a message
        # header and the SMTP envelope carry (and one form per address for deduplication)
        try:
            valid = validate_email(text, check_deliverability=False, allow_smtputf8=False)
            return valid.ascii_email or valid.normalized, None
        except EmailNotValidError:
            if not special_use or not _special_use(text):
                return None, _why_invalid(text)
        # a special-use domain, allowed here: check the syntax with a public suffix added
        try:
            checked = validate_email(f"{text}.com", check_deliverability=False,
                                     allow_smtputf8=False)
        except EmailNotValidError:
            return None, _why_invalid(f"{text}.com")
        return (checked.ascii_email or checked.normalized).removesuffix(".com"), None
    if kind == "sms":
        return e164(text, region)
    return text, None


def _why_invalid(text: str) -> str:
    try:
        validate_email(text, check_deliverability=False)
    except EmailNotValidError:
        return "invalid"
    return "invalid (non-ASCII before the @, which the e-mail channels cannot send)"


def _special_use(address: str) -> bool:
    from email_validator import SPECIAL_USE_DOMAIN_NAMES

    domain = address.rpartition("@")[2].lower().rstrip(".")
    return any(domain == d or domain.endswith(f".{d}") for d in SPECIAL_USE_DOMAIN_NAMES)


@lru_cache(maxsize=CACHE_SIZE)
def e164(text: str, region: str | None) -> tuple[str | None, str | None]:
    """A phone number in E.164 (``+8613812345678``), or (None, why not)."""
    if text[:1] == "+":
        known = _e164_as_written(text)
    elif region:
        known = _national(text, region)
    elif "+" not in text and "\uff0b" not in text:  # no country code, and no region
        return None, "invalid (no country code, and no phone_region in herald.yaml)"
    else:
        known = None
    if known is not None:
        return known
    import phonenumbers

    try:
        number = phonenumbers.parse(text, region)
    except phonenumbers.NumberParseException:
        return None, "invalid" if region or text.startswith("+") else \
            "invalid (no country code, and no phone_region in herald.yaml)"
    if not phonenumbers.is_valid_number(number):
        return None, "invalid"
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164), None


# A number already written in E.164 (the common case in a CRM) is checked without
# phonenumbers' general parser, which costs about 40 µs a number here to find what the
# string already says: '+', the country code, the national number. The answer is the
# parser's own, read from the same metadata: valid when the national number matches the
# region's general pattern and one type's pattern (phonenumbers' ``_number_type_helper``),
# and, for a code shared by several regions, in the region the library would pick.
# Anything the parser would rewrite (a national prefix it could strip, a leading zero,
# a non-geographic code) is left to the parser: ``None`` means "not decided here".
# tests/test_addresses.py holds this path to the parser's answer over every region.
def _e164_as_written(text: str) -> tuple[str | None, str | None] | None:
    digits = text[1:]
    if not (3 <= len(digits) <= 18 and digits.isascii() and digits.isdigit()) \
            or digits[0] == "0":
        return None
    for size in (1, 2, 3):
        country = _country(digits[:size])
        if country is not None:
            break
    else:
        return None  # no known country code: the parser says why
    national = digits[size:]
    strip, regions = country
    if (len(national) < 2 or national[0] == "0" or not regions
            or (strip is not None and strip.match(national))):
        return None
    return _decide(text, national, regions)


def _decide(written: str, national: str, regions: tuple[_Region, ...]
            ) -> tuple[str | None, str | None]:
    # phonenumbers' region_code_for_number: the only region, or the first whose
    # leading digits match or, without leading digits, of whose types the number is
    region = regions[0] if len(regions) == 1 else next(
        (r for r in regions
         if (r.leading.match(national) if r.leading is not None else r.valid(national))),
        None)
    if region is None or not region.valid(national):
        return None, "invalid"
    return written, None


def _national(text: str, region: str) -> tuple[str | None, str | None] | None:
    """A number written as dialled inside ``region`` (digits only), checked as
    :func:`_e164_as_written` checks one in E.164, where the parser would take the digits
    as they are: not when they start with the region's international or national prefix
    or its country code (the parser may strip them), nor with a zero."""
    if not (2 <= len(text) <= 17 and text.isascii() and text.isdigit()) or text[0] == "0":
        return None
    home = _home(region)
    if home is None:
        return None
    code, prefixes, regions = home
    if not regions or text.startswith(code) or any(p.match(text) for p in prefixes):
        return None
    return _decide(f"+{code}{text}", text, regions)


@cache
def _home(region: str) -> tuple[str, tuple[re.Pattern[str], ...], tuple[_Region, ...]] | None:
    """For a region: its country code, the prefixes the parser strips from a number
    dialled there (international, national), and the regions of its country code."""
    from phonenumbers import PhoneMetadata

    meta = PhoneMetadata.metadata_for_region(region.upper(), None)
    if meta is None or meta.country_code is None:
        return None
    country = _country(str(meta.country_code))
    if country is None:
        return None
    prefixes = tuple(re.compile(p) for p in (meta.international_prefix,
                                             meta.national_prefix_for_parsing) if p)
    return str(meta.country_code), prefixes, country[1]


@dataclass(frozen=True, slots=True)
class _Region:
    """What phonenumbers reads of a region to say whether a number is valid there: its
    leading digits, its general description, and its types' patterns joined into one
    pattern per national number length (a type without lengths takes the general's)."""

    leading: re.Pattern[str] | None
    lengths: frozenset[int]
    # per length: "the general pattern matches, and one type's" as one pattern
    types: dict[int, re.Pattern[str]]

    @classmethod
    def of(cls, meta: Any) -> _Region:
        general = meta.general_desc
        pattern = general.national_number_pattern if general is not None else None
        lengths = frozenset(general.possible_length) if pattern else frozenset()
        by_length: dict[int, list[str]] = {}
        for name in TYPES:
            desc = getattr(meta, name)
            if desc is None or not desc.national_number_pattern:
                continue
            for size in desc.possible_length or lengths or range(1, 18):
                by_length.setdefault(size, []).append(desc.national_number_pattern)
        if not pattern:
            by_length.clear()  # no general description: no number is valid
        return cls(re.compile(meta.leading_digits) if meta.leading_digits else None,
                   lengths,
                   {size: re.compile(f"(?=(?:{pattern})$)(?:"
                                     + "|".join(f"(?:{p})" for p in patterns) + ")")
                    for size, patterns in by_length.items()})

    def valid(self, national: str) -> bool:
        """phonenumbers' ``_number_type_helper(...) != UNKNOWN``: the general description
        matches, and so does one type's."""
        size = len(national)
        if self.lengths and size not in self.lengths:
            return False
        types = self.types.get(size)
        return types is not None and types.fullmatch(national) is not None


TYPES = ("mobile", "fixed_line", "premium_rate", "toll_free", "shared_cost", "voip",
         "personal_number", "pager", "uan", "voicemail")


Country = tuple["re.Pattern[str] | None", tuple[_Region, ...]]


@cache
def _country(code: str) -> Country | None:
    """For country calling code ``code``: the national prefix the parser would try to
    strip (its main region's), and its regions in the order phonenumbers tries them;
    ``None`` when no country has that code, no regions where its numbers are left to the
    parser (non-geographic codes)."""
    from phonenumbers import COUNTRY_CODE_TO_REGION_CODE, PhoneMetadata

    names = COUNTRY_CODE_TO_REGION_CODE.get(int(code))
    if names is None:
        return None
    found = [PhoneMetadata.metadata_for_region(name.upper(), None) for name in names]
    metas = [meta for meta in found if meta is not None]
    if len(metas) < len(found):
        return None, ()
    strip = metas[0].national_prefix_for_parsing
    return (re.compile(strip) if strip else None), tuple(_Region.of(m) for m in metas)


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
