"""Find channel adapters: built-ins and third-party ones, through one entry-point group.

A package registers an adapter in its ``pyproject.toml``::

    [project.entry-points."herald.channels"]
    pigeon = "herald_pigeon:PigeonChannel"
"""

from __future__ import annotations

from functools import cache
from importlib.metadata import EntryPoint, entry_points

from herald.channels.base import Channel
from herald.flows.errors import ChannelError

GROUP = "herald.channels"


@cache
def _entry_points() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def installed() -> list[str]:
    """The channel type names that are installed."""
    return sorted(_entry_points())


@cache
def channel_class(type_name: str) -> type[Channel]:
    """The adapter class registered as ``type_name``; ChannelError names the case."""
    eps = _entry_points()
    if type_name not in eps:
        raise ChannelError(f"unknown channel type '{type_name}' "
                           f"(installed: {', '.join(installed()) or 'none'})")
    try:
        cls = eps[type_name].load()
    except Exception as exc:  # an adapter's import can fail in any way
        raise ChannelError(f"channel '{type_name}' failed to import: "
                           f"{type(exc).__name__}: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, Channel)):
        raise ChannelError(f"channel '{type_name}' ({eps[type_name].value}) is not a "
                           "herald.channels.base.Channel subclass")
    return cls
