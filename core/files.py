"""Reading the operator's files (YAML, SQL, templates, SQLite sources): one place turns
what the OS says about a file into one line naming it, and drops the byte-order mark
some editors write at the start of a UTF-8 file."""

from __future__ import annotations

import codecs
from pathlib import Path

from herald.core.errors import WorkspaceError


class UnreadableFile(WorkspaceError):
    """A file that is missing, a folder, or that the OS will not let Herald read."""

    def __init__(self, file: str, reason: str) -> None:
        self.file = file
        self.reason = reason
        super().__init__(f"{file}: {reason}")


def read_text(path: Path, display: str) -> str:
    """The text of ``path`` as UTF-8, a leading byte-order mark dropped.

    UnreadableFile (naming ``display``) when it is missing, a folder or unreadable;
    UnicodeDecodeError for bytes that are not UTF-8, for the caller to locate.
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UnreadableFile(display, unreadable_reason(path, exc)) from None
    return raw.removeprefix(codecs.BOM_UTF8).decode("utf-8")


def check_readable(path: Path, display: str) -> None:
    """UnreadableFile unless ``path`` is a file this process may open for reading."""
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise UnreadableFile(display, unreadable_reason(path, exc)) from None


def file_in_the_way(path: Path) -> Path | None:
    """The first of ``path``'s folders that is a file instead (``.herald/outbox`` made a
    file), which is why nothing can be written there; None when there is none."""
    return next((p for p in reversed(path.parents) if p.exists() and not p.is_dir()), None)


def folder_blocked(folder: Path) -> Path | None:
    """A file where ``folder``, or a folder above it, should be (nothing can be written
    under it); None when there is none."""
    return folder if folder.exists() and not folder.is_dir() else file_in_the_way(folder)


def unreadable_reason(path: Path, exc: OSError) -> str:
    """Why ``path`` could not be read, in the words of an error message."""
    if isinstance(exc, IsADirectoryError) or path.is_dir():
        return "is a folder, not a file"
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    if isinstance(exc, PermissionError):
        return "cannot read: permission denied"
    return f"cannot read: {(exc.strerror or type(exc).__name__).lower()}"
