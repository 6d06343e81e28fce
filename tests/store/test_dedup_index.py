from __future__ import annotations

import os

from meter_gateway.store.dedup_index import DedupIndex


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
