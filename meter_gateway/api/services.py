"""What the HTTP API needs of the service that runs it, as one protocol: the API is built from
these (``Gateway`` has them) and imports nothing above itself.

Handlers still reach several services through it; splitting it into narrow query, billing and
catalog services, each handed only to its routes, is the next step (issue 14 item 4).
"""

from __future__ import annotations

from typing import Protocol
from zoneinfo import ZoneInfo

from meter_gateway.billing.invoices import Invoices
from meter_gateway.catalog import CatalogService
from meter_gateway.clock import Clock
from meter_gateway.keys import KeyRing
from meter_gateway.store import Store
from receivers.remote_write import RemoteWriteReceiver
from receivers.rest import IngestServices


class ApiServices(IngestServices, Protocol):
    """The services behind the routes: ingest (``IngestServices``), remote write, keys, the
    catalog, the store's reads and billing, invoices, the clock and the billing time zone."""

    @property
    def clock(self) -> Clock: ...

    @property
    def tz(self) -> ZoneInfo: ...

    @property
    def keys(self) -> KeyRing: ...

    @property
    def catalog(self) -> CatalogService: ...

    @property
    def store(self) -> Store: ...

    @property
    def invoices(self) -> Invoices: ...

    @property
    def remote_write(self) -> RemoteWriteReceiver: ...

    @property
    def ready(self) -> bool:
        """False while draining or while commits fail (``/readyz`` answers 503)."""
        ...
