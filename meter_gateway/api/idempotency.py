"""``Idempotency-Key`` on creating POSTs (SPEC 11): the same key and body answer the first answer
again (same status and body); the same key with another body answers 409.

``Idempotency(store, clock).wrap(handler)`` wraps any POST handler (invoices, top-ups, catalog
entries, cancellations). Keys are scoped per path and kept at least ``KEEP`` (24 h) in the
store (``IdempotencyStore``), so any replica answers a retry. A request reserves its key before
the handler runs and records the answer after; a second request with the key while the first
runs answers 409 (retry it). Only 2xx answers are recorded: after an error the key is free for
a corrected retry. If a process dies between the handler's commit and the record, its
reservation is taken over after ``ABANDONED``; handlers close that window by deriving the id of
what they create from the key (``derived_id``), so the retry finds it instead of making another.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Awaitable, Callable
from datetime import timedelta

import orjson
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from meter_gateway.clock import Clock
from meter_gateway.http import ApiError
from meter_gateway.store.base import IdempotencyStore

Handler = Callable[[Request], Awaitable[Response]]

HEADER = "Idempotency-Key"
#: How long an answer is kept for its key (at least; purged after).
KEEP = timedelta(hours=24)
#: A reservation this old without an answer belongs to a request whose process died.
ABANDONED = timedelta(minutes=1)
_PURGE_EVERY = timedelta(minutes=1)
_KEY = re.compile(r"[\x21-\x7e]{1,255}")
_NS = 1000  # per microsecond


def _ns(d: timedelta) -> int:
    return d // timedelta(microseconds=1) * _NS


def key_of(request: Request) -> str | None:
    """The request's idempotency key (None: none sent); 400 if it cannot be one."""
    key = request.headers.get(HEADER)
    if key is None:
        return None
    if _KEY.fullmatch(key) is None:
        raise ApiError(
            400,
            f"{HEADER} must be 1 to 255 visible ASCII characters (a UUID is a good key)",
            parameter=HEADER,
        )
    return key


def derived_id(request: Request, prefix: str, length: int = 20) -> str | None:
    """An id derived from the request's path and idempotency key (None without a key): what a
    handler names the entry it creates, so a retry after a crash finds it."""
    key = key_of(request)
    if key is None:
        return None
    digest = hashlib.blake2b(f"{request.url.path}\n{key}".encode(), digest_size=32).hexdigest()
    return prefix + digest[:length]


def fingerprint(method: str, body: bytes) -> str:
    """What "the same body" means: the same JSON value (key order and spacing aside), else the
    same bytes."""
    try:
        canonical = orjson.dumps(orjson.loads(body), option=orjson.OPT_SORT_KEYS)
    except orjson.JSONDecodeError:
        canonical = body
    return hashlib.sha256(method.encode() + b"\n" + canonical).hexdigest()


class Idempotency:
    def __init__(self, store: IdempotencyStore, clock: Clock) -> None:
        self._store = store
        self._clock = clock
        self._purged_ns = 0

    def wrap(self, handler: Handler) -> Handler:
        async def endpoint(request: Request) -> Response:
            key = key_of(request)
            if key is None:
                return await handler(request)
            return await self._once(request, key, handler)

        return endpoint

    async def _once(self, request: Request, key: str, handler: Handler) -> Response:
        path = request.url.path
        fp = fingerprint(request.method, await request.body())
        now = self._clock.now_ns()
        await run_in_threadpool(self._purge, now)
        found = await run_in_threadpool(
            self._store.idempotency_begin, path, key, fp, now, now - _ns(ABANDONED)
        )
        if found is not None:
            if found.fingerprint != fp:
                raise ApiError(
                    409,
                    f"{HEADER} {key!r} was used with another body on this path: a new request "
                    "needs a new key",
                    parameter=HEADER,
                )
            if found.status is None or found.body is None:
                raise ApiError(
                    409,
                    f"a request with {HEADER} {key!r} is still in progress: retry shortly",
                    headers={"Retry-After": "1"},
                    parameter=HEADER,
                )
            return Response(
                found.body,
                status_code=found.status,
                media_type=found.media_type,
                headers={"Idempotent-Replayed": "true"},
            )
        try:
            response = await handler(request)
        except BaseException:
            await run_in_threadpool(self._store.idempotency_release, path, key)
            raise
        if 200 <= response.status_code < 300:
            await run_in_threadpool(
                self._store.idempotency_finish,
                path,
                key,
                response.status_code,
                response.media_type,
                bytes(response.body),
            )
        else:
            await run_in_threadpool(self._store.idempotency_release, path, key)
        return response

    def _purge(self, now: int) -> None:
        if now - self._purged_ns >= _ns(_PURGE_EVERY):
            self._purged_ns = now
            self._store.idempotency_purge(now - _ns(KEEP))
