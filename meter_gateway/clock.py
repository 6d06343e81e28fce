"""Injectable clocks: everything that depends on "now" takes a Clock, so tests never sleep."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now_ns(self) -> int:
        """Wall-clock time in nanoseconds since the Unix epoch (UTC)."""
        ...


class SystemClock:
    def now_ns(self) -> int:
        return time.time_ns()


class FixedClock:
    """A clock that only moves when told to."""

    def __init__(self, now_ns: int) -> None:
        self._now = now_ns

    def now_ns(self) -> int:
        return self._now

    def set(self, now_ns: int) -> None:
        self._now = now_ns

    def advance(self, seconds: float) -> None:
        self._now += int(seconds * 1_000_000_000)
