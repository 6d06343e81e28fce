"""The PromQL the gateway accepts for metered series: plain vector selectors.

Usage must come from raw samples, and only a selector has them; a function or an aggregation
is evaluated at steps, which is what makes ``increase()`` inexact.
"""

from __future__ import annotations

import re

_NAME = re.compile(r"\s*([a-zA-Z_:][a-zA-Z0-9_:]*)")
_LABEL = re.compile(r"\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*")
_STRING = re.compile(r"\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*'|`[^`]*`")


def parse_selector(text: str) -> str:
    """Check that ``text`` is one PromQL vector selector (``name{l="v",...}``) and return its
    metric name ("" for ``{__name__=~...}``); raise ``ValueError`` saying why not.

    Only a selector has raw samples; a function or an aggregation is computed at evaluation
    steps, which is what makes ``increase()`` inexact. Aggregate in the gateway instead: the
    customer label groups the series.
    """
    pos, name = 0, ""
    m = _NAME.match(text, pos)
    if m:
        name, pos = m.group(1), m.end()
    rest = text[pos:].lstrip()
    pos = len(text) - len(rest)
    if rest.startswith("{"):
        pos += 1
        matchers = 0
        while True:
            while pos < len(text) and text[pos].isspace():
                pos += 1
            if pos < len(text) and text[pos] == "}":
                pos += 1
                break
            lm = _LABEL.match(text, pos)
            if not lm:
                raise ValueError(f"{text!r}: expected a label matcher at offset {pos}")
            sm = _STRING.match(text, lm.end())
            if not sm:
                raise ValueError(f"{text!r}: expected a quoted string at offset {lm.end()}")
            pos, matchers = sm.end(), matchers + 1
            while pos < len(text) and text[pos].isspace():
                pos += 1
            if pos < len(text) and text[pos] == ",":
                pos += 1
            elif not (pos < len(text) and text[pos] == "}"):
                raise ValueError(f"{text!r}: expected ',' or '}}' at offset {pos}")
        if not name and not matchers:
            raise ValueError(f"{text!r}: an empty selector matches nothing")
    if not name and not rest.startswith("{"):
        raise ValueError(f'{text!r} is not a vector selector such as app_bytes_total{{env="prod"}}')
    if text[pos:].strip():
        raise ValueError(
            f"{text!r} is not a plain vector selector (found {text[pos:].strip()[:40]!r}): "
            "usage is computed from raw samples, so functions, operators, ranges and offsets "
            "are not allowed; the customer label groups series in the gateway"
        )
    return name
