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

from herald.delivery.addresses import _e164_as_written, e164


def parser(text: str) -> tuple[str | None, str | None]:
    """What phonenumbers' general parser says of ``text`` (the path the fast one skips)."""
    try:
        number = phonenumbers.parse(text, None)
    except phonenumbers.NumberParseException:
        return None, "invalid"
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
])
def test_e164_agrees_with_the_parser_on_hard_cases(text: str, expected: tuple) -> None:
    e164.cache_clear()
    assert e164(text, None) == expected == parser(text)
