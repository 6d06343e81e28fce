"""RFC 3339 timestamps to integer nanoseconds, keeping every fractional digit.

The grammar is RFC 3339's ``date-time`` (section 5.6), nothing wider:
``YYYY-MM-DDTHH:MM:SS[.fraction](Z|+HH:MM|-HH:MM)``, ASCII digits only. As the RFC allows,
``T`` and ``Z`` may be lower case and a space may separate date and time (its note to 5.6).
Refused: ISO 8601 forms outside RFC 3339 (week dates, basic format, reduced precision such as
``2026-11-29T16Z``), a missing offset, leap seconds (``:60``, which no clock here can hold),
and fractions finer than nanoseconds (rejected, not truncated: a timestamp is never altered).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

# The grammar, checked in full here; datetime.fromisoformat (C, a wider ISO 8601 reader) then
# only converts text already known to be RFC 3339, and checks the calendar (February 30).
_RFC3339 = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.([0-9]+))?"
    r"(?:[Zz]|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_EXAMPLE = "expected RFC 3339 such as 2026-05-01T12:00:00Z or 2026-05-01T14:00:00.5+02:00"
MAX_FRACTION_DIGITS = 9


# Reading a timestamp in full (the grammar, the calendar, datetime arithmetic) took 2.1 us, a
# tenth of the GIL's time in bench.mix. A batch's timestamps share their seconds and most of
# what follows them, so each part is read in full once and remembered: the first 19 characters
# ("2026-05-01T12:00:09", once a whole timestamp with them was read) → ns at that second as if
# in UTC, and the rest (".889Z", "+02:00", matched by _AFTER_SECOND) → the ns it adds. Each
# memo is emptied when it reaches _KEPT entries.
_SECOND_CHARS = 19
_AFTER_SECOND = re.compile(r"(?:\.([0-9]{1,9}))?(?:[Zz]|([+-])([01][0-9]|2[0-3]):([0-5][0-9]))")
_seconds: dict[str, int] = {}
_after: dict[str, int] = {}
_KEPT = 10_000


def parse_timestamp(text: str) -> int:
    """``2026-05-01T12:00:00.123456789Z`` → ns since the epoch; raises ValueError saying why."""
    base = _seconds.get(text[:_SECOND_CHARS])
    if base is not None:
        add = _after.get(text[_SECOND_CHARS:])
        if add is None:
            add = _after_second(text[_SECOND_CHARS:])
        if add is not None:
            return base + add
    ns = _parse_in_full(text)
    add = _after_second(text[_SECOND_CHARS:])
    if add is not None:  # always, for a text read in full (tests/pipeline/test_strict_values.py)
        _remember(_seconds, text[:_SECOND_CHARS], ns - add)
    return ns


def _after_second(after: str) -> int | None:
    """The ns a fraction and offset add to the second (remembered), or None if ``after`` is
    not one."""
    m = _AFTER_SECOND.fullmatch(after)
    if m is None:
        return None
    frac, sign, off_h, off_m = m.groups()
    ns = 0 if frac is None else int(frac.ljust(9, "0"))
    if sign is not None:
        off = (int(off_h) * 60 + int(off_m)) * 60_000_000_000
        ns += -off if sign == "+" else off
    _remember(_after, after, ns)
    return ns


def _remember(memo: dict[str, int], key: str, ns: int) -> None:
    if len(memo) >= _KEPT:
        memo.clear()
    memo[key] = ns


def _parse_in_full(text: str) -> int:
    m = _RFC3339.fullmatch(text) if len(text) <= 64 else None
    if m is None:
        raise ValueError(f"{_show(text)} is not an RFC 3339 timestamp: {_why(text)}")
    try:
        dt = datetime.fromisoformat(text if text[-1] != "z" else text[:-1] + "Z")
    except ValueError as exc:  # month 13, February 30, year 0, hour 24, second 60
        raise ValueError(
            f"{_show(text)} is not a valid date and time ({exc}); leap seconds are not "
            f"accepted: {_EXAMPLE}"
        ) from None
    ns = (dt - _EPOCH) // _MICROSECOND * 1000  # fromisoformat keeps 6 fractional digits
    # Only a text longer than "2026-05-01T12:00:00.123456Z" can hold a 7th digit.
    if len(text) > 27 and (frac := m.group(1)) is not None and len(frac) > 6:
        if len(frac) > MAX_FRACTION_DIGITS:
            raise ValueError(
                f"{_show(text)} has {len(frac)} fractional digits: expected at most "
                f"{MAX_FRACTION_DIGITS} (nanoseconds); timestamps are never truncated"
            )
        ns += int(frac[6:].ljust(3, "0"))
    return ns


def _why(text: str) -> str:
    """What is missing, for the common near misses."""
    if not text.isascii():
        return f"only ASCII digits and separators are accepted; {_EXAMPLE}"
    if re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?", text):
        return "a UTC offset is required (add Z or +00:00)"
    return _EXAMPLE


def _show(text: str) -> str:
    return repr(text) if len(text) <= 64 else repr(text[:48]) + f"... ({len(text)} characters)"


def format_timestamp(ns: int) -> str:
    """ns since the epoch → RFC 3339 UTC with as many fractional digits as needed."""
    s, frac = divmod(ns, 1_000_000_000)
    base = datetime.fromtimestamp(s, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")
    if frac == 0:
        return base + "Z"
    digits = f"{frac:09d}".rstrip("0")
    return f"{base}.{digits}Z"
