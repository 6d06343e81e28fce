"""Scheduled work: jobs that must run on one replica at a time (Prometheus queries, meters,
exporter outboxes) run here, each under a store lease, on one background thread.

A job is anything with a ``name`` and ``run(now_ns) -> seconds until next run``. Before each
run the scheduler takes or renews the job's lease (``Store.lease``); a replica that does not
hold it skips the run and tries again later, so when the holder dies another takes over once
the lease expires. A job that raises is retried with exponential backoff and counted in
``meter_gateway_job_errors_total``. ``wake(name)`` runs a job early (meters after a commit).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from meter_gateway.clock import Clock

log = logging.getLogger(__name__)

NS = 1_000_000_000


class Job(Protocol):
    name: str

    def run(self, now_ns: int) -> float:
        """Do one round of work; return the seconds until the next round is due."""
        ...


class Leases(Protocol):
    def lease(self, name: str, holder: str, ttl_ns: int, now_ns: int) -> bool: ...

    def release(self, name: str, holder: str) -> None: ...


def replica_id() -> str:
    """A name for this process that no other replica shares (host, pid, random suffix)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass
class _Entry:
    job: Job
    due_ns: int
    failures: int = 0
    held: bool = False


class Scheduler:
    def __init__(
        self,
        leases: Leases,
        clock: Clock,
        holder: str | None = None,
        lease_ttl_s: float = 15.0,
        max_backoff_s: float = 60.0,
        on_error: Callable[[str], None] | None = None,
        on_run: Callable[[str], None] | None = None,
    ) -> None:
        self.leases = leases
        self.clock = clock
        self.holder = holder or replica_id()
        self.lease_ttl_ns = int(lease_ttl_s * NS)
        self.max_backoff_s = max_backoff_s
        self._on_error = on_error
        self._on_run = on_run
        self._entries: dict[str, _Entry] = {}
        self._cv = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def add(self, job: Job, first_run_in_s: float = 0.0) -> None:
        with self._cv:
            if job.name in self._entries:
                raise ValueError(f"job {job.name!r} is already scheduled")
            due = self.clock.now_ns() + int(first_run_in_s * NS)
            self._entries[job.name] = _Entry(job, due)
            self._cv.notify()

    def wake(self, name: str) -> None:
        """Run the job as soon as possible (no-op for unknown jobs)."""
        with self._cv:
            e = self._entries.get(name)
            if e is not None and e.failures == 0:
                e.due_ns = 0
                self._cv.notify()

    def holds(self, name: str) -> bool:
        """Whether this replica held the job's lease at its last run."""
        e = self._entries.get(name)
        return e is not None and e.held

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)
            self._thread.start()

    def close(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for name, e in self._entries.items():
            if e.held:
                try:
                    self.leases.release(name, self.holder)
                except Exception:  # the lease expires on its own
                    log.warning("could not release lease %s", name, exc_info=True)

    def run_due(self) -> None:
        """Run every job that is due now (the loop's body; tests call it directly)."""
        now = self.clock.now_ns()
        for e in [e for e in self._entries.values() if e.due_ns <= now]:
            self._run(e, now)

    def _run(self, e: _Entry, now: int) -> None:
        name = e.job.name
        try:
            e.held = self.leases.lease(name, self.holder, self.lease_ttl_ns, now)
        except Exception as exc:
            e.held = False
            log.warning("job %s: could not take its lease: %s", name, exc)
            self._failed(e, now)
            return
        if not e.held:
            # Someone else runs it; check again before their lease could expire.
            e.due_ns = now + self.lease_ttl_ns // 3
            return
        try:
            delay_s = e.job.run(now)
        except Exception:
            log.exception("job %s failed", name)
            self._failed(e, now)
            return
        e.failures = 0
        if self._on_run is not None:
            self._on_run(name)
        # Never sleep past a third of the lease, so the lease is renewed while we hold it.
        delay_ns = min(int(max(delay_s, 0.0) * NS), self.lease_ttl_ns // 3)
        e.due_ns = self.clock.now_ns() + delay_ns

    def _failed(self, e: _Entry, now: int) -> None:
        e.failures += 1
        if self._on_error is not None:
            self._on_error(e.job.name)
        backoff = min(self.max_backoff_s, 0.5 * 2 ** min(e.failures - 1, 16))
        e.due_ns = now + int(backoff * NS)

    def _loop(self) -> None:
        while True:
            with self._cv:
                if self._stopping:
                    return
                now = self.clock.now_ns()
                due = min((e.due_ns for e in self._entries.values()), default=None)
                if due is None or due > now:
                    wait = 1.0 if due is None else min((due - now) / NS, 1.0)
                    self._cv.wait(wait)
                    continue
            self.run_due()
