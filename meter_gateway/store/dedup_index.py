"""The in-memory index of dedup keys seen within the dedup window.

Random 128-bit keys in an on-disk B-tree cost a random page write each; here they live in a few
sorted runs with a small dict of recent keys in front. Recent keys become a new run when the dict
fills; a run is merged into the one before it only once it has grown to a quarter of that one's
size (the logarithmic method), so the writer rarely touches the big run. The store persists the
keys append-only and rebuilds this index at start-up; it is exact (full 128-bit comparison) and
only the store's single writer touches it.

Memory is the constraint (tens of millions of keys in a gateway with a budget): a key costs 20
bytes (high and low halves, first-seen second as uint32), and a run is a list of segments of
about ``SEGMENT_KEYS`` keys split by key range. Merges, expiry and start-up loading go segment
by segment and release each source segment once it is read past, so no step holds a second copy
of a big run: only a few segments (``SEGMENT_KEYS``, ``LOAD_CHUNK_KEYS``) beyond the keys.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

SEGMENT_KEYS = 1 << 18  # keys in a segment: what a merge or an expiry pass copies at a time
LOAD_CHUNK_KEYS = 1 << 19  # keys sorted at a time while loading (argsort temporaries: 28 B a key)
LOAD_FAN_IN = 8  # runs merged at once while loading: each key is copied about log8(chunks) times
MAX_SEEN_S = (1 << 32) - 1  # first-seen seconds are uint32: Unix time until 2106

_KEY = np.dtype([("hi", ">u8"), ("lo", ">u8")])
_U64Array = npt.NDArray[np.uint64]
_U32Array = npt.NDArray[np.uint32]
_Part = tuple[_U64Array, _U64Array, _U32Array]  # hi, lo, seen: sorted by hi


def _split(keys: bytes) -> tuple[_U64Array, _U64Array]:
    arr = np.frombuffer(keys, dtype=_KEY)
    return arr["hi"].astype(np.uint64), arr["lo"].astype(np.uint64)


def _check_seen(seen_s: int) -> None:
    if not 0 <= seen_s <= MAX_SEEN_S:
        raise ValueError(f"first-seen second {seen_s} is outside 0..{MAX_SEEN_S}")


@dataclass(frozen=True, slots=True)
class _Segment:
    """Keys sorted by their high half (equal high halves adjacent, in any order), never empty."""

    hi: _U64Array
    lo: _U64Array
    seen: _U32Array
    oldest: int  # the smallest first-seen second: expiry skips a segment with nothing to drop

    @staticmethod
    def of(hi: _U64Array, lo: _U64Array, seen: _U32Array) -> _Segment:
        return _Segment(hi, lo, seen, int(seen.min()))

    def __len__(self) -> int:
        return len(self.hi)

    def probe(
        self, hi: _U64Array, lo: _U64Array, cutoff: int, found: npt.NDArray[np.bool_]
    ) -> None:
        """Mark in ``found`` each probe (sorted by ``hi``) here and seen at ``cutoff`` or later."""
        pos = np.searchsorted(self.hi, hi)
        same = np.take(self.hi, pos, mode="clip") == hi
        if not same.any():
            return  # the common case: new keys
        at = np.flatnonzero(same)
        cand = pos[at]
        hit = (self.lo[cand] == lo[at]) & (self.seen[cand] >= cutoff)
        found[at[hit]] = True
        # Equal high halves are adjacent and searchsorted found the first: a probe that matched
        # the high half only walks the others (another key, or an earlier sighting of this one).
        n = len(self.hi)
        for i, j in zip(at[~hit].tolist(), cand[~hit].tolist(), strict=True):
            j += 1
            while j < n and self.hi[j] == hi[i]:
                if self.lo[j] == lo[i] and self.seen[j] >= cutoff:
                    found[i] = True
                    break
                j += 1


class _Run:
    """Keys sorted by their high half, in segments that split the key range in order."""

    __slots__ = ("firsts", "segments", "size")

    def __init__(self, segments: list[_Segment]) -> None:
        self.segments = segments
        self.firsts: _U64Array = np.array([s.hi[0] for s in segments], dtype=np.uint64)
        self.size = sum(len(s) for s in segments)

    def __len__(self) -> int:
        return self.size

    def oldest(self) -> int:
        return min(s.oldest for s in self.segments)

    def probe(
        self, hi: _U64Array, lo: _U64Array, cutoff: int, found: npt.NDArray[np.bool_]
    ) -> None:
        starts = np.searchsorted(hi, self.firsts).tolist()
        ends = [*starts[1:], len(hi)]
        for seg, a, b in zip(self.segments, starts, ends, strict=True):
            if a < b:
                seg.probe(hi[a:b], lo[a:b], cutoff, found[a:b])


class _Builder:
    """Cuts a stream of sorted pieces, each above the one before, into segments."""

    def __init__(self, segment_keys: int | None = None) -> None:
        self._keys = SEGMENT_KEYS if segment_keys is None else segment_keys
        self._segments: list[_Segment] = []
        self._pending: list[_Part] = []
        self._count = 0

    def add(self, part: _Part) -> None:
        n = len(part[0])
        if not n:
            return
        if (
            not self._pending
            and self._keys // 2 <= n <= 2 * self._keys
            and all(a.base is None for a in part)  # not a view that would keep its source
        ):
            self._segments.append(_Segment.of(*part))  # no copy: a whole segment or new arrays
            return
        self._pending.append(part)
        self._count += n
        if self._count >= self._keys:
            self._cut(final=False)

    def finish(self) -> _Run:
        self._cut(final=True)
        return _Run(self._segments)

    def _cut(self, final: bool) -> None:
        if not self._pending:
            return
        if len(self._pending) == 1:
            hi, lo, seen = self._pending[0]
        else:
            hi = np.concatenate([p[0] for p in self._pending])
            lo = np.concatenate([p[1] for p in self._pending])
            seen = np.concatenate([p[2] for p in self._pending])
        self._pending, self._count = [], 0
        n, start = len(hi), 0
        while n - start >= self._keys or (final and start < n):
            end = min(start + self._keys, n)
            while end < n and hi[end] == hi[end - 1]:
                end += 1  # equal high halves stay in one segment (the probe walks them)
            if start == 0 and end == n and hi.base is None:
                self._segments.append(_Segment.of(hi, lo, seen))
            else:
                s = slice(start, end)
                self._segments.append(_Segment.of(hi[s].copy(), lo[s].copy(), seen[s].copy()))
            start = end
        if start < n:
            self._pending, self._count = [(hi[start:], lo[start:], seen[start:])], n - start


class _Cursor:
    """Reads a run in key order, a key range at a time, dropping each segment once read past
    (the run is consumed) and keys seen before ``cutoff``."""

    def __init__(self, run: _Run, cutoff: int | None) -> None:
        self._segments = deque(run.segments)
        run.segments = []
        self._at = 0  # into the first segment
        self._cutoff = cutoff

    def take(self, below: np.uint64 | None, into: list[_Part]) -> None:
        """Append to ``into`` the keys whose high half is below ``below`` (all when None)."""
        segments = self._segments
        while segments:
            seg = segments[0]
            n = len(seg)
            end = n if below is None else int(np.searchsorted(seg.hi, below))
            if end > self._at:
                part = (seg.hi, seg.lo, seg.seen)
                if self._at or end < n:
                    s = slice(self._at, end)
                    part = (seg.hi[s], seg.lo[s], seg.seen[s])
                if self._cutoff is not None and seg.oldest < self._cutoff:
                    keep = part[2] >= self._cutoff
                    part = (part[0][keep], part[1][keep], part[2][keep])
                into.append(part)
            if end < n:
                self._at = end
                return
            segments.popleft()
            self._at = 0


def _merge(runs: list[_Run], cutoff: int | None) -> _Run:
    """One run of the keys of ``runs`` (those seen at ``cutoff`` or later), which it consumes.

    Key ranges are cut at every ``step``-th key of each run, so a range holds at most about one
    segment's worth of keys whatever the number of runs; each range is merged on its own.
    """
    step = max(1, SEGMENT_KEYS // max(1, len(runs) - 1))
    samples = [s.hi[::step] for r in runs for s in r.segments]
    if not samples:
        return _Run([])
    bounds = np.unique(np.concatenate(samples))
    cursors = [_Cursor(r, cutoff) for r in runs]
    out = _Builder()
    uppers: list[np.uint64 | None] = [*bounds[1:], None]
    for below in uppers:
        parts: list[_Part] = []
        for c in cursors:
            c.take(below, parts)
        parts = [p for p in parts if len(p[0])]
        if len(parts) == 1:
            out.add(parts[0])
        elif len(parts) == 2:
            (bh, bl, bs), (sh, sl, ss) = sorted(parts, key=lambda p: -len(p[0]))
            at = np.searchsorted(bh, sh)
            out.add((np.insert(bh, at, sh), np.insert(bl, at, sl), np.insert(bs, at, ss)))
        elif parts:
            hi = np.concatenate([p[0] for p in parts])
            order = np.argsort(hi, kind="stable")  # timsort: finds the sorted parts, merges them
            lo = np.concatenate([p[1] for p in parts])[order]
            seen = np.concatenate([p[2] for p in parts])[order]
            out.add((hi[order], lo, seen))
    return out.finish()


def _sorted_run(hi: _U64Array, lo: _U64Array, seen: _U32Array, segment_keys: int) -> _Run:
    """A run of the keys, sorted straight into segments of about ``segment_keys``."""
    order = np.argsort(hi)
    out = _Builder(segment_keys)
    n, start = len(order), 0
    while start < n:
        end = min(start + segment_keys, n)
        while end < n and hi[order[end]] == hi[order[end - 1]]:
            end += 1  # equal high halves stay in one segment
        o = order[start:end]
        out.add((hi[o], lo[o], seen[o]))
        start = end
    return out.finish()


class DedupIndex:
    """Set of 16-byte keys with a first-seen time; keys older than the window are absent.

    Times are Unix seconds (0 to ``MAX_SEEN_S``).
    """

    def __init__(self, window_s: int, compact_at: int = 65_536, growth: int = 4) -> None:
        self.window_s = window_s
        self._compact_at = compact_at
        self._growth = growth
        self._runs: list[_Run] = []  # oldest (largest) first
        self._recent: dict[bytes, int] = {}  # about 100 bytes a key: flushed at ``compact_at``

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
        if self._runs:
            hi, lo = _split(b"".join(keys))
            # Sorted probes walk each segment in one direction and split by segment in one call.
            order = np.argsort(hi)
            hi, lo = hi[order], lo[order]
            found = np.zeros(len(keys), dtype=np.bool_)
            for run in self._runs:
                run.probe(hi, lo, cutoff, found)
            unsorted = np.empty_like(found)
            unsorted[order] = found
            out: list[bool] = unsorted.tolist()
        else:
            out = [False] * len(keys)
        recent = self._recent
        for i, k in enumerate(keys):
            if not out[i]:
                seen = recent.get(k)
                if seen is not None and seen >= cutoff:
                    out[i] = True
        return out

    def add(self, keys: Iterable[bytes], seen_s: int) -> None:
        _check_seen(seen_s)
        recent = self._recent
        for k in keys:
            recent[k] = seen_s
        if len(recent) >= self._compact_at:
            self._flush_recent(seen_s - self.window_s)

    def load(self, groups: Iterable[tuple[bytes, int]]) -> None:
        """Bulk-add blobs of concatenated keys, each with its first-seen second (start-up).

        Streams: the blobs are copied into chunks of ``LOAD_CHUNK_KEYS``, each sorted on its own
        into small segments, and every ``LOAD_FAN_IN`` runs of a tier are merged into one of the
        next; the last merge leaves one run. No step holds all the blobs or a second copy.
        """
        tiers: list[list[_Run]] = [[]]

        def flush(hi: _U64Array, lo: _U64Array, seen: _U32Array) -> None:
            # Small segments: a merge of many runs releases each source a little at a time.
            segment_keys = max(1, LOAD_CHUNK_KEYS // LOAD_FAN_IN // 4)
            tiers[0].append(_sorted_run(hi, lo, seen, segment_keys))
            for t, runs in enumerate(tiers):
                if len(runs) < LOAD_FAN_IN:
                    break
                if t + 1 == len(tiers):
                    tiers.append([])
                tiers[t + 1].append(_merge(runs, None))
                runs.clear()

        hi = lo = np.empty(0, dtype=np.uint64)
        seen = np.empty(0, dtype=np.uint32)
        filled = 0
        for blob, seen_s in groups:
            _check_seen(seen_s)
            arr = np.frombuffer(blob, dtype=_KEY)
            at = 0
            while at < len(arr):
                if filled == len(hi):
                    if filled:
                        flush(hi, lo, seen)
                    hi = np.empty(LOAD_CHUNK_KEYS, dtype=np.uint64)
                    lo = np.empty(LOAD_CHUNK_KEYS, dtype=np.uint64)
                    seen = np.empty(LOAD_CHUNK_KEYS, dtype=np.uint32)
                    filled = 0
                take = min(len(hi) - filled, len(arr) - at)
                part = arr[at : at + take]
                hi[filled : filled + take] = part["hi"]
                lo[filled : filled + take] = part["lo"]
                seen[filled : filled + take] = seen_s
                filled += take
                at += take
        if filled:
            flush(hi[:filled], lo[:filled], seen[:filled])
        del hi, lo, seen
        runs = [r for tier in reversed(tiers) for r in tier]
        if runs:
            self._push(runs[0] if len(runs) == 1 else _merge(runs, None), cutoff=None)

    def compact(self, now_s: int) -> None:
        """Fold recent keys into the runs and drop keys older than the window everywhere."""
        cutoff = now_s - self.window_s
        runs = []
        for run in self._runs:
            if run.oldest() < cutoff:
                run = _merge([run], cutoff)
            if len(run):
                runs.append(run)
        self._runs = runs
        self._flush_recent(cutoff)

    def _flush_recent(self, cutoff: int) -> None:
        if not self._recent:
            return
        hi, lo = _split(b"".join(self._recent.keys()))
        seen = np.fromiter(self._recent.values(), np.uint32, len(self._recent))
        self._recent = {}
        if int(seen.min()) < cutoff:
            keep = seen >= cutoff
            hi, lo, seen = hi[keep], lo[keep], seen[keep]
        if len(hi):
            self._push(_sorted_run(hi, lo, seen, SEGMENT_KEYS), cutoff)

    def _push(self, run: _Run, cutoff: int | None) -> None:
        runs = self._runs
        runs.append(run)
        while len(runs) >= 2 and len(runs[-2]) <= self._growth * len(runs[-1]):
            newer = runs.pop()
            merged = _merge([runs.pop(), newer], cutoff)
            if len(merged):
                runs.append(merged)
