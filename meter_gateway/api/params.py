"""Query parameters (and the times of request bodies), parsed one way on every API path.

Each parser takes the raw value (``None`` when absent) and returns a typed value or raises
``ApiError`` 400 naming the parameter, showing the value and saying what was expected; no
other exception escapes, whatever the text. The limits every path shares live here.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from meter_gateway.aggregation.windows import Window, next_start, truncate
from meter_gateway.api.errors import ApiError, shown
from meter_gateway.model import Reason
from meter_gateway.pipeline.timestamps import format_timestamp, parse_timestamp

NS = 1_000_000_000
#: SPEC §9 "Bounded time": every from/to lies in [EARLIEST_NS, LATEST_NS].
EARLIEST_NS = 0
LATEST_NS = int(datetime(9999, 1, 1, tzinfo=UTC).timestamp()) * NS
#: The store keeps times as 64-bit nanoseconds, which end in 2262: no record can lie later, and
#: a bound past it cannot be handed to the store.
STORE_HORIZON_NS = 2**63 - 1
#: Integers handed to the store (sequence numbers, times in cursors) fit a signed 64-bit column.
MAX_INT = 2**63 - 1
#: One page size for every paginated list (raw usage, rejected records, invoices).
PAGE_DEFAULT = 100
PAGE_MAX = 10_000
#: At most this many windows in one answer of GET /v1/usage (every customer and dimension).
MAX_WINDOWS = 10_000
#: The longest IANA name is 32 characters; anything much longer is not one.
TZ_MAX_LEN = 64

_DIGITS = re.compile(r"[0-9]{1,19}", re.ASCII)
_TZ_NAME = re.compile(r"[A-Za-z0-9_+-]+(/[A-Za-z0-9_+-]+)*", re.ASCII)
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}", re.ASCII)
_B64 = re.compile(r"[A-Za-z0-9_-]{1,200}={0,2}", re.ASCII)


def bad(name: str, message: str) -> ApiError:
    """A 400 about query parameter ``name``."""
    return ApiError(400, f"{name}: {message}", parameter=name)


def check_known(items: Iterable[tuple[str, str]], allowed: Collection[str]) -> None:
    """Refuse parameters the path does not define, and any given twice (which one would win?)."""
    seen: set[str] = set()
    for name, _ in items:
        if name not in allowed:
            expected = ", ".join(sorted(allowed)) if allowed else "none"
            raise bad(name, f"not a parameter of this path (its parameters: {expected})")
        if name in seen:
            raise bad(name, "given more than once")
        seen.add(name)


def integer(raw: str | None, name: str, default: int, lo: int, hi: int) -> int:
    """ASCII digits only (no sign, no ``²`` or ``①``) within ``[lo, hi]``."""
    if raw is None or raw == "":
        return default
    if _DIGITS.fullmatch(raw) is None or not lo <= int(raw) <= hi:
        raise bad(name, f"expected a whole number from {lo} to {hi}, got {shown(raw)}")
    return int(raw)


def limit(raw: str | None) -> int:
    return integer(raw, "limit", PAGE_DEFAULT, 1, PAGE_MAX)


def choice(raw: str | None, name: str, options: Collection[str], default: str) -> str:
    if raw is None or raw == "":
        return default
    if raw not in options:
        raise bad(name, f"expected one of {', '.join(options)}, got {shown(raw)}")
    return raw


def time(raw: object, name: str, default: int) -> int:
    """An RFC 3339 timestamp within SPEC §9's bounds, as ns since the epoch.

    ``raw`` may come from a JSON body, so anything that is not a string is refused too.
    """
    if raw is None or raw == "":
        return default
    if not isinstance(raw, str):
        raise bad(name, f"expected an RFC 3339 timestamp string, got {type(raw).__name__}")
    try:
        ns = parse_timestamp(raw)  # the ingest grammar: one rule for every timestamp
    except ValueError as exc:
        raise bad(name, str(exc)) from None
    if not EARLIEST_NS <= ns <= LATEST_NS:
        raise bad(
            name,
            f"{shown(raw)} is outside {format_timestamp(EARLIEST_NS)} … "
            f"{format_timestamp(LATEST_NS)}",
        )
    return ns


def period(raw_from: object, raw_to: object, default: tuple[int, int]) -> tuple[int, int]:
    """``from`` and ``to`` (each defaulted on its own), with ``to`` after ``from``."""
    from_ns = time(raw_from, "from", default[0])
    to_ns = time(raw_to, "to", default[1])
    if to_ns <= from_ns:
        raise bad(
            "to",
            f"must be after from ({format_timestamp(from_ns)}), got {format_timestamp(to_ns)}",
        )
    return from_ns, to_ns


def within_store(to_ns: int) -> int:
    """Refuse a ``to`` the store cannot take (see STORE_HORIZON_NS)."""
    if to_ns > STORE_HORIZON_NS:
        raise bad(
            "to",
            f"usage is counted up to {format_timestamp(STORE_HORIZON_NS)} (64-bit nanoseconds); "
            f"got {format_timestamp(to_ns)}",
        )
    return to_ns


def time_zone(raw: str | None, default: ZoneInfo) -> ZoneInfo:
    """An IANA time zone name (``Europe/Berlin``), looked up without touching odd paths."""
    if raw is None or raw == "":
        return default
    problem = f"expected an IANA time zone such as Europe/Berlin, got {shown(raw)}"
    if len(raw) > TZ_MAX_LEN or _TZ_NAME.fullmatch(raw) is None:
        raise bad("tz", problem)
    try:
        return ZoneInfo(raw)
    # Not found, a directory (America), a file that is not TZif (leapseconds), unreadable.
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise bad("tz", problem) from None


def window_count(from_ns: int, to_ns: int, window: Window, tz: ZoneInfo, cap: int) -> int:
    """How many ``window`` windows ``[from_ns, to_ns)`` spans, counting no further than
    ``cap + 1`` (so a 1970…9999 range of hours costs as little as a short one)."""
    n, start = 0, truncate(from_ns, window, tz)
    while start < to_ns and n <= cap:
        n += 1
        start = next_start(start, window, tz)
    return n


def record_cursor(raw: str | None) -> tuple[int, int] | None:
    """The raw-usage cursor (time, seq) that ``encode_record_cursor`` made."""
    if raw is None or raw == "":
        return None
    ts, _, seq = _unpack(raw).partition(":")
    if _DIGITS.fullmatch(ts) is None or _DIGITS.fullmatch(seq) is None:
        raise _not_ours(raw)
    if int(ts) > MAX_INT or int(seq) > MAX_INT:
        raise _not_ours(raw)
    return int(ts), int(seq)


def encode_record_cursor(ts_ns: int, seq: int) -> str:
    return _pack(f"{ts_ns}:{seq}")


def invoice_cursor(raw: str | None) -> tuple[int, str] | None:
    """The invoice-list cursor (created, id) that ``encode_invoice_cursor`` made."""
    if raw is None or raw == "":
        return None
    created, _, id_ = _unpack(raw).partition(":")
    if _DIGITS.fullmatch(created) is None or int(created) > MAX_INT:
        raise _not_ours(raw)
    if _ID.fullmatch(id_) is None:
        raise _not_ours(raw)
    return int(created), id_


def encode_invoice_cursor(created_ns: int, invoice_id: str) -> str:
    return _pack(f"{created_ns}:{invoice_id}")


def seq_cursor(raw: str | None, name: str = "cursor") -> int:
    """A sequence-number cursor (rejected records, wallet entries): 0 means from the start."""
    return integer(raw, name, 0, 0, MAX_INT)


def _pack(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode()


def _unpack(raw: str) -> str:
    if _B64.fullmatch(raw) is None:
        raise _not_ours(raw)
    try:
        return base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode("ascii")
    except (binascii.Error, ValueError):  # bad padding, or bytes that are not ASCII
        raise _not_ours(raw) from None


def _not_ours(raw: str) -> ApiError:
    return bad("cursor", f"{shown(raw)} is not a cursor this API returned")


def resource_id(raw: str) -> bool:
    """Whether ``raw`` can be an id at all (catalog ids, invoice ids): ``[A-Za-z0-9_.:-]``."""
    return _ID.fullmatch(raw) is not None


# --- what each path takes -------------------------------------------------------------------
#
# The guard refuses any query parameter not named here, and /openapi.json describes each one
# from the same declaration, so the two cannot drift. The schemas state the parsers' rules.


@dataclass(frozen=True, slots=True)
class Param:
    """A query parameter as /openapi.json describes it."""

    schema: Mapping[str, Any]
    description: str
    example: object = None


_TIMESTAMP = {"type": "string", "format": "date-time"}
_CURSOR = {"type": "string", "pattern": f"^{_B64.pattern}$"}
_SEQ = {"type": "integer", "minimum": 0, "maximum": MAX_INT}
_BOUNDS = f"between {format_timestamp(EARLIEST_NS)} and {format_timestamp(LATEST_NS)}"

LIMIT = Param(
    {"type": "integer", "minimum": 1, "maximum": PAGE_MAX, "default": PAGE_DEFAULT},
    "Page size.",
    100,
)
FROM = Param(_TIMESTAMP, f"Start of the period (inclusive), RFC 3339, {_BOUNDS}.")
TO = Param(_TIMESTAMP, f"End of the period (exclusive), RFC 3339, after from, {_BOUNDS}.")
PERIOD_PARAMS: Mapping[str, Param] = {
    "from": Param(FROM.schema, FROM.description + " Default: the current month's start."),
    "to": Param(TO.schema, TO.description + " Default: the current month's end."),
}
USAGE_PARAMS: Mapping[str, Param] = {
    "customerId": Param({"type": "string"}, "Customer id or alias.", "acme"),
    "dimensionId": Param({"type": "string"}, "Dimension id.", "data-processed"),
    "from": Param(FROM.schema, FROM.description + " Default: the current month's start."),
    "to": Param(TO.schema, TO.description + " Default: now."),
    "window": Param(
        {"type": "string", "enum": ["raw", "hour", "day", "month"], "default": "raw"},
        f"raw: the records, paginated; otherwise aggregated windows (at most {MAX_WINDOWS:,} "
        "in one answer).",
    ),
    "tz": Param(
        {"type": "string", "maxLength": TZ_MAX_LEN, "pattern": f"^{_TZ_NAME.pattern}$"},
        "IANA time zone the windows are cut in. Default: the billing time zone.",
        "Europe/Berlin",
    ),
    "limit": Param(LIMIT.schema, "Page size (window=raw only).", 100),
    "cursor": Param(_CURSOR, "The cursor of the previous page (window=raw only)."),
}
REJECTED_PARAMS: Mapping[str, Param] = {
    "reason": Param(
        {"type": "string", "enum": [r.value for r in Reason]}, "Only records rejected for this."
    ),
    "cursor": Param(_SEQ, "The cursor of the previous page."),
    "limit": LIMIT,
}
INVOICE_LIST_PARAMS: Mapping[str, Param] = {
    "cursor": Param(_CURSOR, "The cursor of the previous page."),
    "limit": LIMIT,
}
INVOICE_SEARCH_PARAMS: Mapping[str, Param] = {
    "status": Param(
        {"type": "string", "enum": ["draft", "finalized", "void"]}, "Only invoices of this status."
    ),
    "customerId": Param({"type": "string"}, "Only this customer's (id or alias).", "acme"),
    "from": Param(FROM.schema, "Only invoices whose period ends after this. " + FROM.description),
    "to": Param(TO.schema, "Only invoices whose period starts before this. " + TO.description),
    "cursor": Param(_CURSOR, "The cursor of the previous page."),
    "limit": LIMIT,
}
INVOICE_PARAMS: Mapping[str, Param] = {
    "format": Param(
        {"type": "string", "enum": ["json", "csv", "html", "pdf"], "default": "json"},
        "json, csv (one row per line), html (a printable page) or pdf (that page as A4).",
    )
}
WALLET_PARAMS: Mapping[str, Param] = {
    "after": Param(_SEQ, "Only ledger entries after this seq (at most 1,000 are listed).")
}
CANCELLATION_PARAMS: Mapping[str, Param] = {
    "cursor": Param(_SEQ, "The cursor of the previous page."),
    "limit": LIMIT,
}
