"""The in-memory index of dedup keys seen within the dedup window.

Random 128-bit keys in an on-disk B-tree cost a random page write each; here they live in two
sorted numpy arrays (high and low 64 bits, plus first-seen seconds) with a small dict of recent
keys in front, compacted into the arrays in O(n) merges. The store persists the keys
append-only and rebuilds this index at start-up; it is exact (full 128-bit comparison) and only
the store's single writer touches it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import numpy.typing as npt

_U64 = np.dtype("<u8")
_KEY = np.dtype([("hi", ">u8"), ("lo", ">u8")])


def _split(keys: bytes) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64]]:
    arr = np.frombuffer(keys, dtype=_KEY)
    return arr["hi"].astype(_U64), arr["lo"].astype(_U64)


class DedupIndex:
    """Set of 16-byte keys with a first-seen time; keys older than the window are absent."""

    def __init__(self, window_s: int, compact_at: int = 262_144) -> None:
        self.window_s = window_s
        self._compact_at = compact_at
        self._hi: npt.NDArray[np.uint64] = np.empty(0, _U64)
        self._lo: npt.NDArray[np.uint64] = np.empty(0, _U64)
        self._seen: npt.NDArray[np.int64] = np.empty(0, np.int64)
        self._recent: dict[bytes, int] = {}

    def __len__(self) -> int:
        return len(self._hi) + len(self._recent)

    def contains(self, keys: Sequence[bytes], now_s: int) -> list[bool]:
        """For each key: seen within the window before ``now_s``?"""
        if not keys:
            return []
        cutoff = now_s - self.window_s
        out = [False] * len(keys)
        if len(self._hi):
            hi, lo = _split(b"".join(keys))
            # Sorted probes walk the big array in one direction: about twice as fast.
            order = np.argsort(hi)
            pos = np.empty_like(order)
            pos[order] = np.searchsorted(self._hi, hi[order])
            n = len(self._hi)
            clipped = np.minimum(pos, n - 1)
            hit_hi = (pos < n) & (self._hi[clipped] == hi)
            for i in np.flatnonzero(hit_hi).tolist():
                j = int(pos[i])
                # Equal high halves are adjacent; walk them (almost always exactly one).
                while j < n and self._hi[j] == hi[i]:
                    if self._lo[j] == lo[i] and self._seen[j] >= cutoff:
                        out[i] = True
                        break
                    j += 1
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
            self.compact(seen_s)

    def load(self, groups: Iterable[tuple[bytes, int]]) -> None:
        """Bulk-add blobs of concatenated keys, each with its first-seen second (start-up)."""
        blobs, seen = [], []
        for keys, seen_s in groups:
            blobs.append(keys)
            seen.append(np.full(len(keys) // 16, seen_s, np.int64))
        if blobs:
            hi, lo = _split(b"".join(blobs))
            self._merge(hi, lo, np.concatenate(seen), cutoff=None)

    def compact(self, now_s: int) -> None:
        """Fold recent keys into the sorted arrays and drop keys older than the window."""
        cutoff = now_s - self.window_s
        if self._recent:
            keys = b"".join(self._recent.keys())
            seen = np.fromiter(self._recent.values(), np.int64, len(self._recent))
            hi, lo = _split(keys)
            self._recent = {}
        else:
            hi = lo = np.empty(0, _U64)
            seen = np.empty(0, np.int64)
        self._merge(hi, lo, seen, cutoff)

    def _merge(
        self,
        hi: npt.NDArray[np.uint64],
        lo: npt.NDArray[np.uint64],
        seen: npt.NDArray[np.int64],
        cutoff: int | None,
    ) -> None:
        # Sorted by the high half only: lookups walk every entry with an equal high half.
        order = np.argsort(hi)
        hi, lo, seen = hi[order], lo[order], seen[order]
        if len(self._hi):
            at = np.searchsorted(self._hi, hi)
            hi = np.insert(self._hi, at, hi)
            lo = np.insert(self._lo, at, lo)
            seen = np.insert(self._seen, at, seen)
        if cutoff is not None and len(seen) and int(seen.min()) < cutoff:
            keep = seen >= cutoff
            hi, lo, seen = hi[keep], lo[keep], seen[keep]
        self._hi, self._lo, self._seen = hi, lo, seen
