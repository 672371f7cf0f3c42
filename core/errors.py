"""Herald's user-facing errors.

Every error an operator can cause or fix derives from ``HeraldError``; the CLI prints
its message on one line and exits with status 1 (a traceback only with ``--debug``)::

    HeraldError
     ├── ConfigError          YAML that cannot be loaded or does not match the schema;
     │                        carries every problem found, each with file, line and field
     ├── WorkspaceError       no workspace here, a missing segment, template or flow file,
     │                        or one that is a folder or cannot be read (UnreadableFile)
     ├── ValidationFailed     a flow that must not run: SQL, template or channel problems
     │                        (carries every problem, like ConfigError)
     ├── AudienceError        the segment query failed or its result is unusable
     │                        (duplicate keys, missing key column)
     ├── ChannelError         an adapter cannot be found, imported or configured
     └── RunError             a run that failed after validation (reported, nothing hidden)

Messages never contain secret values: settings read from ``${ENV}`` are ``SecretStr``
and errors name fields, not their contents.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass


class HeraldError(Exception):
    """Base class of every error Herald reports to an operator."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong, located as precisely as we can: file, line and field path."""

    message: str
    file: str | None = None
    line: int | None = None
    field: str | None = None

    def __str__(self) -> str:
        where = ""
        if self.file:
            where = self.file if self.line is None else f"{self.file}:{self.line}"
        if self.field:
            where = f"{where} {self.field}" if where else self.field
        return f"{where}: {self.message}" if where else self.message


def did_you_mean(word: str, choices: Iterable[str], kind: str = "") -> str:
    """`` (did you mean 'email'?)`` when one of ``choices`` is close to ``word``, else '';
    with ``kind``, `` (did you mean journey 'nudge'?)``."""
    close = difflib.get_close_matches(word, list(dict.fromkeys(choices)), n=1, cutoff=0.6)
    return f" (did you mean {kind + ' ' if kind else ''}'{close[0]}'?)" if close else ""


class _ProblemsError(HeraldError):
    """An error that carries every problem found, not just the first."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class ConfigError(_ProblemsError):
    """YAML that cannot be loaded or does not match the schema."""


class ValidationFailed(_ProblemsError):
    """A flow failed its pre-send validation; nothing was sent."""


class WorkspaceError(HeraldError):
    """The workspace or one of its files cannot be found."""


class AudienceError(HeraldError):
    """The segment query failed or returned something Herald cannot send to."""


class ChannelError(HeraldError):
    """A channel adapter cannot be found, imported or configured."""


class RunError(HeraldError):
    """A run failed after validation passed."""


def quoted(value: str, limit: int = 60) -> str:
    """An operator's value in an error message: quoted, shortened past ``limit``
    characters, and on one line: a value holding a newline or another control character
    is shown escaped, as Python writes it (the CLI prints each line of an error as a
    problem of its own)."""
    text = value if len(value) <= limit else value[:limit - 3] + "..."
    return repr(text) if not text.isprintable() else f"'{text}'"
