"""The ingest pipeline: decode → validate → map → (dedup, aggregate, commit in the store)."""
