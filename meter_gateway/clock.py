"""Injectable clocks: everything that depends on "now" takes a Clock, so tests never sleep."""

from __future__ import annotations

import os
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


# Tests only: the gateway subprocess reads its clock offset from this file (see OffsetFileClock).
TEST_CLOCK_OFFSET_FILE_ENV = "METER_GATEWAY_TEST_CLOCK_OFFSET_FILE"


class OffsetFileClock:
    """System time plus an offset in nanoseconds read from a file (re-read when it changes).

    For end-to-end tests of time-dependent behaviour (meter resets at midnight, month ends) in
    a real gateway process, without sleeping: the test writes the offset and the gateway's time
    jumps. Enabled only by the environment variable ``METER_GATEWAY_TEST_CLOCK_OFFSET_FILE``,
    which production deployments never set; the gateway logs a warning when it is.
    """

    def __init__(self, path: str) -> None:
        self._path = path
        self._seen: tuple[int, int, int] | None = None
        self._offset = 0

    def now_ns(self) -> int:
        try:
            st = os.stat(self._path)
            seen = (st.st_ino, st.st_mtime_ns, st.st_size)  # tests replace the file atomically
            if seen != self._seen:
                with open(self._path, encoding="ascii") as f:
                    text = f.read().strip()
                self._offset = int(text) if text else 0
                self._seen = seen
        except (OSError, ValueError):
            pass  # keep the last offset: a test is halfway through rewriting the file
        return time.time_ns() + self._offset
