"""Benchmarks for meter-gateway (run from the repository root: ``python -m bench.ingest``)."""
