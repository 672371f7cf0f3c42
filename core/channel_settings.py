"""What the core knows of channels: the message kinds and their address columns, the
settings every channel accepts (adapters subclass ``ChannelSettings`` in
``herald.channels``), rates, and which kind a configured channel carries."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

# What a message is, independent of who carries it. Each kind has the recipient column
# that holds its address unless the channel's YAML names another (`address: column`).
KINDS: dict[str, str] = {
    "email": "email",
    "sms": "phone",
    "wechat": "wechat_openid",
    "webhook": "webhook_url",
}

_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*$")
_PER_SECONDS = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60,
                "h": 3600, "hour": 3600}


MAX_RATE = 1_000_000  # messages a second


def parse_rate(value: Any) -> float | None:
    """Parse ``"50/s"``, ``"3000/min"`` or ``"100/h"`` (or a number: per second) into
    messages per second; zero, negative or absurd rates are refused, never "no limit"."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError("rate must look like 50/s, 3000/min or 100/h")
    if isinstance(value, float | int):
        if not 0 < value <= MAX_RATE:
            raise ValueError(f"rate must be more than 0 and at most {MAX_RATE:,}/s (leave "
                             "rate out for no limit)")
        return float(value)
    match = _RATE.match(str(value))
    if not match:
        raise ValueError("rate must look like 50/s, 3000/min or 100/h")
    per_second = float(match.group(1)) / _PER_SECONDS[match.group(2)]
    if not 0 < per_second <= MAX_RATE:
        raise ValueError(f"rate must be more than 0 and at most {MAX_RATE:,}/s (leave rate "
                         "out for no limit)")
    return per_second



Rate = Annotated[float | None, BeforeValidator(parse_rate)]


class ChannelSettings(BaseModel):
    """Settings every channel accepts; adapters subclass it with their own fields.

    Secret fields (passwords, tokens) are ``SecretStr`` so they never print.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str
    kind: str | None = None
    address: str | None = None
    rate: Rate = None
    batch_size: int | None = Field(default=None, gt=0)
    # characters of a message (subject + text + HTML) the channel accepts; longer ones
    # fail as ``body_too_long`` without reaching the provider (default: the adapter's)
    max_body: int | None = Field(default=None, gt=0)


def channel_kind(name: str, settings: ChannelSettings, kinds: frozenset[str]) -> str | None:
    """The kind a configured channel carries (the one home of this decision): its
    ``kind:``, else the adapter's only kind, else the channel's name when it names one
    of the adapter's kinds; None when it cannot be told (a configuration error)."""
    if settings.kind:
        return settings.kind
    if len(kinds) == 1:
        return next(iter(kinds))
    return name if name in kinds else None
