"""One mapping of ingest outcomes to answers, for every receiver and transport.

A batch the pipeline could not take ends in one of a few exceptions; each receiver answers it
in its own transport from this one table (SPEC §4 "Overload", SPEC §10):

=================  ====  ==================  ===========  =========  =============================
outcome            HTTP  gRPC                Retry-After  RetryInfo  raised by
=================  ====  ==================  ===========  =========  =============================
``Overloaded``     429   RESOURCE_EXHAUSTED  yes          yes        memory budget, decode
                                                                     workers, commit queue/delay
``Overloaded``     503   UNAVAILABLE         yes          no         the same, to a sender that
(``no_429``)                                                         retries 5xx but not 429
                                                                     (Prometheus remote write)
``CommitFailed``   503   UNAVAILABLE         yes          no         the store failed the commit
``ShuttingDown``   503   UNAVAILABLE         yes          no         the gateway is draining
``StreamsBusy``    503   UNAVAILABLE         yes          no         a cumulative series was held
``TooLarge``       413   INVALID_ARGUMENT    no           no         a body larger than the budget
=================  ====  ==================  ===========  =========  =============================

Every sender we serve retries 429 and 503 (Vector, Logstash, OTLP exporters, Prometheus for
503) and a gRPC exporter retries RESOURCE_EXHAUSTED only with RetryInfo, UNAVAILABLE always.

The ``code`` label of ``meter_gateway_requests_total`` has one vocabulary for all transports:
the HTTP status of the answer as a number in text ("200", "204", "400", "429", "503"...). A
gRPC answer is counted under the HTTP status its gRPC code stands for (``GRPC_HTTP``: OK 200,
INVALID_ARGUMENT 400, UNAUTHENTICATED 401, PERMISSION_DENIED 403, RESOURCE_EXHAUSTED 429,
INTERNAL 500, UNAVAILABLE 503), so ``code=~"5.."`` means the same on every receiver. One
addition: "499" counts requests whose client went away before its body was complete
(nginx's convention; nobody was there to read the 400).
"""

from __future__ import annotations

from dataclasses import dataclass

from meter_gateway.pipeline.admission import Overloaded, TooLarge
from meter_gateway.pipeline.cumulative import StreamsBusy
from meter_gateway.pipeline.ingest import CommitFailed, ShuttingDown

#: What ``answer`` maps; anything else is the caller's own (bad input, auth, a bug).
REFUSALS: tuple[type[Exception], ...] = (
    Overloaded,
    CommitFailed,
    ShuttingDown,
    StreamsBusy,
    TooLarge,
)

#: gRPC status name → the HTTP status it stands for (the gRPC-over-HTTP mapping, reversed),
#: for the ``code`` label and for OTLP/HTTP's ``google.rpc.Status`` bodies.
GRPC_HTTP: dict[str, int] = {
    "OK": 200,
    "INVALID_ARGUMENT": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "RESOURCE_EXHAUSTED": 429,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
}

#: google.rpc.Code number of each gRPC status name above.
RPC_CODE: dict[str, int] = {
    "OK": 0,
    "UNKNOWN": 2,
    "INVALID_ARGUMENT": 3,
    "NOT_FOUND": 5,
    "PERMISSION_DENIED": 7,
    "RESOURCE_EXHAUSTED": 8,
    "INTERNAL": 13,
    "UNAVAILABLE": 14,
    "UNAUTHENTICATED": 16,
}

#: HTTP status → google.rpc.Code, for a ``google.rpc.Status`` body of an OTLP/HTTP error
#: (413 and 415 are bad requests to an OTLP exporter: INVALID_ARGUMENT, not retried).
HTTP_RPC_CODE: dict[int, int] = {
    **{status: RPC_CODE[name] for name, status in GRPC_HTTP.items()},
    413: RPC_CODE["INVALID_ARGUMENT"],
    415: RPC_CODE["INVALID_ARGUMENT"],
}


def grpc_code_label(grpc_name: str) -> str:
    """The ``code`` label of a gRPC answer: the HTTP status its code stands for ("500" for
    a code the gateway does not send)."""
    return str(GRPC_HTTP.get(grpc_name, 500))


@dataclass(frozen=True, slots=True)
class Answer:
    """How a receiver answers a refused batch, whatever its transport."""

    http: int  # HTTP status
    grpc: str  # gRPC status name (``grpc.StatusCode[name]``)
    message: str
    retry_after_s: float | None  # Retry-After (HTTP); None: not retryable
    retry_info: bool  # gRPC: RetryInfo in the trailers (RESOURCE_EXHAUSTED is retried with it)

    @property
    def code(self) -> str:
        """The ``code`` label of ``meter_gateway_requests_total``."""
        return str(self.http)

    @property
    def rpc_code(self) -> int:
        """The google.rpc.Code of ``grpc``."""
        return RPC_CODE[self.grpc]

    def headers(self) -> dict[str, str] | None:
        """``Retry-After`` in whole seconds (at least 1), when the outcome is retryable."""
        if self.retry_after_s is None:
            return None
        return {"Retry-After": str(max(1, round(self.retry_after_s)))}


def answer(exc: Exception, retry_after_s: float, *, no_429: bool = False) -> Answer:
    """The answer to ``exc`` (one of ``REFUSALS``). ``retry_after_s`` is the configured
    ``ingest.retry_after``; an ``Overloaded`` that asks for longer gets longer. ``no_429``:
    the sender does not retry 429 (Prometheus remote write), so overload answers 503."""
    if isinstance(exc, Overloaded):
        retry, message = max(exc.retry_after, retry_after_s), f"{exc}; nothing was stored"
        if no_429:
            return Answer(503, "UNAVAILABLE", message, retry, False)
        return Answer(429, "RESOURCE_EXHAUSTED", message, retry, True)
    if isinstance(exc, (CommitFailed, ShuttingDown, StreamsBusy)):
        return Answer(503, "UNAVAILABLE", str(exc), retry_after_s, False)
    if isinstance(exc, TooLarge):
        return Answer(413, "INVALID_ARGUMENT", str(exc), None, False)
    raise TypeError(f"not an ingest outcome: {exc!r}") from exc
