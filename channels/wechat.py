"""The WeChat channel: an Official (service) account's template messages and
subscription notifications.

A channel sends one kind (``message: template`` for service notices such as a level
change or points expiring, ``message: subscribe`` for notifications the user opted in
to) with one ``template_id``. The flow's WeChat template (``TIER.wechat.txt.j2``) renders
the data fields as a JSON object, ``{"thing1": "...", "time2": "..."}``; each value is
checked against the platform's limits for its field type before anything is sent.

The access token comes from ``/cgi-bin/stable_token`` and is kept in the workspace
database, so every worker of every process of a run shares one token; when the API says
it is invalid or expired (40001, 40014, 42001) it is refreshed and the message retried
once. Answers: 43004 (not following), 43101 (refused), 40003 (invalid openid) and 43019
(blocked) fail the recipient and suppress the openid; 40037 (template id invalid or
banned) and 45009 (daily quota) stop the channel without failing the run; 45011 (minute
quota) and -1 (system busy) are retried.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from pydantic import SecretStr
from sqlalchemy import select

from herald.channels.base import ChannelContext, ChannelSettings, Message, SendResult
from herald.channels.http import HttpChannel, HttpSettings, json_body
from herald.core.db import channel_tokens as tokens
from herald.core.db import writing

TOKEN_ERRORS = {40001, 40014, 42001}
SUPPRESS = {43004: "the user does not follow the account", 43101: "the user refused",
            40003: "invalid openid", 43019: "the user blocked the account"}
STOP = {40037: "the template id is invalid or banned", 45009: "the daily API quota is used up",
        40164: "this server's IP is not on the account's whitelist",
        40013: "invalid appid", 40125: "invalid appsecret", 48001: "API unauthorized"}
RETRY = {-1: "system busy", 45011: "minute quota reached", 45047: "too many messages"}

# Subscription-notification field types (the key's prefix) and their limits.
_LIMITS: dict[str, tuple[int, str | None]] = {
    "thing": (20, None), "number": (32, r"[0-9.]+"), "letter": (32, r"[A-Za-z]+"),
    "symbol": (5, None), "character_string": (32, r"[A-Za-z0-9_\-.:@#/ ]+"),
    "time": (40, None), "date": (40, None), "amount": (32, r"[¥$€]?[0-9.,]+元?"),
    "phone_number": (17, r"[0-9+\-() ]+"), "car_number": (8, None), "name": (20, None),
    "phrase": (5, None), "const": (20, None),
}


def check_fields(data: dict[str, Any], kind: str) -> list[str]:
    """Problems with a message's data fields for ``kind`` (template or subscribe)."""
    problems = []
    for key, value in data.items():
        if not isinstance(value, str | int | float):
            problems.append(f"{key}: a field value must be text or a number")
            continue
        text = str(value)
        if kind == "subscribe":
            field_type = re.sub(r"\d+$", "", key)
            if field_type not in _LIMITS:
                problems.append(f"{key}: unknown field type '{field_type}' (one of "
                                f"{', '.join(sorted(_LIMITS))})")
                continue
            limit, pattern = _LIMITS[field_type]
            if len(text) > limit:
                problems.append(f"{key}: {len(text)} characters, {field_type} allows {limit}")
            elif pattern and not re.fullmatch(pattern, text):
                problems.append(f"{key}: '{text}' is not a valid {field_type}")
        elif len(text) > 200:
            problems.append(f"{key}: {len(text)} characters (template fields: 200 at most)")
    return problems


class WechatSettings(HttpSettings):
    appid: str
    secret: SecretStr
    message: Literal["template", "subscribe"]
    template_id: str
    link: str | None = None  # template: url; subscribe: page
    base_url: str = "https://api.weixin.qq.com"


_token_locks: dict[tuple[str, str], threading.Lock] = {}


class WechatChannel(HttpChannel):
    """Template messages or subscription notifications of one WeChat account."""

    type_name = "wechat"
    kinds = frozenset({"wechat"})
    Settings = WechatSettings
    batch_size = 100

    def __init__(self, name: str, settings: ChannelSettings, context: ChannelContext) -> None:
        super().__init__(name, settings, context)
        assert isinstance(settings, WechatSettings)
        self.options = settings

    # -- the shared access token --------------------------------------------------------
    def _store(self) -> Any:
        if self.context.store is None:
            raise RuntimeError("the WeChat channel needs the workspace database "
                               "(ChannelContext.store) to share its access token")
        return self.context.store

    async def token(self, stale: str | None = None) -> str:
        """The account's access token: the shared one unless it is ``stale``."""
        store = self._store()
        key = (self.name, self.options.appid)

        def cached() -> str | None:
            with store.connect() as conn:
                row = conn.execute(select(tokens.c.token, tokens.c.expires_at).where(
                    tokens.c.channel == key[0], tokens.c.account == key[1])).first()
            if row is None or row.token == stale:
                return None
            expires = row.expires_at if row.expires_at.tzinfo else row.expires_at.replace(
                tzinfo=UTC)
            return str(row.token) if expires > datetime.now(UTC) + timedelta(minutes=5) \
                else None

        found = await asyncio.to_thread(cached)
        if found:
            return found
        lock = _token_locks.setdefault(key, threading.Lock())
        await asyncio.to_thread(lock.acquire)
        try:
            found = await asyncio.to_thread(cached)  # another task refreshed it meanwhile
            if found:
                return found
            response = await self.client().post(
                f"{self.options.base_url}/cgi-bin/stable_token",
                json={"grant_type": "client_credential", "appid": self.options.appid,
                      "secret": self.options.secret.get_secret_value(),
                      "force_refresh": stale is not None})
            body = json_body(response)
            if not body.get("access_token"):
                raise TokenRefused(int(body.get("errcode") or response.status_code),
                                   str(body.get("errmsg") or response.reason_phrase))
            token = str(body["access_token"])
            expires = datetime.now(UTC) + timedelta(seconds=int(body.get("expires_in", 7200)))

            def save() -> None:
                with writing(store) as conn:
                    conn.execute(tokens.delete().where(tokens.c.channel == key[0],
                                                       tokens.c.account == key[1]))
                    conn.execute(tokens.insert().values(channel=key[0], account=key[1],
                                                        token=token, expires_at=expires))

            await asyncio.to_thread(save)
            return token
        finally:
            lock.release()

    # -- sending --------------------------------------------------------------------
    async def send_one(self, message: Message) -> SendResult:
        try:
            return await self._send(message)
        except TokenRefused as exc:
            return SendResult.fatal(str(exc.code), f"access token refused: {exc.code} "
                                    f"{exc.message}")

    async def _send(self, message: Message) -> SendResult:
        try:
            data = json.loads(message.body)
            if not isinstance(data, dict):
                raise ValueError("not an object")
        except ValueError:
            return SendResult.permanent("data", "the WeChat template must render a JSON "
                                        "object of data fields")
        problems = check_fields(data, self.options.message)
        if problems:
            return SendResult.permanent("data", "; ".join(problems))
        o = self.options
        path = ("/cgi-bin/message/template/send" if o.message == "template"
                else "/cgi-bin/message/subscribe/bizsend")
        payload: dict[str, Any] = {"touser": message.address, "template_id": o.template_id,
                                   "data": {k: {"value": str(v)} for k, v in data.items()}}
        if o.link:
            payload["url" if o.message == "template" else "page"] = o.link
        token = await self.token()
        for attempt in (1, 2):
            response = await self.client().post(f"{o.base_url}{path}",
                                                params={"access_token": token}, json=payload)
            body = json_body(response)
            code = int(body.get("errcode", 0 if response.status_code == 200 else -1))
            if code in TOKEN_ERRORS and attempt == 1:
                token = await self.token(stale=token)  # refreshed, then this message again
                continue
            return self._classify(code, str(body.get("errmsg") or ""), body)
        raise AssertionError("unreachable")

    def _classify(self, code: int, errmsg: str, body: dict[str, Any]) -> SendResult:
        detail = f"WeChat {code}: {errmsg}".strip()
        if code == 0:
            return SendResult.sent(provider_id=str(body.get("msgid") or "") or None)
        if code in SUPPRESS:
            return SendResult.permanent(str(code), f"{detail} ({SUPPRESS[code]})",
                                        suppress=True)
        if code in STOP:
            return SendResult.fatal(str(code), f"{detail} ({STOP[code]})")
        if code in RETRY:
            return SendResult.retryable(str(code), f"{detail} ({RETRY[code]})",
                                        5.0 if code == 45011 else None)
        if code in TOKEN_ERRORS:
            return SendResult.fatal(str(code), f"{detail} (even with a fresh access token)")
        return SendResult.permanent(str(code), detail)

class TokenRefused(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{code} {message}")
        self.code = code
        self.message = message

