"""The outbox channel: writes each message it would send to a file, sends nothing.

Email becomes one RFC 5322 ``.eml`` file per message (the same MIME the SMTP channel
sends); every other kind becomes one JSON line in a file per channel. The layout is
``<dir>/<flow>/<run key>/<channel>/<recipient>.eml`` and
``<dir>/<flow>/<run key>/<channel>.jsonl``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
from collections.abc import Sequence
from email.errors import MessageError
from pathlib import Path

import orjson

from herald.channels.base import (
    KINDS,
    Channel,
    ChannelSettings,
    Message,
    Outcome,
    SendResult,
)
from herald.core import clock
from herald.core.files import file_in_the_way, folder_blocked

_UNSAFE = re.compile(r"[^A-Za-z0-9_.@+-]")


class OutboxSettings(ChannelSettings):
    dir: str = ".herald/outbox"
    sender: str = "Herald outbox <outbox@herald.invalid>"  # the From of .eml files


def outbox_dir(settings: OutboxSettings, workspace: Path) -> Path:
    """The folder an outbox channel writes under (a relative ``dir``: in the workspace)."""
    base = Path(settings.dir)
    return base if base.is_absolute() else workspace / base


def blocked(settings: OutboxSettings, workspace: Path) -> Path | None:
    """A file where the channel's folder, or a folder above it, should be (nothing can be
    written under it); None when there is none."""
    return folder_blocked(outbox_dir(settings, workspace))


def safe_name(key: str) -> str:
    """A file name for a recipient key: readable, and distinct for distinct keys."""
    cleaned = _UNSAFE.sub("_", key)[:80].lstrip(".") or "_"
    if cleaned != key:  # sanitising may have merged two keys: keep them apart
        cleaned += "-" + hashlib.sha256(key.encode()).hexdigest()[:8]
    return cleaned


class OutboxChannel(Channel):
    """Write messages under the workspace instead of sending them."""

    type_name = "outbox"
    kinds = frozenset(KINDS)
    Settings = OutboxSettings
    batch_size = 500

    @property
    def folder(self) -> Path:
        settings = self.settings
        assert isinstance(settings, OutboxSettings)
        return (outbox_dir(settings, self.context.workspace) / safe_name(self.context.flow)
                / safe_name(self.context.run_key))

    async def send_batch(self, messages: Sequence[Message]) -> list[SendResult]:
        # file I/O off the event loop: other channels of the chunk keep sending
        return await asyncio.to_thread(self._write, messages)

    def _write(self, messages: Sequence[Message]) -> list[SendResult]:
        if self.kind == "email":
            return self._write_emails(messages)
        path = self.folder / f"{safe_name(self.name)}.jsonl"
        # O_APPEND and one write() per batch: chunks of a run append to the same file
        # from several threads and processes without interleaving their lines.
        stamp = clock.now().isoformat()
        lines = [orjson.dumps({
            "recipient": m.recipient, "address": m.address, "kind": m.kind,
            "body": m.body, "message_id": m.message_id, "meta": dict(m.meta),
            "written_at": stamp}) + b"\n" for m in messages]
        written = 0
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                view = memoryview(b"".join(lines))
                while view:  # a regular file takes it whole unless the disk fills
                    n = os.write(fd, view)
                    written += n
                    view = view[n:]
            finally:
                os.close(fd)
        except OSError as exc:
            # the lines written whole before the error are delivered; the rest are not
            failure = self._unwritable(path, exc)
            results, end = [], 0
            for m, line in zip(messages, lines, strict=True):
                end += len(line)
                results.append(SendResult.sent(provider_id=f"{path.name}#{m.message_id}")
                               if end <= written else failure)
            return results
        return [SendResult.sent(provider_id=f"{path.name}#{m.message_id}") for m in messages]

    def _write_emails(self, messages: Sequence[Message]) -> list[SendResult]:
        results: list[SendResult] = []
        for message in messages:
            if results and results[-1].outcome is Outcome.FATAL:
                results.append(results[-1])  # the folder cannot be written: stop here
                continue
            results.append(self._write_email(message))
        return results

    def _write_email(self, message: Message) -> SendResult:
        from herald.channels.mime import build_email

        path = self.folder / safe_name(self.name) / f"{safe_name(message.recipient)}.eml"
        settings = self.settings
        assert isinstance(settings, OutboxSettings)
        try:
            email = build_email(message, sender=settings.sender)
        except (ValueError, MessageError) as exc:  # the refusal SMTP would give too
            return SendResult.permanent("invalid_address", f"cannot build the message: {exc}")
        tmp = path.with_suffix(".eml.part")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(email.as_bytes())
            tmp.replace(path)  # a reader never sees half a message
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            return self._unwritable(path, exc)
        return SendResult.sent(provider_id=str(path.relative_to(self.context.workspace))
                               if path.is_relative_to(self.context.workspace) else str(path))

    def _unwritable(self, path: Path, exc: OSError) -> SendResult:
        """Nothing was written for the message: a fault of the outbox folder, not of the
        recipient. The channel cannot work (fatal), and the message did not go out."""
        def shown(p: Path) -> Path:
            root = self.context.workspace
            return p.relative_to(root) if p.is_relative_to(root) else p

        why = exc.strerror or type(exc).__name__
        blocking = file_in_the_way(path)
        if blocking is not None:
            why = f"{shown(blocking)} is a file, not a folder"
        return SendResult.fatal("outbox_unwritable", f"cannot write {shown(path)}: {why}")
