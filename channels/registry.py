"""Find channel adapters: built-ins and third-party ones, through one entry-point group
(``herald.channels``; the lookup itself is ``herald.core.plugins``)."""

from __future__ import annotations

from functools import cache

from herald.channels.base import Channel
from herald.core.errors import ChannelError
from herald.core.plugins import GROUP, _entry_points, installed, load

__all__ = ["GROUP", "channel_class", "installed"]


@cache
def channel_class(type_name: str) -> type[Channel]:
    """The adapter class registered as ``type_name``; ChannelError names the case."""
    cls = load(type_name)
    if not (isinstance(cls, type) and issubclass(cls, Channel)):
        raise ChannelError(f"channel '{type_name}' ({_entry_points()[type_name].value}) is "
                           "not a herald.channels.base.Channel subclass")
    return cls
