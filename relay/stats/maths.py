"""Statistics maths, pure: days, mailbox providers (ESPs), counters and their rates, and the
parameters and answer of the Alibaba-compatible ``GetTrackList`` (README, "Statistics and
events API").

Every count here is of *counted* events only (people and mailbox image proxies, see
relay/tracking/bots.py); machine traffic never reaches a statistic. Events are attributed to the UTC
day their message was sent, so the rates of a day compare like with like: of the mail sent
that day, how much was opened and clicked (whenever that happened).

=====================  ===================================================================
sent                   recipients the upstream accepted a copy for (``recipients.status``
                       ``sent``; failed, deferred and duplicate copies are not sent)
opens                  counted open events, implied opens included (a counted click from a
                       recipient with no counted open records one: the click proves it)
unique_opens           recipients who opened, once per message (``first_for_recipient``)
clicks                 counted click events
unique_clicks          recipients who clicked any link, once per message
open_rate              opens / sent (can exceed 100%: one recipient may open many times)
unique_open_rate       unique_opens / sent
click_rate             clicks / sent
unique_click_rate      unique_clicks / sent
click_to_open_rate     unique_clicks / unique_opens
=====================  ===================================================================

A rate with a zero denominator is 0 in ``GetTrackList`` (as Alibaba answers for a day with
no mail) and ``null`` in the native API.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from relay.errors import InvalidParameter

# Mailbox providers by recipient domain. The key is the value ``GetTrackList`` names it by;
# the aliases are the provider's other consumer domains.
ESP_DOMAINS: Mapping[str, frozenset[str]] = {
    "gmail.com": frozenset({"gmail.com", "googlemail.com"}),
    "yahoo.com": frozenset({
        "yahoo.com", "ymail.com", "rocketmail.com", "yahoo.co.uk", "yahoo.fr", "yahoo.de",
        "yahoo.es", "yahoo.it", "yahoo.ca", "yahoo.com.au", "yahoo.co.in", "yahoo.com.br",
        "yahoo.com.mx", "yahoo.com.sg", "yahoo.com.hk", "yahoo.com.tw"}),
    "outlook.com": frozenset({
        "outlook.com", "hotmail.com", "live.com", "msn.com", "passport.com", "outlook.fr",
        "outlook.de", "outlook.es", "outlook.it", "outlook.jp", "hotmail.co.uk", "hotmail.fr",
        "hotmail.de", "hotmail.es", "hotmail.it", "live.co.uk", "live.fr", "live.de",
        "live.cn", "live.jp"}),
    "icloud.com": frozenset({"icloud.com", "me.com", "mac.com"}),
}
OTHERS = "Others"
ESPS = (*ESP_DOMAINS, OTHERS)
ESP_BY_DOMAIN = {domain: esp for esp, domains in ESP_DOMAINS.items() for domain in domains}

MAX_PAGE_SIZE = 100
DEFAULT_PAGE_SIZE = 10
TRACK_LIST_DAYS_BACK = 30  # StartTime no earlier than this many days before today
TRACK_LIST_SPAN_DAYS = 7  # EndTime - StartTime at most this many days
DAY_FORMAT = "%Y-%m-%d"  # for parsing; days are written with date.isoformat() (always 4-digit
# years, where strftime writes year 226 as "226")


def esp_of(recipient: str) -> str:
    """The provider of a recipient address, by its domain: one of :data:`ESPS`."""
    return ESP_BY_DOMAIN.get(domain_of(recipient), OTHERS)


def domain_of(address: str) -> str:
    """An address's domain as :data:`ESP_BY_DOMAIN` keys it: after the last ``@``, stripped,
    lower case (``relay_domain()`` in SQL: relay/stats/rollup.py rebuild)."""
    return address.rpartition("@")[2].strip().lower()


def esp_parameter(value: str) -> str:
    """An ``Esp`` value (a provider, any of its aliases, or ``Others``, any case) as its key."""
    text = value.strip().lower()
    if text == OTHERS.lower():
        return OTHERS
    if text in ESP_BY_DOMAIN:
        return ESP_BY_DOMAIN[text]
    raise InvalidParameter("Esp", f"{value!r} is not one of {', '.join(ESPS)} (or an alias "
                                  "such as googlemail.com, hotmail.com, me.com)")


def day_of(timestamp: float) -> str:
    """The UTC day (``yyyy-mm-dd``) a Unix time falls on: the statistics' day bucket."""
    return datetime.fromtimestamp(timestamp, UTC).date().isoformat()


def days_between(first: date, last: date) -> list[date]:
    """Every day from ``first`` to ``last``, both included."""
    return [first + timedelta(days=n) for n in range((last - first).days + 1)]


def parse_day(parameter: str, value: str) -> date:
    try:
        if len(value) != 10:
            raise ValueError
        return datetime.strptime(value, DAY_FORMAT).date()
    except ValueError:
        raise InvalidParameter(parameter, f"{value!r} is not a date in the form yyyy-MM-dd"
                               ) from None


def parse_int(parameter: str, value: str, low: int, high: int) -> int:
    digits = value.strip().lstrip("0") or "0"
    # The length first: int() refuses (ValueError) strings of thousands of digits.
    if (not digits.isascii() or not digits.isdigit() or len(digits) > len(str(high))
            or not low <= int(digits) <= high):
        raise InvalidParameter(
            parameter, f"{value[:40]!r} is not a whole number from {low} to {high}")
    return int(digits)


@dataclass(frozen=True, slots=True)
class Counts:
    sent: int = 0
    opens: int = 0
    unique_opens: int = 0
    clicks: int = 0
    unique_clicks: int = 0

    @property
    def open_rate(self) -> float | None:
        return ratio(self.opens, self.sent)

    @property
    def unique_open_rate(self) -> float | None:
        return ratio(self.unique_opens, self.sent)

    @property
    def click_rate(self) -> float | None:
        return ratio(self.clicks, self.sent)

    @property
    def unique_click_rate(self) -> float | None:
        return ratio(self.unique_clicks, self.sent)

    @property
    def click_to_open_rate(self) -> float | None:
        return ratio(self.unique_clicks, self.unique_opens)

    def as_dict(self) -> dict[str, int | float | None]:
        return {
            "sent": self.sent, "opens": self.opens, "unique_opens": self.unique_opens,
            "clicks": self.clicks, "unique_clicks": self.unique_clicks,
            "open_rate": self.open_rate, "unique_open_rate": self.unique_open_rate,
            "click_rate": self.click_rate, "unique_click_rate": self.unique_click_rate,
            "click_to_open_rate": self.click_to_open_rate,
        }


def ratio(part: int, whole: int) -> float | None:
    """``part / whole`` rounded to 4 decimals (0.1234 is 12.34%); None when ``whole`` is 0."""
    return round(part / whole, 4) if whole else None


def percent(part: int, whole: int) -> str:
    """``GetTrackList``'s rate: a percentage as a decimal string with at most two decimals,
    without a sign ("12.5" is 12.5%, "0" when ``whole`` is 0)."""
    if not whole:
        return "0"
    text = f"{100 * part / whole:.2f}".rstrip("0").rstrip(".")
    return text or "0"


# ---- GetTrackList ----

# Parameters Alibaba marks deprecated: accepted and ignored.
DEPRECATED = ("Total", "Offset", "OffsetCreateTime", "OffsetCreateTimeDesc")
# Alibaba features the relay does not have: accepted when empty, refused otherwise (answering
# with everything would look like an answer for the pool, IP or set asked for).
UNSUPPORTED = {
    "DedicatedIpPoolId": "the relay has no dedicated IP pools",
    "DedicatedIp": "the relay has no dedicated IPs",
    "ConfigSetId": "the relay has no configuration sets",
}


@dataclass(frozen=True, slots=True)
class TrackListQuery:
    start: date
    end: date
    page_size: int = DEFAULT_PAGE_SIZE
    page_number: int = 1
    account_name: str | None = None  # the sender address, lower-cased
    tag_name: str | None = None
    esp: str | None = None

    @property
    def days(self) -> list[date]:
        return days_between(self.start, self.end)


def parse_track_list(params: Mapping[str, str], today: date) -> TrackListQuery:
    """Validate ``GetTrackList``'s query parameters as Alibaba's API states them."""
    start = parse_day("StartTime", _required(params, "StartTime"))
    end = parse_day("EndTime", _required(params, "EndTime"))
    earliest = today - timedelta(days=TRACK_LIST_DAYS_BACK)
    if start < earliest:
        raise InvalidParameter("StartTime", f"must be within the last {TRACK_LIST_DAYS_BACK} "
                                            f"days (not before {earliest})")
    if end < start:
        raise InvalidParameter("EndTime", "must not be before StartTime")
    if (end - start).days > TRACK_LIST_SPAN_DAYS:
        raise InvalidParameter("EndTime", f"must be at most {TRACK_LIST_SPAN_DAYS} days after "
                                          "StartTime")
    for name, why in UNSUPPORTED.items():
        if params.get(name, "").strip():
            raise InvalidParameter(name, f"not supported: {why}")
    account = _optional(params, "AccountName")
    if account is not None and ("@" not in account or len(account) > 254):
        raise InvalidParameter("AccountName", f"{account!r} is not a sender address")
    tag = _optional(params, "TagName")
    if tag is not None and account is None:
        raise InvalidParameter("TagName", "requires AccountName")
    esp = _optional(params, "Esp")
    return TrackListQuery(
        start, end,
        page_size=parse_int("PageSize", params.get("PageSize") or str(DEFAULT_PAGE_SIZE), 1,
                            MAX_PAGE_SIZE),
        page_number=parse_int("PageNumber", params.get("PageNumber") or "1", 1, 1_000_000),
        account_name=account.lower() if account else None,
        tag_name=tag,
        esp=esp_parameter(esp) if esp is not None else None,
    )


def _required(params: Mapping[str, str], name: str) -> str:
    value = params.get(name, "").strip()
    if not value:
        raise InvalidParameter(name, "is required (yyyy-MM-dd)")
    return value


def _optional(params: Mapping[str, str], name: str) -> str | None:
    value = params.get(name, "").strip()
    return value or None


def track_list_body(query: TrackListQuery, by_day: Mapping[str, Counts],
                    request_id: str | None = None) -> dict[str, object]:
    """The answer, field for field as Alibaba's: one row per day of the range, oldest first,
    days without mail included (zeros), paged by ``PageSize``/``PageNumber``."""
    days = query.days
    first = (query.page_number - 1) * query.page_size
    page = days[first:first + query.page_size]
    return {
        "OffsetCreateTimeDesc": "",
        "OffsetCreateTime": "",
        "RequestId": request_id or str(uuid.uuid4()).upper(),
        "PageNo": query.page_number,
        "PageSize": query.page_size,
        "Total": len(days),
        "TotalPages": math.ceil(len(days) / query.page_size),
        "data": {"stat": [track_list_row(d, by_day.get(d.isoformat(), Counts()))
                          for d in page]},
    }


def track_list_row(day: date, c: Counts) -> dict[str, str]:
    """One ``data.stat[]`` entry: every value a string, as Alibaba writes them."""
    return {
        "RcptClickRate": percent(c.clicks, c.sent),
        "RcptUniqueOpenCount": str(c.unique_opens),
        "RcptClickCount": str(c.clicks),
        "RcptUniqueClickCount": str(c.unique_clicks),
        "CreateTime": f"{day.isoformat()}T00:00Z",
        "RcptUniqueOpenRate": percent(c.unique_opens, c.sent),
        "RcptUniqueClickRate": percent(c.unique_clicks, c.sent),
        "TotalNumber": str(c.sent),
        "RcptOpenRate": percent(c.opens, c.sent),
        "RcptOpenCount": str(c.opens),
    }


def counter_rows(totals: dict[Any, list[int]]) -> list[tuple[Any, ...]]:
    """``totals`` as the rows of their upserts (key then counts), in key order: nodes adding to
    the same counter rows at once take their row locks in the same order."""
    return [(*key, *counts) for key, counts in sorted(totals.items())]


def add_counts(totals: dict[Any, list[int]], key: Any, counts: Sequence[int]) -> None:
    """Add ``counts`` to ``totals[key]`` (a batch's counters, summed before one upsert each)."""
    total = totals.get(key)
    if total is None:
        totals[key] = list(counts)
    else:
        for i, n in enumerate(counts):
            total[i] += n
