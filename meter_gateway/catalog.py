"""The catalog: dimensions, offerings, customers (with aliases) and meters.

Entries come from the config file (written to the store at start-up, so the file wins for the
ids it names) and from the ``/v1`` catalog API. Readers take an immutable ``Catalog`` snapshot;
writers validate the whole would-be catalog, persist the change, then swap the snapshot.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from meter_gateway.config import Config, Customer, Dimension, Meter, Offering
from meter_gateway.store.base import Store

Kind = Literal["dimensions", "offerings", "customers", "meters"]
MODELS: dict[str, type[BaseModel]] = {
    "dimensions": Dimension,
    "offerings": Offering,
    "customers": Customer,
    "meters": Meter,
}


class CatalogError(ValueError):
    """A catalog change that would leave the catalog inconsistent; ``errors`` says where."""

    def __init__(self, errors: list[str], status: int = 422) -> None:
        super().__init__("; ".join(errors))
        self.errors = errors
        self.status = status


@dataclass(frozen=True)
class Catalog:
    dimensions: Mapping[str, Dimension] = field(default_factory=dict)
    offerings: Mapping[str, Offering] = field(default_factory=dict)
    customers: Mapping[str, Customer] = field(default_factory=dict)
    meters: Mapping[str, Meter] = field(default_factory=dict)
    # every customer id and alias → customer id
    names: Mapping[str, str] = field(default_factory=dict)

    def customer_id(self, name: str) -> str | None:
        return self.names.get(name)

    def check(self) -> list[str]:
        errors = []
        for o in self.offerings.values():
            for c in o.charges:
                if c.dimension not in self.dimensions:
                    errors.append(f"offerings.{o.id}: charge for unknown dimension {c.dimension!r}")
        for cust in self.customers.values():
            if cust.offering is not None and cust.offering not in self.offerings:
                errors.append(f"customers.{cust.id}.offering: unknown offering {cust.offering!r}")
        for m in self.meters.values():
            if m.dimension not in self.dimensions:
                errors.append(f"meters.{m.id}.dimension: unknown dimension {m.dimension!r}")
            if m.customer not in self.customers:
                errors.append(f"meters.{m.id}.customer: unknown customer {m.customer!r}")
        return errors


def build(entries: Mapping[str, Mapping[str, BaseModel]]) -> Catalog:
    """A snapshot from entries by kind; raises CatalogError on alias clashes."""
    customers: dict[str, Customer] = dict(entries.get("customers", {}))  # type: ignore[arg-type]
    names: dict[str, str] = {c: c for c in customers}
    errors = []
    for c in customers.values():
        for a in c.aliases:
            owner = names.setdefault(a, c.id)
            if owner != c.id:
                errors.append(f"customers.{c.id}.aliases: {a!r} already names {owner!r}")
    if errors:
        raise CatalogError(errors, status=409)
    return Catalog(
        dimensions=dict(entries.get("dimensions", {})),  # type: ignore[arg-type]
        offerings=dict(entries.get("offerings", {})),  # type: ignore[arg-type]
        customers=customers,
        meters=dict(entries.get("meters", {})),  # type: ignore[arg-type]
        names=names,
    )


class CatalogService:
    """Owns the current snapshot and every change to it."""

    def __init__(self, store: Store, config: Config) -> None:
        self._store = store
        self._lock = threading.Lock()
        for kind in MODELS:
            for item in getattr(config, kind):
                store.catalog_put(kind, item.id, item.model_dump(mode="json"))
        stored = store.catalog_load()
        entries: dict[str, dict[str, BaseModel]] = {}
        for kind, model in MODELS.items():
            entries[kind] = {
                id_: model.model_validate(body) for id_, body in stored.get(kind, {}).items()
            }
        self._snapshot = build(entries)

    @property
    def current(self) -> Catalog:
        return self._snapshot

    def parse(self, kind: str, body: Any) -> BaseModel:
        model = MODELS[kind]
        try:
            return model.model_validate(body)
        except ValidationError as exc:
            raise CatalogError(
                [
                    f"{'.'.join(str(p) for p in e['loc']) or '<body>'}: "
                    f"{'unknown key' if e['type'] == 'extra_forbidden' else e['msg']}"
                    for e in exc.errors()
                ]
            ) from None

    def put(self, kind: str, item: BaseModel, create_only: bool = False) -> None:
        with self._lock:
            snap = self._snapshot
            current: dict[str, BaseModel] = dict(getattr(snap, kind))
            item_id = str(getattr(item, "id"))  # noqa: B009 - every catalog model has an id
            if create_only and item_id in current:
                raise CatalogError([f"{kind}.{item_id}: already exists"], status=409)
            current[item_id] = item
            new = build({**self._entries(snap), kind: current})
            errors = new.check()
            if errors:
                raise CatalogError(errors)
            self._store.catalog_put(kind, item_id, item.model_dump(mode="json"))
            self._snapshot = new

    def delete(self, kind: str, item_id: str) -> bool:
        with self._lock:
            snap = self._snapshot
            current: dict[str, BaseModel] = dict(getattr(snap, kind))
            if item_id not in current:
                return False
            del current[item_id]
            new = build({**self._entries(snap), kind: current})
            errors = new.check()
            if errors:
                raise CatalogError(
                    [f"{kind}.{item_id} is still in use: {e}" for e in errors], status=409
                )
            self._store.catalog_delete(kind, item_id)
            self._snapshot = new
            return True

    @staticmethod
    def _entries(snap: Catalog) -> dict[str, Mapping[str, BaseModel]]:
        return {kind: getattr(snap, kind) for kind in MODELS}
