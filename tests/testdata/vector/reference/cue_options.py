"""Extract Vector's component option trees from its generated CUE reference into JSON.

Vector documents every option of every component in
``website/cue/reference/**/generated/*.cue``, generated from the Rust config structs (which
deny unknown fields). This script turns the parts our shipped configs use into the small JSON
files next to it, so the tests can reject an option Vector would refuse at start-up.

    python tests/testdata/vector/reference/cue_options.py /path/to/vector.git v0.57.0

Regenerating is explicit: run it, review the diff, commit.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
CUE = "website/cue/reference"
# (output file, CUE file, path of the option struct inside it)
WANTED = {
    "global.json": (
        f"{CUE}/generated/configuration.cue",
        ["generated", "configuration", "configuration"],
    ),
    "sinks/_common.json": (
        f"{CUE}/components/generated/sinks.cue",
        ["generated", "components", "sinks", "configuration"],
    ),
    "sources/_common.json": (
        f"{CUE}/components/generated/sources.cue",
        ["generated", "components", "sources", "configuration"],
    ),
    "transforms/_common.json": (
        f"{CUE}/components/generated/transforms.cue",
        ["generated", "components", "transforms", "configuration"],
    ),
}
for _kind, _names in {
    "sinks": ["http"],
    "sources": [
        "file",
        "kubernetes_logs",
        "statsd",
        "prometheus_scrape",
        "kafka",
        "aws_s3",
        "aws_kinesis_firehose",
    ],
    "transforms": ["remap", "filter", "aggregate"],
}.items():
    for _name in _names:
        WANTED[f"{_kind}/{_name}.json"] = (
            f"{CUE}/components/{_kind}/generated/{_name}.cue",
            ["generated", "components", _kind, _name, "configuration"],
        )

_TOKEN = re.compile(
    r'(?P<ws>[ \t\r\n,]+)|(?P<comment>//[^\n]*)|(?P<mstr>"""(?:.|\n)*?""")'
    r'|(?P<str>"(?:[^"\\\n]|\\.)*")|(?P<punct>[{}\[\]:])'
    r"|(?P<atom>[A-Za-z0-9_#$.+\-]+)"
)


def tokenize(text: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise ValueError(f"cannot tokenize CUE at {text[pos : pos + 40]!r}")
        pos = m.end()
        kind = m.lastgroup
        assert kind is not None
        if kind in ("ws", "comment"):
            continue
        out.append((kind, m.group()))
    return out


class _Parser:
    def __init__(self, tokens: list[tuple[str, str]]) -> None:
        self.t, self.i = tokens, 0

    def peek(self, k: int = 0) -> tuple[str, str]:
        return self.t[self.i + k] if self.i + k < len(self.t) else ("eof", "")

    def next(self) -> tuple[str, str]:
        tok = self.peek()
        self.i += 1
        return tok

    def fields(self, end: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        while self.peek()[1] != end and self.peek()[0] != "eof":
            label = self.label()
            if self.next()[1] != ":":
                raise ValueError(f"expected ':' after {label!r}")
            out[label] = self.value()
        return out

    def label(self) -> str:
        kind, text = self.next()
        if kind == "str":
            return str(json.loads(text))
        if kind == "atom":
            return text
        raise ValueError(f"expected a label, got {text!r}")

    def value(self) -> Any:
        kind, text = self.peek()
        if kind in ("atom", "str") and self.peek(1)[1] == ":":
            label = self.label()
            self.next()
            return {label: self.value()}
        self.next()
        if text == "{":
            v = self.fields("}")
            self.next()
            return v
        if text == "[":
            items = []
            while self.peek()[1] != "]":
                items.append(self.value())
            self.next()
            return items
        if kind == "mstr":
            return text[3:-3]
        if kind == "str":
            return json.loads(text)
        return {"true": True, "false": False, "null": None}.get(text, text)


def parse_cue(text: str) -> dict[str, Any]:
    tokens = tokenize(text)
    if tokens[:1] == [("atom", "package")]:
        tokens = tokens[2:]
    return _Parser(tokens).fields("eof")


def simplify(options: dict[str, Any]) -> dict[str, Any]:
    """Option structs → {name: {"required", "relevant_when"?, "types": {...}}}."""
    return {name: _option(spec) for name, spec in sorted(options.items())}


def _option(spec: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "required": bool(spec.get("required", False)),
        "types": _types(spec.get("type", {})),
    }
    if "relevant_when" in spec:
        out["relevant_when"] = spec["relevant_when"]
    return out


def _types(types: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for tname, tspec in types.items():
        tspec = tspec if isinstance(tspec, dict) else {}
        t: dict[str, Any] = {}
        if "enum" in tspec:
            t["enum"] = sorted(tspec["enum"])
        if tname == "object" and "options" in tspec:
            t["options"] = simplify(tspec["options"])
        if tname == "array" and "items" in tspec:
            t["items"] = _types(tspec["items"].get("type", {}))
        out[tname] = t
    return out


def main(repo: str, ref: str) -> None:
    for out_name, (path, keys) in WANTED.items():
        text = subprocess.run(
            ["git", "-C", repo, "show", f"{ref}:{path}"], check=True, capture_output=True, text=True
        ).stdout
        node: Any = parse_cue(text)
        for key in keys:
            node = node[key]
        target = HERE / out_name
        target.parent.mkdir(parents=True, exist_ok=True)
        doc = {"source": f"vectordotdev/vector@{ref}:{path}", "options": simplify(node)}
        target.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
        print(f"wrote {target.relative_to(HERE)}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
