"""Hostile REST ingest (``POST /v1/usage`` and ``/usage``) against a running gateway.

Each example posts one generated body for a customer of its own and checks, against the oracle
of ``tests/reliability/oracle.py``: no 5xx; the per-record answer (a valid record is accepted, an
invalid one rejected with an error); the customer's stored records are exactly the accepted
ones, read back unaltered (``window=raw``) — none lost, none doubled, nothing forbidden; the
windows' total equals the sum of the raw values; sending the records again adds nothing; and a
valid record right after is accepted (no wedge).
"""

from __future__ import annotations

import gzip
import json
import time
import zlib
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import cramjam
import httpx
import pytest
import zstandard
from hypothesis import given
from hypothesis import strategies as st

from tests.gatewayproc import INGEST_KEY, GatewayProcess
from tests.reliability.fuzzing import (
    Tally,
    assert_windows_match_raw,
    fresh_customer,
    fuzz_settings,
    gateway_alive,
    json_error,
    probe,
    raw_records,
)
from tests.reliability.oracle import (
    ANY,
    Catalog,
    Expected,
    Raw,
    RecordJudgement,
    Verdict,
    deep_recursion,
    dumps,
    judge_number_text,
    judge_record,
    judge_vector_increment,
    normalize_json,
    parse_rfc3339,
    same_json,
    well_formed,
)
from tests.reliability.strategies import deep_object, records, vector_events

NDJSON_TYPES = ["application/x-ndjson", "application/ndjson", "text/plain", None]
JSON_TYPES = ["application/json", "application/json; charset=utf-8", "APPLICATION/JSON", None]


@pytest.fixture(scope="module")
def ingest(fuzz_gateway: GatewayProcess) -> Any:
    with httpx.Client(
        base_url=fuzz_gateway.url, headers={"Authorization": f"Bearer {INGEST_KEY}"}, timeout=60
    ) as c:
        yield c


@pytest.fixture(scope="module")
def probe_customer(admin: httpx.Client) -> str:
    return fresh_customer(admin, "probe")[0]


# --- bodies ---------------------------------------------------------------------------------


@dataclass
class Item:
    text: str  # the item's JSON text (one NDJSON line)
    judged: RecordJudgement
    malformed: bool = False  # the item's text is not JSON
    running_total: bool = False  # a Vector absolute counter: its first point is a baseline


def compress(body: bytes, encoding: str | None) -> bytes:
    if encoding in (None, "identity"):
        return body
    if encoding == "gzip":
        return gzip.compress(body)
    if encoding == "deflate":
        return zlib.compress(body)
    if encoding == "zstd":
        return zstandard.ZstdCompressor().compress(body)
    if encoding == "snappy":
        return bytes(cramjam.snappy.compress_raw(body))
    raise ValueError(encoding)


def _judge_line(text: str, catalog: Catalog, now_ns: int) -> RecordJudgement:
    """A line that is not one of the generated records: judged as any JSON would be."""
    try:
        with deep_recursion():
            doc = json.loads(text, parse_constant=_no_constant)
    except ValueError:
        return RecordJudgement(Verdict.INVALID, None, "not JSON")
    return judge_record(doc, catalog, now_ns)


def _malformed(text: str) -> bool:
    try:
        with deep_recursion():
            json.loads(text, parse_constant=_no_constant)
    except ValueError:
        return True
    return False


def _no_constant(name: str) -> Any:
    raise ValueError(name)


GARBAGE_LINES = st.sampled_from(
    [
        "not json",
        "[1,2]",
        '"text"',
        "42",
        "null",
        '{"a":',
        "{}",
        '{"customerId":"x"}',
        "{'single': 'quotes'}",
        '{"a":1}}',
        "\x00\x01",
        '{"recordValue": NaN}',
        "[" * 1000 + "]" * 1000,
        '{"a":' * 1000 + "1" + "}" * 1000,
    ]
)


@st.composite
def bodies(draw: st.DrawFn, catalog: Catalog, other: str, now_ns: int) -> dict[str, Any]:
    """A body of records, Vector events, garbage lines and exact duplicates, framed as one
    object, a JSON array or NDJSON, maybe compressed."""
    framing = draw(st.sampled_from(["array", "array", "ndjson", "ndjson", "single"]))
    n = 1 if framing == "single" else draw(st.integers(1, 12))
    ascii_only = draw(st.booleans())
    items: list[Item] = []
    tenants = (catalog.customer, catalog.aliases[0], other)
    for _ in range(n):
        kind = draw(st.sampled_from(["record"] * 6 + ["vector", "garbage", "dup"]))
        if kind == "dup" and items:
            src = draw(st.integers(0, len(items) - 1))
            items.append(items[src])
            continue
        if kind == "garbage" and framing == "ndjson":
            text = draw(GARBAGE_LINES)
            items.append(Item(text, _judge_line(text, catalog, now_ns), _malformed(text)))
            continue
        if kind == "vector":
            ev = draw(vector_events(tenants, now_ns))
            judged = (
                judge_vector_increment(ev, catalog, now_ns)
                if ev["tags"] is not None
                and isinstance(ev["tags"], dict)
                and ev["tags"].get("tenant") != other
                else RecordJudgement(Verdict.EITHER, None, "another customer's")
            )
            if not well_formed(ev):
                judged = RecordJudgement(Verdict.INVALID, None, "malformed JSON")
            # only an absolute counter is a running total; a gauge of either kind is a level,
            # a sample with an identity (series, time, value) like an incremental counter's
            total = ev["kind"] == "absolute" and "counter" in ev
            items.append(Item(dumps(ev, ascii_only), judged, not well_formed(ev), total))
            continue
        rec = draw(records(catalog.customer, catalog.aliases[0], now_ns))
        judged = judge_record(rec, catalog, now_ns)
        if not well_formed(rec):
            judged = RecordJudgement(Verdict.INVALID, None, "malformed JSON")
        items.append(Item(dumps(rec, ascii_only), judged, not well_formed(rec)))
    if framing == "array":
        text = "[" + ",".join(i.text for i in items) + "]"
        ctype = draw(st.sampled_from(JSON_TYPES))
    elif framing == "single":
        text = items[0].text
        ctype = draw(st.sampled_from(JSON_TYPES))
    else:
        text = "\n".join(i.text for i in items) + draw(st.sampled_from(["", "\n"]))
        ctype = draw(st.sampled_from(NDJSON_TYPES))
        if ctype is None and (len(items) == 1 or not items[0].text.startswith("{")):
            # with no type, the body is sniffed: one line is one object, "[" an array
            ctype = "application/x-ndjson"
    encoding = draw(st.sampled_from([None] * 4 + ["identity", "gzip", "deflate", "zstd", "snappy"]))
    return {
        "framing": framing,
        "items": items,
        "body": text.encode(),
        "content_type": ctype,
        "encoding": encoding,
        "path": draw(st.sampled_from(["/v1/usage", "/v1/usage", "/usage"])),
    }


# --- checking what was stored ---------------------------------------------------------------


def _matches(exp: Expected, row: dict[str, Any]) -> bool:
    if row.get("id") != exp.id or row.get("dimensionId") != exp.dimension:
        return False
    if Decimal(row["recordValue"]) != exp.value:
        return False
    if exp.timestamp_ns is not None and parse_rfc3339(row["timestamp"]).ns != exp.timestamp_ns:
        return False
    if exp.metadata is ANY:
        return True
    stored = row.get("metadata")
    if exp.metadata is None:
        return stored in (None, {})
    return same_json(exp.metadata, normalize_json(stored))


def assert_stored_exactly(rows: list[dict[str, Any]], expected: list[Expected]) -> None:
    """The stored rows are the expected records, one each: nothing lost, doubled or altered."""
    # the most specific expectations first: one with a time (or metadata) of its own must not
    # lose its row to one that takes any time or any metadata
    left = sorted(expected, key=lambda e: (e.timestamp_ns is None, e.metadata is ANY))
    unexpected = []
    for row in rows:
        for i, exp in enumerate(left):
            if _matches(exp, row):
                del left[i]
                break
        else:
            unexpected.append(row)
    assert not unexpected, f"stored but not sent as valid (or altered): {_short(unexpected)}"
    assert not left, f"sent as valid but not stored as sent: {_short(left)}"


def assert_allowed(rows: list[dict[str, Any]]) -> None:
    """Whatever a customer holds is a value the contract allows."""
    for row in rows:
        text = row["recordValue"]
        j = judge_number_text(text, negative_ok=True)
        assert j.verdict is Verdict.VALID, f"stored a forbidden value {text!r} ({j.why}): {row}"


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) < 3000 else text[:3000] + "..."


def post(
    ingest: httpx.Client,
    path: str,
    body: bytes,
    content_type: str | None,
    encoding: str | None,
) -> httpx.Response:
    headers = {}
    if content_type is not None:
        headers["Content-Type"] = content_type
    if encoding is not None:
        headers["Content-Encoding"] = encoding
    try:
        return ingest.post(path, content=compress(body, encoding), headers=headers)
    except httpx.TransportError as exc:
        raise AssertionError(f"connection failed: {exc!r}") from None


# --- the tests ------------------------------------------------------------------------------


@fuzz_settings(300)
@given(data=st.data())
def test_hostile_records_store_exactly_the_valid_ones(
    data: st.DataObject,
    fuzz_gateway: GatewayProcess,
    admin: httpx.Client,
    ingest: httpx.Client,
    probe_customer: str,
    tally: Tally,
) -> None:
    customer, alias = fresh_customer(admin)
    other, _ = fresh_customer(admin)
    catalog = Catalog(customer, (alias,))
    now_ns = time.time_ns()
    b = data.draw(bodies(catalog, other, now_ns), label="body")
    items: list[Item] = b["items"]
    r = post(ingest, b["path"], b["body"], b["content_type"], b["encoding"])
    tally.add("rest", r.status_code)
    assert r.status_code < 500, f"{r.status_code}: {r.text[:500]}"

    malformed = [i for i in items if i.malformed]
    # An element nested past what a JSON parser follows is rejected alone (the rest of the
    # array is stored, SPEC §4) without its syntax being read further: when every malformed
    # item is that deep, the gateway may answer either way.
    deep_only = bool(malformed) and all(_nesting(i.text) > DEEP_ENOUGH for i in malformed)
    if b["framing"] != "ndjson" and malformed and not (deep_only and r.status_code == 200):
        # the body as a whole is not JSON: refused whole, nothing stored
        assert 400 <= r.status_code < 500, r.text[:500]
        json_error(r)
        accepted_items: list[int] = []
    else:
        if b["framing"] == "single":
            v = items[0].judged.verdict
            allowed = {Verdict.VALID: {200}, Verdict.INVALID: {400, 422}}.get(v, {200, 400, 422})
        else:
            allowed = {200}  # Vector and Logstash drop a whole batch on any other answer
        assert r.status_code in allowed, f"{r.status_code}: {r.text[:1000]}"
        out = r.json()
        if b["framing"] == "single" and r.status_code != 200 and "errors" not in out:
            json_error(r)  # a lone record refused with a plain error
            out = {"accepted": 0, "duplicates": 0, "rejected": 1, "errors": [{"index": 0, **out}]}
        rejected = {e["index"] for e in out["errors"]}
        for e in out["errors"]:
            assert isinstance(e.get("error"), str), e
            assert e["error"], e
        accepted_items = []
        seen_ids: set[str] = set()
        n_dups = 0
        for i, item in enumerate(items):
            v = item.judged.verdict
            if v is Verdict.VALID:
                assert i not in rejected, (
                    f"item {i} is valid but was rejected: {out['errors']}\n{item.text[:500]}"
                )
            elif v is Verdict.INVALID:
                assert i in rejected, (
                    f"item {i} is invalid ({item.judged.why}) but was accepted:\n{item.text[:500]}"
                )
            if i in rejected:
                continue
            exp = item.judged.expected
            # A record's id, or a Vector event's sample identity (series, time and value: the
            # same event sent twice is one sample, README "Vector metric events").
            # A running total (an absolute counter) sent again is a repeat of its series'
            # state, which adds nothing and is no duplicate: it has no identity here.
            key = exp.id if exp is not None and exp.id is not None else None
            if key is None and item.text.startswith('{"name"') and not item.running_total:
                event = json.loads(item.text)
                if event.get("timestamp") is not None:  # events stamped at receipt: no identity
                    key = "vector:" + item.text
            if key is not None:
                if key in seen_ids:
                    n_dups += 1
                    continue
                seen_ids.add(key)
            accepted_items.append(i)
        # every item is counted once, but for running totals whose first point is a baseline
        counted = out["accepted"] + out["duplicates"] + out["rejected"]
        assert len(items) - sum(i.running_total for i in items) <= counted <= len(items), out
        assert out["rejected"] == len(rejected), out
        assert out["duplicates"] == n_dups, out

    expected = [e for i in accepted_items if (e := items[i].judged.expected) is not None]
    rows = raw_records(admin, customer)
    assert_stored_exactly(rows, expected)
    assert_allowed(rows)
    assert_allowed(raw_records(admin, other))
    assert_windows_match_raw(admin, customer, rows, "data-processed")

    # sent again, the records with ids add nothing
    again = [items[i].text for i in accepted_items if (e := items[i].judged.expected) and e.id]
    if again:
        r2 = post(ingest, "/v1/usage", ("[" + ",".join(again) + "]").encode(), None, None)
        assert r2.status_code == 200, r2.text[:500]
        assert r2.json()["accepted"] == 0, r2.text[:500]
        assert len(raw_records(admin, customer)) == len(rows)

    gateway_alive(fuzz_gateway)
    probe(fuzz_gateway, admin, probe_customer)


@st.composite
def corrupted(draw: st.DrawFn, body: bytes) -> tuple[bytes, str | None, str]:
    """A body damaged in transit: truncated, bytes flipped, or a Content-Encoding that lies."""
    encoding = draw(
        st.sampled_from([None, "gzip", "deflate", "zstd", "snappy", "br", "gzip, zstd"])
    )
    try:
        data = compress(body, encoding)
    except ValueError:
        data = body
    how = draw(st.sampled_from(["truncate", "flip", "insert", "plain-but-labelled", "empty"]))

    # positions are drawn as fractions of the length: the body's length varies between runs
    # (its compressed form depends on the customer id), the same draw must mean the same place
    def at(lo: int, hi: int) -> int:
        return lo + draw(st.integers(0, 999_999)) * (hi - lo + 1) // 1_000_000

    if how == "truncate" and len(data) > 1:
        data = data[: at(1, len(data) - 1)]
    elif how == "flip":
        for _ in range(draw(st.integers(1, 4))):
            pos = at(0, len(data) - 1)
            data = data[:pos] + bytes([data[pos] ^ draw(st.integers(1, 255))]) + data[pos + 1 :]
    elif how == "insert":
        pos = at(0, len(data))
        data = data[:pos] + draw(st.binary(min_size=1, max_size=16)) + data[pos:]
    elif how == "plain-but-labelled":
        data = body
        encoding = encoding or "gzip"
    else:
        data = b""
    return data, encoding, how


@fuzz_settings(80)
@given(data=st.data())
def test_damaged_bodies_are_refused_not_crashes(
    data: st.DataObject,
    fuzz_gateway: GatewayProcess,
    admin: httpx.Client,
    ingest: httpx.Client,
    probe_customer: str,
    tally: Tally,
) -> None:
    """Truncated bodies, corrupt compressed payloads, wrong content types. Whatever a damaged
    body makes the gateway store must be among the valid records sent, unaltered and once."""
    customer, alias = fresh_customer(admin)
    catalog = Catalog(customer, (alias,))
    now_ns = time.time_ns()
    good = [
        {
            "id": f"d-{customer}-{i}",
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now_ns / 1e9 - 60)),
            "customerId": customer,
            "dimensionId": "data-processed",
            "recordValue": f"{i}.25",
        }
        for i in range(data.draw(st.integers(1, 20), label="n"))
    ]
    framing = data.draw(st.sampled_from(["array", "ndjson"]), label="framing")
    text = (
        json.dumps(good) if framing == "array" else "\n".join(json.dumps(g) for g in good)
    ).encode()
    body, encoding, _how = data.draw(corrupted(text), label="damage")
    ctype = data.draw(
        st.sampled_from(
            [
                "application/json",
                "application/x-ndjson",
                "text/html",
                "application/xml",
                "multipart/form-data; boundary=x",
                "application/x-www-form-urlencoded",
                "application/octet-stream",
                None,
            ]
        ),
        label="content_type",
    )
    headers = {}
    if ctype is not None:
        headers["Content-Type"] = ctype
    if encoding is not None:
        headers["Content-Encoding"] = encoding
    try:
        r = ingest.post("/v1/usage", content=body, headers=headers)
    except httpx.TransportError as exc:
        raise AssertionError(f"connection failed: {exc!r}") from None
    tally.add("rest-damaged", r.status_code)
    assert r.status_code < 500, f"{r.status_code}: {r.text[:500]}"
    if r.status_code >= 400:
        json_error(r)
    rows = raw_records(admin, customer)
    valid = [judge_record(g, catalog, now_ns).expected for g in good]
    # A flip inside a string leaves a different, still valid record (an id "d-…-0" becoming
    # "d-…-1" is just another id): what the damaged body itself holds counts as sent.
    valid += [judge_record(g, catalog, now_ns).expected for g in _records_in(body, encoding)]
    for row in rows:
        assert any(e is not None and _matches(e, row) for e in valid), f"altered: {row}"
    # a flip in a key ("id" -> "hd", an ignored field) leaves records without ids: valid, and
    # not deduplicated, so only the rows with ids can be doubled
    ids = [row["id"] for row in rows if row["id"] is not None]
    assert len(set(ids)) == len(ids), "doubled"
    gateway_alive(fuzz_gateway)
    probe(fuzz_gateway, admin, probe_customer)


def _records_in(body: bytes, encoding: str | None) -> list[dict[str, Any]]:
    """The JSON objects a damaged body still holds, as an array or line by line. Raw snappy has
    no checksum, so damage inside it can decompress to other, valid records."""
    if encoding is not None:
        from meter_gateway.pipeline.decode import DecodeError, decompress

        try:
            body = decompress(body, encoding, 100 * 1024 * 1024)
        except DecodeError:
            return []
    try:
        doc = json.loads(body)
        return [d for d in (doc if isinstance(doc, list) else [doc]) if isinstance(d, dict)]
    except (ValueError, RecursionError):
        pass
    found = []
    for line in body.split(b"\n"):
        try:
            d = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(d, dict):
            found.append(d)
    return found


#: Nesting past which the standard library's parser gives up (its recursion limit, ~1000).
DEEP_ENOUGH = 900


def _nesting(text: str) -> int:
    """How deep ``text`` nests objects and arrays, outside strings."""
    depth = deepest = 0
    in_string = escaped = False
    for c in text:
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in "]}":
            depth -= 1
    return deepest


DEPTHS = [1, 10, 64, 200, 252, 253, 254, 255, 256, 500, 1000, 1023, 1024, 1100]


@pytest.mark.parametrize("depth", DEPTHS)
def test_deep_metadata_is_stored_and_listed_or_refused_and_never_wedges(
    depth: int,
    fuzz_gateway: GatewayProcess,
    admin: httpx.Client,
    ingest: httpx.Client,
    probe_customer: str,
    tally: Tally,
) -> None:
    customer, _alias = fresh_customer(admin)
    rec = {
        "id": f"deep-{customer}",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 60)),
        "customerId": customer,
        "dimensionId": "data-processed",
        "recordValue": "3",
        "metadata": deep_object(depth),
    }
    good = dict(rec, id=f"deep-{customer}-ok", metadata={"a": 1})
    for framing in ("single", "array", "ndjson"):
        cid = f"{framing}-"
        r1 = dict(rec, id=cid + rec["id"])
        r2 = dict(good, id=cid + good["id"])
        if framing == "single":
            body, ctype = dumps(r1), "application/json"
        elif framing == "array":
            body, ctype = "[" + dumps(r1) + "," + dumps(r2) + "]", "application/json"
        else:
            body, ctype = dumps(r1) + "\n" + dumps(r2), "application/x-ndjson"
        r = post(ingest, "/v1/usage", body.encode(), ctype, None)
        tally.add("rest-deep", r.status_code)
        assert r.status_code < 500, f"depth {depth} {framing}: {r.status_code} {r.text[:300]}"
        if framing != "single":
            assert r.status_code == 200, r.text[:300]
            assert 1 not in {e["index"] for e in r.json()["errors"]}, r.text[:300]
        probe(fuzz_gateway, admin, probe_customer)
    rows = raw_records(admin, customer)  # every accepted record can be listed
    with deep_recursion():
        expected_meta = normalize_json(json.loads('{"a":' * depth + "1" + "}" * depth))
    for row in rows:
        if row["id"].endswith("-ok"):
            assert row["metadata"] == {"a": 1}
        else:
            assert same_json(expected_meta, normalize_json(row["metadata"])), "metadata altered"
    assert sum(row["id"].endswith("-ok") for row in rows) == 2
    assert_windows_match_raw(admin, customer, rows, "data-processed")


NESTED_BODIES = [
    "[" * 1000 + "]" * 1000,
    "[" * 100_000 + "]" * 100_000,
    '{"a":' * 1000 + "1" + "}" * 1000,
    "[" + "{" * 1000 + "}" * 1000 + "]",
    '[{"customerId":"acme","recordValue":' + "[" * 1000 + "]" * 1000 + "}]",
    '{"recordValue":' + '{"a":' * 1000 + "1" + "}" * 1000 + "}",
]


@pytest.mark.parametrize("body", NESTED_BODIES, ids=range(len(NESTED_BODIES)))
@pytest.mark.parametrize("ctype", ["application/json", "application/x-ndjson"])
def test_bodies_nested_a_thousand_deep(
    body: str,
    ctype: str,
    fuzz_gateway: GatewayProcess,
    admin: httpx.Client,
    ingest: httpx.Client,
    probe_customer: str,
    tally: Tally,
) -> None:
    r = post(ingest, "/v1/usage", body.encode(), ctype, None)
    tally.add("rest-nested", r.status_code)
    assert r.status_code < 500, f"{r.status_code}: {r.text[:300]}"
    if r.status_code >= 400:
        json_error(r)
    probe(fuzz_gateway, admin, probe_customer)


def test_raw_is_not_a_value_literal() -> None:
    """The oracle itself: a few cases the issue names, decided from SPEC alone."""
    assert Raw("1_000").valid is False
    for text in ("\u0661\u0662", "\uff11\uff12", "1_000", "1_0.5", "1e-400", ".5", "5.", "+5"):
        assert judge_number_text(text, False).verdict is Verdict.INVALID, text
    for text in ("2026-W47-1T16:29:12Z", "20261129T120000Z", "2026-11-29T16Z"):
        assert parse_rfc3339(text).verdict is Verdict.INVALID, text
    assert judge_number_text("1e21", False).verdict is Verdict.INVALID
    assert judge_number_text("999999999999999999999.999999999999999999", False).value == Decimal(
        "999999999999999999999.999999999999999999"
    )


HOSTILE_TAGS = [
    '{"tenant":"acme","\\udc00x":1.5}',
    '{"tenant":"acme","k":"\\ud800"}',
    '{"tenant":"acme","\\u0000":1}',
    '{"tenant":"\\ud800"}',
    '{"tenant":"acme","k":{"nested":["\\udfff"]}}',
]


@pytest.mark.parametrize("tags", HOSTILE_TAGS)
@pytest.mark.parametrize(
    ("kind", "value"), [("absolute", "counter"), ("incremental", "counter"), ("absolute", "gauge")]
)
def test_vector_metric_events_with_hostile_tags(
    tags: str,
    kind: str,
    value: str,
    fuzz_gateway: GatewayProcess,
    admin: httpx.Client,
    ingest: httpx.Client,
    probe_customer: str,
    tally: Tally,
) -> None:
    """Issue 13 item 4 for every kind of Vector metric event: a tag that is not Unicode text
    is this event's error, never a 500; the good event beside it is stored."""
    ts = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 60))
    customer, _ = fresh_customer(admin)
    bad = (
        f'{{"name":"fuzz_requests","tags":{tags},"kind":"{kind}",'
        f'"{value}":{{"value":1}},"timestamp":"{ts}"}}'
    )
    good = dumps(
        {
            "id": f"tags-{customer}",
            "timestamp": ts,
            "customerId": customer,
            "dimensionId": "data-processed",
            "recordValue": "2",
        }
    )
    r = post(ingest, "/v1/usage", f"[{bad},{good}]".encode(), "application/json", None)
    tally.add("rest-vector-tags", r.status_code)
    assert r.status_code == 200, f"{r.status_code}: {r.text[:300]}"
    assert 1 not in {e["index"] for e in r.json()["errors"]}, r.text[:300]
    assert [row["recordValue"] for row in raw_records(admin, customer)] == ["2"]
    probe(fuzz_gateway, admin, probe_customer)
