"""SPEC §10: a running gateway conforms to its own /openapi.json.

schemathesis generates requests for every operation from the document (valid ones and, in its
negative mode, invalid ones) and holds each answer to it: no 5xx, a documented status, the
documented content type and a body that matches its schema. The gateway runs on the store of
METER_TEST_STORE, so the suite covers SQLite and PostgreSQL. Examples per operation:
METER_SCHEMATHESIS_EXAMPLES (default 10; raise it for a long run).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from requests.adapters import BaseAdapter, HTTPAdapter
from schemathesis import Case
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.config import SchemathesisConfig

from tests.gatewayproc import ADMIN_KEY, GatewayProcess

EXAMPLES = int(os.environ.get("METER_SCHEMATHESIS_EXAMPLES", "10"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
#: Served on the OTLP/HTTP port, tested against it below.
OTLP_PATH = "/v1/metrics"


@schemathesis.serializer("application/x-ndjson")
def _ndjson(ctx: Any, value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


@schemathesis.serializer("application/x-protobuf")
def _protobuf(ctx: Any, value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


class _Adapter(BaseAdapter):
    """requests' adapter behind one that is not an HTTPAdapter: schemathesis counts the open
    connections of HTTPAdapters through urllib3 internals that urllib3-future (which
    grafana-client brings in through niquests, and which replaces urllib3) does not have."""

    def __init__(self) -> None:
        super().__init__()
        self._inner = HTTPAdapter()
        self.statuses: Counter[int] = Counter()

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        response = self._inner.send(request, **kwargs)
        self.statuses[response.status_code] += 1
        return response

    def close(self) -> None:
        self._inner.close()


@pytest.fixture(scope="module")
def session() -> Iterator[requests.Session]:
    adapter = _Adapter()
    with requests.Session() as s:
        for prefix in ("http://", "https://"):
            s.mount(prefix, adapter)
        yield s
    # Shown with -s: how much was sent, and what came back.
    counts = dict(sorted(adapter.statuses.items()))
    print(f"\nschemathesis: {adapter.statuses.total()} requests, by status {counts}")


@pytest.fixture(scope="module")
def conformance_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """A gateway of its own: schemathesis fills its catalog with what it generates."""
    gw = GatewayProcess(Path(tmp_path_factory.mktemp("schemathesis"))).start()
    yield gw
    gw.stop()


def _config(base_url: str) -> SchemathesisConfig:
    return SchemathesisConfig.from_dict(
        {
            "base-url": base_url,
            "headers": {"Authorization": f"Bearer {ADMIN_KEY}"},
            "seed": int(os.environ.get("METER_SCHEMATHESIS_SEED", "20260515")),
            "generation": {"max-examples": EXAMPLES, "database": "none"},
            "phases": {"stateful": {"enabled": False}},
            "request-timeout": 30,
        }
    )


@pytest.fixture(scope="module")
def api_schema(conformance_gateway: GatewayProcess) -> Any:
    url = conformance_gateway.url
    return schemathesis.openapi.from_url(f"{url}/openapi.json", config=_config(url))


@pytest.fixture(scope="module")
def otlp_schema(conformance_gateway: GatewayProcess) -> Any:
    url = conformance_gateway.otlp_http
    return schemathesis.openapi.from_url(
        f"{conformance_gateway.url}/openapi.json", config=_config(url)
    )


api = schemathesis.pytest.from_fixture("api_schema").exclude(path=OTLP_PATH)
otlp = schemathesis.pytest.from_fixture("otlp_schema").include(path=OTLP_PATH)


@api.parametrize()
def test_gateway_conforms_to_its_openapi(case: Case, session: requests.Session) -> None:
    case.call_and_validate(session=session, checks=CHECKS)


@otlp.parametrize()
def test_otlp_http_conforms_to_its_openapi(case: Case, session: requests.Session) -> None:
    case.call_and_validate(session=session, checks=CHECKS)
