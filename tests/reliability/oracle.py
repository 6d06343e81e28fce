"""A reference oracle for ingest, written from SPEC §1 and §4, independent of the gateway's code.

``judge_record`` says of one REST record whether the gateway must store it (``VALID``), must
reject it (``INVALID``) or may do either (``EITHER``: cases SPEC leaves open, such as an id with
a NUL or metadata nested 300 deep — if such a record is accepted it must read back unaltered).
A valid record's expected value, timestamp and id are what it must read back as.

The number grammar is JSON's, in ASCII; the same grammar inside a string. The time grammar is
RFC 3339 §5.6 (``date-time``).
"""

from __future__ import annotations

import calendar
import json
import re
import sys
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from enum import Enum
from typing import Any

NS = 1_000_000_000
LATE_NS = 35 * 86400 * NS  # SPEC §4 default late-arrival limit
FUTURE_NS = 5 * 60 * NS  # and future tolerance
MAX_ABS_EXP = 21  # |v| < 1e21
MAX_PLACES = 18
MAX_ID = 512  # longer ids: the gateway may refuse them (a limit SPEC leaves open)
SHALLOW_METADATA = 10  # metadata this deep and this small must be accepted
SMALL_METADATA = 8 * 1024

_NUMBER = re.compile(r"(-?)(0|[1-9][0-9]*)(?:\.([0-9]+))?(?:[eE]([+-]?[0-9]+))?")
_RFC3339 = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})([Tt ])([0-9]{2}):([0-9]{2}):([0-9]{2})"
    r"(?:\.([0-9]+))?([Zz]|[+-][0-9]{2}:[0-9]{2})"
)


class Verdict(Enum):
    VALID = "valid"
    INVALID = "invalid"
    EITHER = "either"

    def __and__(self, other: Verdict) -> Verdict:
        if Verdict.INVALID in (self, other):
            return Verdict.INVALID
        if Verdict.EITHER in (self, other):
            return Verdict.EITHER
        return Verdict.VALID


@dataclass(frozen=True)
class Raw:
    """JSON text put into a body verbatim (a number literal, a malformed token, deep nesting).

    ``kind`` is ``number`` (judged by the JSON number grammar) or ``json`` (any JSON text;
    ``valid`` says whether it parses as JSON)."""

    text: str
    kind: str = "number"
    valid_json: bool = True

    @property
    def valid(self) -> bool:
        if self.kind == "number":  # JSON allows whitespace around a token
            return _NUMBER.fullmatch(self.text.strip(" \t\r\n")) is not None
        return self.valid_json


def dumps(v: Any, ascii_only: bool = True) -> str:
    """JSON text of ``v`` with ``Raw`` parts verbatim (never a newline outside strings)."""
    if isinstance(v, Raw):
        return v.text
    if isinstance(v, dict):
        return (
            "{"
            + ",".join(_s(k, ascii_only) + ":" + dumps(x, ascii_only) for k, x in v.items())
            + "}"
        )
    if isinstance(v, list):
        return "[" + ",".join(dumps(x, ascii_only) for x in v) + "]"
    if isinstance(v, str):
        return _s(v, ascii_only)
    return json.dumps(v)


def _s(text: str, ascii_only: bool) -> str:
    # A lone surrogate can only travel as an escape: keep the body valid UTF-8.
    return json.dumps(text, ensure_ascii=ascii_only or not _is_unicode(text))


def well_formed(v: Any) -> bool:
    """Whether the JSON text of ``v`` is valid JSON (every Raw part valid)."""
    if isinstance(v, Raw):
        return v.valid
    if isinstance(v, dict):
        return all(well_formed(x) for x in v.values())
    if isinstance(v, list):
        return all(well_formed(x) for x in v)
    return True


@contextmanager
def deep_recursion(limit: int = 20_000) -> Iterator[None]:
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, limit))
    try:
        yield
    finally:
        sys.setrecursionlimit(old)


def value_of(v: Any) -> Any:
    """The JSON value ``v`` denotes (numbers as Decimal), as a reader of the body sees it."""
    if isinstance(v, Raw):
        if v.kind == "number":
            return ("number", v.text)
        with deep_recursion():
            return normalize_json(json.loads(v.text, parse_float=Decimal))
    if isinstance(v, dict):
        return {k: value_of(x) for k, x in v.items()}
    if isinstance(v, list):
        return [value_of(x) for x in v]
    return normalize_json(v)


def normalize_json(v: Any) -> Any:
    """Numbers as ('number', Decimal text) so that 1, 1.0 and "1" stored for 1 compare equal."""
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, int | float | Decimal):
        return ("number", str(v))
    if isinstance(v, dict):
        return {k: normalize_json(x) for k, x in v.items()}
    if isinstance(v, list):
        return [normalize_json(x) for x in v]
    raise TypeError(type(v))


def same_json(sent: Any, stored: Any) -> bool:
    """Metadata read back equals metadata sent; a number may come back as the same number or
    as its exact decimal text (big integers and long decimals are kept as text)."""
    if isinstance(sent, tuple):
        want = _decimal_text(sent[1])
        if want is None:
            return False
        got: Decimal | None
        if isinstance(stored, tuple):
            got = _decimal_text(stored[1])
        elif isinstance(stored, str):
            got = _decimal_text(stored)
        else:
            return False
        return got is not None and got == want
    if isinstance(sent, dict):
        return (
            isinstance(stored, dict)
            and sent.keys() == stored.keys()
            and all(same_json(sent[k], stored[k]) for k in sent)
        )
    if isinstance(sent, list):
        return (
            isinstance(stored, list)
            and len(sent) == len(stored)
            and all(same_json(a, b) for a, b in zip(sent, stored, strict=True))
        )
    return type(sent) is type(stored) and sent == stored


def _decimal_text(text: str) -> Decimal | None:
    try:
        return Decimal(text)
    except ArithmeticError:
        return None


# --- values ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Judged:
    verdict: Verdict
    value: Decimal | None = None  # what a valid value reads back as
    why: str = ""


def judge_number_text(text: str, negative_ok: bool) -> Judged:
    """A value written in the JSON number grammar (as a literal or inside a string)."""
    m = _NUMBER.fullmatch(text)
    if m is None:
        return Judged(Verdict.INVALID, why="not JSON number grammar")
    sign, whole, frac, exp_text = m.groups()
    frac = frac or ""
    exp = int(exp_text or "0")
    digits = (whole + frac).lstrip("0")
    if not digits:
        # exactly zero, however written; "0e-400" is still 0 (nothing rounds)
        return Judged(Verdict.VALID if abs(exp) <= 400 else Verdict.EITHER, Decimal(0))
    point = exp - len(frac)  # value = int(whole+frac) × 10^point
    stripped = digits.rstrip("0")
    last_place = point + (len(digits) - len(stripped))  # exponent of the last nonzero digit
    lead = point + len(digits) - 1  # exponent of the leading nonzero digit
    if lead >= MAX_ABS_EXP:
        return Judged(Verdict.INVALID, why="|v| >= 1e21")
    if last_place < -MAX_PLACES:
        return Judged(Verdict.INVALID, why="more than 18 decimal places")
    value = Decimal(f"{sign}{stripped}E{last_place}")
    if value < 0 and not negative_ok:
        return Judged(Verdict.INVALID, why="negative")
    return Judged(Verdict.VALID, value)


def judge_value(raw: Any, negative_ok: bool) -> Judged:
    """``recordValue`` as sent (a Raw literal or a JSON value)."""
    if isinstance(raw, Raw):
        if raw.kind != "number":
            return Judged(Verdict.INVALID, why="not a number")
        return judge_number_text(raw.text.strip(" \t\r\n"), negative_ok)
    if isinstance(raw, bool):
        return Judged(Verdict.INVALID, why="boolean")
    if isinstance(raw, int):
        return judge_number_text(str(raw), negative_ok)
    if isinstance(raw, str):
        return judge_number_text(raw, negative_ok)
    return Judged(Verdict.INVALID, why=f"not a number: {type(raw).__name__}")


# --- timestamps -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Time:
    verdict: Verdict
    ns: int | None = None
    why: str = ""
    exact: bool = True  # False: if accepted, the stored time may differ (a leap second)


def parse_rfc3339(text: str) -> Time:
    """RFC 3339 ``date-time`` → ns; lower-case t/z, a leap second and more than 9 fraction
    digits are legal RFC 3339 the gateway may still refuse (EITHER)."""
    m = _RFC3339.fullmatch(text)
    if m is None:
        return Time(Verdict.INVALID, why="not RFC 3339")
    y, mo, d, t, hh, mm, ss, frac, off = m.groups()
    year, month, day, hour, minute, second = map(int, (y, mo, d, hh, mm, ss))
    verdict = Verdict.VALID
    exact = True
    if not 1 <= month <= 12 or not 1 <= day <= calendar.monthrange(max(year, 1), month)[1]:
        return Time(Verdict.INVALID, why="no such date")
    if year == 0:
        return Time(Verdict.INVALID, why="year 0000")
    if hour > 23 or minute > 59 or second > 60:
        return Time(Verdict.INVALID, why="no such time")
    if second == 60:
        verdict, second, exact = Verdict.EITHER, 59, False
    if t in ("t", " ") or off == "z":
        verdict = verdict & Verdict.EITHER
    frac = frac or ""
    if len(frac) > 9:
        verdict = verdict & Verdict.EITHER
    offset_s = 0
    if off not in ("Z", "z"):
        oh, om = int(off[1:3]), int(off[4:6])
        if oh > 23 or om > 59:
            return Time(Verdict.INVALID, why="no such offset")
        offset_s = (oh * 3600 + om * 60) * (1 if off[0] == "+" else -1)
    days = _days_from_civil(year, month, day)
    seconds = days * 86400 + hour * 3600 + minute * 60 + second - offset_s
    ns = seconds * NS + int(frac[:9].ljust(9, "0"))
    return Time(verdict, ns, exact=exact)


def _days_from_civil(y: int, m: int, d: int) -> int:
    y -= m <= 2
    era = y // 400
    yoe = y - era * 400
    doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def judge_time(raw: Any, now_ns: int, margin_ns: int = 60 * NS) -> Time:
    """A record's timestamp: RFC 3339 and within the late/future limits. Within ``margin_ns``
    of a limit the answer depends on the exact moment the gateway reads its clock: EITHER."""
    if not isinstance(raw, str):
        return Time(Verdict.INVALID, why="not a string")
    t = parse_rfc3339(raw)
    if t.ns is None:
        return t
    lo, hi = now_ns - LATE_NS, now_ns + FUTURE_NS
    if t.ns < lo - margin_ns or t.ns > hi + margin_ns:
        return Time(Verdict.INVALID, t.ns, "outside the late/future limits")
    if t.ns < lo + margin_ns or t.ns > hi - margin_ns:
        return Time(t.verdict & Verdict.EITHER, t.ns, "at a limit", t.exact)
    return t


# --- ids, metadata, records ------------------------------------------------------------------


def _is_unicode(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def plain_text(text: str) -> bool:
    """Text every store keeps as is: valid Unicode, no control or unassigned characters."""
    return _is_unicode(text) and not any(
        unicodedata.category(c) in ("Cc", "Cs", "Cn", "Co") for c in text
    )


def judge_id(item: dict[str, Any]) -> tuple[Verdict, str | None]:
    if "id" not in item:
        return Verdict.VALID, None
    rid = item["id"]
    if isinstance(rid, Raw):
        return Verdict.INVALID if not rid.valid else Verdict.EITHER, None
    if rid is None:
        return Verdict.EITHER, None  # "id": null — absent, or refused
    if isinstance(rid, int) and not isinstance(rid, bool):
        return Verdict.EITHER, str(rid)
    if not isinstance(rid, str):
        return Verdict.INVALID, None
    if not rid or len(rid) > MAX_ID or not plain_text(rid) or rid != rid.strip():
        return Verdict.EITHER, rid
    return Verdict.VALID, rid


def _depth(v: Any) -> int:
    if isinstance(v, Raw):
        return 10_000 if v.kind == "json" else 0
    if isinstance(v, dict):
        return 1 + max((_depth(x) for x in v.values()), default=0)
    if isinstance(v, list):
        return 1 + max((_depth(x) for x in v), default=0)
    return 0


def _texts(v: Any) -> Iterator[str]:
    if isinstance(v, str):
        yield v
    elif isinstance(v, dict):
        for k, x in v.items():
            yield k
            yield from _texts(x)
    elif isinstance(v, list):
        for x in v:
            yield from _texts(x)


def judge_metadata(item: dict[str, Any]) -> Verdict:
    if "metadata" not in item or item["metadata"] is None:
        return Verdict.VALID
    meta = item["metadata"]
    if isinstance(meta, Raw):
        if meta.kind == "json" and meta.valid and meta.text.startswith("{"):
            return Verdict.EITHER  # deep or huge: a limit SPEC leaves to the gateway
        return Verdict.INVALID
    if not isinstance(meta, dict):
        return Verdict.INVALID
    verdict = Verdict.VALID
    if _depth(meta) > SHALLOW_METADATA or len(dumps(meta)) > SMALL_METADATA:
        verdict = Verdict.EITHER
    if any(isinstance(x, Raw) and x.kind == "number" for x in _leaves(meta)):
        # long or huge numbers in metadata: kept as exact text, or refused
        verdict = verdict & Verdict.EITHER
    if not all(plain_text(t) for t in _texts(meta)):
        verdict = verdict & Verdict.EITHER
    return verdict


def _leaves(v: Any) -> Iterator[Any]:
    if isinstance(v, dict):
        for x in v.values():
            yield from _leaves(x)
    elif isinstance(v, list):
        for x in v:
            yield from _leaves(x)
    else:
        yield v


@dataclass(frozen=True)
class Catalog:
    """What the oracle knows: the test customer (and its alias) and the dimensions."""

    customer: str
    aliases: tuple[str, ...]
    dimensions: dict[str, str] = field(
        default_factory=lambda: {"data-processed": "sum", "storage": "weighted_sum"}
    )


@dataclass(frozen=True)
class Expected:
    """One record as it must read back (if stored)."""

    id: str | None
    dimension: str
    timestamp_ns: int | None  # None: any time (stamped at receipt, or a leap second)
    value: Decimal
    metadata: Any  # normalized (see value_of), None, or ANY (not compared)


@dataclass(frozen=True)
class RecordJudgement:
    verdict: Verdict
    expected: Expected | None
    why: str


def judge_record(item: Any, catalog: Catalog, now_ns: int) -> RecordJudgement:
    """A REST record (an item of a body that parsed as JSON)."""
    if not isinstance(item, dict):
        return RecordJudgement(Verdict.INVALID, None, "not an object")
    customer = item.get("customerId")
    if not isinstance(customer, str) or customer not in (catalog.customer, *catalog.aliases):
        return RecordJudgement(Verdict.INVALID, None, "unknown customer")
    dimension = item.get("dimensionId")
    if not isinstance(dimension, str) or dimension not in catalog.dimensions:
        return RecordJudgement(Verdict.INVALID, None, "unknown dimension")
    if "recordValue" not in item:
        return RecordJudgement(Verdict.INVALID, None, "no recordValue")
    value = judge_value(item["recordValue"], catalog.dimensions[dimension] == "weighted_sum")
    if "timestamp" in item:
        when = judge_time(item["timestamp"], now_ns)
        if item["timestamp"] is None and "@timestamp" in item:
            alt = judge_time(item["@timestamp"], now_ns)
            when = Time(alt.verdict & Verdict.EITHER, alt.ns, "null timestamp beside @timestamp")
    elif "@timestamp" in item:
        when = judge_time(item["@timestamp"], now_ns)
    else:
        return RecordJudgement(Verdict.INVALID, None, "no timestamp")
    id_verdict, rid = judge_id(item)
    verdict = value.verdict & when.verdict & id_verdict & judge_metadata(item)
    why = ", ".join(w for w in (value.why, when.why) if w)
    if verdict is Verdict.INVALID:
        return RecordJudgement(verdict, None, why)
    assert value.value is not None
    assert when.ns is not None
    meta = item.get("metadata")
    expected = Expected(
        rid,
        dimension,
        when.ns if when.exact else None,
        value.value,
        None if meta is None or meta == {} else value_of(meta),
    )
    return RecordJudgement(verdict, expected, why)


ANY = object()


def judge_vector_increment(event: dict[str, Any], catalog: Catalog, now_ns: int) -> RecordJudgement:
    """A Vector ``incremental`` ``counter`` event: an amount for the customer its ``tenant``
    tag names (the fuzz config's rule for ``fuzz_requests``)."""
    tags = event.get("tags")
    if not isinstance(tags, dict):
        return RecordJudgement(Verdict.INVALID, None, "no tags object")
    tenant = tags.get("tenant")
    if not isinstance(tenant, str) or tenant not in (catalog.customer, *catalog.aliases):
        return RecordJudgement(Verdict.INVALID, None, "tenant tag is not the customer")
    counter = event.get("counter")
    if not isinstance(counter, dict) or "value" not in counter:
        return RecordJudgement(Verdict.INVALID, None, "no counter value")
    value = judge_value(counter["value"], negative_ok=False)
    verdict = value.verdict
    ts: int | None = None
    if "timestamp" in event:
        when = judge_time(event["timestamp"], now_ns)
        verdict = verdict & when.verdict
        ts = when.ns if when.exact else None
    texts = [t for k, v in tags.items() for t in (k, v) if isinstance(t, str)]
    if not all(plain_text(t) for t in texts) or not well_formed(tags):
        verdict = verdict & Verdict.EITHER
    if verdict is Verdict.INVALID:
        return RecordJudgement(verdict, None, value.why)
    assert value.value is not None
    return RecordJudgement(
        verdict, Expected(None, "data-processed", ts, value.value, ANY), value.why
    )
