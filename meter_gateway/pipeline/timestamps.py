"""RFC 3339 timestamps to integer nanoseconds, keeping every fractional digit."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

_FRACTION = re.compile(r"\.(\d+)")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def parse_timestamp(text: str) -> int:
    """``2026-05-01T12:00:00.123456789Z`` → ns since the epoch; raises ValueError."""
    if len(text) > 40:
        raise ValueError("timestamp is too long for RFC 3339")
    try:
        dt = datetime.fromisoformat(text)  # takes Z and offsets; truncates past microseconds
    except ValueError:
        raise ValueError(
            f"{text!r} is not an RFC 3339 timestamp (e.g. 2026-05-01T12:00:00Z)"
        ) from None
    if dt.tzinfo is None:
        raise ValueError(f"{text!r} has no UTC offset (add Z or +00:00)")
    ns = (dt - _EPOCH) // _MICROSECOND * 1000
    dot = text.find(".")
    if dot != -1 and len(text) > dot + 7 and text[dot + 7].isdigit():
        m = _FRACTION.match(text, dot)
        if m is not None:
            ns += int(m.group(1)[6:9].ljust(3, "0"))
    return ns


def format_timestamp(ns: int) -> str:
    """ns since the epoch → RFC 3339 UTC with as many fractional digits as needed."""
    s, frac = divmod(ns, 1_000_000_000)
    base = datetime.fromtimestamp(s, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")
    if frac == 0:
        return base + "Z"
    digits = f"{frac:09d}".rstrip("0")
    return f"{base}.{digits}Z"
