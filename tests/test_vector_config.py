"""The shipped Vector configs (``vector_config/``), run as Vector would run them.

Vector cannot run here, so each config is taken apart the way Vector takes it apart:
environment interpolation over the raw text (Vector's own rules, so a stray ``$word`` in a
comment or a VRL regex fails here as it fails there), every option checked against Vector
0.57's generated option reference (``testdata/vector/reference``), every VRL program compiled
and run by the real VRL engine (pyVRL), the events framed, encoded and gzipped as the ``http``
sink sends them, and posted to a running gateway, whose usage totals must be exactly what the
sample events in ``testdata/vector/<config>/`` should produce.

What is emulated, not run: the sources (the samples are the events they emit, legacy log
namespace), the ``filter`` and ``aggregate`` transforms (the filter's condition is real VRL;
``aggregate`` sums incremental counters per series as Vector's Auto mode does), the metric
``remap`` target (a VRL object with Vector's metric paths), and the ``http`` sink's transport.
Event JSON is encoded by VRL's ``encode_json``, the same serde serializer Vector's ``json``
codec uses: sorted keys, RFC 3339 timestamps with 0/3/6/9 fraction digits, ryu floats.

Golden files (``expected_events.ndjson``): ``METER_GATEWAY_UPDATE_GOLDEN=1 pytest
tests/test_vector_config.py`` rewrites them; review the diff. ``expected_usage.json`` is written
by hand from the samples and never regenerated.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import pyvrl  # type: ignore[import-untyped]  # the real VRL engine (dev extra); never skipped
import yaml

from tests.gatewayproc import ADMIN_KEY, INGEST_KEY, GatewayProcess
from tests.pgdb import store_url

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "vector_config"
DATA = Path(__file__).parent / "testdata" / "vector"
REFERENCE = DATA / "reference"
UPDATE_GOLDEN = os.environ.get("METER_GATEWAY_UPDATE_GOLDEN") == "1"
GATEWAY_EXAMPLE = CONFIG_DIR / "gateway-example.yaml"
# What the READMEs tell operators to set for Vector (the Firehose key only for firehose.yaml).
VECTOR_ENV_NAMES = ("METER_GATEWAY_URL", "METER_GATEWAY_INGEST_KEY", "METER_FIREHOSE_ACCESS_KEY")
STATIC_ENV = {
    "METER_GATEWAY_URL": "https://meter.example.com",
    "METER_GATEWAY_INGEST_KEY": "k" * 24,
    "METER_FIREHOSE_ACCESS_KEY": "f" * 24,
}

LOG_SOURCES = {"file", "kubernetes_logs", "kafka", "aws_s3", "aws_kinesis_firehose"}
METRIC_SOURCES = {"statsd", "prometheus_scrape"}
# What each log source puts in every event (legacy namespace), besides what its options add.
SOURCE_FIELDS = {
    "file": {"message", "file", "host", "source_type", "timestamp"},
    "kubernetes_logs": {"message", "file", "kubernetes", "source_type", "stream", "timestamp"},
    # src/sources/kafka.rs (key_field, topic_key, partition_key, offset_key, headers_key defaults)
    "kafka": {
        "message",
        "message_key",
        "headers",
        "topic",
        "partition",
        "offset",
        "source_type",
        "timestamp",
    },
    # website/cue/reference/components/sources/aws_s3.cue, output.logs
    "aws_s3": {"message", "bucket", "object", "region", "source_type", "timestamp"},
    # src/sources/aws_kinesis_firehose/handlers.rs: the record (base64-decoded) is .message
    "aws_kinesis_firehose": {"message", "request_id", "source_arn", "source_type", "timestamp"},
}
# Status codes the gateway answers that must never be retried (they would loop forever) and
# codes that must be (overload; the gateway sends them with Retry-After).
NEVER_RETRY = {400, 404, 413, 415, 422}
MUST_RETRY = {429, 503}


def vector_configs() -> list[Path]:
    return sorted(p for p in CONFIG_DIR.glob("*.y*ml") if p != GATEWAY_EXAMPLE)


CONFIG_IDS = [p.stem for p in vector_configs()]
# Log streams other than files: each event says where it sits, or its content identifies it.
STREAM_CONFIGS = ("kafka", "s3-sqs", "firehose")


# --- Vector's config loading ----------------------------------------------------------------

# src/config/vars.rs (Vector 0.57): interpolation runs over the whole file, comments included.
_VAR = re.compile(r"\$\$|\$([A-Za-z0-9_.]+)|\$\{([A-Za-z0-9_.]+)(?:(:?-|:?\?)([^}]*))?\}")


def interpolate(text: str, env: Mapping[str, str]) -> str:
    errors: list[str] = []

    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name is None:
            return "$"
        flag, default = m.group(3) or "", m.group(4) or ""
        value = env.get(name)
        if flag == ":-":
            return value if value else default
        if flag == "-":
            return default if value is None else value
        if flag in (":?", "?") and (value is None or (flag == ":?" and not value)):
            errors.append(f"required environment variable {name} is not set: {default}")
            return ""
        if value is None:
            errors.append(f"missing environment variable in config: {name}")
            return ""
        return value

    out = _VAR.sub(repl, text)
    if errors:
        raise ValueError("; ".join(errors))
    return out


def load_vector_config(path: Path, env: Mapping[str, str]) -> dict[str, Any]:
    doc = yaml.safe_load(interpolate(path.read_text(encoding="utf-8"), env))
    assert isinstance(doc, dict), f"{path.name}: not a mapping"
    return doc


def test_interpolation_follows_vectors_rules() -> None:
    env = {"FOO": "dogs", "EMPTY": ""}
    assert interpolate("$FOO ${FOO} $$FOO ${NOT:-cats} ${EMPTY-x}|", env) == "dogs dogs $FOO cats |"
    assert interpolate("$ x ${} ${FOO x", env) == "$ x ${} ${FOO x"
    for bad in ("$NOT", "${NOT}", "${NOT:?why}", "${EMPTY:?why}"):
        with pytest.raises(ValueError, match=r"NOT|EMPTY"):
            interpolate(bad, env)


# --- the option reference -------------------------------------------------------------------


def _reference(kind: str, name: str) -> dict[str, Any]:
    path = REFERENCE / kind / f"{name}.json"
    assert path.exists(), f"no option reference for {kind} {name!r}: add it to cue_options.py"
    options: dict[str, Any] = json.loads(path.read_text())["options"]
    return options


def _relevant(spec: dict[str, Any], siblings: dict[str, Any]) -> bool:
    cond = spec.get("relevant_when")
    if cond is None:
        return True
    terms = re.findall(r'(\w+) = "([^"]*)"', cond)
    if not terms or " and " in cond:
        return True
    return any(siblings.get(k) == v for k, v in terms)


def check_options(
    value: Any, options: dict[str, Any], path: str, errors: list[str], top: bool = False
) -> None:
    """Every key known, every value of a documented type, required options present."""
    if not isinstance(value, dict):
        errors.append(f"{path}: expected a table, got {value!r}")
        return
    for key, v in value.items():
        spec = options.get(key, options.get("*"))
        if spec is None:
            errors.append(f"{path}.{key}: unknown option (Vector rejects unknown fields)")
            continue
        if not _relevant(spec, value):
            errors.append(f"{path}.{key}: only applies when {spec['relevant_when']}")
        _check_types(v, spec["types"], f"{path}.{key}", errors)
    for key, spec in options.items():
        if (
            key != "*"
            and spec["required"]
            and key not in value
            and _relevant(spec, value)
            and (top or "relevant_when" in spec)
        ):
            errors.append(f"{path}.{key}: required option missing")


def _check_types(v: Any, types: dict[str, Any], path: str, errors: list[str]) -> None:
    problems: list[str] = []
    for tname, tspec in types.items():
        sub: list[str] = []
        if _type_matches(v, tname, tspec, path, sub):
            if not sub:
                return
            problems.extend(sub)
    errors.extend(problems or [f"{path}: {v!r} is not one of {sorted(types)}"])


def _type_matches(v: Any, tname: str, tspec: dict[str, Any], path: str, errors: list[str]) -> bool:
    if tname in ("*", "condition"):
        return True
    if tname in ("string", "ascii_char"):
        if not isinstance(v, str):
            return False
        if "enum" in tspec and v not in tspec["enum"]:
            errors.append(f"{path}: {v!r} is not one of {tspec['enum']}")
        return True
    if tname == "bool":
        return isinstance(v, bool)
    if tname == "uint":
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0
    if tname == "float":
        return isinstance(v, int | float) and not isinstance(v, bool)
    if tname == "array":
        if not isinstance(v, list):
            return False
        for i, item in enumerate(v):
            _check_types(item, tspec.get("items", {"*": {}}), f"{path}[{i}]", errors)
        return True
    if tname == "object":
        if not isinstance(v, dict):
            return False
        if "options" in tspec:
            check_options(v, tspec["options"], path, errors)
        return True
    raise AssertionError(f"{path}: the reference has a type {tname!r} this test does not know")


# --- a config, taken apart ------------------------------------------------------------------


@dataclass
class Topology:
    config: dict[str, Any]
    components: dict[str, tuple[str, str, dict[str, Any]]]  # id → (kind, type, options)

    @classmethod
    def load(cls, path: Path, env: Mapping[str, str]) -> Topology:
        config = load_vector_config(path, env)
        components = {}
        for kind in ("sources", "transforms", "sinks"):
            for cid, opts in (config.get(kind) or {}).items():
                assert cid not in components, f"{path.name}: component id {cid!r} used twice"
                components[cid] = (kind, opts.get("type"), opts)
        return cls(config, components)

    def of_type(self, kind: str, ctype: str | None = None) -> dict[str, dict[str, Any]]:
        return {
            cid: opts
            for cid, (k, t, opts) in self.components.items()
            if k == kind and (ctype is None or t == ctype)
        }

    def vrl_programs(self) -> Iterator[tuple[str, str, str]]:
        """(component, what, source) of every VRL program: remap sources, filter conditions."""
        for cid, (kind, ctype, opts) in self.components.items():
            if kind != "transforms":
                continue
            if ctype == "remap":
                assert "source" in opts, f"{cid}: ship the program inline (source), not a file"
                yield cid, "source", opts["source"]
            elif ctype == "filter":
                yield cid, "condition", condition_source(opts["condition"])


def condition_source(cond: Any) -> str:
    if isinstance(cond, str):
        return cond
    assert isinstance(cond, dict), f"a condition is a string or a table, got {cond!r}"
    assert cond.get("type", "vrl") == "vrl", f"only VRL conditions are supported here, got {cond!r}"
    return str(cond["source"])


@pytest.fixture(params=vector_configs(), ids=CONFIG_IDS)
def config_path(request: pytest.FixtureRequest) -> Path:
    path: Path = request.param
    return path


def test_every_shipped_config_has_samples() -> None:
    assert CONFIG_IDS, "vector_config/ ships no configs"
    for name in CONFIG_IDS:
        for f in ("input.json", "expected_events.ndjson", "expected_usage.json"):
            assert (DATA / name / f).exists(), f"{name}: tests/testdata/vector/{name}/{f} missing"


def test_configs_reference_only_documented_env_vars(config_path: Path) -> None:
    text = config_path.read_text(encoding="utf-8")
    names = {m.group(1) or m.group(2) for m in _VAR.finditer(text) if m.group() != "$$"}
    assert names <= set(VECTOR_ENV_NAMES), f"undocumented variables {names - set(VECTOR_ENV_NAMES)}"
    with pytest.raises(ValueError, match="METER_GATEWAY_INGEST_KEY"):
        load_vector_config(
            config_path, {"METER_GATEWAY_URL": "http://x", "METER_FIREHOSE_ACCESS_KEY": "f" * 24}
        )


def test_config_options_are_valid_for_vector(config_path: Path) -> None:
    topo = Topology.load(config_path, STATIC_ENV)
    errors: list[str] = []
    top_level = {
        k: v for k, v in topo.config.items() if k not in ("sources", "transforms", "sinks")
    }
    global_options = json.loads((REFERENCE / "global.json").read_text())["options"]
    check_options(top_level, global_options, "<global>", errors)
    for cid, (kind, ctype, opts) in topo.components.items():
        assert ctype, f"{kind}.{cid}: no type"
        options = {**_reference(kind, "_common"), **_reference(kind, ctype)}
        rest = {k: v for k, v in opts.items() if k != "type"}
        check_options(rest, options, f"{kind}.{cid}", errors, top=True)
        for upstream in opts.get("inputs", []):
            if upstream.split(".")[0] not in topo.components or upstream in topo.of_type("sinks"):
                errors.append(f"{kind}.{cid}.inputs: {upstream!r} is no source or transform")
    consumed = {i for _, _, o in topo.components.values() for i in o.get("inputs", [])}
    for cid, (kind, _, _) in topo.components.items():
        if kind != "sinks" and cid not in consumed:
            errors.append(f"{kind}.{cid}: nothing consumes its events")
    assert not errors, "\n".join(errors)


def test_http_sink_settings_are_what_the_gateway_needs(config_path: Path) -> None:
    raw = config_path.read_text(encoding="utf-8")
    topo = Topology.load(config_path, STATIC_ENV)
    sinks = topo.of_type("sinks")
    assert sinks
    assert set(sinks) == set(topo.of_type("sinks", "http")), "only http sinks"
    for cid, sink in sinks.items():
        assert sink["uri"] == "https://meter.example.com/v1/usage", cid
        assert sink.get("method", "post") == "post"
        assert sink["encoding"] == {"codec": "json"}
        assert sink.get("framing", {"method": "newline_delimited"})["method"] == (
            "newline_delimited"
        )
        assert sink["compression"] == "gzip"
        assert sink["auth"] == {
            "strategy": "bearer",
            "token": STATIC_ENV["METER_GATEWAY_INGEST_KEY"],
        }
        assert 'token: "${METER_GATEWAY_INGEST_KEY' in raw, "the key comes from the environment"
        assert sink["acknowledgements"] == {"enabled": True}
        assert sink["healthcheck"] == {"enabled": True, "uri": sink["uri"]}
        batch = sink["batch"]
        # Under the gateway's 10 MiB body limit and 100,000 records per request.
        assert batch["max_bytes"] <= 10 * 1024 * 1024
        assert batch["max_events"] <= 100_000
        assert 0 < batch["timeout_secs"] <= 60
        request = sink["request"]
        assert request["timeout_secs"] >= 30
        assert "retry_attempts" not in request, "retries must not give up on billing data"
        codes = set(sink["retry_strategy"]["status_codes"])
        assert sink["retry_strategy"]["type"] == "custom"
        assert codes >= MUST_RETRY, codes
        assert not codes & NEVER_RETRY, codes
        assert sink["buffer"]["when_full"] == "block", "backpressure, never drop_newest"


def test_vrl_programs_compile(config_path: Path) -> None:
    """Compiled alone, as Vector compiles them (schema disabled: the event is `any` object)."""
    topo = Topology.load(config_path, STATIC_ENV)
    programs = list(topo.vrl_programs())
    assert programs
    for cid, what, source in programs:
        try:
            pyvrl.Transform(source)
        except ValueError as exc:
            pytest.fail(f"{config_path.name}: transforms.{cid}.{what} does not compile:\n{exc}")


_VRL_LITERAL = re.compile(r"""r'[^']*'|"(?:[^"\\]|\\.)*"|#[^\n]*""")
_VRL_CALL = re.compile(r"\b([a-z_][a-z0-9_]*)!?\(")


def test_vrl_programs_use_only_functions_vector_ships(config_path: Path) -> None:
    """pyVRL embeds VRL 0.15; Vector 0.57 runs VRL 0.33. Every function the programs call must
    exist in the newer one too (and compile in the older one, above)."""
    known = set(json.loads((REFERENCE / "vrl_functions.json").read_text())["functions"])
    topo = Topology.load(config_path, STATIC_ENV)
    for cid, what, source in topo.vrl_programs():
        called = set(_VRL_CALL.findall(_VRL_LITERAL.sub("", source))) - {"if"}
        assert called, f"{cid}.{what}: no function calls found; is the scanner broken?"
        assert called <= known, f"{cid}.{what}: not in Vector 0.57's VRL: {called - known}"


# --- running a topology ---------------------------------------------------------------------

# Log sources give `.timestamp` as a timestamp; pyVRL takes JSON-ish input, so the samples hold
# RFC 3339 text and this turns it back into a timestamp before the program runs.
_PRELUDE = 'if is_string(.timestamp) { .timestamp = parse_timestamp!(.timestamp, "%+") }\n'
# Vector's json codec serializes each event with serde; so does VRL's encode_json. A root set to
# an array is one event per element.
_ENCODE = "\nencode_json(.)"


def split_events(text: str) -> list[str]:
    """The exact text of each event: the root object, or each element of a root array."""
    if not text.startswith("["):
        return [text]
    decoder, out, pos = json.JSONDecoder(), [], 1
    while text[pos] != "]":
        _, end = decoder.raw_decode(text, pos)
        out.append(text[pos:end])
        pos = end + 1 if text[end] == "," else end
    return out


@dataclass
class Log:
    fields: dict[str, Any]
    encoded: str


@dataclass
class Metric:
    name: str
    kind: str
    value_type: str
    value: float
    namespace: str | None = None
    tags: dict[str, str] | None = None
    timestamp: str | None = None
    interval_ms: int | None = None
    generated_timestamp: bool = False

    def series(self) -> tuple[Any, ...]:
        return (self.name, self.namespace, tuple(sorted((self.tags or {}).items())))

    def encoded(self) -> str:
        """Vector's serde layout of a metric: series (name, namespace, tags), time, kind, value."""
        parts = [f'"name":{_json(self.name)}']
        if self.namespace is not None:
            parts.append(f'"namespace":{_json(self.namespace)}')
        if self.tags is not None:
            parts.append(f'"tags":{_json(dict(sorted(self.tags.items())))}')
        if self.timestamp is not None:
            parts.append(f'"timestamp":{_json(self.timestamp)}')
        if self.interval_ms is not None:
            parts.append(f'"interval_ms":{self.interval_ms}')
        parts.append(f'"kind":{_json(self.kind)}')
        parts.append(f'"{self.value_type}":{{"value":{ryu(self.value)}}}')
        return "{" + ",".join(parts) + "}"


Event = Log | Metric


def _json(v: Any) -> str:
    return json.dumps(v, ensure_ascii=False, separators=(",", ":"))


def ryu(f: float) -> str:
    """A finite f64 as serde_json writes it (the ryu crate's format64)."""
    if f == 0:
        return "-0.0" if str(f).startswith("-") else "0.0"
    sign = "-" if f < 0 else ""
    # repr gives the shortest digits that round-trip, as ryu does; only the layout differs.
    mantissa, _, e = repr(abs(f)).partition("e")
    int_part, _, frac_part = mantissa.partition(".")
    digits = (int_part + frac_part).lstrip("0")
    exp = int(e or 0) - len(frac_part)
    stripped = digits.rstrip("0")
    exp += len(digits) - len(stripped)
    digits = stripped
    length = len(digits)
    kk = length + exp  # 10^(kk-1) <= |f| < 10^kk
    if exp >= 0 and kk <= 16:
        return sign + digits + "0" * exp + ".0"
    if 0 < kk <= 16:
        return sign + digits[:kk] + "." + digits[kk:]
    if -5 < kk <= 0:
        return sign + "0." + "0" * -kk + digits
    if length == 1:
        return f"{sign}{digits}e{kk - 1}"
    return f"{sign}{digits[0]}.{digits[1:]}e{kk - 1}"


def test_ryu_matches_serde_json() -> None:
    cases = {
        1.0: "1.0",
        1234.0: "1234.0",
        0.1: "0.1",
        1.5e-7: "1.5e-7",
        1e21: "1e21",
        123456789.0: "123456789.0",
        1e16: "1e16",
        1.2345e16: "1.2345e16",
        0.0001: "0.0001",
        2.5e9: "2500000000.0",
        -3.25: "-3.25",
        1e15: "1000000000000000.0",
    }
    for f, text in cases.items():
        assert ryu(f) == text, (f, ryu(f), text)
    # VRL's encode_json is serde_json too: the same text for the same floats.
    enc = pyvrl.Transform("encode_json(.values)").remap({"values": list(cases)})
    assert enc == "[" + ",".join(cases.values()) + "]"


def autosi(ts: str) -> str:
    """RFC 3339 → Vector's rendering: UTC, `Z`, 0/3/6/9 fraction digits (chrono AutoSi)."""
    m = re.fullmatch(r"(.*?)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", ts)
    assert m, ts
    base = datetime.fromisoformat(m.group(1) + m.group(3)).astimezone(UTC)
    nanos = int((m.group(2) or "").ljust(9, "0")[:9] or 0)
    frac = f"{nanos:09d}"
    for n in (0, 3, 6):
        if frac[n:] == "0" * (9 - n):
            frac = frac[:n]
            break
    return base.strftime("%Y-%m-%dT%H:%M:%S") + (f".{frac}" if frac else "") + "Z"


class Runner:
    """Runs a topology's transforms on sample events and collects what each sink receives."""

    def __init__(self, topo: Topology) -> None:
        self.topo = topo
        self.runtime_errors: list[str] = []
        self._programs: dict[str, Any] = {}

    def run(self, inputs: Mapping[str, list[dict[str, Any]]]) -> dict[str, list[Event]]:
        sources = self.topo.of_type("sources")
        assert set(inputs) <= set(sources), f"samples for unknown sources {set(inputs)}"
        outputs: dict[str, list[Event]] = {
            cid: [self._source_event(sources[cid], e) for e in events]
            for cid, events in inputs.items()
        }
        for cid in sources:
            outputs.setdefault(cid, [])
        pending = dict(self.topo.of_type("transforms"))
        while pending:
            ready = [cid for cid, o in pending.items() if all(i in outputs for i in o["inputs"])]
            assert ready, f"transforms with unresolved inputs: {sorted(pending)}"
            for cid in ready:
                opts = pending.pop(cid)
                events = [e for i in opts["inputs"] for e in outputs[i]]
                outputs[cid] = self._transform(cid, opts, events)
        return {
            cid: [e for i in opts["inputs"] for e in outputs[i]]
            for cid, opts in self.topo.of_type("sinks").items()
        }

    def _source_event(self, opts: dict[str, Any], sample: dict[str, Any]) -> Event:
        stype = opts["type"]
        if stype in LOG_SOURCES:
            expected = set(SOURCE_FIELDS[stype])
            if opts.get("offset_key"):
                expected.add(opts["offset_key"])
            missing = expected - set(sample)
            assert not missing, f"a {stype} event has {sorted(missing)}: fix the sample"
            assert sample["source_type"] == stype
            fields = dict(sample)
            return Log(fields, self._vrl(_PRELUDE + _ENCODE, "encode", fields))
        assert stype in METRIC_SOURCES, f"no emulation for source type {stype!r}"
        (value_type,) = [k for k in ("counter", "gauge") if k in sample]
        if stype == "statsd":
            assert "timestamp" not in sample, "StatsD metrics carry no timestamp"
        return Metric(
            name=sample["name"],
            kind=sample["kind"],
            value_type=value_type,
            value=float(sample[value_type]["value"]),
            namespace=sample.get("namespace"),
            tags=sample.get("tags"),
            timestamp=autosi(sample["timestamp"]) if "timestamp" in sample else None,
        )

    def _vrl(self, source: str, key: str, target: Any) -> Any:
        """Run a program; compile errors fail the test, runtime errors raise ValueError."""
        program = self._programs.get(key)
        if program is None:
            try:
                program = self._programs[key] = pyvrl.Transform(source)
            except ValueError as exc:
                pytest.fail(f"{key} does not compile:\n{exc}")
        return program.remap(target)

    def _transform(self, cid: str, opts: dict[str, Any], events: list[Event]) -> list[Event]:
        ttype = opts["type"]
        if ttype == "remap":
            out: list[Event] = []
            for e in events:
                out.extend(self._remap(cid, opts, e))
            return out
        if ttype == "filter":
            cond = condition_source(opts["condition"])
            return [e for e in events if self._condition(cid, cond, e)]
        if ttype == "aggregate":
            assert opts.get("mode", "Auto") == "Auto", "only aggregate's Auto mode is emulated"
            return aggregate(events)
        raise AssertionError(f"no emulation for transform type {ttype!r} ({cid})")

    def _condition(self, cid: str, cond: str, e: Event) -> bool:
        target = e.fields if isinstance(e, Log) else metric_target(e)
        try:
            result = self._vrl(_PRELUDE + cond, f"{cid}/condition", target)
        except ValueError as exc:  # a failing condition is false
            self.runtime_errors.append(f"{cid}: {exc}")
            return False
        assert isinstance(result, bool), f"{cid}: condition returned {result!r}"
        return result

    def _remap(self, cid: str, opts: dict[str, Any], e: Event) -> list[Event]:
        program = _PRELUDE + opts["source"] + _ENCODE
        target = e.fields if isinstance(e, Log) else metric_target(e)
        try:
            out = self._vrl(program, f"{cid}/{type(e).__name__}", target)
        except ValueError as exc:
            if str(exc).startswith("remap failure: aborted"):
                return [] if opts.get("drop_on_abort", True) else [e]
            self.runtime_errors.append(f"{cid}: {exc}")
            return [] if opts.get("drop_on_error", False) else [e]
        if isinstance(e, Log):
            return [Log(json.loads(s), s) for s in split_events(out)]
        return [apply_metric_target(e, json.loads(out), cid)]


_METRIC_PATHS = {"name", "namespace", "tags", "timestamp", "kind", "type", "interval_ms"}


def metric_target(m: Metric) -> dict[str, Any]:
    """The VRL view of a metric (vrl_target.rs): name, kind, type, and the optional paths."""
    target: dict[str, Any] = {"name": m.name, "kind": m.kind, "type": m.value_type}
    for key in ("namespace", "tags", "timestamp", "interval_ms"):
        if getattr(m, key) is not None:
            target[key] = getattr(m, key)
    return target


def apply_metric_target(m: Metric, target: dict[str, Any], cid: str) -> Metric:
    assert set(target) <= _METRIC_PATHS, f"{cid}: a metric has no {set(target) - _METRIC_PATHS}"
    assert target["type"] == m.value_type, f"{cid}: a metric's type cannot be set"
    assert target["kind"] in ("absolute", "incremental"), f"{cid}: bad kind {target['kind']!r}"
    tags = target.get("tags")
    assert tags is None or all(isinstance(v, str) for v in tags.values()), f"{cid}: tag values"
    ts = target.get("timestamp")
    return replace(
        m,
        name=target["name"],
        kind=target["kind"],
        namespace=target.get("namespace"),
        tags=tags or None,
        timestamp=None if ts is None else autosi(ts),
        interval_ms=target.get("interval_ms"),
        generated_timestamp=m.generated_timestamp or (m.timestamp is None and ts is not None),
    )


def aggregate(events: list[Event]) -> list[Event]:
    """aggregate, mode Auto, one flush: incremental series summed, absolute ones keep the last."""
    out: dict[tuple[Any, ...], Metric] = {}
    for e in events:
        assert isinstance(e, Metric), "aggregate takes metrics"
        key = e.series()
        prev = out.get(key)
        if e.kind == "absolute" or prev is None or prev.value_type != e.value_type:
            out[key] = e
            continue
        assert prev.interval_ms is None, "intervals are not emulated"
        assert e.interval_ms is None, "intervals are not emulated"
        stamps = [t for t in (prev.timestamp, e.timestamp) if t is not None]
        out[key] = replace(
            prev, value=prev.value + e.value, timestamp=max(stamps, key=_ns) if stamps else None
        )
    return list(out.values())


def _ns(ts: str) -> int:
    m = re.fullmatch(r"(.*?)(?:\.(\d+))?Z", ts)
    assert m
    base = int(datetime.fromisoformat(m.group(1) + "+00:00").timestamp())
    return base * 1_000_000_000 + int((m.group(2) or "0").ljust(9, "0"))


# --- the http sink's requests ---------------------------------------------------------------


@dataclass
class Request:
    uri: str
    headers: dict[str, str]
    body: bytes  # as sent (compressed)
    plain: bytes = field(repr=False, default=b"")


def http_request(sink: dict[str, Any], events: list[Event]) -> Request:
    """One batch as Vector's http sink sends it (src/sinks/http: encoder, content type)."""
    assert sink["encoding"]["codec"] == "json"
    lines = [e.encoded if isinstance(e, Log) else e.encoded() for e in events]
    method = (sink.get("framing") or {}).get("method")
    if method is None:  # json codec default framing: a JSON array
        plain, ctype = "[" + ",".join(lines) + "]", "application/json"
    elif method == "newline_delimited":  # no trailing newline
        plain, ctype = "\n".join(lines), "application/x-ndjson"
    else:
        raise AssertionError(f"framing {method!r} is not emulated")
    headers = {"Content-Type": ctype}
    data = plain.encode()
    body = data
    compression = sink.get("compression", "none")
    if compression == "gzip":
        # flate2's GzEncoder at the default level: mtime 0, OS 255, as gzip.compress writes.
        body = gzip.compress(data, compresslevel=6, mtime=0)
        headers["Content-Encoding"] = "gzip"
    else:
        assert compression == "none", f"compression {compression!r} is not emulated"
    auth = sink.get("auth")
    if auth:
        assert auth["strategy"] == "bearer"
        headers["Authorization"] = f"Bearer {auth['token']}"
    return Request(sink["uri"], headers, body, data)


# --- samples, goldens, the gateway ----------------------------------------------------------


def load_inputs(name: str) -> dict[str, list[dict[str, Any]]]:
    inputs: dict[str, list[dict[str, Any]]] = json.loads((DATA / name / "input.json").read_text())
    return inputs


def golden_lines(events: list[Event]) -> list[str]:
    lines = []
    for e in events:
        if isinstance(e, Metric) and e.generated_timestamp:
            e = replace(e, timestamp="<set by now() at flush>")
        lines.append(e.encoded if isinstance(e, Log) else e.encoded())
    return lines


def check_golden(name: str, sink_id: str, events: list[Event]) -> None:
    path = DATA / name / "expected_events.ndjson"
    text = "".join(f"{line}\n" for line in golden_lines(events))
    if UPDATE_GOLDEN:
        path.write_text(text)
    assert text == path.read_text(), (
        f"{name}: events for sink {sink_id} differ from {path.name}; if intended, rerun with "
        "METER_GATEWAY_UPDATE_GOLDEN=1 and review the diff"
    )


def gateway_config(workdir: Path) -> dict[str, Any]:
    """gateway-example.yaml as shipped, on a test port and database, plus an admin key.

    The samples are dated June 2025 so the goldens stay byte-stable: the gateway takes that
    history as a backfill (late_arrival_limit) and deduplicates across it (dedup_window).
    """
    config: dict[str, Any] = yaml.safe_load(GATEWAY_EXAMPLE.read_text())
    config.pop("server", None)
    config["store"] = {"url": store_url(workdir)}
    config["auth"]["api_keys"].append({"name": "admin", "key": ADMIN_KEY, "scopes": ["admin"]})
    config["ingest"] = {"late_arrival_limit": "3650d", "dedup_window": "3650d"}
    return config


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[GatewayProcess]:
    gw = GatewayProcess(
        tmp_path, gateway_config(tmp_path), env={"METER_GATEWAY_INGEST_KEY": INGEST_KEY}
    ).start()
    yield gw
    gw.stop()


def vector_env(gw: GatewayProcess) -> dict[str, str]:
    return {
        "METER_GATEWAY_URL": gw.url,
        "METER_GATEWAY_INGEST_KEY": INGEST_KEY,
        "METER_FIREHOSE_ACCESS_KEY": STATIC_ENV["METER_FIREHOSE_ACCESS_KEY"],
    }


def send(request: Request) -> httpx.Response:
    return httpx.post(request.uri, content=request.body, headers=request.headers, timeout=30)


def month_range(month: str) -> tuple[str, str]:
    if month == "current":
        now = datetime.now(UTC)
        month = f"{now.year:04d}-{now.month:02d}"
    year, mon = (int(x) for x in month.split("-"))
    nxt = (year + 1, 1) if mon == 12 else (year, mon + 1)
    return f"{year:04d}-{mon:02d}-01T00:00:00Z", f"{nxt[0]:04d}-{nxt[1]:02d}-01T00:00:00Z"


def usage_value(gw: GatewayProcess, customer: str, dimension: str, month: str) -> Decimal | None:
    start, end = month_range(month)
    with gw.client(ADMIN_KEY) as c:
        r = c.get(
            "/v1/usage",
            params={
                "customerId": customer,
                "dimensionId": dimension,
                "window": "month",
                "from": start,
                "to": end,
            },
        )
    assert r.status_code == 200, r.text
    (row,) = r.json()["data"]
    return None if row["value"] is None else Decimal(row["value"])


def rejected_records(gw: GatewayProcess) -> list[dict[str, Any]]:
    with gw.client(ADMIN_KEY) as c:
        r = c.get("/v1/rejected", params={"limit": 1000})
    assert r.status_code == 200, r.text
    data: list[dict[str, Any]] = r.json()["data"]
    return data


def assert_usage(gw: GatewayProcess, expected: dict[str, Any]) -> None:
    for row in expected["usage"]:
        got = usage_value(gw, row["customerId"], row["dimensionId"], row["month"])
        assert got == Decimal(row["value"]), (row, got)


def run_config(
    name: str,
    env: Mapping[str, str],
    inputs: Mapping[str, list[dict[str, Any]]] | None = None,
) -> tuple[Topology, Runner, dict[str, list[Event]]]:
    topo = Topology.load(CONFIG_DIR / f"{name}.yaml", env)
    runner = Runner(topo)
    return topo, runner, runner.run(load_inputs(name) if inputs is None else inputs)


# --- the tests that send ----------------------------------------------------------------------


@pytest.mark.parametrize("name", CONFIG_IDS)
def test_sample_events_give_exact_usage(name: str, gateway: GatewayProcess) -> None:
    topo, runner, by_sink = run_config(name, vector_env(gateway))
    # The shipped programs handle every error themselves.
    assert runner.runtime_errors == []
    expected = json.loads((DATA / name / "expected_usage.json").read_text())
    ((sink_id, events),) = by_sink.items()
    check_golden(name, sink_id, events)

    request = http_request(topo.of_type("sinks")[sink_id], events)
    response = send(request)
    # One bad record never fails the batch: 2xx, the good ones stored, the bad one kept.
    assert response.status_code == 200, response.text
    body = response.json()
    assert {k: body[k] for k in ("accepted", "duplicates", "rejected")} == expected["response"]
    got_errors = sorted((e["field"], e["reason"]) for e in body["errors"])
    want_errors = sorted((e["field"], e["reason"]) for e in expected["rejected"])
    assert got_errors == want_errors, body["errors"]
    assert len(rejected_records(gateway)) == len(expected["rejected"])
    assert_usage(gateway, expected)


# Not metrics.yaml: incremental metric events carry no id and the gateway does not deduplicate
# them yet (vector_config/README.md, "Metric events").
@pytest.mark.parametrize("name", [n for n in CONFIG_IDS if n != "metrics"])
def test_a_retried_batch_counts_once(name: str, gateway: GatewayProcess) -> None:
    """The sink retries the same body (429, 503, timeouts): every record carries its id."""
    topo, _, by_sink = run_config(name, vector_env(gateway))
    ((sink_id, events),) = by_sink.items()
    request = http_request(topo.of_type("sinks")[sink_id], events)
    first = send(request).json()
    again = send(request)
    assert again.status_code == 200
    assert again.json()["accepted"] == 0
    assert again.json()["duplicates"] == first["accepted"]
    assert_usage(gateway, json.loads((DATA / name / "expected_usage.json").read_text()))


@pytest.mark.parametrize("name", ["app-json-logs", "access-logs", *STREAM_CONFIGS])
def test_a_line_read_again_after_a_restart_counts_once(name: str, gateway: GatewayProcess) -> None:
    """Vector re-reads unacknowledged lines after a restart, at a later read time (a Kafka
    rebalance, an SQS message back after its visibility timeout, a Firehose retry); the remap
    runs again and must give the same ids."""
    env = vector_env(gateway)
    inputs = load_inputs(name)
    topo, _, by_sink = run_config(name, env, inputs)
    reread = {
        # A Firehose record delivered again comes in another request, with another request id.
        src: [
            {
                **e,
                "timestamp": "2025-06-02T18:30:00.250Z",
                **(
                    {"request_id": "a2b5c0d9-0000-4e4e-9f9f-redelivered0"}
                    if "request_id" in e
                    else {}
                ),
            }
            for e in events
        ]
        for src, events in inputs.items()
    }
    _, _, by_sink_again = run_config(name, env, reread)
    ((sink_id, events),) = by_sink.items()
    events_again = by_sink_again[sink_id]
    ids = [e.fields.get("id") for e in events if isinstance(e, Log)]
    assert ids == [e.fields.get("id") for e in events_again if isinstance(e, Log)]
    sink = topo.of_type("sinks")[sink_id]
    first = send(http_request(sink, events)).json()
    again = send(http_request(sink, events_again)).json()
    assert again["accepted"] == 0
    assert again["duplicates"] == first["accepted"]
    assert_usage(gateway, json.loads((DATA / name / "expected_usage.json").read_text()))


@pytest.mark.parametrize("framing", [None, "newline_delimited"])
def test_one_malformed_event_does_not_fail_the_batch(
    framing: str | None, gateway: GatewayProcess
) -> None:
    """Any non-2xx but 408/429/5xx makes Vector drop the whole batch: the gateway must answer
    2xx, store the good records and keep the bad one (here a line the format does not
    describe), in both framings."""
    topo, _, by_sink = run_config("access-logs", vector_env(gateway))
    ((sink_id, events),) = by_sink.items()
    sink = dict(topo.of_type("sinks")[sink_id])
    if framing is None:
        sink.pop("framing", None)
    else:
        sink["framing"] = {"method": framing}
    malformed = [e for e in events if isinstance(e, Log) and "customerId" not in e.fields]
    assert len(malformed) == 1, "the access-log samples hold one line of another format"
    request = http_request(sink, events)
    assert request.headers["Content-Type"] == (
        "application/json" if framing is None else "application/x-ndjson"
    )
    assert not request.plain.endswith(b"\n")
    response = send(request)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["rejected"] == 2
    assert body["accepted"] == len(events) - 2
    kept = rejected_records(gateway)
    assert any("does not match the metered log_format" in r["record"] for r in kept)
    assert_usage(gateway, json.loads((DATA / "access-logs" / "expected_usage.json").read_text()))


def test_healthcheck_answers_exactly_200(gateway: GatewayProcess) -> None:
    """Vector's healthcheck: HEAD healthcheck.uri with the sink's auth, must be exactly 200."""
    for name in CONFIG_IDS:
        topo = Topology.load(CONFIG_DIR / f"{name}.yaml", vector_env(gateway))
        for sink in topo.of_type("sinks").values():
            r = httpx.head(
                sink["healthcheck"]["uri"],
                headers={"Authorization": f"Bearer {sink['auth']['token']}"},
            )
            assert r.status_code == 200, (name, r.status_code)


def counter(tenant: str, minute: int, total: float) -> Metric:
    return Metric(
        "app_api_requests_total",
        "absolute",
        "counter",
        total,
        tags={"instance": "127.0.0.1:9100", "job": "app", "tenant": tenant},
        timestamp=f"2025-06-02T12:{minute:02d}:00Z",
    )


def test_absolute_counters_count_increases_once_across_resends_and_restarts(
    gateway: GatewayProcess,
) -> None:
    """Prometheus counters (absolute metric events): each series' totals become increases
    against the last committed total; a resent batch adds nothing, and a gateway restart
    neither repeats nor loses the step across it."""
    topo = Topology.load(CONFIG_DIR / "metrics.yaml", vector_env(gateway))
    sink = topo.of_type("sinks")["meter_gateway"]

    def post(events: list[Event]) -> dict[str, Any]:
        response = send(http_request(sink, events))
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    first: list[Event] = [counter("acme", 0, 500.0), counter("acme", 1, 520.5)]
    assert post(first)["accepted"] == 1  # the first total is a baseline
    assert post(first)["accepted"] == 0  # Vector retried the batch
    gateway.stop()
    gateway.start()
    # after the restart: +9.5, then a reset (the app restarted) counts from zero
    assert post([counter("acme", 2, 530.0), counter("acme", 3, 4.0)])["accepted"] == 2
    assert post([counter("acme", 1, 520.5)])["accepted"] == 0  # an old total, late
    assert usage_value(gateway, "acme", "api-calls", "2025-06") == Decimal("34")


def test_a_bad_absolute_counter_is_rejected_alone(gateway: GatewayProcess) -> None:
    """A total no rule bills is rejected with its reason; the rest of the batch is stored."""
    topo = Topology.load(CONFIG_DIR / "metrics.yaml", vector_env(gateway))
    sink = topo.of_type("sinks")["meter_gateway"]
    events: list[Event] = [
        counter("acme", 0, 10.0),
        counter("nobody", 0, 3.0),
        counter("acme", 1, 15.0),
        counter("nobody", 1, 8.0),
    ]
    body = send(http_request(sink, events)).json()
    assert (body["accepted"], body["rejected"]) == (1, 1)
    (error,) = body["errors"]
    assert error["index"] == 3
    assert error["reason"] == "unknown_customer"
    assert usage_value(gateway, "acme", "api-calls", "2025-06") == Decimal(5)


def test_an_atomic_batch_with_a_bad_absolute_counter_stores_nothing(
    gateway: GatewayProcess,
) -> None:
    """?atomic=true holds for running totals too: the totals' state does not move either, so
    the same series' next total is still measured from before the refused batch."""
    topo = Topology.load(CONFIG_DIR / "metrics.yaml", vector_env(gateway))
    sink = topo.of_type("sinks")["meter_gateway"]
    assert send(http_request(sink, [counter("acme", 0, 10.0)])).json()["accepted"] == 0
    refused = http_request(
        sink, [counter("acme", 1, 15.0), counter("nobody", 0, 3.0), counter("nobody", 1, 8.0)]
    )
    response = httpx.post(
        refused.uri + "?atomic=true", content=refused.body, headers=refused.headers, timeout=30
    )
    assert response.status_code == 422, response.text
    assert response.json()["accepted"] == 0
    assert usage_value(gateway, "acme", "api-calls", "2025-06") == 0
    assert send(http_request(sink, [counter("acme", 2, 21.0)])).json()["accepted"] == 1
    assert usage_value(gateway, "acme", "api-calls", "2025-06") == Decimal(11)
