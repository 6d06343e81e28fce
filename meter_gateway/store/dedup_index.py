"""The in-memory index of dedup keys seen within the dedup window.

Random 128-bit keys in an on-disk B-tree cost a random page write each; here they live in a few
sorted runs of numpy arrays (high and low 64 bits, plus first-seen seconds) with a small dict of
recent keys in front. Recent keys become a new run when the dict fills; a run is merged into the
one before it only once it has grown to a quarter of that one's size (the logarithmic method),
so the writer rarely touches the big run and merges stay O(n) insertions, not sorts. The store
persists the keys append-only and rebuilds this index at start-up; it is exact (full 128-bit
comparison) and only the store's single writer touches it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

_U64 = np.dtype("<u8")
_KEY = np.dtype([("hi", ">u8"), ("lo", ">u8")])
_U64Array = npt.NDArray[np.uint64]
_I64Array = npt.NDArray[np.int64]


def _split(keys: bytes) -> tuple[_U64Array, _U64Array]:
    arr = np.frombuffer(keys, dtype=_KEY)
    return arr["hi"].astype(_U64), arr["lo"].astype(_U64)


@dataclass(frozen=True, slots=True)
class _Run:
    """Keys sorted by their high half (equal high halves adjacent, in any order)."""

    hi: _U64Array
    lo: _U64Array
    seen: _I64Array

    @staticmethod
    def sorted(hi: _U64Array, lo: _U64Array, seen: _I64Array) -> _Run:
        order = np.argsort(hi)
        return _Run(hi[order], lo[order], seen[order])

    def __len__(self) -> int:
        return len(self.hi)

    def merge(self, newer: _Run) -> _Run:
        at = np.searchsorted(self.hi, newer.hi)
        return _Run(
            np.insert(self.hi, at, newer.hi),
            np.insert(self.lo, at, newer.lo),
            np.insert(self.seen, at, newer.seen),
        )

    def without_before(self, cutoff: int) -> _Run:
        if not len(self) or int(self.seen.min()) >= cutoff:
            return self
        keep = self.seen >= cutoff
        return _Run(self.hi[keep], self.lo[keep], self.seen[keep])

    def probe(self, hi: _U64Array, lo: _U64Array, cutoff: int, out: list[bool]) -> None:
        n = len(self.hi)
        if not n:
            return
        # Sorted probes walk the big array in one direction: about twice as fast.
        order = np.argsort(hi)
        pos = np.empty_like(order)
        pos[order] = np.searchsorted(self.hi, hi[order])
        hit_hi = (pos < n) & (self.hi[np.minimum(pos, n - 1)] == hi)
        for i in np.flatnonzero(hit_hi).tolist():
            if out[i]:
                continue
            j = int(pos[i])
            # Equal high halves are adjacent; walk them (almost always exactly one).
            while j < n and self.hi[j] == hi[i]:
                if self.lo[j] == lo[i] and self.seen[j] >= cutoff:
                    out[i] = True
                    break
                j += 1


class DedupIndex:
    """Set of 16-byte keys with a first-seen time; keys older than the window are absent."""

    def __init__(self, window_s: int, compact_at: int = 262_144, growth: int = 4) -> None:
        self.window_s = window_s
        self._compact_at = compact_at
        self._growth = growth
        self._runs: list[_Run] = []  # oldest (largest) first
        self._recent: dict[bytes, int] = {}

    def __len__(self) -> int:
        return sum(len(r) for r in self._runs) + len(self._recent)

    @property
    def runs(self) -> int:
        return len(self._runs)

    def contains(self, keys: Sequence[bytes], now_s: int) -> list[bool]:
        """For each key: seen within the window before ``now_s``?"""
        if not keys:
            return []
        cutoff = now_s - self.window_s
        out = [False] * len(keys)
        if self._runs:
            hi, lo = _split(b"".join(keys))
            for run in self._runs:
                run.probe(hi, lo, cutoff, out)
        recent = self._recent
        for i, k in enumerate(keys):
            if not out[i]:
                seen = recent.get(k)
                if seen is not None and seen >= cutoff:
                    out[i] = True
        return out

    def add(self, keys: Iterable[bytes], seen_s: int) -> None:
        recent = self._recent
        for k in keys:
            recent[k] = seen_s
        if len(recent) >= self._compact_at:
            self._flush_recent(seen_s - self.window_s)

    def load(self, groups: Iterable[tuple[bytes, int]]) -> None:
        """Bulk-add blobs of concatenated keys, each with its first-seen second (start-up)."""
        blobs, seen = [], []
        for keys, seen_s in groups:
            blobs.append(keys)
            seen.append(np.full(len(keys) // 16, seen_s, np.int64))
        if blobs:
            hi, lo = _split(b"".join(blobs))
            self._push(_Run.sorted(hi, lo, np.concatenate(seen)), cutoff=None)

    def compact(self, now_s: int) -> None:
        """Fold recent keys into the runs and drop keys older than the window everywhere."""
        cutoff = now_s - self.window_s
        self._runs = [r for r in (run.without_before(cutoff) for run in self._runs) if len(r)]
        self._flush_recent(cutoff)

    def _flush_recent(self, cutoff: int) -> None:
        if not self._recent:
            return
        hi, lo = _split(b"".join(self._recent.keys()))
        seen = np.fromiter(self._recent.values(), np.int64, len(self._recent))
        self._recent = {}
        self._push(_Run.sorted(hi, lo, seen), cutoff)

    def _push(self, run: _Run, cutoff: int | None) -> None:
        runs = self._runs
        runs.append(run)
        while len(runs) >= 2 and len(runs[-2]) <= self._growth * len(runs[-1]):
            newer = runs.pop()
            merged = runs.pop().merge(newer)
            runs.append(merged if cutoff is None else merged.without_before(cutoff))
