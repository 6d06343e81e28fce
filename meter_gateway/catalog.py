"""The catalog: dimensions, offerings, customers (with aliases) and meters.

Entries come from the config file (written to the store at start-up, so the file wins for the
ids it names) and from the ``/v1`` catalog API. Readers take an immutable ``Catalog`` snapshot;
writers validate the whole would-be catalog, persist the change, then swap the snapshot.
Replicas sharing a store see each other's changes through the store's catalog version (see
``CatalogService``).

Changes cannot rewrite the past (SPEC 11). A dimension or offering change that alters how
usage is rated (``RATING_FIELDS``) while a finalized invoice of a customer it bills exists
answers 409, unless the body carries ``effective_from`` (RFC 3339) at or after the end of the
last finalized period: the new definition then rates the periods that start from then on, and
the one it replaced is kept in ``superseded`` (newest first) for the periods before. Without
finalized invoices a change applies at once (drafts are recomputed). ``Catalog.at(t)`` is the
catalog a period starting at ``t`` is rated with. Finalized invoices never change either way:
they are stored bytes.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ValidationError

from meter_gateway.clock import Clock, SystemClock
from meter_gateway.config import NEW_DEFINITION, Config, Customer, Dimension, Meter, Offering
from meter_gateway.store.base import CatalogStore, ConflictError

log = logging.getLogger(__name__)

NS = 1_000_000_000
CHECK_EVERY_S = 1.0  # how stale another replica's catalog change may be seen
CHANGE_ATTEMPTS = 5  # validations of one change while the catalog keeps moving under it

Kind = Literal["dimensions", "offerings", "customers", "meters"]
MODELS: dict[str, type[BaseModel]] = {
    "dimensions": Dimension,
    "offerings": Offering,
    "customers": Customer,
    "meters": Meter,
}


#: The fields whose change alters how usage already invoiced would rate.
RATING_FIELDS: Mapping[str, tuple[str, ...]] = {
    "dimensions": (
        "aggregation", "aggregation_interval", "usage_increment", "rounding", "price",
        "unique_key", "prorated", "unique_count_mode",
    ),
    "offerings": ("currency", "charges", "fee", "credit"),
}  # fmt: skip
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _ns(dt: datetime) -> int:
    return (dt - _EPOCH) // timedelta(microseconds=1) * 1000


def _iso(ns: int) -> str:
    return (_EPOCH + timedelta(microseconds=ns // 1000)).isoformat().replace("+00:00", "Z")


Versioned = Dimension | Offering
V = TypeVar("V", Dimension, Offering)


def version_at(item: V, t_ns: int) -> V:
    """The definition of ``item`` in effect at ``t_ns``: itself, or the newest superseded one
    whose ``effective_from`` is not after ``t_ns`` (the oldest, before every one)."""
    if not item.superseded:
        return item
    versions: list[V] = [item, *item.superseded]
    for v in versions:
        if v.effective_from is None or _ns(v.effective_from) <= t_ns:
            return v
    return versions[-1]


class CatalogError(ValueError):
    """A catalog change that would leave the catalog inconsistent; ``errors`` says where."""

    def __init__(self, errors: list[str], status: int = 422) -> None:
        super().__init__("; ".join(errors))
        self.errors = errors
        self.status = status


# Serial numbers of snapshots (``Catalog.serial``); next() on a count is atomic under the GIL.
_SERIALS = itertools.count(1)


@dataclass(frozen=True)
class Catalog:
    dimensions: Mapping[str, Dimension] = field(default_factory=dict)
    offerings: Mapping[str, Offering] = field(default_factory=dict)
    customers: Mapping[str, Customer] = field(default_factory=dict)
    meters: Mapping[str, Meter] = field(default_factory=dict)
    # every customer id and alias → customer id
    names: Mapping[str, str] = field(default_factory=dict)
    # Which snapshot this is, unique in the process. What is learned under a snapshot (how a
    # series maps) is tagged with its serial, never with the snapshot itself: one held per
    # cached series kept every version of the catalog alive, each with every customer in it
    # (2.8 GB after 6,000 customers were created one at a time under OTLP traffic).
    serial: int = field(default_factory=lambda: next(_SERIALS), init=False, compare=False)

    def customer_id(self, name: str) -> str | None:
        return self.names.get(name)

    def at(self, t_ns: int) -> Catalog:
        """The catalog a period starting at ``t_ns`` is rated with (module docstring)."""
        if not any(d.superseded for d in self.dimensions.values()) and not any(
            o.superseded for o in self.offerings.values()
        ):
            return self
        return Catalog(
            dimensions={k: version_at(d, t_ns) for k, d in self.dimensions.items()},
            offerings={k: version_at(o, t_ns) for k, o in self.offerings.items()},
            customers=self.customers,
            meters=self.meters,
            names=self.names,
        )

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


def _keep_history(kind: str, body: dict[str, Any], old: Mapping[str, Any]) -> dict[str, Any]:
    """A config file entry written over a stored one keeps the stored definitions it
    superseded when it rates as the stored one does; one that rates differently wins (the file
    is the source of truth) and is logged: finalized invoices keep their stored bytes."""
    if not old.get("superseded") and not old.get("effective_from"):
        return body
    if all(body.get(f) == old.get(f) for f in RATING_FIELDS[kind]):
        return {
            **body,
            "superseded": old.get("superseded", []),
            "effective_from": body.get("effective_from") or old.get("effective_from"),
        }
    log.warning(
        "the config file redefines %s %r, which has catalog versions (effective_from); it "
        "now rates every period, those already invoiced included (their invoices do not change)",
        kind[:-1],
        body.get("id"),
    )
    return body


class CatalogService:
    """Owns the current snapshot and every change to it.

    Several replicas share the store's catalog: every change, made through any replica, moves
    the store's ``catalog_version`` in its transaction, and the snapshot is reloaded once the
    version has moved. ``current`` checks the version at most every ``check_every_s`` (by the
    injected clock; a failed check keeps the snapshot), ``fresh()`` checks it at once (before
    usage is rejected for an unknown customer or dimension). A change is validated against the
    whole catalog as stored and written compare-and-set on the version it was validated at,
    under the store's catalog lock so replicas' changes take turns; if the catalog changed in
    between anyway (a replica starting up writes its config entries without the lock), it is
    reloaded and validated again.
    """

    def __init__(
        self,
        store: CatalogStore,
        config: Config,
        clock: Clock | None = None,
        check_every_s: float = CHECK_EVERY_S,
    ) -> None:
        self._store = store
        self._clock: Clock = clock or SystemClock()
        self._check_every_ns = int(check_every_s * NS)
        self._lock = threading.Lock()  # one change at a time
        self._refresh_lock = threading.Lock()  # version checks and snapshot swaps
        stored = store.catalog_load()
        for kind in MODELS:
            for item in getattr(config, kind):
                body = item.model_dump(mode="json")
                old = stored.get(kind, {}).get(item.id)
                if kind in RATING_FIELDS and old is not None:
                    body = _keep_history(kind, body, old)
                store.catalog_put(kind, item.id, body)
        # The version is read before the load: the snapshot is at least that new.
        self._version = store.catalog_version()
        self._snapshot = self._load()
        self._checked_ns = self._clock.now_ns()

    @property
    def current(self) -> Catalog:
        """The snapshot; reloaded first if the check is due and the version moved. Never waits
        for a check another thread is making."""
        now = self._clock.now_ns()
        due = not 0 <= now - self._checked_ns < self._check_every_ns  # or the clock went back
        if due and self._refresh_lock.acquire(blocking=False):
            try:
                self._refresh_quietly(now)
            finally:
                self._refresh_lock.release()
        return self._snapshot

    def fresh(self) -> Catalog:
        """The snapshot after checking the version now (one small read): for answers that would
        otherwise turn away what another replica has just added."""
        with self._refresh_lock:
            self._refresh_quietly(self._clock.now_ns())
        return self._snapshot

    def _refresh_quietly(self, now: int) -> None:
        try:
            self._refresh(now)
        except Exception:
            self._checked_ns = now  # keep serving the snapshot; check again when next due
            log.warning("could not check the catalog version; keeping the snapshot", exc_info=True)

    def _refresh(self, now: int) -> None:
        """Reload if the store's catalog version moved (the caller holds ``_refresh_lock``)."""
        version = self._store.catalog_version()
        if version != self._version:
            self._snapshot = self._load()
            self._version = version
        self._checked_ns = now

    def _load(self) -> Catalog:
        stored = self._store.catalog_load()
        entries: dict[str, dict[str, BaseModel]] = {}
        for kind, model in MODELS.items():
            entries[kind] = {
                id_: model.model_validate(body) for id_, body in stored.get(kind, {}).items()
            }
        return build(entries)

    def parse(self, kind: str, body: Any) -> BaseModel:
        """An API body as a new entry of ``kind``: unknown fields are errors, and the checks
        for new definitions (ISO 4217 currencies, template units, aliases) apply."""
        model = MODELS[kind]
        try:
            return model.model_validate(body, context=NEW_DEFINITION)
        except ValidationError as exc:
            raise CatalogError(
                [
                    f"{'.'.join(str(p) for p in e['loc']) or '<body>'}: "
                    f"{'unknown field' if e['type'] == 'extra_forbidden' else e['msg']}"
                    for e in exc.errors()
                ]
            ) from None

    def put(self, kind: str, item: BaseModel, create_only: bool = False) -> BaseModel:
        """Create or replace an entry; the entry as stored (a dimension or offering with the
        definitions it superseded, see the module docstring)."""
        item_id = str(getattr(item, "id"))  # noqa: B009 - every catalog model has an id
        stored = [item]

        def change(snap: Catalog) -> Catalog:
            current: dict[str, BaseModel] = dict(getattr(snap, kind))
            if create_only and item_id in current:
                raise CatalogError([f"{kind}.{item_id}: already exists"], status=409)
            old = current.get(item_id)
            # what GET answered may come back as it was; anything else is not the client's
            sent = item.superseded if isinstance(item, Dimension | Offering) else ()
            if sent and (old is None or sent != getattr(old, "superseded", ())):
                raise CatalogError(
                    ["superseded: kept by the gateway (the definitions a change replaced); "
                     "leave it out and set effective_from"]
                )  # fmt: skip
            if kind in RATING_FIELDS and old is not None:
                stored[0] = self._versioned(kind, snap, old, item)  # type: ignore[arg-type]
            current[item_id] = stored[0]
            new = build({**self._entries(snap), kind: current})
            errors = new.check()
            if errors:
                raise CatalogError(errors)
            return new

        self._change(
            change,
            lambda v: self._store.catalog_put(kind, item_id, stored[0].model_dump(mode="json"), v),
        )
        return stored[0]

    def _versioned(self, kind: str, snap: Catalog, old: Versioned, new: Versioned) -> Versioned:
        """What replacing ``old`` by ``new`` stores (module docstring); 409 when it would rate
        finalized periods again differently."""
        where = f"{kind}.{new.id}"
        changed = [f for f in RATING_FIELDS[kind] if getattr(old, f) != getattr(new, f)]
        if not changed:  # a rename, a description: the history stays as it is
            keep: dict[str, Any] = {"superseded": old.superseded}
            if new.effective_from is None:
                keep["effective_from"] = old.effective_from
            return new.model_copy(update=keep)
        if isinstance(new, Dimension):
            billed = {o.id for o in snap.offerings.values() for v in (o, *o.superseded)
                      for c in v.charges if c.dimension == new.id}  # fmt: skip
        else:
            billed = {new.id}
        customers = sorted(c.id for c in snap.customers.values() if c.offering in billed)
        through = self._store.finalized_through(customers)
        fields = ", ".join(changed)
        if new.effective_from is None:
            if through is None:
                return new.model_copy(
                    update={"superseded": old.superseded, "effective_from": old.effective_from}
                )
            raise CatalogError(
                [f"{where}: changing {fields} would change how periods already invoiced rate "
                 f"(finalized invoices up to {_iso(through)}); send effective_from (RFC 3339) "
                 f"at or after {_iso(through)}, e.g. the start of the next billing cycle: it "
                 "applies to periods that start from then on. Finalized invoices never change"],
                status=409,
            )  # fmt: skip
        at = _ns(new.effective_from)
        if through is not None and at < through:
            raise CatalogError(
                [f"{where}.effective_from: {_iso(at)} is before the end of the last finalized "
                 f"period ({_iso(through)}); it must be at or after it"],
                status=409,
            )  # fmt: skip
        if old.effective_from is not None and at <= _ns(old.effective_from):
            raise CatalogError(
                [f"{where}.effective_from: {_iso(at)} must be after the current definition's "
                 f"({_iso(_ns(old.effective_from))})"],
                status=409,
            )  # fmt: skip
        return new.model_copy(
            update={"superseded": (old.model_copy(update={"superseded": ()}), *old.superseded)}
        )

    def delete(self, kind: str, item_id: str) -> bool:
        def change(snap: Catalog) -> Catalog | None:
            current: dict[str, BaseModel] = dict(getattr(snap, kind))
            if item_id not in current:
                return None
            del current[item_id]
            new = build({**self._entries(snap), kind: current})
            errors = new.check()
            if errors:
                raise CatalogError(
                    [f"{kind}.{item_id} is still in use: {e}" for e in errors], status=409
                )
            return new

        return self._change(change, lambda v: self._store.catalog_delete(kind, item_id, v))

    def _change(
        self, change: Callable[[Catalog], Catalog | None], write: Callable[[int], object]
    ) -> bool:
        """Validate ``change`` against the catalog as stored (it returns the new snapshot, or
        None: nothing to change) and ``write`` it compare-and-set on the version validated at;
        when another replica changed the catalog first, reload and validate again."""
        # the store's lock before the refresh lock: fresh() never waits for another replica
        with self._lock, self._store.catalog_lock(), self._refresh_lock:
            for _ in range(CHANGE_ATTEMPTS):
                self._refresh(self._clock.now_ns())
                new = change(self._snapshot)
                if new is None:
                    return False
                try:
                    write(self._version)
                except ConflictError:
                    continue
                self._snapshot, self._version = new, self._version + 1
                return True
        raise CatalogError(["the catalog kept changing under this change: try again"], 409)

    @staticmethod
    def _entries(snap: Catalog) -> dict[str, Mapping[str, BaseModel]]:
        return {kind: getattr(snap, kind) for kind in MODELS}
