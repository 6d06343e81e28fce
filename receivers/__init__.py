"""Receivers: one module per way usage arrives (REST, OTLP, Prometheus, remote write).

Each decodes what its senders put on the wire and hands batches to the pipeline it was given.
"""
