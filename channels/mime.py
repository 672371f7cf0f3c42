"""E-mail as MIME: the message Herald builds for a ``Message`` of kind email, shared by
the SMTP channel and the outbox (which writes what SMTP would send)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from email.utils import format_datetime, make_msgid

from herald.channels.base import Message


def build_email(message: Message, sender: str, reply_to: str | None = None,
                extra_headers: Mapping[str, str] | None = None) -> EmailMessage:
    """The MIME message for ``message``: text, plus HTML as an alternative when present."""
    email = EmailMessage(policy=SMTP_POLICY)
    email["From"] = sender
    email["To"] = Address(addr_spec=message.address)
    email["Subject"] = message.subject or ""
    email["Date"] = format_datetime(datetime.now(UTC))
    email["Message-ID"] = message.message_id or make_msgid(domain="herald")
    if reply_to:
        email["Reply-To"] = reply_to
    for name, value in {**(extra_headers or {}), **message.headers}.items():
        email[name] = value
    email.set_content(message.body, charset="utf-8")
    if message.html:
        email.add_alternative(message.html, subtype="html", charset="utf-8")
    return email
