"""The NDJSON file exporter: one event envelope per line, appended and fsynced before the event
counts as delivered. At-least-once: a crash between the fsync and the outbox mark appends the
line again on restart, with the same ``id`` (readers deduplicate on it)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

from exporters.outbox import DeliveryError
from meter_gateway.store.base import OutboxItem


class FileSink:
    def __init__(self, name: str, path: str) -> None:
        self.name = name
        self.path = Path(path)
        self._file: BinaryIO | None = None

    def deliver(self, item: OutboxItem) -> None:
        start: int | None = None
        try:
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self.path, "ab")  # noqa: SIM115 - kept open between events
            start = self._file.seek(0, os.SEEK_END)
            self._file.write(item.payload.rstrip(b"\n") + b"\n")
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as exc:
            self._undo(start)
            raise DeliveryError(f"append to {self.path}: {exc}") from exc

    def _undo(self, start: int | None) -> None:
        """Cut a half-written line off (so the retry starts a clean line) and reopen later
        (the file may have been rotated or its disk remounted)."""
        try:
            if self._file is not None and start is not None:
                os.truncate(self.path, start)
        except OSError:
            pass
        self.close()

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            finally:
                self._file = None
