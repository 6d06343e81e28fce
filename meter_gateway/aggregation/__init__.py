"""Exact aggregation: window arithmetic, per-method partial aggregates, billable quantity."""
