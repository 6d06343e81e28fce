"""Rollup buckets: UTC hours in integer nanoseconds since the epoch.

The lowest floor of the package: the store keys its rollups by these buckets and aggregation
cuts windows along them, so both take them from here (neither imports the other for them).
"""

from __future__ import annotations

NS = 1_000_000_000
BUCKET_NS = 3600 * NS


def floor_bucket(ts_ns: int) -> int:
    """Start of the bucket holding ``ts_ns``."""
    return ts_ns - ts_ns % BUCKET_NS


def ceil_bucket(ts_ns: int) -> int:
    """``ts_ns`` if it starts a bucket, else the start of the next bucket."""
    r = ts_ns % BUCKET_NS
    return ts_ns if r == 0 else ts_ns - r + BUCKET_NS
