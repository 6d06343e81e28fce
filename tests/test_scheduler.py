"""The scheduler runs jobs under leases, backs off on errors and hands over when a lease ends."""

from __future__ import annotations

from dataclasses import dataclass, field

from meter_gateway.clock import FixedClock
from meter_gateway.scheduler import NS, Scheduler


@dataclass
class FakeLeases:
    """An in-memory lease table shared by several schedulers (the 'database')."""

    held: dict[str, tuple[str, int]] = field(default_factory=dict)

    def lease(self, name: str, holder: str, ttl_ns: int, now_ns: int) -> bool:
        cur = self.held.get(name)
        if cur is not None and cur[0] != holder and cur[1] > now_ns:
            return False
        self.held[name] = (holder, now_ns + ttl_ns)
        return True

    def release(self, name: str, holder: str) -> None:
        if self.held.get(name, ("", 0))[0] == holder:
            del self.held[name]


@dataclass
class CountingJob:
    name: str = "job"
    every_s: float = 10.0
    fail: int = 0
    runs: list[int] = field(default_factory=list)

    def run(self, now_ns: int) -> float:
        if self.fail:
            self.fail -= 1
            raise RuntimeError("prometheus is down")
        self.runs.append(now_ns)
        return self.every_s


def test_one_replica_runs_a_job_and_the_other_takes_over_when_its_lease_expires() -> None:
    clock, leases = FixedClock(1_000 * NS), FakeLeases()
    a_job, b_job = CountingJob(), CountingJob()
    a = Scheduler(leases, clock, holder="a", lease_ttl_s=15)
    b = Scheduler(leases, clock, holder="b", lease_ttl_s=15)
    a.add(a_job)
    b.add(b_job)
    a.run_due()
    b.run_due()
    assert (len(a_job.runs), len(b_job.runs)) == (1, 0)
    assert a.holds("job")
    assert not b.holds("job")
    # a dies (never runs again); b gets the job once a's lease has expired, not before
    clock.advance(10)
    b.run_due()
    assert b_job.runs == []
    clock.advance(6)
    b.run_due()
    assert len(b_job.runs) == 1


def test_release_on_close_hands_over_at_once() -> None:
    clock, leases = FixedClock(1_000 * NS), FakeLeases()
    a, b = Scheduler(leases, clock, holder="a"), Scheduler(leases, clock, holder="b")
    b_job = CountingJob()
    a.add(CountingJob())
    b.add(b_job)
    a.run_due()
    a.close()
    b.run_due()
    assert len(b_job.runs) == 1


def test_failures_back_off_and_are_reported_then_recover() -> None:
    clock, errors = FixedClock(1_000 * NS), []
    job = CountingJob(fail=3)
    s = Scheduler(FakeLeases(), clock, on_error=errors.append, max_backoff_s=1.5)
    s.add(job)
    s.run_due()
    s.run_due()  # not due again yet: backing off
    assert errors == ["job"]
    for expected_wait in (0.5, 1.0, 1.5):
        clock.advance(expected_wait - 1e-9)
        s.run_due()
        clock.advance(1e-9)
        s.run_due()
    assert errors == ["job"] * 3
    assert len(job.runs) == 1


def test_wake_runs_a_job_early_and_runs_renew_the_lease_in_time() -> None:
    clock, leases = FixedClock(1_000 * NS), FakeLeases()
    job = CountingJob(every_s=3600)
    s = Scheduler(leases, clock, holder="a", lease_ttl_s=15)
    s.add(job)
    s.run_due()
    clock.advance(1)
    s.run_due()
    assert len(job.runs) == 1
    s.wake("job")
    s.run_due()
    assert len(job.runs) == 2
    # the next run comes before the lease runs out, however long the job asked to wait
    clock.advance(5)
    s.run_due()
    assert len(job.runs) == 3
    assert leases.held["job"] == ("a", clock.now_ns() + 15 * NS)


def test_background_thread_runs_jobs_and_stops() -> None:
    import threading

    from meter_gateway.clock import SystemClock

    done = threading.Event()

    class Once:
        name = "once"

        def run(self, now_ns: int) -> float:
            done.set()
            return 60.0

    s = Scheduler(FakeLeases(), SystemClock())
    s.add(Once())
    s.start()
    assert done.wait(5)
    s.close()
