from __future__ import annotations

import contextlib
import operator
import os
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meter_gateway.store import dedup_index
from meter_gateway.store.dedup_index import (
    LOAD_CHUNK_KEYS,
    MAX_SEEN_S,
    SEGMENT_KEYS,
    DedupIndex,
)


def keys(n: int) -> list[bytes]:
    return [os.urandom(16) for _ in range(n)]


def test_finds_loaded_recent_and_compacted_keys() -> None:
    ix = DedupIndex(window_s=100, compact_at=50)
    loaded, recent = keys(1000), keys(30)
    ix.load([(b"".join(loaded[:500]), 10), (b"".join(loaded[500:]), 20)])
    ix.add(recent, 30)
    assert ix.contains(loaded + recent, 40) == [True] * 1030
    assert ix.contains(keys(100), 40) == [False] * 100
    ix.add(keys(40), 40)  # crosses compact_at: recent keys fold into the sorted arrays
    assert ix.contains(recent, 41) == [True] * 30
    assert len(ix) == 1070


def test_keys_expire_after_the_window() -> None:
    ix = DedupIndex(window_s=100)
    old, new = keys(5), keys(5)
    ix.load([(b"".join(old), 0)])
    ix.add(new, 50)
    assert ix.contains(old + new, 100) == [True] * 10
    assert ix.contains(old + new, 101) == [False] * 5 + [True] * 5
    ix.compact(101)
    assert len(ix) == 5


def test_keys_sharing_the_high_half_are_told_apart() -> None:
    ix = DedupIndex(window_s=100)
    hi = os.urandom(8)
    a, b, c = hi + b"\x00" * 8, hi + b"\x01" * 8, hi + b"\x02" * 8
    ix.load([(a + c, 0)])
    assert ix.contains([a, b, c], 1) == [True, False, True]
    ix.add([b], 1)
    ix.compact(1)
    assert ix.contains([a, b, c], 2) == [True, True, True]


def test_many_compactions_keep_every_key_and_few_runs() -> None:
    ix = DedupIndex(window_s=1000, compact_at=100, growth=4)
    all_keys: list[bytes] = []
    for second in range(60):
        batch = keys(50)
        all_keys += batch
        assert ix.contains(batch, second) == [False] * 50
        ix.add(batch, second)
    assert ix.contains(all_keys, 60) == [True] * len(all_keys)
    assert ix.runs <= 4  # logarithmic in the number of keys, not one per compaction
    ix.compact(1030)  # keys first seen before second 30 have left the window
    assert ix.contains(all_keys, 1030) == [False] * 1500 + [True] * 1500
    assert len(ix) == 1500


def test_first_seen_seconds_must_fit_uint32() -> None:
    ix = DedupIndex(window_s=100)
    with pytest.raises(ValueError, match="outside"):
        ix.add(keys(1), -1)
    with pytest.raises(ValueError, match="outside"):
        ix.load([(b"".join(keys(2)), MAX_SEEN_S + 1)])
    ix.add(keys(1), MAX_SEEN_S)
    assert len(ix) == 1


def test_loads_and_merges_at_full_segment_sizes() -> None:
    # Past one load chunk and several segments: the sizes the store sees, not the tests' small ones.
    rng = np.random.default_rng(7)
    n = LOAD_CHUNK_KEYS * 2 + 1234
    blob = rng.bytes(16 * n)
    ix = DedupIndex(window_s=1000, compact_at=40_000)
    ix.load(
        (blob[i : i + 16 * 50_000], 500 + i // (16 * 50_000))
        for i in range(0, len(blob), 16 * 50_000)
    )
    assert len(ix) == n
    assert ix.runs == 1
    sample = [blob[16 * i : 16 * i + 16] for i in range(0, n, 997)]
    assert all(ix.contains(sample, 1000))
    assert not any(ix.contains(keys(2000), 1000))
    more = [rng.bytes(16) for _ in range(SEGMENT_KEYS)]
    for i in range(0, len(more), 20_000):
        ix.add(more[i : i + 20_000], 1000)
    assert all(ix.contains(sample + more, 1000))
    ix.compact(1503)  # the first three blobs (seen 500..502) leave the window
    assert len(ix) == n - 150_000 + len(more)
    assert ix.contains(sample, 1503) == [i >= 150_000 for i in range(0, n, 997)]


# Keys built from a few high and low halves share them often, so equal high halves meet at
# segment edges, in merges and in probes; small segments, chunks and fan-in make every load and
# merge path run on a few dozen keys.
_HALVES = [bytes(8), b"\xff" * 8, bytes(7) + b"\x01", b"\x80" + bytes(7), b"\x7f" + b"\xff" * 7]
_half = st.one_of(st.sampled_from(_HALVES), st.binary(min_size=8, max_size=8))
_key = st.builds(operator.add, _half, _half)
_op = st.one_of(
    st.tuples(st.just("add"), st.lists(_key, max_size=12), st.integers(0, 20)),
    st.tuples(st.just("probe"), st.lists(_key, max_size=12), st.integers(0, 20)),
    st.tuples(st.just("compact"), st.just([]), st.integers(0, 40)),
)


@settings(max_examples=400, deadline=None)
@given(
    window=st.integers(1, 60),
    groups=st.lists(st.tuples(st.lists(_key, max_size=10), st.integers(0, 100)), max_size=8),
    ops=st.lists(_op, max_size=30),
    growth=st.integers(1, 4),
)
def test_answers_like_a_dict_of_first_seen_seconds(
    window: int,
    groups: list[tuple[list[bytes], int]],
    ops: list[tuple[str, list[bytes], int]],
    growth: int,
) -> None:
    small = {"SEGMENT_KEYS": 4, "LOAD_CHUNK_KEYS": 8, "LOAD_FAN_IN": 2, "LOAD_SEGMENT_KEYS": 2}
    with contextlib.ExitStack() as stack:
        for name, value in small.items():
            stack.enter_context(mock.patch.object(dedup_index, name, value))
        ix = DedupIndex(window_s=window, compact_at=5, growth=growth)
        oracle: dict[bytes, int] = {}  # key -> last first-seen second (the store's protocol)
        blobs = []
        for ks, seen_s in groups:
            fresh = [k for k in dict.fromkeys(ks) if k not in oracle]
            oracle.update(dict.fromkeys(fresh, seen_s))
            blobs.append((b"".join(fresh), seen_s))
        ix.load(blobs)
        now = 100

        def expected(ks: list[bytes]) -> list[bool]:
            return [oracle.get(k, -1) >= now - window for k in ks]

        for op, ks, step in ops:
            now += step
            if op == "compact":
                ix.compact(now)
                assert len(ix) == sum(s >= now - window for s in oracle.values())
                continue
            assert ix.contains(ks, now) == expected(ks)
            if op == "add":
                fresh = [k for k in dict.fromkeys(ks) if not expected([k])[0]]
                ix.add(fresh, now)
                oracle.update(dict.fromkeys(fresh, now))
        every = list(oracle)
        assert ix.contains(every, now) == expected(every)
