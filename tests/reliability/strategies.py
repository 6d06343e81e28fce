"""Hypothesis generators of hostile ingest input: numbers in every grammar, timestamps in every
ISO 8601 / RFC 3339 variant, hostile text, deep metadata, REST records, Vector metric events.

Numbers are generated as JSON text (``Raw``) so that a body can carry literals no encoder would
write (``1_000``, ``NaN``, ``.5``, ``1e99999999999999999999``, Arabic-Indic digits).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from hypothesis import strategies as st

from tests.reliability.oracle import NS, Raw

# --- numbers --------------------------------------------------------------------------------

_DIGITS = st.text("0123456789", min_size=1, max_size=25)
_UNICODE_DIGITS = st.sampled_from(
    ["\u0661\u0662", "\uff11\uff12", "\u00b2", "\u2460", "\u0967", "1\u0662", "\U0001d7ce"]
)


@st.composite
def grammar_numbers(draw: st.DrawFn) -> str:
    """Text in (or near) the JSON number grammar, valid or not."""
    sign = draw(st.sampled_from(["", "", "", "-", "+"]))
    whole = draw(st.one_of(st.just("0"), _DIGITS, st.just("")))
    frac = draw(st.one_of(st.just(None), _DIGITS, st.just("")))
    exp = draw(
        st.one_of(
            st.just(None),
            st.integers(-30, 30).map(str),
            st.integers(-(10**6), 10**6).map(str),
            st.sampled_from(["+5", "-400", "99999999999999999999", "-99999999999999999999", ""]),
        )
    )
    text = sign + whole
    if frac is not None:
        text += "." + frac
    if exp is not None:
        text += draw(st.sampled_from(["e", "E"])) + exp
    return text


SPECIAL_NUMBERS = st.sampled_from(
    [
        "NaN",
        "Infinity",
        "-Infinity",
        "nan",
        "inf",
        "1_000",
        "1_0.5",
        ".5",
        "5.",
        "+5",
        "0x10",
        "1e-400",
        "1e99999999999999999999",
        "1e21",
        "-1e21",
        "999999999999999999999.999999999999999999",
        "1000000000000000000000",
        "0.000000000000000001",
        "0.0000000000000000001",
        "1.000000000000000000000",
        "00",
        "-0",
        "-0.0",
        "0e-400",
        "1E+2",
        " 5",
        "5 ",
        "",
        "-",
        "1e",
        "0.1",
        "2.5",
        "12345678901234567.89",
        "123456789012345678901234567890e-20",
        "1" * 400,
    ]
)

# a plausible valid value, so that many records in a body are good
PLAIN_VALUES = st.one_of(
    st.integers(0, 10**15).map(str),
    st.decimals(0, 10**6, places=6, allow_nan=False, allow_infinity=False).map(
        lambda d: format(d, "f")
    ),
    st.sampled_from(["0", "0.1", "1", "2.5", "1e3", "0.000001", "1234.5678"]),
)


@st.composite
def record_values(draw: st.DrawFn) -> Any:
    """``recordValue``: a literal, the same text in a string, or another JSON type."""
    text = draw(st.one_of(PLAIN_VALUES, SPECIAL_NUMBERS, grammar_numbers(), _UNICODE_DIGITS))
    how = draw(st.sampled_from(["literal", "literal", "string", "string", "other"]))
    if how == "literal":
        return Raw(text)
    if how == "string":
        return text
    return draw(
        st.sampled_from(
            [None, True, False, [], {}, [1], {"value": 1}, Raw('"\\ud800"', "json"), 7, -3]
        )
    )


# --- text -----------------------------------------------------------------------------------

HOSTILE_TEXT = st.one_of(
    st.text(max_size=20),
    st.text(st.characters(codec="utf-8", categories=["Cc"]), min_size=1, max_size=8),
    st.sampled_from(
        [
            "\x00",
            "nul\x00A",
            "nul\x00B",
            "\ud800",
            "\udc00x",
            "\ufeff",
            "\u202e",
            "e\u0301",
            "\U0001f600",
            "a" * 600,
            " ",
            "",
        ]
    ),
)


def unique_id() -> str:
    return f"r-{uuid.uuid4().hex}"


@st.composite
def record_ids(draw: st.DrawFn) -> Any:
    kind = draw(st.sampled_from(["fresh"] * 6 + ["absent", "hostile", "null", "int", "odd"]))
    if kind == "fresh":
        return unique_id()
    if kind == "absent":
        return _ABSENT
    if kind == "null":
        return None
    if kind == "int":
        # unique per example (the dedup window spans the whole run), in every magnitude
        unique = uuid.uuid4().int % 10**12
        return draw(st.sampled_from([unique, -unique, unique * 10**12, unique * 10**30]))
    if kind == "odd":
        return draw(st.sampled_from([[], {}, True, 1.5, Raw("1e400")]))
    # hostile text, made unique: an id seen in an earlier example would be a duplicate
    text = draw(HOSTILE_TEXT)
    suffix = uuid.uuid4().hex[:8]
    return draw(st.sampled_from([text + suffix, suffix + text]))


_ABSENT = object()

# --- timestamps -----------------------------------------------------------------------------


def _fmt(dt: datetime, frac_digits: int, offset: timedelta | None, t: str, z: str) -> str:
    if offset is not None:
        dt = dt.astimezone(timezone(offset))
    text = dt.strftime("%Y-%m-%d") + t + dt.strftime("%H:%M:%S")
    if frac_digits:
        text += "." + (f"{dt.microsecond:06d}" + "123456789")[:frac_digits]
    if offset is None:
        return text + z
    total = int(offset.total_seconds()) // 60
    sign = "+" if total >= 0 else "-"
    return text + f"{sign}{abs(total) // 60:02d}:{abs(total) % 60:02d}"


@st.composite
def timestamps(draw: st.DrawFn, now_ns: int) -> Any:
    """A record's timestamp: mostly RFC 3339 within the limits, and every way to get it wrong."""
    now = datetime.fromtimestamp(now_ns / NS, tz=UTC)
    kind = draw(st.sampled_from(["ok"] * 6 + ["old", "future", "iso", "other", "far"]))
    if kind in ("ok", "old", "future", "far"):
        delta = {
            "ok": st.integers(-34 * 86400, 240),
            "old": st.integers(-400 * 86400, -36 * 86400),
            "future": st.integers(600, 10 * 365 * 86400),
            "far": st.sampled_from([-(now_ns // NS) - 1, -(now_ns // NS)]),
        }[kind]
        dt = now + timedelta(seconds=draw(delta), microseconds=draw(st.integers(0, 999_999)))
        offset = draw(
            st.one_of(
                st.none(),
                st.integers(-23 * 60 - 59, 23 * 60 + 59).map(lambda m: timedelta(minutes=m)),
            )
        )
        frac = draw(st.sampled_from([0, 0, 1, 3, 6, 9, 12]))
        t = draw(st.sampled_from(["T", "T", "T", "t", " "]))
        z = draw(st.sampled_from(["Z", "Z", "Z", "z"]))
        return _fmt(dt, frac, offset, t, z)
    if kind == "iso":
        return draw(
            st.sampled_from(
                [
                    "2026-W47-1T16:29:12Z",
                    "20261129T120000Z",
                    "2026-11-29T16Z",
                    "2026-11-29T16:29Z",
                    "2026-11-29",
                    "2026-333T12:00:00Z",
                    now.strftime("%Y-%m-%dT%H:%M:%S"),
                    now.strftime("%Y-%m-%dT%H:%M:%S+0000"),
                    now.strftime("%Y-%m-%dT%H:%M:%S+00"),
                    now.strftime("%Y-%m-%dT%H:%M:%S,5Z"),
                    now.strftime("%Y-%m-%dT%H:%M:%SZ "),
                    now.strftime(" %Y-%m-%dT%H:%M:%SZ"),
                    now.strftime("%Y-%m-%dT%H:%M:60Z"),
                    now.strftime("%Y-%m-%dT24:00:00Z"),
                    now.strftime("%Y-02-30T00:00:00Z"),
                    now.strftime("%Y-%m-%dT%H:%M:%S+24:00"),
                    now.strftime("%Y-%m-%dT%H:%M:%S.Z"),
                    "\u0662\u0660\u0662\u0666-05-01T12:00:00Z",
                    now.strftime("%Y-%m-%dT%H:%M:%S.") + "1" * 40 + "Z",
                    "0000-01-01T00:00:00Z",
                    "9999-12-31T23:59:59Z",
                    "+002026-05-01T12:00:00Z",
                ]
            )
        )
    return draw(
        st.one_of(
            st.sampled_from([None, 1777636800, 1777636800000, True, [], {}, "", "now"]),
            HOSTILE_TEXT,
        )
    )


# --- metadata -------------------------------------------------------------------------------

_LEAF = st.one_of(
    HOSTILE_TEXT,
    st.integers(-(2**80), 2**80),
    st.booleans(),
    st.none(),
    st.sampled_from(["1e400", "0.1", "123456789012345678901234567890", "-0"]).map(Raw),
)


def deep_object(depth: int) -> Raw:
    """``{"a":{"a":...1...}}``, ``depth`` objects deep, as JSON text (no recursion to build)."""
    return Raw('{"a":' * depth + "1" + "}" * depth, "json")


@st.composite
def metadata(draw: st.DrawFn) -> Any:
    kind = draw(st.sampled_from(["small"] * 5 + ["absent", "deep", "wide", "odd", "huge"]))
    if kind == "absent":
        return _ABSENT
    if kind == "deep":
        return deep_object(
            draw(st.sampled_from([2, 11, 64, 252, 253, 254, 255, 256, 600, 1023, 1100]))
        )
    if kind == "wide":
        return {"items": [i % 10 for i in range(draw(st.integers(0, 3000)))]}
    if kind == "huge":
        return {"blob": "x" * draw(st.sampled_from([16 * 1024, 100_000, 1_000_000]))}
    if kind == "odd":
        return draw(st.sampled_from([None, [], "text", 5, Raw("[1,2]", "json"), True]))
    return draw(
        st.recursive(
            st.dictionaries(st.text(max_size=8), _LEAF, max_size=4),
            lambda inner: st.dictionaries(
                st.text(max_size=8),
                st.one_of(_LEAF, inner, st.lists(inner, max_size=3)),
                max_size=3,
            ),
            max_leaves=12,
        )
    )


# --- records --------------------------------------------------------------------------------


@st.composite
def records(draw: st.DrawFn, customer: str, alias: str, now_ns: int) -> dict[str, Any]:
    """A REST (or Logstash) record with a generated value for every field."""
    rec: dict[str, Any] = {}
    rid = draw(record_ids())
    if rid is not _ABSENT:
        rec["id"] = rid
    ts = draw(timestamps(now_ns))
    where = draw(st.sampled_from(["timestamp"] * 4 + ["@timestamp", "both", "none", "null"]))
    if where == "timestamp":
        rec["timestamp"] = ts
    elif where == "@timestamp":
        rec["@timestamp"] = ts
        rec["@version"] = "1"
        rec["host"] = draw(st.sampled_from([{"hostname": "web-1"}, "web-1"]))
    elif where == "both":
        rec["timestamp"] = ts
        rec["@timestamp"] = draw(timestamps(now_ns))
    elif where == "null":
        rec["timestamp"] = None
        rec["@timestamp"] = ts
    rec["customerId"] = draw(
        st.one_of(
            st.sampled_from([customer] * 6 + [alias, alias]),
            st.sampled_from([customer.upper(), customer + " ", "", None, 5, [customer]]),
            HOSTILE_TEXT.map(lambda t: "nobody-" + t),
        )
    )
    rec["dimensionId"] = draw(
        st.one_of(
            st.sampled_from(["data-processed"] * 5 + ["storage"] * 2),
            st.sampled_from(["Data-Processed", "nope", "", None, 1, "data-processed\x00"]),
        )
    )
    if draw(st.integers(0, 19)):
        rec["recordValue"] = draw(record_values())
    meta = draw(metadata())
    if meta is not _ABSENT:
        rec["metadata"] = meta
    if draw(st.booleans()):
        rec["message"] = draw(HOSTILE_TEXT)  # envelope fields are ignored
    # shuffle key order: the gateway must not depend on it
    keys = draw(st.permutations(list(rec)))
    return {k: rec[k] for k in keys}


@st.composite
def vector_events(draw: st.DrawFn, tenants: tuple[str, str, str], now_ns: int) -> dict[str, Any]:
    """A Vector metric event (JSON codec) with hostile tags. Incremental counters name the
    first or second tenant (the test customer, its alias); absolute counters and gauges, whose
    stored amounts depend on earlier totals, name the third (a customer of their own)."""
    kind = draw(st.sampled_from(["incremental"] * 3 + ["absolute"]))
    value_kind = draw(st.sampled_from(["counter"] * 3 + ["gauge"]))
    plain = kind == "incremental" and value_kind == "counter"
    tenant = draw(st.sampled_from(tenants[:2])) if plain else tenants[2]
    tags: Any = {"tenant": tenant, "seq": uuid.uuid4().hex}
    for _ in range(draw(st.integers(0, 4))):
        tags[draw(HOSTILE_TEXT)] = draw(
            st.one_of(HOSTILE_TEXT, st.sampled_from([None, 1, 1.5, True, [], {"a": "b"}]))
        )
    if draw(st.integers(0, 9)) == 0:
        tags = draw(st.sampled_from([None, [], "tenant", 5]))
    value: Any = draw(st.one_of(PLAIN_VALUES.map(Raw), record_values()))
    ev: dict[str, Any] = {
        "name": "fuzz_requests",
        "tags": tags,
        "kind": kind,
        value_kind: {"value": value},
    }
    if draw(st.integers(0, 3)):
        ev["timestamp"] = draw(timestamps(now_ns))
    if draw(st.booleans()):
        ev["namespace"] = draw(st.sampled_from(["app", "", None]))
    return ev


ABSENT = _ABSENT
