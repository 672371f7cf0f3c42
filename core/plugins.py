"""Channel types by name, through one entry-point group (``herald.channels``).

A package registers an adapter in its ``pyproject.toml``::

    [project.entry-points."herald.channels"]
    pigeon = "herald_pigeon:PigeonChannel"

The workspace needs a channel type's settings model and kinds to validate
``config/herald.yaml``, so the lookup lives in the core; the core knows a type only by
those two attributes (:class:`ChannelType`), never the adapter base class, which
``herald.channels.registry`` checks on top.
"""

from __future__ import annotations

from functools import cache
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Protocol

from herald.core.channel_settings import ChannelSettings
from herald.core.errors import ChannelError, did_you_mean

GROUP = "herald.channels"


class ChannelType(Protocol):
    """What the workspace reads of a channel adapter class."""

    type_name: str
    kinds: frozenset[str]
    Settings: type[ChannelSettings]


@cache
def _entry_points() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def installed() -> list[str]:
    """The channel type names that are installed."""
    return sorted(_entry_points())


@cache
def load(type_name: str) -> Any:
    """The object registered as ``type_name``; ChannelError names the case."""
    eps = _entry_points()
    if type_name not in eps:
        raise ChannelError(f"unknown channel type '{type_name}'"
                           f"{did_you_mean(type_name, eps)} "
                           f"(installed: {', '.join(installed()) or 'none'})")
    try:
        return eps[type_name].load()
    except Exception as exc:  # an adapter's import can fail in any way
        raise ChannelError(f"channel '{type_name}' failed to import: "
                           f"{type(exc).__name__}: {exc}") from exc


def channel_type(type_name: str) -> ChannelType:
    """The registered adapter's settings model and kinds, checked to be there."""
    cls = load(type_name)
    settings = getattr(cls, "Settings", None)
    if not (isinstance(cls, type) and isinstance(settings, type)
            and issubclass(settings, ChannelSettings)
            and isinstance(getattr(cls, "kinds", None), frozenset)):
        raise ChannelError(f"channel '{type_name}' ({_entry_points()[type_name].value}) is "
                           "not a herald.channels.base.Channel subclass")
    return cls  # type: ignore[return-value]
