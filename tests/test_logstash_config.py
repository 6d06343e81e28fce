"""The shipped Logstash pipelines (``logstash_config/``), parsed and run as Logstash would.

Logstash cannot run here. Each pipeline is parsed with ``lscl`` (a maintained parser of the
Logstash config language), every plugin option is checked against the option names the plugins'
sources declare (``testdata/logstash/reference``), the ``http`` outputs are checked for the
settings the gateway needs, and the filters are *emulated* on sample Beats events
(``testdata/logstash/<pipeline>/input.json``):

- ``grok`` expands the real ECS v1 pattern files of logstash-patterns-core
  (``testdata/logstash/patterns``) into a Python regex; captures, ``:int`` and tags as grok;
- ``date`` parses ``ISO8601`` and the Joda patterns used here, at millisecond precision;
- ``json`` parses into its target, ``_jsonparsefailure`` on bad input;
- ``fingerprint`` builds the same ``|field|value|`` string and SHA-256 hex digest;
- conditionals, ``%{field}`` interpolation, ``@timestamp``'s text (Logstash 8: at least
  millisecond digits) and the ``http`` output's ``json_batch`` body (one JSON array of the
  ``mapping`` of every event, gzipped, Basic auth) follow logstash-core and logstash-output-http.

The bodies are posted to a running gateway, whose usage totals must be exactly what the samples
should produce. Golden bodies: ``METER_GATEWAY_UPDATE_GOLDEN=1 pytest
tests/test_logstash_config.py`` rewrites them; review the diff. ``expected_usage.json`` is
written by hand and never regenerated.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from lscl.lang import (
    LsclAnd,
    LsclAttribute,
    LsclBlock,
    LsclConditions,
    LsclEqualTo,
    LsclGreaterThan,
    LsclIn,
    LsclNot,
    LsclNotEqualTo,
    LsclNotIn,
    LsclOr,
    LsclSelector,
)
from lscl.parser import parse_lscl

from tests.gatewayproc import ADMIN_KEY, BASE_CONFIG, INGEST_KEY, GatewayProcess

REPO = Path(__file__).resolve().parents[1]
PIPELINE_DIR = REPO / "logstash_config"
DATA = Path(__file__).parent / "testdata" / "logstash"
UPDATE_GOLDEN = os.environ.get("METER_GATEWAY_UPDATE_GOLDEN") == "1"
ENV_NAMES = ("METER_GATEWAY_URL", "METER_GATEWAY_INGEST_KEY")
STATIC_ENV = {
    "METER_GATEWAY_URL": "https://meter.example.com",
    "METER_GATEWAY_INGEST_KEY": "k" * 24,
}
# The gateway's overload answers must be retried; answers that can never succeed must not be
# (Logstash would retry them forever and stall the pipeline).
MUST_RETRY = {429, 503}
NEVER_RETRY = {400, 404, 413, 415, 422}
RECORD_KEYS = {"id", "timestamp", "customerId", "dimensionId", "recordValue"}


def pipelines() -> list[Path]:
    return sorted(PIPELINE_DIR.glob("*.conf"))


PIPELINE_IDS = [p.stem for p in pipelines()]


# --- parsing and Logstash's ${VAR} substitution ----------------------------------------------

_VAR = re.compile(r"\$\{(\w+)(?::([^}]*))?\}")


def substitute(value: Any, env: Mapping[str, str]) -> Any:
    """Logstash replaces ${VAR} and ${VAR:default} in option values, not in comments."""
    if isinstance(value, str):

        def repl(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in env:
                return env[name]
            if default is None:
                raise ValueError(f"Cannot evaluate `${{{name}}}`: not defined and no default")
            return default

        return _VAR.sub(repl, value)
    if isinstance(value, list):
        return [substitute(v, env) for v in value]
    if isinstance(value, dict):
        return {k: substitute(v, env) for k, v in value.items()}
    return value


@dataclass
class Plugin:
    kind: str  # input, filter, output
    name: str
    options: dict[str, Any]
    index: int  # position among the section's plugins, in reading order


@dataclass
class Pipeline:
    sections: dict[str, list[Any]]  # input/filter/output → lscl content
    plugins: list[Plugin]

    @classmethod
    def load(cls, path: Path, env: Mapping[str, str]) -> Pipeline:
        tree = parse_lscl(path.read_text(encoding="utf-8"))
        sections: dict[str, list[Any]] = {}
        for block in tree:
            assert isinstance(block, LsclBlock), f"{path.name}: top level holds sections only"
            assert block.name in ("input", "filter", "output"), block.name
            sections.setdefault(block.name, []).extend(block.content)
        pipeline = cls(sections, [])
        for kind, content in sections.items():
            for block in _blocks(content):
                options: dict[str, Any] = {}
                for item in block.content:
                    assert isinstance(item, LsclAttribute), f"{block.name}: nested block"
                    assert item.name not in options, f"{block.name}.{item.name} set twice"
                    options[item.name] = substitute(item.content, env)
                n = sum(1 for p in pipeline.plugins if p.kind == kind)
                pipeline.plugins.append(Plugin(kind, block.name, options, n))
        return pipeline

    def of(self, kind: str, name: str | None = None) -> list[Plugin]:
        return [p for p in self.plugins if p.kind == kind and (name is None or p.name == name)]


def _blocks(content: list[Any]) -> Iterator[LsclBlock]:
    for item in content:
        if isinstance(item, LsclBlock):
            yield item
        elif isinstance(item, LsclConditions):
            for _, sub in item.conditions:
                yield from _blocks(sub)
            yield from _blocks(item.default or [])
        else:
            raise AssertionError(f"unexpected {item!r} in a section")


@pytest.fixture(params=pipelines(), ids=PIPELINE_IDS)
def pipeline_path(request: pytest.FixtureRequest) -> Path:
    path: Path = request.param
    return path


def test_every_shipped_pipeline_has_samples() -> None:
    assert PIPELINE_IDS, "logstash_config/ ships no pipelines"
    for name in PIPELINE_IDS:
        for f in ("input.json", "expected_usage.json"):
            assert (DATA / name / f).exists(), f"{name}: tests/testdata/logstash/{name}/{f}"


def test_pipeline_uses_only_documented_env_vars(pipeline_path: Path) -> None:
    names = set(_VAR.findall(pipeline_path.read_text()))
    assert {n for n, _ in names} <= set(ENV_NAMES)
    with pytest.raises(ValueError, match="METER_GATEWAY_INGEST_KEY"):
        Pipeline.load(pipeline_path, {"METER_GATEWAY_URL": "http://x"})


def test_plugin_options_are_known_to_logstash(pipeline_path: Path) -> None:
    reference = json.loads((DATA / "reference" / "plugins.json").read_text())
    pipeline = Pipeline.load(pipeline_path, STATIC_ENV)
    errors = []
    for p in pipeline.plugins:
        known = reference["plugins"].get(f"{p.kind}/{p.name}")
        if known is None:
            errors.append(f"{p.kind} {p.name}: not in the reference; add it to plugin_options.py")
            continue
        for opt in p.options:
            if opt in known["obsolete"]:
                errors.append(f"{p.kind} {p.name}: {opt} is obsolete (Logstash refuses to start)")
            elif opt not in known["options"] and opt not in reference["common"][p.kind]:
                errors.append(f"{p.kind} {p.name}: unknown option {opt}")
    assert not errors, "\n".join(errors)


def test_http_outputs_are_what_the_gateway_needs(pipeline_path: Path) -> None:
    raw = pipeline_path.read_text()
    pipeline = Pipeline.load(pipeline_path, STATIC_ENV)
    outputs = pipeline.of("output")
    assert outputs
    assert all(p.name == "http" for p in outputs), "only http outputs"
    assert 'password => "${METER_GATEWAY_INGEST_KEY}"' in raw, "the key comes from the env"
    for p in outputs:
        o = p.options
        assert o["url"] == "https://meter.example.com/v1/usage"
        assert o["http_method"] == "post"
        assert o["format"] == "json_batch", "one request per batch, not per event"
        assert o["http_compression"] == "true"
        assert o["user"]
        assert o["password"] == STATIC_ENV["METER_GATEWAY_INGEST_KEY"]
        assert "headers" not in o or "Authorization" not in o["headers"]
        assert o.get("retry_failed", "true") == "true"
        codes = set(o["retryable_codes"])
        assert codes >= MUST_RETRY, codes
        assert not codes & NEVER_RETRY, codes
        assert "ignorable_codes" not in o, "a non-2xx must never count as delivered"
        assert int(o.get("request_timeout", 60)) >= 30
        mapping = o["mapping"]
        assert isinstance(mapping, dict)
        if "customerId" in mapping:
            assert set(mapping) >= RECORD_KEYS, sorted(mapping)
            assert mapping["timestamp"] == "%{@timestamp}"
            assert mapping["id"].startswith("%{[@metadata][fingerprint]}:")
            assert mapping["id"].endswith(":" + mapping["dimensionId"])


# --- the emulated runtime -------------------------------------------------------------------


@dataclass(frozen=True)
class LsTimestamp:
    ns: int  # since the epoch, UTC

    @classmethod
    def parse(cls, text: str) -> LsTimestamp:
        m = re.fullmatch(r"(.*?)(?:\.(\d+))?(Z|[+-]\d\d:?\d\d)", text)
        assert m, f"not an ISO 8601 timestamp with a zone: {text!r}"
        base = datetime.fromisoformat(m.group(1) + _zone(m.group(3)))
        frac = (m.group(2) or "").ljust(9, "0")[:9]
        return cls(int(base.timestamp()) * 1_000_000_000 + int(frac))

    def __str__(self) -> str:
        """org.logstash.Timestamp#toString: ISO_INSTANT, at least three fraction digits."""
        s, nanos = divmod(self.ns, 1_000_000_000)
        base = datetime.fromtimestamp(s, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        frac = f"{nanos:09d}"
        if frac.endswith("000000"):
            frac = frac[:3]
        elif frac.endswith("000"):
            frac = frac[:6]
        return f"{base}.{frac}Z"


def _zone(z: str) -> str:
    return "+00:00" if z == "Z" else (z if ":" in z else f"{z[:3]}:{z[3:]}")


def test_timestamp_text_is_logstashs() -> None:
    assert str(LsTimestamp.parse("2025-06-02T12:00:00Z")) == "2025-06-02T12:00:00.000Z"
    assert str(LsTimestamp.parse("2025-06-02T14:00:00.12+02:00")) == "2025-06-02T12:00:00.120Z"
    assert str(LsTimestamp.parse("2025-06-02T12:00:00.1234Z")) == "2025-06-02T12:00:00.123400Z"


_REF = re.compile(r"\[([^\]]+)\]")


def field_path(ref: str) -> list[str]:
    if ref.startswith("["):
        parts = _REF.findall(ref)
        assert "".join(f"[{p}]" for p in parts) == ref, f"bad field reference {ref!r}"
        return parts
    return [ref]


class Event:
    """A Logstash event: nested fields, @metadata apart, @timestamp a LsTimestamp."""

    def __init__(self, fields: dict[str, Any]) -> None:
        self.fields = fields
        self.cancelled = False

    def get(self, ref: str | list[str]) -> Any:
        node: Any = self.fields
        for part in field_path(ref) if isinstance(ref, str) else ref:
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node

    def set(self, ref: str, value: Any) -> None:
        *parents, last = field_path(ref)
        node = self.fields
        for part in parents:
            node = node.setdefault(part, {})
            assert isinstance(node, dict), f"{ref}: a parent is not an object"
        node[last] = value

    def tag(self, tag: str) -> None:
        tags = self.fields.setdefault("tags", [])
        if tag not in tags:
            tags.append(tag)

    def to_hash(self) -> dict[str, Any]:
        return {k: _plain(v) for k, v in self.fields.items() if k != "@metadata"}


def _plain(v: Any) -> Any:
    if isinstance(v, LsTimestamp):
        return str(v)
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_plain(x) for x in v]
    return v


_SPRINTF = re.compile(r"%\{([^}]+)\}")


def sprintf(template: str, event: Event) -> str:
    """event.sprintf: %{field} replaced by the value's text; an absent field stays as written."""

    def repl(m: re.Match[str]) -> str:
        ref = m.group(1)
        assert not ref.startswith("+"), "date formats in sprintf are not emulated"
        value = event.get(ref)
        if value is None:
            return m.group(0)
        if isinstance(value, bool):
            return str(value).lower()
        if isinstance(value, str | int | LsTimestamp):
            return str(value)
        raise AssertionError(f"%{{{ref}}} of a {type(value).__name__} is not emulated")

    return _SPRINTF.sub(repl, template)


def _truthy(v: Any) -> bool:
    return v is not None and v is not False


def evaluate(cond: Any, event: Event) -> Any:
    if isinstance(cond, LsclSelector):
        return event.get(cond.names)
    if isinstance(cond, str | int | Decimal | list):
        return cond
    if isinstance(cond, LsclAnd):
        return all(_truthy(evaluate(c, event)) for c in cond.conditions)
    if isinstance(cond, LsclOr):
        return any(_truthy(evaluate(c, event)) for c in cond.conditions)
    if isinstance(cond, LsclNot):
        return not _truthy(evaluate(cond.condition, event))
    if isinstance(cond, LsclIn | LsclNotIn):
        needle, hay = evaluate(cond.needle, event), evaluate(cond.haystack, event)
        found = hay is not None and needle in hay
        return found if isinstance(cond, LsclIn) else not found
    if isinstance(cond, LsclEqualTo | LsclNotEqualTo):
        equal = evaluate(cond.first, event) == evaluate(cond.second, event)
        return equal if isinstance(cond, LsclEqualTo) else not equal
    if isinstance(cond, LsclGreaterThan):
        a, b = evaluate(cond.first, event), evaluate(cond.second, event)
        return a is not None and b is not None and a > b
    raise AssertionError(f"condition {type(cond).__name__} is not emulated")


# grok ---------------------------------------------------------------------------------------

_GROK = re.compile(r"%\{(\w+)(?::([^:}]+))?(?::(int|float))?\}")
_NAMED = re.compile(r"\(\?<([A-Za-z_][\w@\[\]]*)>")


def load_patterns() -> dict[str, str]:
    patterns = {}
    for f in sorted((DATA / "patterns").glob("*")):
        if f.suffix == ".md":
            continue
        for line in f.read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                name, _, body = line.partition(" ")
                patterns[name] = body
    return patterns


class Grok:
    """A grok expression compiled as logstash-filter-grok (jls-grok) compiles it."""

    def __init__(self, expression: str, definitions: Mapping[str, str]) -> None:
        self.captures: list[tuple[str, str, str | None]] = []  # (group, field, type)
        regex = self._expand(expression, definitions, 0)
        assert "[[:" not in regex, "POSIX classes are not emulated"
        self.regex = re.compile(regex)

    def _expand(self, text: str, defs: Mapping[str, str], depth: int) -> str:
        assert depth < 64, "grok patterns nest too deep"

        def named(m: re.Match[str]) -> str:
            group = f"g{len(self.captures)}"
            self.captures.append((group, m.group(1), None))
            return f"(?P<{group}>"

        def ref(m: re.Match[str]) -> str:
            name, semantic, kind = m.groups()
            assert name in defs, f"grok pattern {name} is not defined"
            if semantic is None:
                return f"(?:{self._expand(defs[name], defs, depth + 1)})"
            group = f"g{len(self.captures)}"
            self.captures.append((group, semantic, kind))
            return f"(?P<{group}>{self._expand(defs[name], defs, depth + 1)})"

        # Oniguruma's (?<name>...) named groups, not the (?<=...) / (?<!...) lookbehinds.
        return _GROK.sub(ref, _NAMED.sub(named, text))

    def match(self, text: str) -> dict[str, Any] | None:
        m = self.regex.search(text)
        if m is None:
            return None
        out: dict[str, Any] = {}
        for group, name, kind in self.captures:
            value = m.group(group)
            if value is None or value == "":  # keep_empty_captures => false
                continue
            out[name] = int(value) if kind == "int" else float(value) if kind == "float" else value
        return out


def grok_filter(options: dict[str, Any], event: Event) -> None:
    assert options.get("ecs_compatibility") in ("v1", "v8"), (
        "set ecs_compatibility: only the ECS v1 patterns are vendored"
    )
    definitions = {**load_patterns(), **options.get("pattern_definitions", {})}
    for source, expressions in options["match"].items():
        value = event.get(source)
        for expression in [expressions] if isinstance(expressions, str) else expressions:
            captures = (
                Grok(expression, definitions).match(value) if isinstance(value, str) else None
            )
            if captures is not None:
                for name, v in captures.items():
                    assert event.get(name) is None, f"grok would append to {name}"
                    event.set(name, v)
                return
    for tag in options.get("tag_on_failure", ["_grokparsefailure"]):
        event.tag(tag)


# date, json, fingerprint ---------------------------------------------------------------------

_JODA = {
    "yyyy": "%Y",
    "MMM": "%b",
    "MM": "%m",
    "dd": "%d",
    "HH": "%H",
    "mm": "%M",
    "ss": "%S",
    "Z": "%z",
}


def _joda_to_strptime(pattern: str) -> str:
    out = []
    for m in re.finditer(r"([A-Za-z])\1*|[^A-Za-z]", pattern):
        token = m.group()
        if token[0].isalpha():
            assert token in _JODA, f"Joda token {token!r} is not emulated"
            out.append(_JODA[token])
        else:
            out.append("%%" if token == "%" else token)
    return "".join(out)


def date_filter(options: dict[str, Any], event: Event) -> None:
    assert options.get("locale", "en") in ("en", "en-US"), "month names are English here"
    source, *formats = options["match"]
    value = event.get(source)
    target = options.get("target", "@timestamp")
    for fmt in formats:
        if not isinstance(value, str):
            break
        try:
            if fmt == "ISO8601":
                ts = LsTimestamp.parse(value)
            else:
                # Every Joda pattern here carries a zone (Z); the timezone option is not used.
                dt = datetime.strptime(value, _joda_to_strptime(fmt))  # noqa: DTZ007
                assert dt.tzinfo is not None, "timezone option is not emulated"
                ts = LsTimestamp(int(dt.timestamp()) * 1_000_000_000)
        except (ValueError, AssertionError):
            continue
        # The date filter parses with Joda: millisecond precision.
        event.set(target, LsTimestamp(ts.ns - ts.ns % 1_000_000))
        return
    for tag in options.get("tag_on_failure", ["_dateparsefailure"]):
        event.tag(tag)


def json_filter(options: dict[str, Any], event: Event) -> None:
    raw = event.get(options["source"])
    try:
        parsed = json.loads(raw) if isinstance(raw, str) else None
    except ValueError:
        parsed = None
    target = options.get("target")
    if parsed is None or (target is None and not isinstance(parsed, dict)):
        if options.get("skip_on_invalid_json", "false") != "true":
            for tag in options.get("tag_on_failure", ["_jsonparsefailure"]):
                event.tag(tag)
        return
    if target is None:
        for k, v in parsed.items():
            event.set(k, v)
    else:
        event.set(target, parsed)


def _canonical(v: Any) -> str:
    """fingerprint's to_canonical_value, then Ruby's string interpolation."""
    if isinstance(v, dict):
        return "|".join(f"{k}|{_canonical(x)}" for k, x in sorted(v.items()))
    if isinstance(v, list):
        return "|".join(_canonical(x) for x in v)
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, str | int | LsTimestamp):
        return str(v)  # fingerprint forces 3 fraction digits on timestamps, as str() does
    raise AssertionError(f"fingerprint of a {type(v).__name__} is not emulated")


def fingerprint_filter(options: dict[str, Any], event: Event) -> None:
    method = options.get("method", "SHA1")
    assert method in ("SHA1", "SHA256", "SHA384", "SHA512", "MD5"), f"{method} not emulated"
    assert "key" not in options
    assert options.get("base64encode", "false") == "false"
    assert options.get("concatenate_sources") == "true", "per-field digests are not emulated"
    sources = options.get("source", ["message"])
    sources = [sources] if isinstance(sources, str) else sources
    text = "".join(f"|{k}|{_canonical(event.get(k))}" for k in sorted(sources)) + "|"
    digest = hashlib.new(method.lower(), text.encode()).hexdigest()
    event.set(options["target"], digest)


FILTERS = {
    "grok": grok_filter,
    "date": date_filter,
    "json": json_filter,
    "fingerprint": fingerprint_filter,
}
# Common filter options that act on success are not used by the shipped pipelines.
_UNEMULATED_COMMON = {"add_field", "add_tag", "remove_field", "remove_tag"}


def run_filters(content: list[Any], event: Event) -> None:
    for item in content:
        if isinstance(item, LsclConditions):
            for cond, sub in item.conditions:
                if _truthy(evaluate(cond, event)):
                    run_filters(sub, event)
                    break
            else:
                run_filters(item.default or [], event)
            continue
        assert isinstance(item, LsclBlock)
        assert item.name in FILTERS, f"filter {item.name!r} is not emulated"
        options = {a.name: a.content for a in item.content if isinstance(a, LsclAttribute)}
        assert not (set(options) & _UNEMULATED_COMMON), f"{item.name}: {options}"
        FILTERS[item.name](options, event)


def route_outputs(
    content: list[Any],
    event: Event,
    counter: list[int],
    routed: dict[int, list[Event]],
    active: bool = True,
) -> None:
    """Which http outputs an event reaches; outputs are numbered in reading order."""
    for item in content:
        if isinstance(item, LsclConditions):
            chosen = None
            if active:
                for i, (cond, _) in enumerate(item.conditions):
                    if _truthy(evaluate(cond, event)):
                        chosen = i
                        break
            for i, (_, sub) in enumerate(item.conditions):
                route_outputs(sub, event, counter, routed, active and chosen == i)
            route_outputs(item.default or [], event, counter, routed, active and chosen is None)
            continue
        n = counter[0]
        counter[0] += 1
        if active:
            routed.setdefault(n, []).append(event)


def beats_event(sample: dict[str, Any]) -> Event:
    """A Beats input event (ECS): @timestamp a timestamp, @version "1", Beats' own fields."""
    for key in ("@timestamp", "@version", "message", "host", "log", "tags"):
        assert key in sample, f"a Beats event has {key}: fix the sample"
    assert "beats_input_codec_plain_applied" in sample["tags"]
    fields = json.loads(json.dumps(sample))
    fields["@timestamp"] = LsTimestamp.parse(sample["@timestamp"])
    return Event(fields)


# --- the http output's requests -------------------------------------------------------------


@dataclass
class Request:
    url: str
    headers: dict[str, str]
    body: bytes
    plain: bytes = field(repr=False, default=b"")


def _map(mapping: Any, event: Event) -> Any:
    """logstash-output-http convert_mapping: sprintf every leaf, keep the structure."""
    if isinstance(mapping, dict):
        return {k: _map(v, event) for k, v in mapping.items()}
    if isinstance(mapping, list):
        return [_map(v, event) for v in mapping]
    return sprintf(str(mapping), event)


def http_request(options: dict[str, Any], events: list[Event]) -> Request:
    assert options["format"] == "json_batch"
    assert options["http_method"] == "post"
    mapping = options.get("mapping")
    docs = [_map(mapping, e) if mapping is not None else e.to_hash() for e in events]
    # LogStash::Json.dump (JrJackson): compact, UTF-8, keys in insertion order.
    plain = json.dumps(docs, ensure_ascii=False, separators=(",", ":")).encode()
    headers = {"Content-Type": options.get("content_type", "application/json")}
    body = plain
    if options.get("http_compression") == "true":
        body = gzip.compress(plain)
        headers["Content-Encoding"] = "gzip"
    if "user" in options:
        token = base64.b64encode(f"{options['user']}:{options['password']}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    return Request(options["url"], headers, body, plain)


def run_pipeline(
    name: str, env: Mapping[str, str], samples: list[dict[str, Any]] | None = None
) -> list[Request]:
    """The requests the pipeline's http outputs send for the samples (one batch each)."""
    pipeline = Pipeline.load(PIPELINE_DIR / f"{name}.conf", env)
    (beats,) = pipeline.of("input")
    assert beats.name == "beats", "the samples are Beats events"
    if samples is None:
        samples = json.loads((DATA / name / "input.json").read_text())
    routed: dict[int, list[Event]] = {}
    for sample in samples:
        event = beats_event(sample)
        run_filters(pipeline.sections.get("filter", []), event)
        route_outputs(pipeline.sections["output"], event, [0], routed)
    outputs = pipeline.of("output")
    return [http_request(outputs[n].options, routed[n]) for n in sorted(routed)]


def check_golden(name: str, requests: list[Request]) -> None:
    path = DATA / name / "expected_bodies.ndjson"
    text = "".join(r.plain.decode() + "\n" for r in requests)
    if UPDATE_GOLDEN:
        path.write_text(text)
    assert text == path.read_text(), (
        f"{name}: bodies differ from {path.name}; if intended, rerun with "
        "METER_GATEWAY_UPDATE_GOLDEN=1 and review the diff"
    )


# --- against a running gateway ----------------------------------------------------------------


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[GatewayProcess]:
    """The standard test catalog. The samples are dated June 2025, so the goldens stay
    byte-stable: the gateway takes that history as a backfill and deduplicates across it."""
    config = {**BASE_CONFIG, "ingest": {"late_arrival_limit": "3650d", "dedup_window": "3650d"}}
    gw = GatewayProcess(tmp_path, config).start()
    yield gw
    gw.stop()


def logstash_env(gw: GatewayProcess) -> dict[str, str]:
    return {"METER_GATEWAY_URL": gw.url, "METER_GATEWAY_INGEST_KEY": INGEST_KEY}


def send(request: Request) -> httpx.Response:
    return httpx.post(request.url, content=request.body, headers=request.headers, timeout=30)


def month_usage(gw: GatewayProcess, customer: str, dimension: str, month: str) -> Decimal:
    year, mon = (int(x) for x in month.split("-"))
    nxt = f"{year + 1:04d}-01" if mon == 12 else f"{year:04d}-{mon + 1:02d}"
    with gw.client(ADMIN_KEY) as c:
        r = c.get(
            "/v1/usage",
            params={
                "customerId": customer,
                "dimensionId": dimension,
                "window": "month",
                "from": f"{month}-01T00:00:00Z",
                "to": f"{nxt}-01T00:00:00Z",
            },
        )
    assert r.status_code == 200, r.text
    (row,) = r.json()["data"]
    return Decimal(row["value"])


def assert_usage(gw: GatewayProcess, expected: dict[str, Any]) -> None:
    for row in expected["usage"]:
        got = month_usage(gw, row["customerId"], row["dimensionId"], row["month"])
        assert got == Decimal(row["value"]), (row, got)


@pytest.mark.parametrize("name", PIPELINE_IDS)
def test_sample_events_give_exact_usage(name: str, gateway: GatewayProcess) -> None:
    requests = run_pipeline(name, logstash_env(gateway))
    check_golden(name, requests)
    expected = json.loads((DATA / name / "expected_usage.json").read_text())
    totals = {"accepted": 0, "duplicates": 0, "rejected": 0}
    errors = []
    for request in requests:
        assert request.headers["Content-Type"] == "application/json"
        assert request.plain.startswith(b"[")
        assert request.plain.endswith(b"]")
        response = send(request)
        # A batch with bad records still answers 2xx: Logstash drops on anything else.
        assert response.status_code == 200, response.text
        body = response.json()
        for k in totals:
            totals[k] += body[k]
        errors.extend((e["field"], e["reason"]) for e in body["errors"])
    assert totals == expected["response"]
    assert sorted(errors) == sorted((e["field"], e["reason"]) for e in expected["rejected"])
    assert_usage(gateway, expected)


@pytest.mark.parametrize("name", PIPELINE_IDS)
def test_a_retried_batch_counts_once(name: str, gateway: GatewayProcess) -> None:
    """logstash-output-http retries the same batch on 429/503/timeouts; Filebeat re-sends
    lines after a restart with a new @timestamp: the fingerprint ids count them once."""
    env = logstash_env(gateway)
    requests = run_pipeline(name, env)
    accepted = sum(send(r).json()["accepted"] for r in requests)
    samples = json.loads((DATA / name / "input.json").read_text())
    resent = [{**s, "@timestamp": "2025-06-02T18:30:00.250Z"} for s in samples]
    again = [send(r).json() for r in run_pipeline(name, env, resent)]
    assert sum(b["accepted"] for b in again) == 0
    assert sum(b["duplicates"] for b in again) == accepted
    assert_usage(gateway, json.loads((DATA / name / "expected_usage.json").read_text()))


def test_one_malformed_event_does_not_fail_the_batch(gateway: GatewayProcess) -> None:
    """The json-logs data-processed batch holds one line with a byte count that is no number:
    the gateway answers 2xx, stores the others and keeps the bad one with the reason."""
    requests = run_pipeline("json-logs", logstash_env(gateway))
    batch = next(r for r in requests if b'"dimensionId":"data-processed"' in r.plain)
    docs = json.loads(batch.plain)
    bad = [i for i, d in enumerate(docs) if not re.fullmatch(r"\d+e-9", d["recordValue"])]
    assert len(bad) == 1
    assert len(docs) > 2
    response = send(batch)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["accepted"], body["rejected"]) == (len(docs) - 1, 1)
    assert body["errors"][0]["index"] == bad[0]
    assert body["errors"][0]["field"] == "recordValue"
    with gateway.client(ADMIN_KEY) as c:
        kept = c.get("/v1/rejected").json()["data"]
    assert len(kept) == 1
    assert docs[bad[0]]["id"] in kept[0]["record"]


def test_basic_auth_takes_the_key_as_password(gateway: GatewayProcess) -> None:
    (request, *_) = run_pipeline("json-logs", logstash_env(gateway))
    assert send(request).status_code == 200
    wrong = base64.b64encode(b"logstash:not-the-key").decode()
    r = send(
        Request(request.url, {**request.headers, "Authorization": f"Basic {wrong}"}, request.body)
    )
    # 401 is in retryable_codes: a wrong key stalls the pipeline instead of dropping usage.
    assert r.status_code == 401
