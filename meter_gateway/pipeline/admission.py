"""Admission by memory: a budget of bytes in flight that ingest takes from before it reads.

A receiver reserves what a request will hold (its body, what decoding and validation make of
it, its batch while queued and committed) before reading the body; the reservation is given
back once the request is answered. When the budget is spent, ``reserve`` raises ``Overloaded``
at once (HTTP 429 with Retry-After, gRPC RESOURCE_EXHAUSTED with RetryInfo) instead of letting
a queue grow. What a request costs is an estimate (``EXPANSION`` × body bytes, measured);
the estimate is the only place these numbers live. ``Workers`` runs the CPU work of large
bodies off the event loop and refuses new requests while that work is seconds behind.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

#: Peak bytes held per byte of JSON/NDJSON body while it is decoded and validated: the body,
#: the parsed items (about 4x the JSON) and the batch of records (about 3.3x), measured with
#: tracemalloc on bench.mix's records (~210 bytes each, two metadata keys).
EXPANSION = 6
#: Bytes one queued record holds, for batches a receiver did not reserve for (OTLP, remote
#: write, scheduled receivers): a UsageRecord with its strings, Decimal and metadata.
RECORD_BYTES = 1024


class Overloaded(Exception):
    """Ingest is at capacity (memory budget, queue or queue delay); retry after
    ``retry_after`` seconds. Nothing of the batch was stored."""

    def __init__(self, retry_after: float, what: str = "ingest queue is full") -> None:
        super().__init__(f"{what}; retry after {retry_after:g}s")
        self.retry_after = retry_after


class TooLarge(Exception):
    """One request needs more than the whole budget: it can never be admitted (413)."""


class Budget:
    """Bytes in flight, shared by every receiver of one gateway; thread-safe.

    A reservation that fits is granted; one that does not is refused with ``Overloaded``,
    except when nothing else is in flight: a request within the per-request limits is never
    refused forever, so memory stays under max(limit, one request's estimate).
    """

    def __init__(
        self,
        limit_bytes: int,
        retry_after_s: float,
        on_change: Callable[[int], None] | None = None,
    ) -> None:
        self.limit = limit_bytes
        self._retry_after = retry_after_s
        self._on_change = on_change
        self._lock = threading.Lock()
        self._in_use = 0

    @property
    def in_use(self) -> int:
        return self._in_use

    def reserve(self, nbytes: int, wire_bytes: int | None = None) -> Reservation:
        """Take ``nbytes``; ``wire_bytes`` (the body as sent) larger than the whole budget
        raises ``TooLarge``."""
        if wire_bytes is not None and wire_bytes > self.limit:
            raise TooLarge(
                f"body of {wire_bytes} bytes exceeds the ingest memory budget of "
                f"{self.limit} bytes (ingest.max_inflight_bytes)"
            )
        r = Reservation(self)
        self._take(r, nbytes)
        return r

    def _take(self, r: Reservation, nbytes: int) -> None:
        with self._lock:
            grow = nbytes - r.nbytes
            others = self._in_use - r.nbytes
            if grow > 0 and others > 0 and self._in_use + grow > self.limit:
                raise Overloaded(self._retry_after, "ingest memory budget is spent")
            self._in_use += grow
            r.nbytes = nbytes
            if self._on_change is not None:
                self._on_change(self._in_use)


class Reservation:
    """Bytes one request or batch holds of a ``Budget``; give them back with ``release``
    (idempotent) once the request is answered."""

    __slots__ = ("_budget", "nbytes")

    def __init__(self, budget: Budget) -> None:
        self._budget = budget
        self.nbytes = 0

    def resize(self, nbytes: int) -> None:
        """Hold ``nbytes`` from now on; growing past the budget raises ``Overloaded`` (and
        keeps what was held)."""
        self._budget._take(self, nbytes)

    def release(self) -> None:
        if self.nbytes:
            self._budget._take(self, 0)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Workers:
    """A few threads for CPU work that must not run on the event loop (decoding and validating
    large bodies), with admission by waiting time: while the oldest task has waited longer than
    ``max_wait_s`` for a thread, ``admit`` raises ``Overloaded``, so a request is refused before
    its body is read rather than queued behind seconds of other requests' decoding. The
    memory budget bounds what waits in bytes; this bounds it in time."""

    def __init__(
        self,
        threads: int,
        max_wait_s: float | None,
        retry_after_s: float,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="meter-gateway-decode")
        self._max_wait = max_wait_s
        self._retry_after = retry_after_s
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._waiting: dict[int, float] = {}  # task number → when it was queued, oldest first
        self._numbers = itertools.count()

    def admit(self) -> None:
        """Raise ``Overloaded`` while the oldest waiting task has waited past the bound."""
        if self._max_wait is None:
            return
        with self._lock:
            oldest = next(iter(self._waiting.values()), None)
        if oldest is not None and self._monotonic() - oldest > self._max_wait:
            raise Overloaded(self._retry_after, "ingest decoding is behind")

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on a worker thread."""
        n = next(self._numbers)
        with self._lock:
            self._waiting[n] = self._monotonic()

        def task() -> T:
            with self._lock:
                self._waiting.pop(n, None)
            return fn(*args)

        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, task)
        finally:
            with self._lock:
                self._waiting.pop(n, None)  # cancelled before it started

    def shutdown(self) -> None:
        self._pool.shutdown()
