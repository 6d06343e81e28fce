"""Memory and speed of the in-memory dedup index (``meter_gateway.store.dedup_index``) alone.

Loads ``--keys`` random 16-byte keys in blobs of ``--blob`` keys (the shape of ``dedup_log``
rows at start-up), then runs ``--adds`` keys through ``contains`` + ``add`` in batches, probes
``--probe`` keys that are absent (the same keys again, a cached best case, and new keys each
call) and as many that are present, and finally compacts with half of the loaded keys past the
window. After each phase: RSS and the phase's peak RSS (VmHWM, reset between phases through
``/proc/self/clear_refs``; Linux only).

    python -m bench.dedup_memory                  # 10M keys, 400k adds, 2,000-key probes
    python -m bench.dedup_memory --keys 1000000
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from meter_gateway.store.dedup_index import DedupIndex

START_S = 1_000_000_000
STATUS = Path("/proc/self/status")


def vm_mb(field: str) -> float:
    for line in STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def reset_peak() -> None:
    with contextlib.suppress(OSError):  # the peak then covers every phase so far
        Path("/proc/self/clear_refs").write_text("5")


def report(phase: str, seconds: float, extra: str = "") -> None:
    print(
        f"{phase:<8} {seconds:7.2f}s  RSS {vm_mb('VmRSS'):6.0f} MB  "
        f"peak {vm_mb('VmHWM'):6.0f} MB  {extra}"
    )


def probe_ms(ix: DedupIndex, batches: list[list[bytes]], now_s: int) -> float:
    """Best of five rounds of the mean ``contains`` time over ``batches`` (milliseconds)."""
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for keys in batches:
            ix.contains(keys, now_s)
        best = min(best, (time.perf_counter() - t) / len(batches))
    return best * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=10_000_000, help="keys loaded at start-up")
    ap.add_argument("--blob", type=int, default=2_000, help="keys per loaded blob")
    ap.add_argument("--adds", type=int, default=400_000, help="keys added after loading")
    ap.add_argument("--probe", type=int, default=2_000, help="keys per contains call")
    args = ap.parse_args()

    rng = np.random.default_rng(1)
    blobs = max(1, args.keys // args.blob)
    window_s = blobs  # the loaded keys' first-seen seconds span one window
    ix = DedupIndex(window_s)
    known: list[bytes] = []

    def groups() -> Iterator[tuple[bytes, int]]:
        for i in range(blobs):
            blob = rng.bytes(16 * args.blob)
            if i % max(1, blobs // args.probe) == 0 and len(known) < args.probe:
                known.append(blob[:16])
            yield blob, START_S + i

    print(f"{args.keys:,} keys loaded, {args.adds:,} added, probes of {args.probe:,}")
    print(f"start    {'':>8}  RSS {vm_mb('VmRSS'):6.0f} MB")
    reset_peak()
    t = time.perf_counter()
    ix.load(groups())
    report("load", time.perf_counter() - t, f"runs {ix.runs}")

    now_s = START_S + blobs
    reset_peak()
    t = time.perf_counter()
    for _ in range(max(1, args.adds // args.probe)):
        batch = [rng.bytes(16) for _ in range(args.probe)]
        ix.contains(batch, now_s)
        ix.add(batch, now_s)
    report("adds", time.perf_counter() - t, f"runs {ix.runs}")

    absent = [rng.bytes(16) for _ in range(args.probe)]
    assert not any(ix.contains(absent, now_s))
    assert all(ix.contains(known, now_s))
    fresh = [[rng.bytes(16) for _ in range(args.probe)] for _ in range(50)]
    hot = probe_ms(ix, [absent] * 50, now_s)
    cold = probe_ms(ix, fresh, now_s)
    present = probe_ms(ix, [known] * 50, now_s)
    print(
        f"contains of {args.probe:,} keys: {hot:.2f} ms absent (the same keys again), "
        f"{cold:.2f} ms absent (new keys each call), {present:.2f} ms present"
    )

    reset_peak()
    t = time.perf_counter()
    ix.compact(now_s + window_s // 2)
    report("compact", time.perf_counter() - t, f"runs {ix.runs}, {len(ix):,} keys left")


if __name__ == "__main__":
    main()
