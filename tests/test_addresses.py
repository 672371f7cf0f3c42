"""Addresses checked without the general parsers give the parsers' own answers.

A phone number written in E.164 is checked from phonenumbers' metadata without its
general parser (delivery/addresses.py says why). These tests hold that path to the
parser's answer over every region phonenumbers knows: each type's example number, and
numbers one digit off, one longer, one shorter and random, so that a disagreement in any
region's rules shows up here and not as a message sent to a number the parser refuses.
"""

from __future__ import annotations

import random

import phonenumbers
import pytest

from herald.delivery.addresses import _e164_as_written, _national, e164


def parser(text: str, region: str | None = None) -> tuple[str | None, str | None]:
    """What phonenumbers' general parser says of ``text`` (the path the fast one skips)."""
    try:
        number = phonenumbers.parse(text, region)
    except phonenumbers.NumberParseException:
        return None, "invalid" if region or "+" in text else \
            "invalid (no country code, and no phone_region in herald.yaml)"
    if not phonenumbers.is_valid_number(number):
        return None, "invalid"
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164), None


def written_numbers() -> list[str]:
    """Example numbers of every region and type in E.164, and variants of each."""
    pick = random.Random(20261130)
    found: set[str] = set()
    for region in sorted(phonenumbers.SUPPORTED_REGIONS):
        for kind in range(12):
            example = phonenumbers.example_number_for_type(region, kind)
            if example is None:
                continue
            text = phonenumbers.format_number(example, phonenumbers.PhoneNumberFormat.E164)
            found.add(text)
            found.add(text[:-1] + str((int(text[-1]) + 1) % 10))  # one digit off
            found.add(text + str(pick.randrange(10)))  # one longer
            found.add(text[:-1])  # one shorter
            code = str(example.country_code)
            for size in (4, 7, 9, 10, 11, 13):  # random national numbers
                found.add(f"+{code}{pick.randrange(1, 10)}"
                          + "".join(str(pick.randrange(10)) for _ in range(size - 1)))
    for code in phonenumbers.COUNTRY_CODE_TO_REGION_CODE:  # non-geographic codes too
        found.add(f"+{code}" + "".join(str(pick.randrange(10)) for _ in range(9)))
    for _ in range(2000):  # any digits at all
        found.add("+" + "".join(str(pick.randrange(10)) for _ in range(pick.randrange(3, 19))))
    return sorted(found)


def test_numbers_in_e164_get_the_parsers_answer_in_every_region() -> None:
    numbers = written_numbers()
    decided = 0
    for text in numbers:
        fast = _e164_as_written(text)
        if fast is None:
            continue  # left to the parser
        decided += 1
        assert fast == parser(text), text
    # the shortcut must decide most numbers, or it is no shortcut
    assert len(numbers) > 10_000 and decided / len(numbers) > 0.8, (decided, len(numbers))


def national_numbers() -> list[tuple[str, str]]:
    """(digits as dialled inside a region, the region) for every region and type, with
    variants, and random digits."""
    pick = random.Random(20261201)
    found: set[tuple[str, str]] = set()
    for region in sorted(phonenumbers.SUPPORTED_REGIONS):
        for kind in range(12):
            example = phonenumbers.example_number_for_type(region, kind)
            if example is None:
                continue
            text = "".join(c for c in phonenumbers.format_number(
                example, phonenumbers.PhoneNumberFormat.NATIONAL) if c.isdigit())
            for variant in (text, text[:-1] + str((int(text[-1]) + 1) % 10),
                            text + str(pick.randrange(10)), text[:-1],
                            str(phonenumbers.national_significant_number(example))):
                found.add((variant, region))
        for size in (2, 5, 6, 8, 10, 11, 12, 17):  # keys that look like numbers
            found.add(("".join(str(pick.randrange(10)) for _ in range(size)), region))
    return sorted(found)


def test_numbers_dialled_in_a_region_get_the_parsers_answer() -> None:
    numbers = national_numbers()
    decided = 0
    for text, region in numbers:
        fast = _national(text, region)
        if fast is None:
            continue
        decided += 1
        assert fast == parser(text, region), (text, region)
    assert len(numbers) > 5_000 and decided / len(numbers) > 0.5, (decided, len(numbers))


def test_digits_without_a_country_code_or_region_are_refused_without_the_parser() -> None:
    for text in ("123456", "13800138000", "8613800138000", "00861380013800"):
        e164.cache_clear()
        assert e164(text, None) == parser(text) == (
            None, "invalid (no country code, and no phone_region in herald.yaml)")


@pytest.mark.parametrize("text, expected", [
    ("+8613800138000", ("+8613800138000", None)),  # China, mobile
    ("+86138001380001", (None, "invalid")),  # one digit too many
    ("+14155552671", ("+14155552671", None)),  # NANPA: US
    ("+16135550123", ("+16135550123", None)),  # NANPA: Canada
    ("+11235550123", (None, "invalid")),  # NANPA: no region's area code
    ("+447400123456", ("+447400123456", None)),  # GB mobile
    ("+447624123456", ("+447624123456", None)),  # Isle of Man, sharing +44
    ("+390612345678", ("+390612345678", None)),  # Italy keeps its leading zero
    ("+80012345678", ("+80012345678", None)),  # non-geographic (freephone)
    ("+0123456789", (None, "invalid")),  # no country code starts with 0
    ("+99912345678", (None, "invalid")),  # no such country code
    ("+٨٦١٣٨٠٠١٣٨٠٠٠", ("+8613800138000", None)),  # Arabic-Indic digits: the parser's
    ("13800138000 CN", ("+8613800138000", None)),  # dialled in China
    ("013800138000 CN", ("+8613800138000", None)),  # a national prefix: the parser's
    ("8613800138000 CN", ("+8613800138000", None)),  # the country code without '+'
    ("00861380013800 CN", (None, "invalid")),  # China's international prefix
    ("4155552671 US", ("+14155552671", None)),
    ("6135550123 US", ("+16135550123", None)),  # a Canadian number dialled in the US
    ("123456 CN", (None, "invalid")),  # a customer id that is no number
])
def test_e164_agrees_with_the_parser_on_hard_cases(text: str, expected: tuple) -> None:
    text, _, region = text.partition(" ")
    e164.cache_clear()
    assert e164(text, region or None) == expected == parser(text, region or None)
