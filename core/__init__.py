"""Herald's core: what every other package builds on, and which imports none of them.

Errors (``errors``), YAML loading with positions (``yamlio``), the spec models of
``config/`` (``spec``) with their value types (``fields``: durations, names, time zones)
and schedules (``schedules``), the settings every channel accepts (``channel_settings``),
reading the operator's files (``files``), the workspace (``workspace``), the workspace
database and all of its tables (``db``), the channel-type lookup the workspace validates
settings with (``plugins``), and the one clock every time decision reads (``clock``).
May import: nothing of Herald outside the core.
"""
