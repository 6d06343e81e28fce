"""The gateway's YAML configuration: typed, validated once at start-up, every error with its path.

``parse_config`` reports every problem of a document in one pass: unset ``${NAME}`` variables,
values the models refuse, cross-references (``reference_errors``) and unset ``key_env`` /
``secret_env`` variables, one ``path: message`` line each.

Precedence, highest first, for the settings in ``OVERRIDES``: the command-line argument, the
environment variable, the config file, the default written next to the field here. Every other
setting comes from the file or its default; ``${NAME}`` in any string of the file is replaced by
the environment variable NAME.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import babel
import yaml
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from meter_gateway import currencies, measurements
from meter_gateway.decimals import DecimalError, fmt, parse_value
from meter_gateway.promql import parse_selector

_DURATION_PART = re.compile(r"(\d+)(ms|s|m|h|d|w)")
_DURATION_UNITS = {
    "ms": timedelta(milliseconds=1),
    "s": timedelta(seconds=1),
    "m": timedelta(minutes=1),
    "h": timedelta(hours=1),
    "d": timedelta(days=1),
    "w": timedelta(weeks=1),
}
_SLUG = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def parse_duration(raw: object) -> timedelta:
    """``90s``, ``5m``, ``24h``, ``35d``, ``1h30m``; a bare number is seconds."""
    if isinstance(raw, timedelta):
        return raw
    if isinstance(raw, bool):
        raise ValueError("expected a duration such as 90s, 5m, 24h or 35d")
    if isinstance(raw, int | float):
        return timedelta(seconds=raw)
    if not isinstance(raw, str):
        raise ValueError("expected a duration such as 90s, 5m, 24h or 35d")
    text = raw.strip()
    pos, total = 0, timedelta()
    for m in _DURATION_PART.finditer(text):
        if m.start() != pos:
            break
        total += int(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    if pos != len(text) or not text:
        raise ValueError(f"{raw!r} is not a duration (expected e.g. 90s, 5m, 24h, 35d)")
    return total


def format_duration(value: timedelta) -> str:
    """A duration the way the config writes it: ``35d``, ``5m``, ``1h30m``, ``250ms``."""
    if value < timedelta():
        return f"-{format_duration(-value)}"
    ms = value // timedelta(milliseconds=1)
    if not ms:
        return "0s"
    parts = []
    for unit in ("d", "h", "m", "s", "ms"):
        n, ms = divmod(ms, _DURATION_UNITS[unit] // timedelta(milliseconds=1))
        if n:
            parts.append(f"{n}{unit}")
    return "".join(parts)


def _parse_decimal(raw: object) -> Decimal:
    try:
        return parse_value(raw)
    except DecimalError as exc:
        raise ValueError(str(exc)) from None


def _parse_listen(raw: object) -> str:
    if not isinstance(raw, str) or ":" not in raw:
        raise ValueError(f"{raw!r} is not host:port")
    host, _, port = raw.rpartition(":")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{raw!r} has no valid port")
    if not host:
        raise ValueError(f"{raw!r} has no host")
    return raw


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]
Dec = Annotated[Decimal, BeforeValidator(_parse_decimal)]
Listen = Annotated[str, BeforeValidator(_parse_listen)]
Slug = Annotated[str, Field(pattern=_SLUG)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# Validation context for a definition being written (the config file, an API body), as against
# one read back from the store: ISO 4217 currencies, template units and aliases are checked only
# then, so a catalog stored before those checks existed still loads.
NEW_DEFINITION: Mapping[str, bool] = {"new_definition": True}


def _is_new(info: ValidationInfo) -> bool:
    return isinstance(info.context, Mapping) and bool(info.context.get("new_definition"))


# --- server, store, ingest, auth -------------------------------------------------------------


class ListenConfig(_Model):
    listen: Listen
    enabled: bool = True


class TlsListenConfig(ListenConfig):
    """A listener that serves TLS when both PEM files are given."""

    cert_file: str | None = None
    key_file: str | None = None

    @model_validator(mode="after")
    def _both_or_neither(self) -> TlsListenConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("TLS needs both cert_file and key_file (or neither)")
        return self


class HttpListenConfig(ListenConfig):
    @model_validator(mode="after")
    def _always_on(self) -> HttpListenConfig:
        if not self.enabled:
            raise ValueError(
                "the HTTP API cannot be disabled: it serves ingest, /metrics, /healthz and "
                "/readyz (bind it to 127.0.0.1 to keep it private)"
            )
        return self


class ServerConfig(_Model):
    http: HttpListenConfig = HttpListenConfig(listen="127.0.0.1:8080")
    otlp_grpc: TlsListenConfig = TlsListenConfig(listen="127.0.0.1:4317")
    otlp_http: TlsListenConfig = TlsListenConfig(listen="127.0.0.1:4318")


class StoreConfig(_Model):
    url: str = "sqlite:///./meter-gateway.db"

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, v: str) -> str:
        if not (v.startswith("sqlite://") or v.startswith(("postgresql://", "postgres://"))):
            raise ValueError(f"{v!r}: expected sqlite:///path or postgresql://...")
        return v


class IngestConfig(_Model):
    dedup_window: Duration = timedelta(days=35)
    late_arrival_limit: Duration = timedelta(days=35)
    future_tolerance: Duration = timedelta(minutes=5)
    # Limits that keep one client from exhausting the gateway.
    max_body_bytes: int = Field(default=10 * 1024 * 1024, gt=0)
    max_decompressed_bytes: int = Field(default=100 * 1024 * 1024, gt=0)
    max_batch_records: int = Field(default=100_000, gt=0)
    # Records waiting for commit, across all requests; past it ingest answers 429.
    max_queue_records: int = Field(default=500_000, gt=0)
    # Memory for ingest in flight (bodies read, decoded, validated; batches queued and being
    # committed), estimated per request before its body is read; past it ingest answers 429.
    # 32 MiB holds 25 requests of 1,000 records (6 x 210 KB): three times what keeps the commit
    # pipeline busy. A body larger than the budget's share is still taken when it is alone.
    max_inflight_bytes: int = Field(default=32 * 1024 * 1024, gt=0)
    # How long the oldest batch may wait for a commit to take it before new ones get 429
    # (the store is not keeping up); 0s turns the bound off.
    max_queue_delay: Duration = timedelta(seconds=2)
    # Records one group commit takes at most.
    max_commit_records: int = Field(default=50_000, gt=0)
    retry_after: Duration = timedelta(seconds=1)
    metadata_max_bytes: int = Field(default=16 * 1024, gt=0)


Scope = Literal["ingest", "read", "admin"]


class ApiKeyConfig(_Model):
    name: str
    key: str | None = Field(default=None, min_length=16)
    key_env: str | None = None
    scopes: tuple[Scope, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _one_source(self) -> ApiKeyConfig:
        if (self.key is None) == (self.key_env is None):
            raise ValueError("set exactly one of 'key' or 'key_env'")
        return self

    def resolve(self, environ: Mapping[str, str]) -> str:
        if self.key is not None:
            return self.key
        assert self.key_env is not None
        value = environ.get(self.key_env)
        if not value:
            raise ValueError(f"environment variable {self.key_env} (key_env) is not set")
        return value


class AuthConfig(_Model):
    api_keys: tuple[ApiKeyConfig, ...] = ()
    # /metrics, /healthz, /readyz answer without a key unless this is false.
    open_operations: bool = True


def _known_locale(v: str) -> str:
    try:
        babel.Locale.parse(v)
    except (ValueError, babel.UnknownLocaleError):
        raise ValueError(f"{v!r} is not a locale Babel knows (e.g. en_GB, de_DE)") from None
    return v


Locale = Annotated[str, Field(max_length=32), AfterValidator(_known_locale)]


class Issuer(_Model):
    """Who issues the invoices (the seller), as every new invoice shows it."""

    name: str = Field(min_length=1, max_length=200)
    address: tuple[Annotated[str, Field(max_length=200)], ...] = Field(default=(), max_length=8)
    email: str | None = Field(default=None, max_length=200)
    tax_id: str | None = Field(default=None, max_length=100)
    # Shown by the HTML; the PDF fetches nothing, so only a data: URI shows there.
    logo_url: str | None = Field(default=None, max_length=100_000, pattern=r"^(https?|data):")


class TaxRate(_Model):
    """A tax rate invoices can carry: ``inclusive`` when prices already hold it (VAT-style
    gross prices), else it is added to the total."""

    id: Slug
    name: str = Field(min_length=1, max_length=100)
    percentage: Dec = Field(ge=0, le=100)
    inclusive: bool = False


class BillingConfig(_Model):
    timezone: str = "UTC"
    # How often the meter_gateway_period_* gauges are recomputed (in the background, by
    # rating every customer with usage; sooner once this replica's commits have settled, and
    # only this often while they keep coming); scrapes read the last result.
    period_gauges_interval: Duration = Field(default=timedelta(seconds=15), gt=timedelta(0))
    issuer: Issuer | None = None
    # Net payment terms: an invoice is due this many days after its issue date.
    due_days: int = Field(default=30, ge=0, le=365)
    # How invoices format dates, numbers and money, unless a customer's billing_details say.
    locale: Locale = "en_GB"
    tax_rates: tuple[TaxRate, ...] = ()

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{v!r} is not an IANA time zone") from None
        return v

    @field_validator("tax_rates")
    @classmethod
    def _unique_rates(cls, v: tuple[TaxRate, ...]) -> tuple[TaxRate, ...]:
        ids = [r.id for r in v]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"tax rate ids must be unique, repeated: {dup}")
        return v


# --- catalog ---------------------------------------------------------------------------------

Aggregation = Literal[
    "sum", "count", "max", "min", "avg", "last", "unique_count", "weighted_sum", "time_weighted_avg"
]
Interval = Literal["none", "hour", "day", "month"]
Rounding = Literal["none", "ceil", "floor", "round"]


class Dimension(_Model):
    id: Slug
    name: str
    # A template (meter_gateway.measurements) fills the rest; declared before ``unit`` so the
    # unit check below sees it.
    measurement: str | None = None
    unit: str = "unit"
    aggregation: Aggregation = "sum"
    aggregation_interval: Interval = "none"
    usage_increment: Dec = Decimal(1)
    rounding: Rounding = "none"
    price: Dec | None = None
    unit_cost: Dec | None = None
    unique_key: str | None = None
    # unique_count only (SPEC 11, seats): ``prorated`` counts each value for the share of the
    # period it was present (from its first record to its ``remove`` record, metadata key
    # ``operation``); otherwise ``unique_count_mode`` says which values count: ``any`` seen in
    # the period (SPEC 2's count), or present at its ``end`` (added and not removed).
    prorated: bool = False
    unique_count_mode: Literal["any", "end"] = "any"
    description: str = ""
    # Catalog versions (meter_gateway.catalog): from when this definition rates usage, and the
    # definitions it replaced, newest first (kept by the gateway, never sent in a body).
    effective_from: AwareDatetime | None = None
    superseded: tuple[Dimension, ...] = ()

    @model_validator(mode="before")
    @classmethod
    def _template(cls, data: Any) -> Any:
        return measurements.fill_dimension(data)

    @field_validator("unit")
    @classmethod
    def _template_unit(cls, v: str, info: ValidationInfo) -> str:
        template = measurements.TEMPLATES.get(info.data.get("measurement") or "")
        if template is not None and v != template.unit and _is_new(info):
            name, expected = template.id, template.unit
            raise ValueError(
                f"measurement {name!r} bills in {expected!r}, not {v!r} "
                f"(leave unit out, or set it to {expected!r})"
            )
        return v

    @model_validator(mode="after")
    def _coherent(self) -> Dimension:
        if self.usage_increment <= 0:
            raise ValueError("usage_increment must be > 0")
        if self.aggregation == "unique_count" and not self.unique_key:
            raise ValueError("aggregation unique_count needs unique_key (a metadata key)")
        if self.aggregation != "unique_count" and (
            self.prorated or self.unique_count_mode != "any"
        ):
            raise ValueError("prorated and unique_count_mode apply to unique_count dimensions only")
        if self.prorated and self.unique_count_mode != "any":
            raise ValueError("prorated counts time present: leave unique_count_mode out")
        for name in ("price", "unit_cost"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ValueError(f"{name} must be >= 0")
        return self


class Tier(_Model):
    up_to: Dec | None
    unit_price: Dec = Decimal(0)
    flat_fee: Dec = Decimal(0)


class Charge(_Model):
    dimension: Slug
    model: Literal["per_unit", "graduated", "volume", "package"] = "per_unit"
    unit_price: Dec | None = None
    tiers: tuple[Tier, ...] = ()
    package_size: Dec | None = None
    package_price: Dec | None = None
    free_units: Dec = Decimal(0)
    # The first ``included`` units of each rated period (a cycle) are free: priced on
    # max(0, quantity - included) (SPEC 11).
    included: Dec | None = Field(default=None, ge=0)
    # Custom units: the quantity becomes credits of the offering's ``credit`` unit at this rate
    # (credits per unit), priced with the other charges' credits on the credit line.
    credits_per_unit: Dec | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _model_fields(self) -> Charge:
        _check_model(self)
        if self.credits_per_unit is not None and (
            self.model != "per_unit" or self.unit_price is not None
        ):
            raise ValueError(
                "a charge in credits (credits_per_unit) is priced by the offering's credit "
                "unit: leave model and unit_price out"
            )
        return self


def _check_model(self: Charge | CreditUnit) -> None:
    """The fields a pricing model (SPEC 3) needs."""
    if self.model in ("graduated", "volume"):
        if not self.tiers:
            raise ValueError(f"model {self.model} needs tiers")
        bounds = [t.up_to for t in self.tiers]
        if any(b is None for b in bounds[:-1]) or bounds[-1] is not None:
            raise ValueError("only the last tier is unbounded (up_to: null), and it must be")
        finite = [b for b in bounds if b is not None]
        if finite != sorted(set(finite)):
            raise ValueError("tier up_to bounds must increase")
    if self.model == "package" and (
        self.package_size is None or self.package_size <= 0 or self.package_price is None
    ):
        raise ValueError("model package needs package_size > 0 and package_price")


class Fee(_Model):
    """A recurring fee (SPEC 11): ``amount`` per ``interval``, billed at the start of each
    cycle (``advance``) or at its end (``arrears``); see meter_gateway.billing.fees."""

    amount: Dec = Field(ge=0)
    interval: Literal["month", "year"] = "month"
    timing: Literal["advance", "arrears"] = "arrears"
    description: str | None = Field(default=None, max_length=200)


class CreditUnit(_Model):
    """An offering's custom unit (Snowflake-like credits): charges with ``credits_per_unit``
    convert their quantities into it, and the sum is priced by this model (SPEC 3) on one
    line; ``included`` credits of each period are free."""

    unit: str = Field(default="credit", min_length=1, max_length=64)
    name: str = Field(default="Credits", min_length=1, max_length=200)
    model: Literal["per_unit", "graduated", "volume", "package"] = "per_unit"
    unit_price: Dec | None = None
    tiers: tuple[Tier, ...] = ()
    package_size: Dec | None = None
    package_price: Dec | None = None
    free_units: Dec = Decimal(0)
    included: Dec | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _model_fields(self) -> CreditUnit:
        _check_model(self)
        if self.model == "per_unit" and self.unit_price is None:
            raise ValueError("model per_unit needs unit_price (the price of one credit)")
        return self


class Offering(_Model):
    id: Slug
    name: str
    currency: str = "USD"
    charges: tuple[Charge, ...] = ()
    fee: Fee | None = None
    credit: CreditUnit | None = None
    # Catalog versions, as for dimensions.
    effective_from: AwareDatetime | None = None
    superseded: tuple[Offering, ...] = ()
    tax_rate: Slug | None = None  # an id of billing.tax_rates; a customer's own rate wins

    @field_validator("currency")
    @classmethod
    def _iso_4217(cls, v: str, info: ValidationInfo) -> str:
        if _is_new(info):
            currencies.minor_unit(v)  # ValueError naming the code
        elif not re.fullmatch(r"[A-Z]{3}", v):
            raise ValueError(f"{v!r} is not a currency code")
        return v

    @model_validator(mode="after")
    def _one_charge_per_dimension(self) -> Offering:
        seen = [c.dimension for c in self.charges]
        dup = {d for d in seen if seen.count(d) > 1}
        if dup:
            raise ValueError(f"more than one charge for dimension(s) {sorted(dup)}")
        in_credits = [c.dimension for c in self.charges if c.credits_per_unit is not None]
        if in_credits and self.credit is None:
            raise ValueError(
                f"charges of {in_credits} convert into credits (credits_per_unit): the "
                "offering needs a credit unit (credit: {unit, model, ...})"
            )
        return self


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_STORE_HORIZON = datetime(2262, 4, 11, tzinfo=UTC)  # where 64-bit nanoseconds end


def _catalog_duration(raw: object) -> timedelta:
    # Catalog entries travel as JSON: a duration is text ("1h"), bounded so it never overflows.
    if not isinstance(raw, str | timedelta):
        raise ValueError("expected a duration such as 90s, 5m, 1h or 2d")
    try:
        value = parse_duration(raw)
    except OverflowError:
        raise ValueError(f"{raw!r} is too long a duration") from None
    if not timedelta() <= value <= timedelta(days=366):
        raise ValueError(f"{raw!r} must be between 0s and 366d")
    return value


CatalogDuration = Annotated[
    timedelta,
    BeforeValidator(_catalog_duration),
    PlainSerializer(format_duration, return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "pattern": r"^([0-9]+(ms|s|m|h|d|w))+$", "example": "1h"}),
]


class CustomerBilling(_Model):
    """A customer's billing cycle (SPEC 11; see meter_gateway.billing.cycles): cycles of one
    ``interval`` that start at local midnight of ``anchor_day`` in ``time_zone`` (default
    ``billing.timezone``; a yearly cycle's month is the month of the customer's ``start``, else
    January). A closed cycle is invoiced and finalized by itself once ``finalize_after`` has
    passed (late usage still counts until then)."""

    interval: Literal["month", "year"] = "month"
    anchor_day: int = Field(default=1, ge=1, le=28)
    time_zone: str | None = Field(default=None, max_length=64, pattern=r"^[A-Za-z0-9_+/-]+$")
    finalize_after: CatalogDuration = timedelta(hours=1)

    @field_validator("time_zone")
    @classmethod
    def _known_zone(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                ZoneInfo(v)
            except (ZoneInfoNotFoundError, ValueError, OSError):
                raise ValueError(f"{v!r} is not an IANA time zone") from None
        return v


class CustomerDetails(_Model):
    """Who an invoice is addressed to (its bill-to), and how it reads for them."""

    legal_name: str | None = Field(default=None, max_length=200)  # else the customer's name
    address: tuple[Annotated[str, Field(max_length=200)], ...] = Field(default=(), max_length=8)
    tax_id: str | None = Field(default=None, max_length=100)
    email: str | None = Field(default=None, max_length=200)
    locale: Locale | None = None  # else billing.locale
    tax_rate: Slug | None = None  # an id of billing.tax_rates; wins over the offering's


class Customer(_Model):
    id: Slug
    name: str
    offering: Slug | None = None
    aliases: tuple[str, ...] = ()
    stripe_account_id: str | None = None
    # Billed from ``start`` (inclusive) to ``end`` (exclusive), RFC 3339 with an offset.
    start: AwareDatetime | None = None
    end: AwareDatetime | None = None
    billing: CustomerBilling | None = None
    billing_details: CustomerDetails | None = None

    @model_validator(mode="after")
    def _start_before_end(self) -> Customer:
        for name in ("start", "end"):
            v = getattr(self, name)
            if v is not None and not _EPOCH <= v < _STORE_HORIZON:
                raise ValueError(f"{name} must be between 1970-01-01 and 2262-04-11 (got {v})")
        if self.start is not None and self.end is not None and self.end <= self.start:
            raise ValueError("end must be after start")
        return self

    @field_validator("aliases")
    @classmethod
    def _not_its_own_id(cls, v: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        if not _is_new(info):
            return v
        if info.data.get("id") in v:
            raise ValueError(f"alias {info.data['id']!r} is the customer's own id")
        for alias in v:
            # An alias is matched against what senders put in ids and attributes, which
            # validation refuses with control characters: such an alias could never match.
            if not alias or len(alias) > 512 or any(ord(c) < 32 or ord(c) == 127 for c in alias):
                raise ValueError(
                    f"alias {alias[:80]!r}: expected 1 to 512 characters without control characters"
                )
        return v


class RuleMatch(_Model):
    source: Literal["otlp", "remote_write", "vector", "prometheus"] | None = None
    metric: str | None = None
    attributes: dict[str, str] = Field(default_factory=dict)


class Rule(_Model):
    match: RuleMatch = RuleMatch()
    dimension: Slug
    customer_attribute: str = "tenant"
    scale: Dec = Decimal(1)


class MeterThreshold(_Model):
    """Reached when the meter's value is >= ``value``, or >= ``percent`` % of its capacity."""

    value: Dec | None = None
    percent: Dec | None = None
    name: str | None = None  # a label carried in the threshold_reached event

    @model_validator(mode="after")
    def _one(self) -> MeterThreshold:
        if (self.value is None) == (self.percent is None):
            raise ValueError("set exactly one of 'value' or 'percent'")
        for field in ("value", "percent"):
            v = getattr(self, field)
            if v is not None and v <= 0:
                raise ValueError(f"{field} must be > 0 (got {v})")
        return self

    @property
    def key(self) -> str:
        """Stable identity within a meter (what "fired once per period" is remembered by)."""
        if self.value is not None:
            return f"value:{fmt(self.value)}"
        assert self.percent is not None
        return f"percent:{fmt(self.percent)}"


class Meter(_Model):
    """A per-customer accumulator of one dimension (see meter_gateway.meters).

    ``reset``: ``daily`` and ``monthly`` are calendar days and months in the billing time zone;
    ``billing_period`` follows the customer's billing period (today: the calendar month);
    ``never`` accumulates forever. ``measure``: ``usage`` is the dimension's aggregate over the
    period so far, ``billable_quantity`` that after increments and rounding (what is billed).
    """

    id: Slug
    customer: Slug
    dimension: Slug
    reset: Literal["daily", "monthly", "billing_period", "never"] = "monthly"
    measure: Literal["usage", "billable_quantity"] = "usage"
    capacity: Dec | None = None
    thresholds: tuple[MeterThreshold, ...] = ()

    @model_validator(mode="after")
    def _coherent(self) -> Meter:
        if self.capacity is not None and self.capacity <= 0:
            raise ValueError(f"capacity must be > 0 (got {self.capacity})")
        if self.capacity is None and any(t.percent is not None for t in self.thresholds):
            raise ValueError("percent thresholds need a capacity")
        keys = [t.key for t in self.thresholds]
        dup = sorted({k for k in keys if keys.count(k) > 1})
        if dup:
            raise ValueError(f"duplicate thresholds {dup}")
        return self


# --- receivers, exporters --------------------------------------------------------------------


class PrometheusSeries(_Model):
    dimension: Slug
    query: str
    customer_label: str = "tenant"
    kind: Literal["counter", "gauge"] = "counter"
    scale: Dec = Decimal(1)

    @field_validator("query")
    @classmethod
    def _selector(cls, v: str) -> str:
        parse_selector(v)
        return v


class PrometheusReceiverConfig(_Model):
    url: str
    headers: dict[str, str] = Field(default_factory=dict)
    interval: Duration = timedelta(seconds=60)
    delay: Duration = timedelta(seconds=30)
    series: tuple[PrometheusSeries, ...] = ()


# What a gauge series can feed: levels (time-weighted, last, extremes) or, for sum, the level
# integrated over time (pod-seconds, GB-seconds).
_GAUGE_AGGREGATIONS = ("time_weighted_avg", "last", "max", "min", "sum")


_IDENT = r"^[A-Za-z_][A-Za-z0-9_$]{0,62}$"


class DatastoreColumns(_Model):
    """Which result columns of a datastore query hold what (receivers.datastore)."""

    id: str | None = Field(default=None, pattern=_IDENT)  # the row's unique key
    customer: str = Field(pattern=_IDENT)  # a customer id or alias
    dimension: str | None = Field(default=None, pattern=_IDENT)  # else the fixed `dimension`
    value: str = Field(pattern=_IDENT)
    time: str = Field(pattern=_IDENT)  # timestamp or timestamptz (naive times are UTC)


class DatastoreReceiverConfig(_Model):
    """A scheduled SQL query against a customer's PostgreSQL, read forward from a watermark
    (see receivers.datastore)."""

    name: Slug
    url: str = Field(pattern=r"^postgres(ql)?://")
    query: str = Field(min_length=1)
    columns: DatastoreColumns
    dimension: Slug | None = None
    watermark_column: str | None = Field(default=None, pattern=_IDENT)  # default columns.time
    interval: Duration = timedelta(seconds=60)
    # Rows are read once they are this old, so transactions still open at the source (with
    # earlier times) have committed before the watermark passes them.
    delay: Duration = timedelta()
    page_size: int = Field(default=1000, gt=0, le=50_000)
    timeout: Duration = timedelta(seconds=30)

    @model_validator(mode="after")
    def _one_dimension(self) -> DatastoreReceiverConfig:
        if (self.dimension is None) == (self.columns.dimension is None):
            raise ValueError("set exactly one of 'dimension' (fixed) or 'columns.dimension'")
        if self.interval <= timedelta():
            raise ValueError("interval must be positive")
        return self


class ReceiversConfig(_Model):
    prometheus: PrometheusReceiverConfig | None = None
    datastore: tuple[DatastoreReceiverConfig, ...] = ()

    @field_validator("datastore")
    @classmethod
    def _unique_names(
        cls, v: tuple[DatastoreReceiverConfig, ...]
    ) -> tuple[DatastoreReceiverConfig, ...]:
        names = [d.name for d in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"datastore names must be unique (they key the watermark): {dup}")
        return v


# invoice_finalized: the name before SPEC 11's invoice.finalized; subscribing to it subscribes
# to invoice.finalized (billing.events.subscription).
EventType = Literal[
    "threshold_reached", "meter_reset", "invoice.finalized", "invoice.voided", "invoice_finalized"
]


class WebhookExporterConfig(_Model):
    """JSON POSTs signed with HMAC-SHA256 (see exporters.webhook); retried with exponential
    backoff from ``backoff_initial`` to ``backoff_max``; after ``max_attempts`` failed attempts
    an event is given up (kept as dead in the outbox); without it, retried forever."""

    name: Slug
    url: str = Field(pattern=r"^https?://")
    secret: str | None = Field(default=None, min_length=16)
    secret_env: str | None = None
    events: tuple[EventType, ...] = ()  # empty: every event
    timeout: Duration = timedelta(seconds=10)
    max_attempts: int | None = Field(default=None, ge=1)
    backoff_initial: Duration = timedelta(seconds=1)
    backoff_max: Duration = timedelta(minutes=5)
    headers: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_secret(self) -> WebhookExporterConfig:
        if (self.secret is None) == (self.secret_env is None):
            raise ValueError("set exactly one of 'secret' or 'secret_env'")
        if self.backoff_initial <= timedelta() or self.backoff_max < self.backoff_initial:
            raise ValueError("need 0 < backoff_initial <= backoff_max")
        return self

    def resolve_secret(self, environ: Mapping[str, str]) -> str:
        if self.secret is not None:
            return self.secret
        assert self.secret_env is not None
        value = environ.get(self.secret_env)
        if not value:
            raise ValueError(f"environment variable {self.secret_env} (secret_env) is not set")
        return value


class FileExporterConfig(_Model):
    """Appends one JSON event per line (NDJSON) to ``path``, fsynced before it counts."""

    name: Slug
    path: str = Field(min_length=1)
    events: tuple[EventType, ...] = ()  # empty: every event


class StripeExporterConfig(_Model):
    """Finalized invoices become Stripe invoices of the customer's ``stripe_account_id`` (a
    Stripe customer, ``cus_...``), voids void them (see exporters.stripe); outbox name
    ``stripe``. ``finalize: false`` leaves them drafts to review in Stripe. Retried as webhooks
    are (``backoff_initial`` to ``backoff_max``, ``max_attempts``)."""

    api_key_env: str = Field(min_length=1)
    api_base: str | None = Field(default=None, pattern=r"^https?://")  # tests: localstripe
    events: tuple[Literal["invoice.finalized", "invoice.voided"], ...] = (
        "invoice.finalized",
        "invoice.voided",
    )
    finalize: bool = True
    collection_method: Literal["charge_automatically", "send_invoice"] = "charge_automatically"
    days_until_due: int | None = Field(default=None, ge=0)
    timeout: Duration = timedelta(seconds=30)
    max_attempts: int | None = Field(default=None, ge=1)
    backoff_initial: Duration = timedelta(seconds=1)
    backoff_max: Duration = timedelta(minutes=5)

    @model_validator(mode="after")
    def _consistent(self) -> StripeExporterConfig:
        if self.backoff_initial <= timedelta() or self.backoff_max < self.backoff_initial:
            raise ValueError("need 0 < backoff_initial <= backoff_max")
        if (self.collection_method == "send_invoice") != (self.days_until_due is not None):
            raise ValueError("days_until_due is set exactly when collection_method is send_invoice")
        return self

    def resolve_api_key(self, environ: Mapping[str, str]) -> str:
        value = environ.get(self.api_key_env)
        if not value:
            raise ValueError(f"environment variable {self.api_key_env} (api_key_env) is not set")
        return value


class ExportersConfig(_Model):
    """Where meter events and finalized invoices are forwarded; names are unique across kinds
    (they key the durable outbox)."""

    webhooks: tuple[WebhookExporterConfig, ...] = ()
    files: tuple[FileExporterConfig, ...] = ()
    stripe: StripeExporterConfig | None = None

    @model_validator(mode="after")
    def _unique_names(self) -> ExportersConfig:
        names = [e.name for e in self.webhooks] + [e.name for e in self.files]
        names += ["stripe"] if self.stripe is not None else []
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"exporter names must be unique, repeated: {dup}")
        return self


# --- the whole file --------------------------------------------------------------------------


class Config(_Model):
    server: ServerConfig = ServerConfig()
    store: StoreConfig = StoreConfig()
    ingest: IngestConfig = IngestConfig()
    auth: AuthConfig = AuthConfig()
    billing: BillingConfig = BillingConfig()
    dimensions: tuple[Dimension, ...] = ()
    offerings: tuple[Offering, ...] = ()
    customers: tuple[Customer, ...] = ()
    rules: tuple[Rule, ...] = ()
    meters: tuple[Meter, ...] = ()
    receivers: ReceiversConfig = ReceiversConfig()
    exporters: ExportersConfig = ExportersConfig()

    @model_validator(mode="before")
    @classmethod
    def _series_templates(cls, data: Any) -> Any:
        """A Prometheus series takes what it leaves out from its dimension's measurement."""
        try:
            series = data["receivers"]["prometheus"]["series"]
            named = {d.get("id"): d.get("measurement") for d in data.get("dimensions") or ()}
            filled = [measurements.fill_series(s, named.get(s.get("dimension"))) for s in series]
        except (TypeError, KeyError, AttributeError):
            return data  # not the expected shape: the field validators say what is wrong
        prometheus = {**data["receivers"]["prometheus"], "series": filled}
        return {**data, "receivers": {**data["receivers"], "prometheus": prometheus}}


def _items(raw: Mapping[str, Any], key: str) -> list[tuple[int, Mapping[str, Any]]]:
    """The mapping entries of a list in the raw document (other shapes the models report)."""
    value = raw.get(key)
    if not isinstance(value, list):
        return []
    return [(i, item) for i, item in enumerate(value) if isinstance(item, Mapping)]


def _ids(kind: str, items: list[tuple[int, Mapping[str, Any]]], errors: list[str]) -> set[str]:
    seen: set[str] = set()
    for i, item in items:
        x = item.get("id")
        if not isinstance(x, str):
            continue
        if x in seen:
            errors.append(f"{kind}.{i}.id: duplicate id {x!r}")
        seen.add(x)
    return seen


def reference_errors(raw: Mapping[str, Any]) -> list[str]:
    """Cross-references of a raw document (after ``${NAME}`` substitution), one line each.

    Read from the raw mapping rather than the validated ``Config`` so they are reported in the
    same pass as every other error, even when some values are invalid.
    """
    errors: list[str] = []
    dimensions = _items(raw, "dimensions")
    dims = _ids("dimensions", dimensions, errors)
    offers = _ids("offerings", _items(raw, "offerings"), errors)
    customers = _items(raw, "customers")
    custs = _ids("customers", customers, errors)
    for i, o in _items(raw, "offerings"):
        charges = o.get("charges")
        for j, c in enumerate(charges if isinstance(charges, list) else ()):
            d = c.get("dimension") if isinstance(c, Mapping) else None
            if isinstance(d, str) and d not in dims:
                errors.append(f"offerings.{i}.charges.{j}.dimension: unknown dimension {d!r}")
    billing = raw.get("billing")
    rates = {
        r.get("id") for _, r in _items(billing if isinstance(billing, Mapping) else {}, "tax_rates")
    }
    for i, o in _items(raw, "offerings"):
        rate = o.get("tax_rate")
        if isinstance(rate, str) and rate not in rates:
            errors.append(f"offerings.{i}.tax_rate: unknown tax rate {rate!r} (billing.tax_rates)")
    for i, cust in customers:
        details = cust.get("billing_details")
        rate = details.get("tax_rate") if isinstance(details, Mapping) else None
        if isinstance(rate, str) and rate not in rates:
            errors.append(
                f"customers.{i}.billing_details.tax_rate: unknown tax rate {rate!r} "
                "(billing.tax_rates)"
            )
    owners: dict[str, str] = {}
    for i, cust in customers:
        offering = cust.get("offering")
        if isinstance(offering, str) and offering not in offers:
            errors.append(f"customers.{i}.offering: unknown offering {offering!r}")
        aliases = cust.get("aliases")
        cid = cust.get("id")
        for k, a in enumerate(aliases if isinstance(aliases, list) else ()):
            if not isinstance(a, str) or a == cid:
                continue  # the Customer model reports these
            owner = owners.setdefault(a, str(cid))
            if owner != cid:
                errors.append(f"customers.{i}.aliases.{k}: {a!r} is already an alias of {owner!r}")
            elif a in custs:
                errors.append(f"customers.{i}.aliases.{k}: {a!r} is another customer's id")
    for kind, items in (("rules", _items(raw, "rules")), ("meters", _items(raw, "meters"))):
        for i, item in items:
            d = item.get("dimension")
            if isinstance(d, str) and d not in dims:
                errors.append(f"{kind}.{i}.dimension: unknown dimension {d!r}")
    for i, m in _items(raw, "meters"):
        c = m.get("customer")
        if isinstance(c, str) and c not in custs:
            errors.append(f"meters.{i}.customer: unknown customer {c!r}")
    receivers = raw.get("receivers")
    for i, ds in _items(receivers if isinstance(receivers, Mapping) else {}, "datastore"):
        d = ds.get("dimension")
        if isinstance(d, str) and d not in dims:
            errors.append(f"receivers.datastore.{i}.dimension: unknown dimension {d!r}")
    prometheus = receivers.get("prometheus") if isinstance(receivers, Mapping) else None
    if isinstance(prometheus, Mapping):
        aggregations: dict[object, object] = {}
        for _, dim in dimensions:
            try:
                filled = measurements.fill_dimension(dim)
            except ValueError:
                continue  # an unknown template: the Dimension model reports it
            aggregations[dim.get("id")] = filled.get("aggregation", "sum")
        for i, series in _items(prometheus, "series"):
            sd, series_kind = series.get("dimension"), series.get("kind")
            if series_kind is None:
                series_kind = _template_of(dimensions, sd).get("kind")
            if isinstance(sd, str) and sd not in dims:
                errors.append(
                    f"receivers.prometheus.series.{i}.dimension: unknown dimension {sd!r}"
                )
            elif series_kind == "gauge" and aggregations.get(sd) not in _GAUGE_AGGREGATIONS:
                errors.append(
                    f"receivers.prometheus.series.{i}.kind: a gauge is a level; dimension "
                    f"{sd!r} aggregates by {aggregations.get(sd)}, expected one of "
                    f"{', '.join(_GAUGE_AGGREGATIONS)} (sum integrates the level over time)"
                )
    return errors


def _template_of(dimensions: list[tuple[int, Mapping[str, Any]]], dim: object) -> dict[str, Any]:
    """The series settings of the measurement template the named dimension uses, if any."""
    for _, d in dimensions:
        name = d.get("measurement")
        if d.get("id") == dim and isinstance(name, str) and name in measurements.TEMPLATES:
            return measurements.TEMPLATES[name].series_defaults()
    return {}


class ConfigError(Exception):
    """The configuration is invalid; ``errors`` holds one ``path: message`` line per problem."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


def substitute_env(node: Any, environ: Mapping[str, str], path: str, errors: list[str]) -> Any:
    """Replace ``${NAME}`` in every string of a parsed YAML tree; one error per unset NAME."""
    if isinstance(node, str):

        def repl(m: re.Match[str]) -> str:
            name = m.group(1)
            if name not in environ:
                errors.append(f"{path or '<root>'}: environment variable {name} is not set")
                return ""
            return environ[name]

        return _ENV_REF.sub(repl, node)
    if isinstance(node, dict):
        return {
            k: substitute_env(v, environ, f"{path}.{k}" if path else str(k), errors)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [substitute_env(v, environ, f"{path}.{i}", errors) for i, v in enumerate(node)]
    return node


@dataclass(frozen=True, slots=True)
class Override:
    """A setting a container can give without a config file (see the module docstring)."""

    path: str  # dotted, as in the file
    option: str  # the ``serve`` argument
    env: str  # the environment variable
    help: str
    metavar: str = "HOST:PORT"


OVERRIDES: tuple[Override, ...] = (
    Override("server.http.listen", "--http-listen", "METER_GATEWAY_HTTP_LISTEN", "HTTP API"),
    Override(
        "server.otlp_grpc.listen",
        "--otlp-grpc-listen",
        "METER_GATEWAY_OTLP_GRPC_LISTEN",
        "OTLP/gRPC",
    ),
    Override(
        "server.otlp_http.listen",
        "--otlp-http-listen",
        "METER_GATEWAY_OTLP_HTTP_LISTEN",
        "OTLP/HTTP",
    ),
    Override(
        "store.url",
        "--store",
        "METER_GATEWAY_STORE_URL",
        "sqlite:///path or postgresql://...",
        metavar="URL",
    ),
)


def _apply_overrides(
    raw: dict[str, Any], environ: Mapping[str, str], arguments: Mapping[str, str | None]
) -> dict[str, Any]:
    """The raw document with each ``OVERRIDES`` setting taken from the argument, else the
    environment, else left as the file has it."""
    for o in OVERRIDES:
        value = arguments.get(o.path)
        if value is None:
            value = environ.get(o.env) or None
        if value is None:
            continue
        *parents, leaf = o.path.split(".")
        node = raw
        for key in parents:
            child = node.get(key)
            if not isinstance(child, dict):
                child = {}  # a wrong shape in the file is replaced by what the override says
            node[key] = child = dict(child)
            node = child
        node[leaf] = value
    return raw


def _override_source(
    path: str, environ: Mapping[str, str], arguments: Mapping[str, str | None]
) -> str:
    for o in OVERRIDES:
        if path == o.path or path.startswith(f"{o.path}."):
            if arguments.get(o.path) is not None:
                return f" (from {o.option})"
            if environ.get(o.env):
                return f" (from {o.env})"
    return ""


def _secret_env_errors(raw: Mapping[str, Any], environ: Mapping[str, str]) -> list[str]:
    """``key_env`` and ``secret_env`` naming variables that are unset or empty."""
    errors: list[str] = []
    auth = raw.get("auth")
    exporters = raw.get("exporters")
    lists = (
        ("auth.api_keys", "key_env", auth if isinstance(auth, Mapping) else {}, "api_keys"),
        (
            "exporters.webhooks",
            "secret_env",
            exporters if isinstance(exporters, Mapping) else {},
            "webhooks",
        ),
    )
    for prefix, field, parent, key in lists:
        for i, item in _items(parent, key):
            name = item.get(field)
            if isinstance(name, str) and not environ.get(name):
                errors.append(f"{prefix}.{i}.{field}: environment variable {name} is not set")
    stripe = exporters.get("stripe") if isinstance(exporters, Mapping) else None
    name = stripe.get("api_key_env") if isinstance(stripe, Mapping) else None
    if isinstance(name, str) and name and not environ.get(name):
        errors.append(f"exporters.stripe.api_key_env: environment variable {name} is not set")
    return errors


def parse_config(
    text: str,
    environ: Mapping[str, str] | None = None,
    arguments: Mapping[str, str | None] | None = None,
) -> Config:
    """Parse and validate YAML text; raises ConfigError listing every problem at once.

    ``arguments`` maps ``OVERRIDES`` paths to command-line values (``None``: not given).
    """
    env = os.environ if environ is None else environ
    args = arguments or {}
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([f"<yaml>: {' '.join(str(exc).split())}"]) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(["<root>: expected a mapping of settings"])
    env_errors: list[str] = []
    raw = substitute_env(raw, env, "", env_errors)
    raw = _apply_overrides(raw, env, args)
    # A value that named an unset variable is already reported; what it became ("") is not.
    unset = {line.partition(":")[0] for line in env_errors}
    errors = list(env_errors)
    config: Config | None = None
    try:
        config = Config.model_validate(raw, context=NEW_DEFINITION)
    except ValidationError as exc:
        for path, msg in _format_errors(exc):
            if not any(path == u or path.startswith(f"{u}.") for u in unset):
                errors.append(f"{path}{_override_source(path, env, args)}: {msg}")
    errors += reference_errors(raw)
    errors += _secret_env_errors(raw, env)
    if errors or config is None:
        raise ConfigError(errors)
    return config


def load_config(
    path: str | Path | None,
    environ: Mapping[str, str] | None = None,
    arguments: Mapping[str, str | None] | None = None,
) -> Config:
    """Load the config file, or the defaults when no file is given (see ``parse_config``)."""
    if path is None:
        return parse_config("", environ, arguments)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"<file>: {exc.strerror}"]) from None
    return parse_config(text, environ, arguments)


def _format_errors(exc: ValidationError) -> list[tuple[str, str]]:
    """(path, message) for each error pydantic found, in document order."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        msg = err["msg"].removeprefix("Value error, ")
        value = err.get("input")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif (
            "input" in err
            and err["type"] != "missing"
            and not isinstance(value, dict | list)
            and repr(value) not in msg
        ):
            msg = f"{msg} (got {value!r})"
        lines.append((loc, msg))
    return lines
