"""The HTTP API: ingest, usage queries, catalog, rejected records, operations endpoints."""
