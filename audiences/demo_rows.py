"""The demo shop's rows, drawn without touching a database: customers (names, places,
contact columns, sign-up times), their orders over ~3 years by buyer profile, and the
loyalty members those orders make. ``generate(customers, seed, today)`` returns the same
rows for the same arguments on any machine (only ``random.Random(seed)`` is used); the
tables they go into and the database are ``herald.audiences.demo_shop``'s.
"""

from __future__ import annotations

import base64
import bisect
import itertools
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, Generic, TypeVar
from zoneinfo import ZoneInfo

from herald.core import clock

DEFAULT_CUSTOMERS = 20_000
DEFAULT_SEED = 20261122

# Loyalty levels and the points each starts at (near_next_level.sql repeats this ladder).
LEVELS: tuple[tuple[str, int], ...] = (
    ("bronze", 0), ("silver", 1000), ("gold", 5000), ("platinum", 20000))

HISTORY_DAYS = 1095  # sign-ups reach back three years
LAPSED_DAYS = 90  # the win-back flow's default threshold; churned buyers stop before it
FIRST_ORDER_ID = 100_001  # order numbers that look like a shop's


# -- drawing -------------------------------------------------------------------------------
T = TypeVar("T")


class Weighted(Generic[T]):
    """A fixed weighted list to draw from; cumulative weights are computed once, which
    matters at ~200,000 draws a build."""

    def __init__(self, pairs: Iterable[tuple[T, float]]) -> None:
        pairs = list(pairs)
        self.items = [item for item, _ in pairs]
        self.cum = list(itertools.accumulate(weight for _, weight in pairs))

    def draw(self, rng: random.Random) -> T:
        index = bisect.bisect(self.cum, rng.random() * self.cum[-1])
        return self.items[min(index, len(self.items) - 1)]


# -- names and places ---------------------------------------------------------------------
# (characters, pinyin) so Chinese customers get plausible e-mail addresses.
CN_SURNAMES = (
    ("王", "wang"), ("李", "li"), ("张", "zhang"), ("刘", "liu"), ("陈", "chen"),
    ("杨", "yang"), ("黄", "huang"), ("赵", "zhao"), ("吴", "wu"), ("周", "zhou"),
    ("徐", "xu"), ("孙", "sun"), ("马", "ma"), ("朱", "zhu"), ("胡", "hu"), ("郭", "guo"),
    ("何", "he"), ("林", "lin"), ("罗", "luo"), ("高", "gao"), ("郑", "zheng"),
    ("梁", "liang"), ("谢", "xie"), ("宋", "song"), ("唐", "tang"), ("许", "xu"),
    ("韩", "han"), ("冯", "feng"), ("邓", "deng"), ("曹", "cao"))
# Common surnames are much more common: weight by rank.
CN_SURNAME = Weighted((name, 1 / (rank + 4)) for rank, name in enumerate(CN_SURNAMES))
CN_GIVEN = (
    ("伟", "wei"), ("芳", "fang"), ("娜", "na"), ("秀英", "xiuying"), ("敏", "min"),
    ("静", "jing"), ("丽", "li"), ("强", "qiang"), ("磊", "lei"), ("军", "jun"),
    ("洋", "yang"), ("勇", "yong"), ("艳", "yan"), ("杰", "jie"), ("娟", "juan"),
    ("涛", "tao"), ("明", "ming"), ("超", "chao"), ("秀兰", "xiulan"), ("霞", "xia"),
    ("平", "ping"), ("刚", "gang"), ("婷", "ting"), ("雪", "xue"), ("浩然", "haoran"),
    ("子涵", "zihan"), ("欣怡", "xinyi"), ("梓轩", "zixuan"), ("宇航", "yuhang"),
    ("思远", "siyuan"), ("佳怡", "jiayi"), ("晨", "chen"), ("一鸣", "yiming"),
    ("雨桐", "yutong"), ("俊杰", "junjie"), ("诗涵", "shihan"), ("文博", "wenbo"),
    ("梦琪", "mengqi"), ("志强", "zhiqiang"), ("慧敏", "huimin"))
EN_FIRST = (
    "James", "Mary", "John", "Patricia", "Robert", "Jennifer", "Michael", "Linda", "David",
    "Elizabeth", "William", "Barbara", "Emma", "Olivia", "Liam", "Noah", "Ava", "Sophia",
    "Mia", "Ethan", "Lucas", "Amelia", "Harper", "Oliver", "Charlotte", "Henry", "Grace",
    "Jack", "Chloe", "Daniel", "Sarah", "Ryan", "Emily", "Samuel", "Hannah", "Isaac")
EN_LAST = (
    "Smith", "Johnson", "Williams", "Brown", "Jones", "Garcia", "Miller", "Davis",
    "Rodriguez", "Martinez", "Wilson", "Anderson", "Taylor", "Thomas", "Moore", "Jackson",
    "Martin", "Lee", "Thompson", "White", "Harris", "Clark", "Lewis", "Walker", "Hall",
    "Young", "King", "Wright", "Evans", "Hughes", "Patel", "Murphy", "Green", "Baker")


@dataclass(frozen=True)
class Place:
    """Where a customer lives: the zone drives quiet hours, the phone prefix follows it."""

    city: str
    timezone: str
    phone_prefix: str  # E.164 prefix of a fictional block; the rest is random digits
    phone_digits: int


def _us(city: str, tz: str, area: str) -> Place:
    return Place(city, tz, f"+1{area}55501", 2)  # 555-0100..0199: reserved for fiction


def _uk(city: str) -> Place:
    return Place(city, "Europe/London", "+447700900", 3)  # Ofcom's drama numbers


def _cn(city: str) -> Place:
    return Place(city, "Asia/Shanghai", "+8613800138", 3)


# (place, weight) per locale: most zh_CN customers live in China, a few abroad.
ZH_PLACES = Weighted([
    (_cn("上海"), 14), (_cn("北京"), 14), (_cn("深圳"), 10), (_cn("广州"), 10),
    (_cn("杭州"), 9), (_cn("成都"), 8), (_cn("重庆"), 6), (_cn("南京"), 6), (_cn("武汉"), 6),
    (_cn("西安"), 5), (_cn("苏州"), 5), (_cn("天津"), 4), (_cn("长沙"), 3),
    (_us("旧金山", "America/Los_Angeles", "415"), 1.2),
    (_us("洛杉矶", "America/Los_Angeles", "213"), 1.0),
    (_us("纽约", "America/New_York", "212"), 1.4), (_uk("伦敦"), 1.2)])
EN_PLACES = Weighted([
    (_us("New York", "America/New_York", "212"), 16),
    (_us("Boston", "America/New_York", "617"), 7),
    (_us("Philadelphia", "America/New_York", "215"), 6),
    (_us("Miami", "America/New_York", "305"), 6),
    (_us("Atlanta", "America/New_York", "404"), 5),
    (_us("Washington", "America/New_York", "202"), 5),
    (_us("Los Angeles", "America/Los_Angeles", "213"), 11),
    (_us("San Francisco", "America/Los_Angeles", "415"), 8),
    (_us("Seattle", "America/Los_Angeles", "206"), 6),
    (_us("San Diego", "America/Los_Angeles", "619"), 3),
    (_us("Portland", "America/Los_Angeles", "503"), 2),
    (_uk("London"), 15), (_uk("Manchester"), 4), (_uk("Edinburgh"), 3), (_uk("Bristol"), 3)])

ZH_EMAIL_DOMAINS = Weighted([("mail.example", 4), ("example.com", 3), ("example.net", 3)])
EN_EMAIL_DOMAINS = Weighted([("example.com", 5), ("example.org", 3), ("inbox.example", 2)])

# How likely each contact column is filled, per locale. WeChat is mostly a Chinese thing.
ZH_CONTACT = {"email": 0.86, "phone": 0.80, "wechat_openid": 0.76}
EN_CONTACT = {"email": 0.96, "phone": 0.67, "wechat_openid": 0.10}
MALFORMED_EMAIL = 0.0056  # of the e-mails: ~0.5% of customers, for validation to catch

# Openids of one official account share a prefix; the rest looks random (URL-safe
# base64 characters, as real ones are).
OPENID_PREFIX = "oLmN7"

# People sign up, browse and shop in their evening far more than at 4 a.m.
HOUR_WEIGHTS = (2, 1, 1, 1, 1, 1, 2, 4, 6, 7, 8, 8, 9, 8, 7, 7, 8, 9, 10, 12, 14, 14, 11, 5)
HOUR_CUM = tuple(itertools.accumulate(HOUR_WEIGHTS))


@dataclass(frozen=True)
class Profile:
    """A kind of buyer: how many orders, how likely to stop buying, how much per order."""

    name: str
    orders: tuple[int, int]
    churn: float
    spend: float


PROFILES = Weighted([
    (Profile("one_off", (1, 1), 1.0, 1.0), 30),
    (Profile("casual", (2, 4), 0.50, 1.0), 37),
    (Profile("regular", (5, 10), 0.35, 1.15), 23),
    (Profile("loyal", (11, 24), 0.22, 1.4), 8),
    (Profile("whale", (25, 60), 0.12, 2.2), 2),
])
NEVER_ORDERED = 0.18  # of customers who signed up more than a month ago
REFUND_RATE = 0.05
PRICE_ENDINGS = (0.0, 0.1, 0.01)  # 159.00, 158.90, 157.99


# -- generation -----------------------------------------------------------------------------
ONE_DAY = timedelta(days=1)


class _Clock:
    """Turns "on the day N days before ``today``, in this zone" into naive UTC timestamps
    before ``now`` (midnight UTC starting ``today``)."""

    def __init__(self, today: date) -> None:
        self.today = today
        self.now = datetime.combine(today, time())
        self._midnights: dict[tuple[str, int], datetime] = {}

    def midnight(self, zone: str, days_ago: int) -> datetime:
        """The start of that local day, as naive UTC."""
        key = (zone, days_ago)
        found = self._midnights.get(key)
        if found is None:
            # Converting local noon and stepping back 12 hours is an hour off only in the
            # small hours of a DST switch day, and costs one zoneinfo call per zone and
            # day instead of one per timestamp (~100,000 a build).
            noon = datetime.combine(self.today - timedelta(days=days_ago), time(12),
                                    tzinfo=ZoneInfo(zone))
            found = noon.astimezone(UTC).replace(tzinfo=None) - timedelta(hours=12)
            self._midnights[key] = found
        return found

    def moment(self, rng: random.Random, days_ago: int, zone: str) -> datetime:
        """A plausible time of that local day (evenings are busiest)."""
        # One draw gives the hour (weighted) and, from where it lands inside that hour's
        # share, the second too: timestamps are the bulk of the random calls.
        x = rng.random() * HOUR_CUM[-1]
        hour = min(bisect.bisect(HOUR_CUM, x), 23)
        within = (x - HOUR_CUM[hour] + HOUR_WEIGHTS[hour]) / HOUR_WEIGHTS[hour]
        moment = self.midnight(zone, days_ago) + timedelta(seconds=int((hour + within) * 3600))
        while moment >= self.now:  # an evening in Los Angeles can already be today in UTC
            moment -= ONE_DAY
        return moment


def _email(rng: random.Random, first: str, last: str, customer_id: int, zh: bool) -> str:
    style = rng.randrange(4)
    local = (f"{first}.{last}", f"{last}{first}", f"{first[0]}.{last}", f"{first}_{last}")[style]
    # The id suffix keeps addresses unique, as a shop's login e-mail would be.
    domain = (ZH_EMAIL_DOMAINS if zh else EN_EMAIL_DOMAINS).draw(rng)
    address = f"{local}{customer_id}@{domain}".lower()
    if rng.random() < MALFORMED_EMAIL:
        address = _malformed(rng, address)
    return address


def _malformed(rng: random.Random, address: str) -> str:
    """The typos a sign-up form lets through."""
    local, domain = address.split("@")
    return (f"{local}@@{domain}",                        # doubled @
            f"{local}.{domain}",                         # no @ at all
            f"{local}@{domain.rsplit('.', 1)[0]}",       # no top-level domain
            f"{local[:3]} {local[3:]}@{domain}",         # a space
            f"{local}@{domain.replace('.', '..', 1)}",   # doubled dot
            )[rng.randrange(5)]


def _customer(rng: random.Random, clock: _Clock
              ) -> tuple[dict[str, Any], tuple[str, str] | None]:
    """One customer without an id (ids follow sign-up order, assigned after sorting), and
    the (first, last) names its e-mail address is made of once the id is known, if any."""
    zh = rng.random() < 0.6
    place = (ZH_PLACES if zh else EN_PLACES).draw(rng)
    if zh:
        (last, last_py), (first, first_py) = CN_SURNAME.draw(rng), rng.choice(CN_GIVEN)
    else:
        first, last = rng.choice(EN_FIRST), rng.choice(EN_LAST)
        first_py, last_py = first, last
    # Skewed towards recent sign-ups (a growing shop): ~1.2% in the last week.
    days_ago = 1 + int((HISTORY_DAYS - 1) * rng.random() ** 1.15)
    odds = ZH_CONTACT if zh else EN_CONTACT
    has = {column: rng.random() < p for column, p in odds.items()}
    phone = place.phone_prefix + f"{rng.randrange(10 ** place.phone_digits):0{place.phone_digits}d}"
    openid = OPENID_PREFIX + base64.urlsafe_b64encode(rng.randbytes(18)).decode()[:23]
    return {
        "first_name": first, "last_name": last, "email": None,
        "phone": phone if has["phone"] else None,
        "wechat_openid": openid if has["wechat_openid"] else None,
        "locale": "zh_CN" if zh else "en_US",
        "timezone": place.timezone,
        "signup_at": clock.moment(rng, days_ago, place.timezone),
        "city": place.city,
    }, ((first_py, last_py) if has["email"] else None)


def _orders(rng: random.Random, customer: dict[str, Any], clock: _Clock
            ) -> list[tuple[datetime, float, str]]:
    """A customer's order history: (placed_at, amount, status), oldest first."""
    signup: datetime = customer["signup_at"]
    # Ages are in days before ``now``: floats are much cheaper than datetimes here.
    tenure = (clock.now - signup).total_seconds() / 86400
    if rng.random() < (0.55 if tenure < 30 else NEVER_ORDERED):
        return []
    profile = PROFILES.draw(rng)
    # Nobody orders more than about twice a week since signing up.
    count = max(1, min(rng.randint(*profile.orders), int(tenure / 3.5) + 1))
    first = tenure - min(rng.expovariate(1 / 8), tenure * 0.9)
    lapsed = LAPSED_DAYS + 1
    if count == 1:
        last = first
    elif rng.random() < profile.churn and first > lapsed:
        last = lapsed + (first - lapsed) * rng.random()  # stopped buying a while ago
    else:
        last = min(first, LAPSED_DAYS) * rng.random()  # still buying
    ages = [first, last] + [last + (first - last) * rng.random() for _ in range(count - 2)]
    zone = customer["timezone"]
    basket = rng.lognormvariate(5.05, 0.45) * profile.spend  # median ~156 per order
    out = []
    for age in ages[:count]:
        placed = clock.moment(rng, max(1, math.ceil(age)), zone)
        if placed <= signup:  # same day as sign-up, earlier hour: keep the order after it
            placed = min(signup + timedelta(minutes=rng.randint(5, 90)),
                         clock.now - timedelta(seconds=1))
        whole = round(basket * math.exp(rng.gauss(0, 0.35)))
        amount = round(max(9.9, whole - PRICE_ENDINGS[whole % 3]), 2)
        status = "refunded" if rng.random() < REFUND_RATE else "paid"
        out.append((placed, amount, status))
    out.sort(key=lambda o: o[0])
    return out


def _member(rng: random.Random, customer_id: int, signup: datetime,
            history: list[tuple[datetime, float, str]]) -> dict[str, Any] | None:
    """Loyalty membership: 1 point per currency unit of paid orders plus a joining bonus."""
    if rng.random() >= (0.88 if history else 0.2):
        return None
    points = rng.choice((0, 0, 50, 100, 200))
    level, since = LEVELS[0][0], signup.date()
    for placed, amount, status in history:
        if status != "paid":
            continue  # refunds earn nothing
        points += int(amount)
        reached = _level_for(points)
        if reached != level:
            level, since = reached, placed.date()
    return {"customer_id": customer_id, "level": level, "points": points,
            "level_since": since}


def _level_for(points: int) -> str:
    for name, floor in reversed(LEVELS):
        if points >= floor:
            return name
    return LEVELS[0][0]


def generate(customers_n: int = DEFAULT_CUSTOMERS, seed: int = DEFAULT_SEED,
             today: date | None = None
             ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """The demo shop's rows (customers, orders, members), without touching a database."""
    rng = random.Random(seed)
    clock = _Clock(today or _utc_today())
    drafts = [_customer(rng, clock) for _ in range(customers_n)]
    # Ids follow sign-up order, like an auto-increment key; the index breaks exact ties.
    order = sorted(range(customers_n), key=lambda i: (drafts[i][0]["signup_at"], i))
    customer_rows: list[dict[str, Any]] = []
    placed: list[tuple[datetime, int, float, str]] = []
    member_rows: list[dict[str, Any]] = []
    for customer_id, index in enumerate(order, start=1):
        draft, names = drafts[index]
        row = {"customer_id": customer_id, **draft}
        if names:
            row["email"] = _email(rng, *names, customer_id, row["locale"] == "zh_CN")
        customer_rows.append(row)
        history = _orders(rng, row, clock)
        placed.extend((at, customer_id, amount, status) for at, amount, status in history)
        member = _member(rng, customer_id, row["signup_at"], history)
        if member:
            member_rows.append(member)
    placed.sort()  # order ids follow time, as a real sequence would
    order_rows = [{"order_id": order_id, "customer_id": customer_id, "placed_at": at,
                   "amount": amount, "status": status}
                  for order_id, (at, customer_id, amount, status)
                  in enumerate(placed, start=FIRST_ORDER_ID)]
    return customer_rows, order_rows, member_rows


def _utc_today() -> date:
    # Timestamps are UTC and the segments compare them with Herald's clock (:now, UTC):
    # the UTC date keeps every generated event in the past wherever the demo is built.
    return clock.now().date()
