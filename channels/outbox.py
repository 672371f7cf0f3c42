"""The outbox channel: writes each message it would send to a file, sends nothing.

Email becomes one RFC 5322 ``.eml`` file per message (the same MIME the SMTP channel
sends); every other kind becomes one JSON line in a file per channel. The layout is
``<dir>/<flow>/<run key>/<channel>/<recipient>.eml`` and
``<dir>/<flow>/<run key>/<channel>.jsonl``.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
from collections.abc import Sequence
from email.errors import MessageError
from pathlib import Path

import orjson

from herald.channels.base import KINDS, Channel, ChannelSettings, Message, SendResult
from herald.core import clock

_UNSAFE = re.compile(r"[^A-Za-z0-9_.@+-]")


class OutboxSettings(ChannelSettings):
    dir: str = ".herald/outbox"
    sender: str = "Herald outbox <outbox@herald.invalid>"  # the From of .eml files


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
        base = Path(settings.dir)
        if not base.is_absolute():
            base = self.context.workspace / base
        return base / safe_name(self.context.flow) / safe_name(self.context.run_key)

    async def send_batch(self, messages: Sequence[Message]) -> list[SendResult]:
        # file I/O off the event loop: other channels of the chunk keep sending
        return await asyncio.to_thread(self._write, messages)

    def _write(self, messages: Sequence[Message]) -> list[SendResult]:
        if self.kind == "email":
            return [self._write_email(m) for m in messages]
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{safe_name(self.name)}.jsonl"
        # O_APPEND and one write() per batch: chunks of a run append to the same file
        # from several threads and processes without interleaving their lines.
        stamp = clock.now().isoformat()
        data = b"".join(orjson.dumps({
            "recipient": m.recipient, "address": m.address, "kind": m.kind,
            "body": m.body, "message_id": m.message_id, "meta": dict(m.meta),
            "written_at": stamp}) + b"\n" for m in messages)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(data)
            while view:  # a regular file takes it whole unless the disk fills
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        return [SendResult.sent(provider_id=f"{path.name}#{m.message_id}") for m in messages]

    def _write_email(self, message: Message) -> SendResult:
        from herald.channels.mime import build_email

        folder = self.folder / safe_name(self.name)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{safe_name(message.recipient)}.eml"
        settings = self.settings
        assert isinstance(settings, OutboxSettings)
        try:
            email = build_email(message, sender=settings.sender)
        except (ValueError, MessageError) as exc:  # the refusal SMTP would give too
            return SendResult.permanent("invalid_address", f"cannot build the message: {exc}")
        tmp = path.with_suffix(".eml.part")
        tmp.write_bytes(email.as_bytes())
        tmp.replace(path)  # a reader never sees half a message
        return SendResult.sent(provider_id=str(path.relative_to(self.context.workspace))
                               if path.is_relative_to(self.context.workspace) else str(path))
