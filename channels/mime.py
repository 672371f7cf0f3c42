"""E-mail as MIME: the message Herald builds for a ``Message`` of kind email, shared by
the SMTP channel and the outbox (which writes what SMTP would send)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, make_msgid

from herald.channels.base import Message

# Headers Herald sets itself from plain strings (``set_raw``) are written as they are: the
# policy's folding turns a word longer than a line (an unsubscribe URL) into RFC 2047
# encoded words, which mail clients do not read as a link.
SMTP_POLICY = SMTP.clone(refold_source="none")


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
        if value.isascii() and value.isprintable() and len(name) + len(value) < 990:
            email.set_raw(name, value)  # one line (RFC 5322 allows 998 characters)
        else:
            email[name] = value
    email.set_content(message.body, charset="utf-8")
    if message.html:
        email.add_alternative(message.html, subtype="html", charset="utf-8")
    return email
