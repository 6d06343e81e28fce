"""Bodies to JSON documents: decompression with limits, JSON / JSON array / NDJSON framing.

Numbers stay exact: orjson parses bodies whose numbers all have at most 15 significant digits
and no exponent below -99 (those round-trip through a double); any other body is parsed with
the standard library into ``Decimal``s. A number even ``Decimal`` cannot hold (``1e99999999999
999999999``) or an integer past Python's digit limit stays text (``decimals.Unrepresentable``),
so only its own record fails.
"""

from __future__ import annotations

import decimal
import json
import re
import zlib
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import cramjam
import orjson
import zstandard

from meter_gateway.decimals import Unrepresentable

# A run of 16+ digits/dots may be a number a double cannot hold exactly, and an exponent of
# -100 or below may underflow it (orjson reads 1e-400 as 0.0). Mapping digits and dots to "1",
# e/E to "e", "-" to "-" and everything else to "0" turns both checks into substring searches
# of one translation, several times faster than a regex scan of the body. The exponent pattern
# also turns up inside strings (a UUID "...0e-4123..."): each hit is then looked at where a
# number can stand, after ":", "," or "[" (``_is_number_at``).
_DIGITS = bytes(
    0x31 if chr(b) in "0123456789." else 0x65 if chr(b) in "eE" else 0x2D if b == 0x2D else 0x30
    for b in range(256)
)
_LONG_RUN = b"1" * 16
# A literal regex: sre scans this shape (mostly "0" and "1") faster than bytes.find does.
_SMALL_EXP = re.compile(rb"e-111")
_BEFORE_NUMBER = b":,["
_SPACE = b" \t\r\n"
# Python refuses int() of longer digit strings (sys.int_info.default_max_str_digits).
_MAX_INT_DIGITS = 4300
# What ``loads`` says of a document nested past what the parsers follow (orjson stops at 1024
# levels, the standard library at the interpreter's recursion limit).
TOO_DEEP = "JSON nested too deeply"
# Nesting kept when a rejected item is written back as text for the rejected store.
CLIP_DEPTH = 32


class DecodeError(Exception):
    """The whole body is unusable; ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class ItemError:
    """One item of a body (an NDJSON line) that is not JSON."""

    index: int
    error: str
    raw: str


Item = dict[str, Any] | ItemError


class Parsed(list[Item]):
    """The items of a body; ``single`` is true for a bare JSON object (not an array or NDJSON)."""

    single: bool = False


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """Undo ``Content-Encoding``; never produce more than ``limit`` bytes."""
    codings = [c.strip().lower() for c in (encoding or "").split(",") if c.strip()]
    for coding in reversed(codings):
        if coding in ("identity", ""):
            continue
        if coding in ("gzip", "x-gzip"):
            body = _zlib(body, 16 + zlib.MAX_WBITS, limit, "gzip")
        elif coding == "deflate":
            # RFC 9110 deflate is zlib-wrapped; some clients send raw deflate.
            try:
                body = _zlib(body, zlib.MAX_WBITS, limit, "deflate")
            except DecodeError:
                body = _zlib(body, -zlib.MAX_WBITS, limit, "deflate")
        elif coding == "zstd":
            body = _zstd(body, limit)
        elif coding == "snappy":
            body = _snappy(body, limit)
        else:
            raise DecodeError(
                415,
                f"unsupported Content-Encoding {coding!r} "
                "(expected gzip, deflate, zstd, snappy or identity)",
            )
    return body


def _zlib(body: bytes, wbits: int, limit: int, name: str) -> bytes:
    d = zlib.decompressobj(wbits)
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error as exc:
        raise DecodeError(400, f"body is not valid {name}: {exc}") from None
    if len(out) > limit:
        raise DecodeError(413, f"decompressed body exceeds {limit} bytes")
    if not d.eof:
        raise DecodeError(400, f"{name} body is truncated")
    return out


def _zstd(body: bytes, limit: int) -> bytes:
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(body, read_across_frames=True)
        out = reader.read(limit + 1)
    except zstandard.ZstdError as exc:
        raise DecodeError(400, f"body is not valid zstd: {exc}") from None
    if len(out) > limit:
        raise DecodeError(413, f"decompressed body exceeds {limit} bytes")
    if not out and body:
        raise DecodeError(400, "zstd body is truncated or empty")
    return bytes(out)


def _snappy(body: bytes, limit: int) -> bytes:
    try:
        size = int(cramjam.snappy.decompress_raw_len(body))
    except Exception as exc:  # cramjam raises its own DecompressionError
        raise DecodeError(400, f"body is not valid snappy (raw block): {exc}") from None
    if size > limit:
        raise DecodeError(413, f"decompressed body exceeds {limit} bytes")
    try:
        return bytes(cramjam.snappy.decompress_raw(body))
    except Exception as exc:
        raise DecodeError(400, f"body is not valid snappy (raw block): {exc}") from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a valid JSON number")


def _decimal(text: str) -> Decimal | Unrepresentable:
    try:
        return Decimal(text)
    except decimal.InvalidOperation:  # an exponent past what Decimal holds
        return Unrepresentable(text)


def _int(text: str) -> int | Unrepresentable:
    return int(text) if len(text) <= _MAX_INT_DIGITS else Unrepresentable(text)


def _double_exact(data: bytes) -> bool:
    """Whether orjson's doubles read every number of ``data`` exactly (module docstring)."""
    shape = data.translate(_DIGITS)
    if _LONG_RUN in shape:
        return False
    return not any(_is_number_at(data, shape, m.start()) for m in _SMALL_EXP.finditer(shape))


def _is_number_at(data: bytes, shape: bytes, exp: int) -> bool:
    """Whether the exponent at ``exp`` ends a JSON number rather than sits inside a string:
    its mantissa (at most 15 digits and dots, or it had been a long run), an optional sign,
    then the start of the document or ":", "," or "[" past any whitespace."""
    start = exp
    while start > 0 and shape[start - 1] == 0x31:
        start -= 1
    if start == exp:
        return False  # "e-123" with no mantissa: not a number
    if start > 0 and data[start - 1] == 0x2D:
        start -= 1
    k = start - 1
    while k >= 0 and data[k] in _SPACE:
        k -= 1
    return k < 0 or data[k] in _BEFORE_NUMBER


def loads(data: bytes) -> Any:
    """Parse one JSON document exactly (see module docstring)."""
    if _double_exact(data):
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass  # the standard library's message says where, and it also handles big ints
    try:
        return json.loads(
            data, parse_float=_decimal, parse_int=_int, parse_constant=_reject_constant
        )
    except RecursionError:
        raise ValueError(TOO_DEEP) from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"body is not UTF-8: {exc.reason} at byte {exc.start}") from None


def parse_items(body: bytes, content_type: str | None, max_items: int) -> Parsed:
    """Split a body into JSON objects: a single object, a JSON array, or NDJSON lines.

    A body that is not JSON at all raises DecodeError (400); one bad NDJSON line only fails
    that line. More than ``max_items`` items raises DecodeError (413).
    """
    ctype = (content_type or "").split(";")[0].strip().lower()
    text = body.strip()
    if not text:
        return Parsed()
    ndjson = ctype in (
        "application/x-ndjson",
        "application/ndjson",
        "application/jsonl",
        "application/json-lines",
        "text/plain",
    )
    if text[:1] == b"[" and not ndjson:
        try:
            doc = loads(text)
        except ValueError as exc:
            if str(exc) != TOO_DEEP:
                raise DecodeError(400, f"body is not valid JSON: {exc}") from None
            # Only some records nest past what a parser follows: split the array and fail
            # just those, so the rest of the batch is stored (SPEC §4).
            return _array_by_element(text, max_items)
        if not isinstance(doc, list):
            raise DecodeError(400, "expected a JSON array of records")
        if len(doc) > max_items:
            raise DecodeError(413, f"batch has {len(doc)} records; the limit is {max_items}")
        return Parsed(
            d
            if isinstance(d, dict)
            else ItemError(i, f"expected a JSON object, got {_kind(d)}", _clip(d))
            for i, d in enumerate(doc)
        )
    if not ndjson:
        try:
            doc = loads(text)
        except ValueError as exc:
            if b"\n" not in text:
                raise DecodeError(400, f"body is not valid JSON: {exc}") from None
        else:  # one object, possibly pretty-printed over several lines
            if isinstance(doc, dict):
                single = Parsed([doc])
                single.single = True
                return single
            raise DecodeError(400, f"expected a JSON object, array or NDJSON, got {_kind(doc)}")
    # What senders write: each line one object with nothing around it, so every newline sits
    # between "}" and "{"; the body with commas for newlines is then the array of its lines.
    # Else the lines are stripped, blank ones dropped, and joined if each is "{...}". One parse
    # of that array; any failure (a bad line, a line that is not one object) falls back to
    # line by line, which says where.
    newlines = text.count(b"\n")
    tight = text[:1] == b"{" and text[-1:] == b"}" and text.count(b"}\n{") == newlines
    if tight and newlines < max_items:
        found = _objects(b"[" + text.replace(b"\n", b",") + b"]", newlines + 1)
        if found is not None:
            return found
    lines = [ln for ln in text.split(b"\n") if ln.strip()]
    if len(lines) > max_items:
        raise DecodeError(413, f"batch has {len(lines)} records; the limit is {max_items}")
    lines = [ln.strip() for ln in lines]
    if not tight and all(ln[:1] == b"{" and ln[-1:] == b"}" for ln in lines):  # (tight: parsed)
        found = _objects(b"[" + b",".join(lines) + b"]", len(lines))
        if found is not None:
            return found
    items = Parsed()
    for i, line in enumerate(lines):
        try:
            doc = loads(line)
        except ValueError as exc:
            items.append(
                ItemError(
                    i, f"line {i + 1} is not JSON: {exc}", line[:4096].decode("utf-8", "replace")
                )
            )
            continue
        items.append(
            doc
            if isinstance(doc, dict)
            else ItemError(i, f"expected a JSON object, got {_kind(doc)}", _clip(doc))
        )
    return items


def _objects(array: bytes, n: int) -> Parsed | None:
    """The items of a JSON array of ``n`` lines if it parses to ``n`` objects, else None."""
    try:
        docs = loads(array)
    except ValueError:
        return None
    if type(docs) is list and len(docs) == n and all(type(d) is dict for d in docs):
        return Parsed(docs)
    return None


# A string token, or one structural character outside strings.
_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{},]')


def _array_by_element(text: bytes, max_items: int) -> Parsed:
    """A JSON array too deep for the parsers, element by element: each element is parsed on
    its own, and one nested past the limit fails alone. The array's structure is followed
    token by token (strings are skipped whole by the regex), so a body that is not a
    well-formed array is still refused as a whole."""
    depth = 0
    start = 1
    spans: list[tuple[int, int]] = []
    end = -1
    for m in _TOKENS.finditer(text):
        tok = m.group()
        if tok[:1] == b'"':
            continue
        if tok in (b"[", b"{"):
            depth += 1
        elif tok in (b"]", b"}"):
            depth -= 1
            if depth == 0:
                end = m.start()
                break
        elif depth == 1:  # a comma between elements
            spans.append((start, m.start()))
            start = m.end()
        if depth < 0:
            break
    if end < 0 or text[end + 1 :].strip():
        raise DecodeError(400, "body is not valid JSON: not a well-formed array")
    if text[start:end].strip() or spans:
        spans.append((start, end))
    if len(spans) > max_items:
        raise DecodeError(413, f"batch has {len(spans)} records; the limit is {max_items}")
    items = Parsed()
    for i, (a, b) in enumerate(spans):
        element = text[a:b].strip()
        try:
            doc = loads(element)
        except ValueError as exc:
            if str(exc) != TOO_DEEP:
                raise DecodeError(400, f"body is not valid JSON: element {i}: {exc}") from None
            items.append(
                ItemError(i, f"record {i} is {exc}", element[:4096].decode("utf-8", "replace"))
            )
            continue
        items.append(
            doc
            if isinstance(doc, dict)
            else ItemError(i, f"expected a JSON object, got {_kind(doc)}", _clip(doc))
        )
    return items


def _kind(doc: Any) -> str:
    return {
        dict: "an object",
        list: "an array",
        str: "a string",
        bool: "a boolean",
        type(None): "null",
    }.get(type(doc), "a number")


def _clip(doc: Any) -> str:
    return clip_json(doc, 4096)


def clip_json(doc: Any, limit: int) -> str:
    """``doc`` as JSON text of at most ``limit`` characters, whatever it holds: nesting past
    ``CLIP_DEPTH`` levels becomes "...", text that is not Unicode is escaped, numbers JSON
    cannot carry become strings. For the rejected store and error messages."""
    try:
        return orjson.dumps(doc, default=str).decode()[:limit]
    except (TypeError, RecursionError):  # orjson.JSONEncodeError is a TypeError
        return json.dumps(_bounded(doc, CLIP_DEPTH), default=str)[:limit]


def _bounded(v: Any, depth: int) -> Any:
    if isinstance(v, dict | list):
        if depth <= 0:
            return "..."
        if isinstance(v, dict):
            return {str(k): _bounded(x, depth - 1) for k, x in v.items()}
        return [_bounded(x, depth - 1) for x in v]
    if isinstance(v, int) and not isinstance(v, bool) and v.bit_length() > 64:
        return f"<integer of {v.bit_length()} bits>" if v.bit_length() > 13_000 else str(v)
    return v
