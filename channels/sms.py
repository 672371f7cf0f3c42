"""The SMS channel: one class, three provider profiles over HTTP.

- ``twilio``: ``POST {base_url}/2010-04-01/Accounts/{account_sid}/Messages.json``, a form
  (To, From or MessagingServiceSid, Body), HTTP basic auth; errors as Twilio documents
  them (``{"code": 21211, "message": ...}``).
- ``aliyun``: Dysmsapi ``SendSms`` (RPC style, signature version 1.0, HMAC-SHA1 over the
  sorted, percent-encoded query), with ``sign_name`` and ``template_code``; the flow's
  SMS template renders the ``TemplateParam`` JSON object. Errors by ``Code``.
- ``generic``: ``POST {base_url}`` with ``{"to", "text", "message_id"}`` and a bearer
  token; answers classified like the webhook channel's.

Recipients' numbers arrive in E.164 (the contact policy normalizes them with
phonenumbers; an invalid one is ``no_address`` and never reaches a channel). Each sent
message records the number of SMS parts it costs: GSM-7 160 characters (153 a part when
split), otherwise UCS-2 70 (67), so Chinese text counts right.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, time, timedelta
from typing import Literal
from urllib.parse import quote
from zoneinfo import ZoneInfo

import orjson
from pydantic import SecretStr, model_validator

from herald.channels.base import ChannelContext, ChannelSettings, Message, Outcome, SendResult
from herald.channels.http import (
    MAYBE_SENT,
    MAYBE_TAKEN,
    HttpChannel,
    HttpSettings,
    classify,
    json_body,
    retry_after,
)
from herald.core import clock

DEFAULT_URLS = {"twilio": "https://api.twilio.com", "aliyun": "https://dysmsapi.aliyuncs.com"}

# GSM 03.38: the basic set, and the extension set whose characters take two septets
_GSM = set("@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?¡ABCDEFGHIJKLM"
           "NOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà")
_GSM_EXT = set("^{}\\[~]|€\f")


def segments(text: str) -> int:
    """How many SMS parts ``text`` costs (GSM-7 160/153, else UCS-2 70/67)."""
    if all(c in _GSM or c in _GSM_EXT for c in text):
        septets = len(text) + sum(1 for c in text if c in _GSM_EXT)
        return 1 if septets <= 160 else -(-septets // 153)
    units = len(text.encode("utf-16-le")) // 2  # characters beyond the BMP take two
    return 1 if units <= 70 else -(-units // 67)


class SmsSettings(HttpSettings):
    provider: Literal["twilio", "aliyun", "generic"]
    base_url: str | None = None  # the provider's host by default; a gateway or test server
    # twilio
    account_sid: str | None = None
    auth_token: SecretStr | None = None
    sender: str | None = None  # From: a number or an alphanumeric sender id
    messaging_service_sid: str | None = None
    # aliyun
    access_key_id: str | None = None
    access_key_secret: SecretStr | None = None
    sign_name: str | None = None
    template_code: str | None = None
    region_id: str = "cn-hangzhou"
    # generic
    token: SecretStr | None = None

    @model_validator(mode="after")
    def _provider_fields(self) -> SmsSettings:
        needed = {"twilio": ["account_sid", "auth_token"],
                  "aliyun": ["access_key_id", "access_key_secret", "sign_name",
                             "template_code"],
                  "generic": ["base_url"]}[self.provider]
        missing = [f for f in needed if getattr(self, f) is None]
        if self.provider == "twilio" and not (self.sender or self.messaging_service_sid):
            missing.append("sender (or messaging_service_sid)")
        if missing:
            raise ValueError(f"provider {self.provider} needs {', '.join(missing)}")
        return self

    @property
    def url(self) -> str:
        return (self.base_url or DEFAULT_URLS[self.provider]).rstrip("/")


# Twilio error codes (https://www.twilio.com/docs/api/errors) by what they mean here.
TWILIO_SUPPRESS = {21610}  # the recipient replied STOP
TWILIO_PERMANENT = {21211, 21214, 21217, 21612, 21614, 21408, 21635, 30003, 30005, 30006}
# auth, account, and the sender or Messaging Service every message goes out from: 21212
# invalid From, 21601 not a number of the account, 21603 From or MessagingServiceSid
# missing, 21703-21705 a Messaging Service without numbers or invalid
TWILIO_FATAL = {20003, 20005, 20404, 21212, 21601, 21603, 21606, 21659, 21660, 21703, 21704,
                21705, 30002}
TWILIO_RETRY = {20429, 30001, 30008}
TWILIO_QUEUE_FULL_WAIT = 600.0  # 21611: seconds before a recipient is tried again

# Aliyun Dysmsapi SendSms codes.
ALIYUN_PERMANENT = {"isv.MOBILE_NUMBER_ILLEGAL", "isv.MOBILE_COUNT_OVER_LIMIT",
                    "isv.BLACK_KEY_CONTROL_LIMIT", "isv.PARAM_LENGTH_LIMIT",
                    "isv.INVALID_JSON_PARAM", "isv.TEMPLATE_MISSING_PARAMETERS"}
# (isv.BUSINESS_LIMIT_CONTROL, a limit of one number, has a branch of its own; the
# gateway's Throttling, Throttling.Api, Throttling.User... slow the account's rate down)
ALIYUN_THROTTLE = {"isp.SYSTEM_ERROR", "ServiceUnavailable", "SignatureNonceUsed"}
# the sending limits set in the console: the account's day or month (a natural day or
# month in China's time) is used up, and the channel pauses until it renews
ALIYUN_QUOTAS = {"isv.DAY_LIMIT_CONTROL": "day", "isv.MONTH_LIMIT_CONTROL": "month"}
# the account, its key, its clock or its settings: no message can go out
ALIYUN_FATAL = {"InvalidAccessKeyId.NotFound", "InvalidAccessKeyId.Inactive",
                "SignatureDoesNotMatch", "InvalidTimeStamp.Expired",
                "isv.ACCOUNT_NOT_EXISTS", "isv.ACCOUNT_ABNORMAL", "isv.AMOUNT_NOT_ENOUGH",
                "isv.SMS_TEMPLATE_ILLEGAL", "isv.SMS_SIGNATURE_ILLEGAL",
                "isv.SIGN_STATE_ILLEGAL", "isv.SMS_SIGNATURE_SCENE_ILLEGAL",
                "isv.PRODUCT_UN_SUBSCRIPT", "isv.DENY_IP_RANGE",
                "isp.RAM_PERMISSION_DENY", "isv.OUT_OF_SERVICE", "Forbidden.RAM"}
CHINA = ZoneInfo("Asia/Shanghai")


def _number_limit_wait(said: str) -> float:
    """Seconds until Aliyun's per-number allowance named in its message renews: 天级
    (a day's), 小时级 (an hour's), else a minute's."""
    if "天级" in said or "day" in said.lower():
        return 86_400.0
    if "小时级" in said or "hour" in said.lower():
        return 3_600.0
    return 60.0


def _quota_wait(period: str, now: datetime) -> float:
    """Seconds from ``now`` until Aliyun's day (``period`` "day") or month renews: the
    next midnight, or the first of the next month, in China's time."""
    local = now.astimezone(CHINA)
    if period == "day":
        renews = datetime.combine(local.date() + timedelta(days=1), time(), CHINA)
    else:
        month = local.replace(day=28) + timedelta(days=4)  # into the next month
        renews = datetime.combine(month.date().replace(day=1), time(), CHINA)
    return (renews - local).total_seconds()


def percent_encode(value: str) -> str:
    """Aliyun's RPC percent-encoding (RFC 3986, space as %20, ``~`` kept)."""
    return quote(value, safe="~")


def aliyun_signature(params: Mapping[str, str], secret: str, method: str = "POST") -> str:
    """Signature version 1.0: HMAC-SHA1 of METHOD&%2F&encoded(sorted query), base64."""
    query = "&".join(f"{percent_encode(k)}={percent_encode(v)}"
                     for k, v in sorted(params.items()))
    to_sign = f"{method}&{percent_encode('/')}&{percent_encode(query)}"
    digest = hmac.new(f"{secret}&".encode(), to_sign.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


class SmsChannel(HttpChannel):
    """Text messages through Twilio, Aliyun or a generic JSON gateway."""

    type_name = "sms"
    kinds = frozenset({"sms"})
    Settings = SmsSettings
    batch_size = 100
    max_body = 1000

    def __init__(self, name: str, settings: ChannelSettings, context: ChannelContext) -> None:
        super().__init__(name, settings, context)
        assert isinstance(settings, SmsSettings)
        self.options = settings

    def resends_safely(self) -> bool:
        # the generic gateway's Idempotency-Key; Twilio's and Aliyun's APIs take none
        return self.options.provider == "generic"

    async def request(self, message: Message) -> SendResult:
        if self.options.provider == "twilio":
            return await self._twilio(message)
        if self.options.provider == "aliyun":
            return await self._aliyun(message)
        return await self._generic(message)

    # -- twilio ---------------------------------------------------------------------
    async def _twilio(self, message: Message) -> SendResult:
        o = self.options
        assert o.account_sid and o.auth_token
        form = {"To": message.address, "Body": message.body}
        if o.messaging_service_sid:
            form["MessagingServiceSid"] = o.messaging_service_sid
        else:
            form["From"] = o.sender or ""
        response = await self.client().post(
            f"{o.url}/2010-04-01/Accounts/{o.account_sid}/Messages.json", data=form,
            auth=(o.account_sid, o.auth_token.get_secret_value()))
        if response.status_code in (200, 201):
            sid = json_body(response).get("sid")
            if not sid:  # Twilio's success is the Message resource, with its sid
                return SendResult.unexpected(response, "a message sid")
            return SendResult.sent(provider_id=str(sid), segments=segments(message.body))
        body = json_body(response)
        code = body.get("code")
        detail = f"Twilio {code or response.status_code}: {body.get('message') or ''}".strip()
        if code in TWILIO_SUPPRESS:
            return SendResult.permanent(str(code), detail, suppress=True)
        if code in TWILIO_FATAL or response.status_code in (401, 403):
            return SendResult.fatal(str(code or response.status_code), detail)
        if response.status_code in MAYBE_TAKEN:  # Twilio 20500: the message may have been
            # processed, and a retry could send it twice (Twilio's error reference); a
            # gateway's 502 or 504 may have passed it on before it failed
            return SendResult.unknown(str(code or response.status_code),
                                      f"{detail}: Twilio may have taken it, so it is not "
                                      "resent")
        if code == 21611:  # the sender's queue is full (over 10 hours of messages):
            # Twilio's remedy is to slow down and send later, nothing about the recipient
            return SendResult.retryable(str(code), detail, TWILIO_QUEUE_FULL_WAIT,
                                        throttled=True)
        if code in TWILIO_RETRY or response.status_code == 429 or response.status_code >= 500:
            return SendResult.retryable(str(code or response.status_code), detail,
                                        retry_after(response.headers.get("Retry-After")),
                                        throttled=response.status_code == 429
                                        or code == 20429)
        return SendResult.permanent(str(code or response.status_code), detail)

    # -- aliyun ---------------------------------------------------------------------
    async def _aliyun(self, message: Message) -> SendResult:
        o = self.options
        assert o.access_key_id and o.access_key_secret and o.sign_name and o.template_code
        try:
            template_param = json.loads(message.body)
            if not isinstance(template_param, dict):
                raise ValueError("not an object")
        except ValueError:
            return SendResult.permanent("template_param", "the SMS template must render the "
                                        "TemplateParam JSON object for provider aliyun")
        params = {
            "Action": "SendSms", "Version": "2017-05-25", "Format": "JSON",
            "AccessKeyId": o.access_key_id, "SignatureMethod": "HMAC-SHA1",
            "SignatureVersion": "1.0", "SignatureNonce": uuid.uuid4().hex,
            "Timestamp": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "RegionId": o.region_id,
            # mainland numbers without +86, others in international form
            "PhoneNumbers": message.address.removeprefix("+86") if message.address
            .startswith("+86") else message.address.lstrip("+"),
            "SignName": o.sign_name, "TemplateCode": o.template_code,
            "TemplateParam": json.dumps(template_param, ensure_ascii=False),
            "OutId": message.message_id[:64],
        }
        params["Signature"] = aliyun_signature(params, o.access_key_secret.get_secret_value())
        response = await self.client().post(f"{o.url}/", data=params)
        body = json_body(response)
        if response.status_code == 200 and not body.get("Code"):
            return SendResult.unexpected(response, "a Code")  # Aliyun always sends Code
        code = str(body.get("Code") or response.status_code)
        detail = f"Aliyun {code}: {body.get('Message') or ''}".strip()
        if code == "OK":
            return SendResult.sent(provider_id=str(body.get("BizId") or "") or None,
                                   segments=None)
        if code in ALIYUN_FATAL or response.status_code in (401, 403):
            return SendResult.fatal(code, detail)
        if code in ALIYUN_QUOTAS:
            # the limit set in the console: nothing more goes out until it renews (the
            # channel pauses; recipients are deferred past it)
            return SendResult.retryable(code, detail, _quota_wait(ALIYUN_QUOTAS[code],
                                                                  clock.now()),
                                        throttled=True)
        if code == "isv.BUSINESS_LIMIT_CONTROL":
            # Aliyun's flow control per number (the same signature and template to one
            # number: a minute's, an hour's or a day's allowance used up): that recipient
            # waits until it renews; the account's rate is not the cause
            return SendResult.retryable(code, detail, _number_limit_wait(
                str(body.get("Message") or "")))
        if response.status_code in MAYBE_TAKEN and "Code" not in body:
            # a gateway's 502 or 504 (not Aliyun's answer): it may have passed the
            # request on, and Aliyun's API takes no idempotency key
            return SendResult.unknown(code, f"{detail}: {MAYBE_SENT}")
        throttling = code.startswith("Throttling") or response.status_code == 429
        if throttling or code in ALIYUN_THROTTLE or response.status_code >= 500:
            # Aliyun documents no Retry-After: these retry at once, the gateway's
            # throttling after the account's rate is halved
            return SendResult.retryable(code, detail,
                                        retry_after(response.headers.get("Retry-After")),
                                        throttled=throttling)
        return SendResult.permanent(code, detail)

    # -- generic --------------------------------------------------------------------
    async def _generic(self, message: Message) -> SendResult:
        o = self.options
        headers = {"Content-Type": "application/json", "Idempotency-Key": message.message_id}
        if o.token is not None:
            headers["Authorization"] = f"Bearer {o.token.get_secret_value()}"
        body = orjson.dumps({"to": message.address, "text": message.body,
                             "message_id": message.message_id})
        response = await self.exchange("POST", o.url, body, headers)
        result = classify(response, message.message_id, resends_safely=True)
        if result.outcome is Outcome.SENT:
            return SendResult.sent(result.provider_id, segments=segments(message.body))
        return result
