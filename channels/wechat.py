"""The WeChat channel: an Official (service) account's template messages and
subscription notifications.

A channel sends one kind (``message: template`` for service notices such as a level
change or points expiring, ``message: subscribe`` for notifications the user opted in
to) with one ``template_id``. The flow's WeChat template (``TIER.wechat.txt.j2``) renders
the data fields as a JSON object, ``{"thing1": "...", "time2": "..."}``; each value is
checked against the platform's limits for its field type before anything is sent.

The access token comes from ``/cgi-bin/stable_token`` and is kept in the workspace
database, so every worker of every process of a run shares one token. When the API says
it is invalid or expired (40001, 40014, 42001) a new one is asked for in normal mode and
the message retried; only if that token is refused too is one forced (force-refresh
mode, at most 20 a day and 30 s apart, counted in the workspace database), and the
message retried once more.

Answers: 43004 (not following), 43101 (refused) and 43019 (blocked) fail the recipient
and suppress the openid (not 43101 on a subscription notification: the user's one-time
consent is used up, another may come); 40003 (invalid openid) fails the recipient
without suppressing it: WeChat says it also of an openid of another account, as when
the channel's appid is not the one the openids came from, a setting to fix; 40037
(template id invalid or banned) and 45009 (daily quota) stop the channel without
failing the run; 45011 (minute quota) and -1 (system busy) are retried, then deferred
(see the dispatcher).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import re
import threading
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from zoneinfo import ZoneInfo

import httpx
from pydantic import SecretStr
from sqlalchemy import Engine, select

from herald.channels.base import ChannelContext, ChannelSettings, Message, SendResult
from herald.channels.http import HttpChannel, HttpSettings, classify, json_body
from herald.core.db import channel_token_forces as token_forces
from herald.core.db import channel_tokens as tokens
from herald.core.db import writing

log = logging.getLogger("herald.channels.wechat")

# stable_token's documented limits on force-refresh mode: 20 a day, 30 s apart
FORCE_PER_DAY = 20
FORCE_GAP = timedelta(seconds=30)
_WECHAT_DAY = ZoneInfo("Asia/Shanghai")

TOKEN_ERRORS = {40001, 40014, 42001}
SUPPRESS = {43004: "the user does not follow the account", 43101: "the user refused",
            43019: "the user blocked the account"}
# 40003: WeChat's reference: check that the user follows the account, or whether the
# openid is another account's (a wrong appid makes every openid invalid): not suppressed
NOT_OURS = {40003: "invalid openid: not a follower of this account, or an openid of "
                   "another account (check the channel's appid)"}
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


# One token refresh in flight per account and process: the first task that needs a new
# token fetches it, every other task (of any chunk: each chunk runs its own event loop on
# its own thread) awaits the same future. Across processes the database row is what they
# share. Never a lock awaited on executor threads: a waiting task would hold a thread the
# fetching task needs to read or save the token, and with more waiters than threads
# nothing would move again.
_refreshing: dict[tuple[str, str], concurrent.futures.Future[str]] = {}
_refreshing_guard = threading.Lock()  # held for a dict lookup, never across an await


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

    async def token(self, stale: str | None = None, force: bool = False) -> str:
        """The account's access token: the shared one unless it is ``stale``.

        A new one comes from ``stable_token`` in normal mode, which hands out the current
        token, or a fresh one once it has expired. ``force`` asks for force-refresh mode
        (it revokes the token every other service of the AppID is using), within
        WeChat's limits: FORCE_PER_DAY a day, FORCE_GAP apart, counted in the workspace
        database for every worker of the account.
        """
        store = self._store()
        key = (self.name, self.options.appid)
        while True:
            found = await asyncio.to_thread(_cached, store, key, stale)
            if found:
                return found
            with _refreshing_guard:
                flight = _refreshing.get(key)
                mine = flight is None
                if flight is None:
                    flight = _refreshing[key] = concurrent.futures.Future()
            if not mine:
                token = await asyncio.wrap_future(flight)
                if token != stale:
                    return token
                continue  # that refresh gave back the refused token: ask again
            try:
                token = await self._fetch(store, key, stale, force)
                flight.set_result(token)
                return token
            except BaseException as exc:
                flight.set_exception(exc)
                raise
            finally:
                with _refreshing_guard:
                    _refreshing.pop(key, None)

    async def _fetch(self, store: Engine, key: tuple[str, str], stale: str | None,
                     force: bool) -> str:
        found = await asyncio.to_thread(_cached, store, key, stale)
        if found:  # another process refreshed it meanwhile
            return found
        if force:
            refused = await asyncio.to_thread(_reserve_force, store, key)
            if refused:
                why, recent = refused
                # another worker forced one moments ago: use it once it is saved
                for _ in range(int(self.http.timeout * 2) if recent else 0):
                    await asyncio.sleep(0.5)
                    found = await asyncio.to_thread(_cached, store, key, stale)
                    if found:
                        return found
                raise TokenRefused(40001, f"the access token is refused and {why}")
            log.warning("WeChat channel %s: a fresh access token was refused too; asking "
                        "stable_token for a new one in force-refresh mode (this revokes "
                        "the token of every service on AppID %s)", self.name, key[1])
        try:
            response = await self.client().post(
                f"{self.options.base_url}/cgi-bin/stable_token",
                json={"grant_type": "client_credential", "appid": self.options.appid,
                      "secret": self.options.secret.get_secret_value(),
                      "force_refresh": force})
        except httpx.HTTPError as exc:  # no token yet, and no message sent
            raise TokenUnavailable(f"{type(exc).__name__} {exc}".strip()) from None
        body = json_body(response)
        if not body.get("access_token"):
            code = int(body.get("errcode") or response.status_code)
            said = str(body.get("errmsg") or response.reason_phrase)
            if code == -1 or response.status_code == 429 or response.status_code >= 500:
                # WeChat busy (-1), a gateway's 502: try again, the credentials are fine
                raise TokenUnavailable(f"{code} {said}")
            raise TokenRefused(code, said)
        token = str(body["access_token"])
        # WeChat's servers decide when it expires: the real clock, not Herald's
        expires = datetime.now(UTC) + timedelta(seconds=int(body.get("expires_in", 7200)))
        await asyncio.to_thread(_save, store, key, token, expires)
        return token

    # -- sending --------------------------------------------------------------------
    async def request(self, message: Message) -> SendResult:
        try:
            return await self._send(message)
        except TokenRefused as exc:
            return SendResult.fatal(str(exc.code), f"access token refused: {exc.code} "
                                    f"{exc.message}")
        except TokenUnavailable as exc:
            return SendResult.retryable("token", f"no access token for now: {exc}")

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
        # A refused token (40001/40014/42001): refresh in normal mode, which returns a
        # fresh token once the old one expired; only if that one is refused as well,
        # force a new one (WeChat's remedy for a leaked token, a few times a day).
        for mode in ("stored", "normal", "forced"):
            response = await self.client().post(f"{o.base_url}{path}",
                                                params={"access_token": token}, json=payload)
            body = json_body(response)
            if response.status_code != 200 and not isinstance(body.get("errcode"), int):
                # a proxy's or gateway's answer (WeChat takes no idempotency key)
                return classify(response, message.message_id, resends_safely=False)
            if response.status_code == 200 and not isinstance(body.get("errcode"), int):
                # WeChat answers every call with errcode (0: success)
                return SendResult.unexpected(response, "an errcode")
            code = int(body.get("errcode", -1))
            if code in TOKEN_ERRORS and mode != "forced":
                token = await self.token(stale=token, force=mode == "normal")
                continue
            return self._classify(code, str(body.get("errmsg") or ""), body)
        raise AssertionError("unreachable")

    def _classify(self, code: int, errmsg: str, body: dict[str, Any]) -> SendResult:
        detail = f"WeChat {code}: {errmsg}".strip()
        if code == 0:
            return SendResult.sent(provider_id=str(body.get("msgid") or "") or None)
        if code == 43101 and self.options.message == "subscribe":
            # a subscription notification needs the user's one-time consent: none is
            # left, and the user may give another (a suppression would be for good)
            return SendResult.permanent(str(code), f"{detail} (no consent the user gave "
                                        "is left for this notification)")
        if code in SUPPRESS:
            return SendResult.permanent(str(code), f"{detail} ({SUPPRESS[code]})",
                                        suppress=True)
        if code in NOT_OURS:
            return SendResult.permanent(str(code), f"{detail} ({NOT_OURS[code]})")
        if code in STOP:
            return SendResult.fatal(str(code), f"{detail} ({STOP[code]})")
        if code in RETRY:
            # the minute quota frees up within a minute: wait for it (deferred)
            throttled = code in (45011, 45047)
            return SendResult.retryable(str(code), f"{detail} ({RETRY[code]})",
                                        60.0 if throttled else None, throttled=throttled)
        if code in TOKEN_ERRORS:
            return SendResult.fatal(str(code), f"{detail} (even with a fresh access token)")
        return SendResult.permanent(str(code), detail)

def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _cached(store: Engine, key: tuple[str, str], stale: str | None) -> str | None:
    """The stored token unless it is ``stale`` or expires within 5 minutes (normal mode
    hands out a new one in that window)."""
    with store.connect() as conn:
        row = conn.execute(select(tokens.c.token, tokens.c.expires_at).where(
            tokens.c.channel == key[0], tokens.c.account == key[1])).first()
    if row is None or row.token == stale:
        return None
    if _aware(row.expires_at) <= datetime.now(UTC) + timedelta(minutes=5):
        return None
    return str(row.token)


def _save(store: Engine, key: tuple[str, str], token: str, expires: datetime) -> None:
    with writing(store) as conn:
        conn.execute(tokens.delete().where(tokens.c.channel == key[0],
                                           tokens.c.account == key[1]))
        conn.execute(tokens.insert().values(channel=key[0], account=key[1], token=token,
                                            expires_at=expires))


def _reserve_force(store: Engine, key: tuple[str, str]) -> tuple[str, bool] | None:
    """Count one force refresh for the account if WeChat's limits allow it; else why
    not, and whether another worker forced one moments ago.

    The count is WeChat's, so it follows the real clock (a rehearsal's clock does not
    give back force refreshes spent today).
    """
    at = datetime.now(UTC)
    day = at.astimezone(_WECHAT_DAY).date().isoformat()
    account = key[1]
    with writing(store) as conn:
        query = select(token_forces).where(token_forces.c.account == account)
        if conn.dialect.name == "postgresql":
            query = query.with_for_update()
        row = conn.execute(query).first()
        count = int(row._mapping["count"]) if row is not None and row.day == day else 0
        if row is not None and at - _aware(row.last_at) < FORCE_GAP:
            return (f"the last force refresh was {(at - _aware(row.last_at)).seconds} s ago "
                    f"(WeChat allows one every {FORCE_GAP.seconds} s)"), True
        if count >= FORCE_PER_DAY:
            return (f"{count} force refreshes were used today (WeChat allows "
                    f"{FORCE_PER_DAY} a day)"), False
        if row is None:
            conn.execute(token_forces.insert().values(account=account, day=day, count=1,
                                                      last_at=at))
        else:
            conn.execute(token_forces.update().where(token_forces.c.account == account)
                         .values(day=day, count=count + 1, last_at=at))
    return None


class TokenUnavailable(Exception):
    """The token endpoint did not answer, or was busy: nothing wrong with the account."""


class TokenRefused(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{code} {message}")
        self.code = code
        self.message = message

