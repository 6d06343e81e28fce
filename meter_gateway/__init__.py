"""meter-gateway: exact, deduplicated usage metering for usage-billed SaaS.

Receivers (``receivers``) turn what Vector, Logstash, OTLP, Prometheus and REST clients send into
usage records; the pipeline (``meter_gateway.pipeline``) validates, maps and commits them through a
store (``meter_gateway.store``) that deduplicates and aggregates exactly; the API
(``meter_gateway.api``) reads them back.
"""

__version__ = "0.1.0"
