"""RFC 3339 timestamps to integer nanoseconds, keeping every fractional digit."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

_FRACTION = re.compile(r"\.(\d+)")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def parse_timestamp(text: str) -> int:
    """``2026-05-01T12:00:00.123456789Z`` → ns since the epoch; raises ValueError."""
    if len(text) > 40:
        raise ValueError("timestamp is too long for RFC 3339")
    extra_ns = 0
    m = _FRACTION.search(text)
    if m is not None and len(m.group(1)) > 6:
        digits = m.group(1)[:9].ljust(9, "0")
        extra_ns = int(digits[6:])
        text = text[: m.start()] + "." + digits[:6] + text[m.end() :]
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"{text!r} is not an RFC 3339 timestamp (e.g. 2026-05-01T12:00:00Z)"
        ) from None
    if dt.tzinfo is None:
        raise ValueError(f"{text!r} has no UTC offset (add Z or +00:00)")
    return (dt - _EPOCH) // timedelta(microseconds=1) * 1000 + extra_ns


def format_timestamp(ns: int) -> str:
    """ns since the epoch → RFC 3339 UTC with as many fractional digits as needed."""
    s, frac = divmod(ns, 1_000_000_000)
    base = datetime.fromtimestamp(s, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")
    if frac == 0:
        return base + "Z"
    digits = f"{frac:09d}".rstrip("0")
    return f"{base}.{digits}Z"
