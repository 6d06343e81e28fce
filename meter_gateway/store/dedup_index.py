"""The in-memory index of dedup keys seen within the dedup window.

Random 128-bit keys in an on-disk B-tree cost a random page write each; here they live in a few
sorted runs with a small dict of recent keys in front. Recent keys become a new run when the dict
fills; a run is merged into the one before it only once it has grown to a quarter of that one's
size (the logarithmic method), so the writer rarely touches the big run, and ``compact`` (every
ten minutes in the store) merges them all into one without the keys past the window. The store
persists the keys append-only and rebuilds this index at start-up; it is exact (full 128-bit
comparison) and only the store's single writer touches it.

Memory is the constraint (tens of millions of keys in a gateway with a budget): a key costs 20
bytes (high and low halves, first-seen second as uint32), and a run is a list of segments of
``SEGMENT_KEYS`` to about three times that, split by key range, each in a memory mapping of its
own. Merges, expiry and start-up loading go a key range at a time and release each source
segment once read past, so no step holds a second copy of a big run, only a few segments."""

from __future__ import annotations

import mmap
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

SEGMENT_KEYS = 1 << 18  # keys in a segment: what a merge or an expiry pass copies at a time
LOAD_CHUNK_KEYS = 1 << 19  # keys sorted at a time while loading (argsort temporaries: 28 B a key)
LOAD_FAN_IN = 32  # runs merged at once while loading: 10M keys take one merge, 300M two
LOAD_SEGMENT_KEYS = 1 << 14  # segments until the last merge: what a merge holds of each source
MAX_SEEN_S = (1 << 32) - 1  # first-seen seconds are uint32: Unix time until 2106

_KEY = np.dtype([("hi", ">u8"), ("lo", ">u8")])
# Private (a fork does not share it), anonymous, and faulted in at once (Linux): it is filled next.
_MAP_FLAGS = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
_U64Array = npt.NDArray[np.uint64]
_U32Array = npt.NDArray[np.uint32]
_Part = tuple[_U64Array, _U64Array, _U32Array]  # hi, lo, seen: sorted by hi


def _arrays(part: _Part | _Segment) -> _Part:
    return (part.hi, part.lo, part.seen) if isinstance(part, _Segment) else part


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
    def of(parts: Sequence[_Part]) -> _Segment:
        """The parts' keys (each part sorted and above the one before), copied into a memory
        mapping of the segment's own.

        Segments live for minutes or hours among short-lived temporaries (blobs, sorts, merged
        pieces); in the malloc heap they would pin the freed temporaries' memory around them
        (glibc returns heap memory from its top only), so the RSS after a load or merge would
        stay well above 20 bytes a key. A mapping goes back to the system with its segment.
        """
        n = sum(len(p[0]) for p in parts)
        buf = mmap.mmap(-1, 20 * n, flags=_MAP_FLAGS)
        hi = np.frombuffer(buf, np.uint64, n, 0)
        lo = np.frombuffer(buf, np.uint64, n, 8 * n)
        seen = np.frombuffer(buf, np.uint32, n, 16 * n)
        np.concatenate([p[0] for p in parts], out=hi)
        np.concatenate([p[1] for p in parts], out=lo)
        np.concatenate([p[2] for p in parts], out=seen)
        for own in (hi, lo, seen):
            own.flags.writeable = False
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
    """Gathers sorted pieces, each above the one before and sharing no high half with it, into
    segments of ``segment_keys`` to about three times that (the last one may be smaller)."""

    def __init__(self, segment_keys: int | None = None) -> None:
        self._keys = SEGMENT_KEYS if segment_keys is None else segment_keys
        self._segments: list[_Segment] = []
        self._pending: list[_Part] = []
        self._count = 0

    def add(self, part: _Part | _Segment) -> None:
        if isinstance(part, _Segment) and not self._pending and len(part) >= self._keys // 2:
            self._segments.append(part)  # a whole source segment: kept, not copied
            return
        arrays = _arrays(part)
        if len(arrays[0]):
            self._pending.append(arrays)
            self._count += len(arrays[0])
            if self._count >= self._keys:
                self._emit()

    def finish(self) -> _Run:
        self._emit()
        return _Run(self._segments)

    def _emit(self) -> None:
        if self._pending:
            self._segments.append(_Segment.of(self._pending))
            self._pending, self._count = [], 0


class _Cursor:
    """Reads a run in key order, a key range at a time, dropping each segment once read past
    (the run is consumed) and keys seen before ``cutoff``."""

    def __init__(self, run: _Run, cutoff: int | None) -> None:
        self._segments = deque(run.segments)
        run.segments = []
        self._at = 0  # into the first segment
        self._cutoff = cutoff

    def take(self, below: np.uint64 | None, into: list[_Part | _Segment]) -> None:
        """Append to ``into`` the keys whose high half is below ``below`` (all when None)."""
        segments = self._segments
        while segments:
            seg = segments[0]
            n = len(seg)
            end = n if below is None else int(np.searchsorted(seg.hi, below))
            cutoff = self._cutoff
            expiring = cutoff is not None and seg.oldest < cutoff
            if end > self._at and not self._at and end == n and not expiring:
                into.append(seg)
            elif end > self._at:
                s = slice(self._at, end)
                part = (seg.hi[s], seg.lo[s], seg.seen[s])
                if cutoff is not None and expiring:
                    keep = part[2] >= cutoff
                    part = (part[0][keep], part[1][keep], part[2][keep])
                into.append(part)
            if end < n:
                self._at = end
                return
            segments.popleft()
            self._at = 0


def _merge(runs: list[_Run], cutoff: int | None, segment_keys: int | None = None) -> _Run:
    """One run of the keys of ``runs`` (those seen at ``cutoff`` or later), which it consumes.

    Key ranges are cut at every ``step``-th key of each run, so a range holds at most about one
    segment's worth of keys whatever the number of runs; each range is merged on its own.
    """
    step = max(1, SEGMENT_KEYS // max(1, len(runs) - 1))
    samples = [s.hi[::step] for r in runs for s in r.segments]
    if not samples:
        return _Run([])
    bounds = np.unique(np.concatenate(samples))
    del samples  # views: they would keep every source segment to the end
    cursors = [_Cursor(r, cutoff) for r in runs]
    out = _Builder(segment_keys)
    uppers: list[np.uint64 | None] = [*bounds[1:], None]
    for below in uppers:
        taken: list[_Part | _Segment] = []
        for c in cursors:
            c.take(below, taken)
        if len(taken) == 1:
            out.add(taken[0])
            continue
        parts = [p for p in map(_arrays, taken) if len(p[0])]
        if len(parts) == 1:
            out.add(parts[0])
        elif parts:
            hi = np.concatenate([p[0] for p in parts])
            # Timsort finds the sorted parts and merges them: 4x np.insert's speed for two.
            order = np.argsort(hi, kind="stable")
            lo = np.concatenate([p[1] for p in parts])[order]
            seen = np.concatenate([p[2] for p in parts])[order]
            out.add((hi[order], lo, seen))
    return out.finish()


def _sorted_run(hi: _U64Array, lo: _U64Array, seen: _U32Array, segment_keys: int) -> _Run:
    """A run of the keys, sorted straight into segments of about ``segment_keys``."""
    order = np.argsort(hi)
    segments = []
    n, start = len(order), 0
    while start < n:
        end = min(start + segment_keys, n)
        while end < n and hi[order[end]] == hi[order[end - 1]]:
            end += 1  # equal high halves stay in one segment
        o = order[start:end]
        segments.append(_Segment.of([(hi[o], lo[o], seen[o])]))
        start = end
    return _Run(segments)


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
        into small segments (``LOAD_SEGMENT_KEYS``: a merge of many runs releases each a little
        at a time), and every ``LOAD_FAN_IN`` runs of a tier are merged into one of the next;
        the last merge leaves one run. No step holds all the blobs or a second copy.
        """
        tiers: list[list[_Run]] = [[]]

        def flush(hi: _U64Array, lo: _U64Array, seen: _U32Array) -> None:
            tiers[0].append(_sorted_run(hi, lo, seen, LOAD_SEGMENT_KEYS))
            for t, runs in enumerate(tiers):
                if len(runs) < LOAD_FAN_IN:
                    break
                if t + 1 == len(tiers):
                    tiers.append([])
                tiers[t + 1].append(_merge(runs, None, LOAD_SEGMENT_KEYS))
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
            self._push(_merge(runs, None), cutoff=None)

    def compact(self, now_s: int) -> None:
        """Merge recent keys and every run into one run, without keys older than the window.

        One pass over every key (about 0.3 s of CPU for 10M): the store compacts every ten
        minutes, when it purges old keys from disk, and keys leave the window all the time.
        """
        cutoff = now_s - self.window_s
        runs = self._runs
        recent = self._take_recent(cutoff)
        if recent is not None:
            runs.append(recent)
        if len(runs) > 1 or (runs and runs[0].oldest() < cutoff):
            merged = _merge(runs, cutoff)
            self._runs = [merged] if len(merged) else []

    def _flush_recent(self, cutoff: int) -> None:
        run = self._take_recent(cutoff)
        if run is not None:
            self._push(run, cutoff)

    def _take_recent(self, cutoff: int) -> _Run | None:
        if not self._recent:
            return None
        hi, lo = _split(b"".join(self._recent.keys()))
        seen = np.fromiter(self._recent.values(), np.uint32, len(self._recent))
        self._recent = {}
        if int(seen.min()) < cutoff:
            keep = seen >= cutoff
            hi, lo, seen = hi[keep], lo[keep], seen[keep]
        return _sorted_run(hi, lo, seen, SEGMENT_KEYS) if len(hi) else None

    def _push(self, run: _Run, cutoff: int | None) -> None:
        runs = self._runs
        runs.append(run)
        while len(runs) >= 2 and len(runs[-2]) <= self._growth * len(runs[-1]):
            newer = runs.pop()
            merged = _merge([runs.pop(), newer], cutoff)
            if len(merged):
                runs.append(merged)
