"""Unsubscribe links: a signed token per recipient and channel, the URL templates get as
``unsubscribe_url``, the ``List-Unsubscribe`` headers of e-mail (RFC 2369, RFC 8058
one-click), and honouring a token by adding the recipient to the suppression list.

A token is ``base64url(recipient \\0 channel \\0 flow) . base64url(HMAC-SHA256)``, signed with
the workspace's ``unsubscribe.secret``: anyone holding a recipient's link can unsubscribe
that recipient, and nobody can forge one for someone else.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass

from sqlalchemy import Engine

from herald.core.spec import UnsubscribeSpec
from herald.delivery import suppression


@dataclass(frozen=True)
class Unsubscribe:
    """What a valid token says: who, on which channel, from which flow's message."""

    recipient: str
    channel: str
    flow: str


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(secret: str, payload: bytes) -> bytes:
    return hmac.new(secret.encode(), b"herald-unsubscribe\0" + payload, hashlib.sha256
                    ).digest()


def make_token(secret: str, recipient: str, channel: str, flow: str) -> str:
    payload = "\0".join((recipient, channel, flow)).encode()
    return f"{_b64(payload)}.{_b64(_mac(secret, payload)[:18])}"


def read_token(secret: str, token: str) -> Unsubscribe | None:
    """The token's contents, or None when it is malformed or not signed with ``secret``."""
    try:
        payload_text, mac_text = token.split(".", 1)
        payload, mac = _unb64(payload_text), _unb64(mac_text)
        if not hmac.compare_digest(mac, _mac(secret, payload)[:18]):
            return None
        recipient, channel, flow = payload.decode().split("\0")
    except (ValueError, UnicodeDecodeError):
        return None
    return Unsubscribe(recipient, channel, flow)


def url_for(spec: UnsubscribeSpec, recipient: str, channel: str, flow: str) -> str:
    """The recipient's link, as templates get it (``{{ unsubscribe_url }}``)."""
    token = make_token(spec.secret, recipient, channel, flow)
    return f"{spec.base_url.rstrip('/')}/u/{token}"


def email_headers(url: str) -> dict[str, str]:
    """RFC 2369 ``List-Unsubscribe`` and RFC 8058 one-click: a mail client may POST
    ``List-Unsubscribe=One-Click`` to the URL without asking the recipient again."""
    return {"List-Unsubscribe": f"<{url}>", "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"}


def for_message(spec: UnsubscribeSpec | None, recipient: str, channel: str, kind: str,
                flow: str) -> tuple[dict[str, str], dict[str, str]]:
    """What one message carries of its recipient's link: the template variables
    (``unsubscribe_url``) and the headers (``List-Unsubscribe`` on e-mail); both empty
    when the workspace sets no ``unsubscribe`` section. Flows and journeys both send
    through this, so a template that validates with ``unsubscribe_url`` renders with it."""
    if spec is None:
        return {}, {}
    url = url_for(spec, recipient, channel, flow)
    return {"unsubscribe_url": url}, (email_headers(url) if kind == "email" else {})


def honour(store: Engine, found: Unsubscribe) -> bool:
    """Suppress the recipient on every channel (someone who unsubscribes from an e-mail
    does not expect the same campaign by SMS instead); True when newly added. The reason
    keeps the channel and flow of the link."""
    return suppression.suppress(store, [(found.recipient, None,
                                         f"unsubscribed via {found.channel} link "
                                         f"({found.flow})")], "unsubscribe") > 0
