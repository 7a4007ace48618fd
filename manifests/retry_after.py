"""The one reading of a Retry-After header, for the crawler and the teacher engine.

RFC 9110 §10.2.3 allows two forms, and both are read here::

    parse_retry_after("120")                            # 120.0: delta-seconds
    parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT")  # seconds until then; 0.0 once it has passed
    parse_retry_after("soon")                           # None: absent or unreadable

A decimal fraction (``"0.5"``) is read too: the RFC says whole seconds, but rate-limiting servers and
proxies send fractions, and rounding them up would make a client wait longer than it was asked.
A negative, non-finite or unreadable value counts as absent (None) -- the caller's own backoff then
decides -- rather than as "come back now" or "never come back". No cap is applied here: what is too
long differs by caller (the crawler drops a URL past ``max_retry_after_seconds``; the engine pauses
the teacher).
"""

from __future__ import annotations

import math
import re
import time
from datetime import timezone
from email.utils import parsedate_to_datetime

_SECONDS = re.compile(r"\d+(?:\.\d*)?|\.\d+")


def parse_delay(value: str | None) -> float | None:
    """A non-negative decimal number of seconds (``"2"``, ``"1.5"``), or None for anything else."""
    if value is None:
        return None
    value = value.strip()
    if not _SECONDS.fullmatch(value):
        return None
    seconds = float(value)
    return seconds if math.isfinite(seconds) else None  # 400 digits overflow to inf: "never" is no answer


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP date; None if absent or unreadable."""
    if value is None or not value.strip():
        return None
    seconds = parse_delay(value)
    if seconds is not None:
        return seconds
    try:
        when = parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if (
        when.tzinfo is None
    ):  # "-0000" in the date: RFC 5322's "no zone information", read as UTC (HTTP's zone)
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, when.timestamp() - time.time())
