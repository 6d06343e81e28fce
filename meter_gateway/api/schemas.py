"""The HTTP API's bodies as pydantic models: what requests may carry and what answers hold.

Request models (frozen, ``extra="forbid"``) are what the handlers validate with: ``parse_body``
answers 422 naming every unknown or invalid field, and times go through ``params.time`` (400
naming them, like the query parameters). Catalog bodies are the config models themselves
(``meter_gateway.config``), so the API, the file and the stored catalog take one shape.
Response models describe what the handlers write; ``/openapi.json`` is generated from both, and
the tests hold every answer of a running gateway to them.
"""

from __future__ import annotations

from datetime import date, timedelta
from decimal import Decimal
from typing import Annotated, Any, Literal, TypeVar

import orjson
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
)
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import core_schema

from meter_gateway.api import params
from meter_gateway.api.errors import ApiError
from meter_gateway.config import Aggregation, Interval, Rounding, format_duration
from meter_gateway.decimals import DecimalError, parse_value
from meter_gateway.model import Reason, Source

#: Exact decimals travel as JSON-number text ("0.08", "1E+2"); a request may also send a number.
DECIMAL_TEXT = r"^-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?$"
#: Bodies of the catalog, invoice and wallet APIs (ingest has its own, larger limits).
MAX_BODY = 1024 * 1024

M = TypeVar("M", bound=BaseModel)


class ApiJsonSchema(GenerateJsonSchema):
    """Decimals as the API reads them (a JSON number or its text) and writes them (text);
    durations as the API and the config write them (1h, not ISO 8601's PT1H)."""

    def decimal_schema(self, schema: core_schema.DecimalSchema) -> JsonSchemaValue:
        text = {"type": "string", "pattern": DECIMAL_TEXT}
        if self.mode == "serialization":
            return text
        return {"anyOf": [{"type": "number"}, text]}

    def encode_default(self, dft: Any) -> Any:
        # pydantic encodes defaults without the field's serializer, so a timedelta would read
        # PT1H, which the duration's own pattern refuses.
        if isinstance(dft, timedelta):
            return format_duration(dft)
        return super().encode_default(dft)


def _decimal(raw: object) -> Decimal:
    try:
        return parse_value(raw)
    except DecimalError as exc:
        raise ValueError(str(exc)) from None


Dec = Annotated[Decimal, BeforeValidator(_decimal)]
DecimalText = Annotated[str, Field(pattern=DECIMAL_TEXT)]
Timestamp = Annotated[str, Field(json_schema_extra={"format": "date-time"})]
_TIME_IN = WithJsonSchema({"type": "string", "format": "date-time"})


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=False)


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def parse_body(model: type[M], raw: bytes, *, empty_ok: bool = False) -> M:
    """``raw`` as ``model``: 413 past MAX_BODY, 400 if it is not a JSON object, 422 naming every
    unknown or invalid field (400 naming a time, from ``params.time``)."""
    return validate(model, decode_object(raw, empty_ok=empty_ok))


def decode_object(raw: bytes, *, empty_ok: bool = False) -> dict[str, Any]:
    if len(raw) > MAX_BODY:
        raise ApiError(413, f"the body is limited to {MAX_BODY:,} bytes")
    if empty_ok and not raw.strip():
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "body must be a JSON object")
    return body


def validate(model: type[M], body: dict[str, Any]) -> M:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        errors = field_errors(exc, model)
        raise ApiError(422, "; ".join(errors), errors=errors) from None


def field_errors(exc: ValidationError, model: type[BaseModel]) -> list[str]:
    """One ``path: problem`` line per error; an unknown field lists the fields there are."""
    known = ", ".join(f.alias or name for name, f in model.model_fields.items())
    out = []
    for e in exc.errors(include_url=False):
        path = ".".join(str(p) for p in e["loc"]) or "<body>"
        if e["type"] == "extra_forbidden":
            out.append(f"{path}: unknown field (this body takes: {known})")
        elif e["type"] == "value_error":
            out.append(f"{path}: {e['ctx']['error']}")
        else:
            out.append(f"{path}: {e['msg']}")
    return out


# --- requests ----------------------------------------------------------------------------------


class InvoiceItem(_Request):
    """A one-off charge on a draft: a line of type item, quantity × unitPrice (exact), its
    amount rounded to the currency's minor unit like every line."""

    description: str = Field(min_length=1, max_length=500)
    quantity: Dec = Field(description="More than 0.")
    unitPrice: Dec = Field(description="0 or more, in the offering's currency.")

    @field_validator("quantity")
    @classmethod
    def _positive(cls, v: Decimal) -> Decimal:
        if v <= 0:
            raise ValueError(f"must be more than 0, got {v}")
        return v

    @field_validator("unitPrice")
    @classmethod
    def _not_negative(cls, v: Decimal) -> Decimal:
        if v < 0:
            raise ValueError(f"must be 0 or more, got {v}")
        return v


class InvoiceRequest(_Request):
    """A draft invoice for the period [from, to); either bound may be left out (the current
    month's, or the customer's current billing cycle's). ``items``: one-off charges."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"from": "2026-05-01T00:00:00Z", "to": "2026-06-01T00:00:00Z"},
                {
                    "from": "2026-05-01T00:00:00Z",
                    "to": "2026-06-01T00:00:00Z",
                    "items": [{"description": "Onboarding", "quantity": 1, "unitPrice": "500"}],
                },
            ]
        }
    )

    from_: Annotated[str, _TIME_IN] | None = Field(default=None, alias="from")
    to: Annotated[str, _TIME_IN] | None = None
    items: list[InvoiceItem] | None = Field(default=None, max_length=100)

    @field_validator("from_", "to", mode="before")
    @classmethod
    def _time(cls, v: object, info: ValidationInfo) -> object:
        # 400 naming the field, as for the query parameters of the same name (SPEC §9).
        name = "from" if info.field_name == "from_" else "to"
        if v is not None:
            params.time(v, name, 0)
        return v


class TopUp(_Request):
    """Prepaid credits. An id makes the top-up idempotent: the same id again answers the entry
    it made (200) instead of adding another."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"amount": "50.00", "id": "po-2026-0042"}]}
    )

    amount: Dec = Field(description="More than 0, in whole minor units of the currency.")
    currency: str | None = Field(
        default=None, max_length=200, description="Default: the offering's currency."
    )
    id: str | None = Field(default=None, max_length=200)
    note: str | None = Field(default=None, max_length=200)


class CancellationRequest(_Request):
    """Records to cancel by id (SPEC 11). Each is removed from every aggregate exactly, unless
    its usage is on a finalized invoice (``invoiced``); a cancelled id stays used: sending the
    record again is a duplicate."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"ids": ["evt-123", "evt-124"], "reason": "test run"}]}
    )

    ids: list[Annotated[str, Field(min_length=1, max_length=1024)]] = Field(
        min_length=1, max_length=1000, description="Record ids, as sent in usage records."
    )
    reason: str | None = Field(default=None, max_length=1000, description="Kept in the audit list.")


class UsageRecord(BaseModel):
    """One usage record as ingest takes it. Ingest is lenient about envelope fields (SPEC §4):
    others are ignored, and an invalid record is rejected alone, with its index and field."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [
                {
                    "id": "evt-0001",
                    "timestamp": "2026-05-01T12:00:00Z",
                    "customerId": "acme",
                    "dimensionId": "data-processed",
                    "recordValue": "2.5",
                }
            ]
        },
    )

    id: str | None = Field(default=None, description="Idempotency key: counted once.")
    timestamp: Timestamp
    customerId: str = Field(description="Customer id or alias.")
    dimensionId: str
    recordValue: float | Annotated[str, Field(pattern=DECIMAL_TEXT)] = Field(
        description="A JSON number or its text; kept exact."
    )
    metadata: dict[str, Any] | None = None


# --- answers -----------------------------------------------------------------------------------


class Error(BaseModel):
    """Every error answer (SPEC §10): parameter names the query parameter (or body time) at
    fault; errors lists each problem of a body."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [
                {"error": "to: must be after from (2026-05-01T00:00:00Z)", "parameter": "to"}
            ]
        },
    )

    error: str
    parameter: str | None = None
    errors: list[str] | None = None


class RecordError(_Response):
    index: int = Field(description="Position of the record in the request (0-based).")
    field: str | None
    error: str
    reason: Reason


class IngestResult(_Response):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"accepted": 2, "duplicates": 1, "rejected": 0, "errors": []}]
        }
    )

    accepted: int
    duplicates: int
    rejected: int
    errors: list[RecordError] = Field(description="At most 1,000.")
    errors_truncated: bool | None = None
    error: str | None = Field(default=None, description="Why an atomic batch was refused.")


class RawRecord(_Response):
    id: str | None
    timestamp: Timestamp
    customerId: str
    dimensionId: str
    recordValue: DecimalText
    metadata: dict[str, Any] | None
    source: Source
    receivedAt: Timestamp


class UsagePage(_Response):
    """window=raw: the records, oldest first."""

    data: list[RawRecord]
    cursor: str | None = Field(description="Pass it back for the next page; null: last page.")


class UsageWindow(_Response):
    start: Timestamp
    end: Timestamp
    customerId: str
    dimensionId: str
    value: DecimalText | None = Field(description="null: no record in the window.")
    projected: DecimalText | None = Field(
        default=None, description="Levels only: the value if the level held to the window's end."
    )


class UsageWindows(_Response):
    """Aggregated windows, each measured up to asOf (SPEC §9)."""

    asOf: Timestamp
    data: list[UsageWindow]


class SummaryLine(_Response):
    dimensionId: str
    unit: str
    quantity: DecimalText
    included: DecimalText | None = None
    billedQuantity: DecimalText | None = None
    credits: DecimalText | None = Field(
        default=None, description="A charge in credits: what it adds to the credit line."
    )
    amount: DecimalText | None = Field(
        description="null: the offering does not charge it, or charges it in credits."
    )
    warnings: list[str] | None = None


class UsageSummary(_Response):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "customerId": "acme",
                    "from": "2026-05-01T00:00:00Z",
                    "to": "2026-06-01T00:00:00Z",
                    "asOf": "2026-05-14T09:30:00Z",
                    "currency": "USD",
                    "dimensions": [
                        {
                            "dimensionId": "data-processed",
                            "unit": "gigabyte",
                            "quantity": "2.5",
                            "amount": "0.20",
                        }
                    ],
                    "total": "0.20",
                }
            ]
        }
    )

    customerId: str
    from_: Timestamp = Field(alias="from")
    to: Timestamp
    asOf: Timestamp
    currency: str | None
    dimensions: list[SummaryLine]
    credit: CreditLine | None = Field(default=None, description="The offering's credit line.")
    fees: list[FeeLine] | None = Field(
        default=None, description="Recurring fees this period's invoice carries (SPEC 11)."
    )
    total: DecimalText | None


class TierBreakdown(_Response):
    tier: int
    upTo: DecimalText | None
    units: DecimalText
    unitPrice: DecimalText
    flatFee: DecimalText
    amount: DecimalText


class PackageBreakdown(_Response):
    size: DecimalText
    price: DecimalText
    freeUnits: DecimalText
    packages: DecimalText


class LineUsage(_Response):
    aggregation: Aggregation
    aggregationInterval: Interval
    usageIncrement: DecimalText
    rounding: Rounding
    periodValue: DecimalText | None
    query: str = Field(description="The GET /v1/usage request behind the quantity.")
    rule: str


class InvoiceLine(_Response):
    """A line of usage: one charge of the offering."""

    type: Literal["usage"] = Field(
        default="usage", description="Absent on invoices finalized before lines had types."
    )
    dimensionId: str
    name: str
    quantity: DecimalText
    unit: str
    billedUnit: str | None = Field(
        default=None,
        description="What one billed unit is: the unit, named by its increment (hour for "
        "minutes counted by 60) or e.g. '60 minutes'. Absent on invoices stored before it.",
    )
    included: DecimalText | None = Field(
        default=None, description="The charge's free units of the period (SPEC 11)."
    )
    billedQuantity: DecimalText | None = Field(
        default=None, description="With included: max(0, quantity - included), what is priced."
    )
    model: Literal["per_unit", "graduated", "volume", "package"]
    unitPrice: DecimalText | None = None
    package: PackageBreakdown | None = None
    tiers: list[TierBreakdown] | None = None
    exactAmount: DecimalText
    amount: DecimalText
    usage: LineUsage
    warnings: list[str] | None = None


class CreditConversion(_Response):
    """One charge's usage turned into credits: billedQuantity (or quantity) x creditsPerUnit."""

    dimensionId: str
    name: str
    quantity: DecimalText
    unit: str
    included: DecimalText | None = None
    billedQuantity: DecimalText | None = None
    creditsPerUnit: DecimalText
    credits: DecimalText
    warnings: list[str] | None = None


class CreditLine(_Response):
    """The offering's custom unit (SPEC 11): the credits every conversion made, priced on one
    line (quantity: the credits; included credits are free)."""

    type: Literal["usage"]
    name: str
    quantity: DecimalText
    unit: str
    included: DecimalText | None = None
    billedQuantity: DecimalText | None = None
    model: Literal["per_unit", "graduated", "volume", "package"]
    unitPrice: DecimalText | None = None
    package: PackageBreakdown | None = None
    tiers: list[TierBreakdown] | None = None
    exactAmount: DecimalText
    amount: DecimalText
    conversions: list[CreditConversion]


class FeeCycle(_Response):
    interval: Literal["month", "year"]
    timing: Literal["advance", "arrears"]
    cycleFrom: Timestamp
    cycleTo: Timestamp
    from_: Timestamp = Field(alias="from", description="The part of the cycle subscribed.")
    to: Timestamp
    days: int = Field(description="Whole days subscribed in the cycle (a day begun counts).")
    cycleDays: int


class FeeLine(_Response):
    """A recurring fee of one cycle (SPEC 11): quantity is the share of the cycle billed (1,
    or days / cycleDays when prorated)."""

    type: Literal["fee"]
    description: str
    quantity: DecimalText
    unitPrice: DecimalText
    exactAmount: DecimalText
    amount: DecimalText
    fee: FeeCycle


class ItemLine(_Response):
    """A manual item (SPEC 11)."""

    type: Literal["item"]
    description: str
    quantity: DecimalText
    unitPrice: DecimalText
    exactAmount: DecimalText
    amount: DecimalText


class InvoiceParty(_Response):
    """Who issues an invoice (``billing.issuer``) or is billed (the customer's
    ``billing_details``; ``name`` is its legal name, else the customer's name)."""

    name: str
    address: list[str]
    email: str | None
    taxId: str | None
    logoUrl: str | None = Field(default=None, description="The issuer's only.")


class InvoiceTax(_Response):
    """A tax rate applied to every line: exact per line, rounded once per invoice."""

    id: str
    name: str
    percentage: DecimalText
    inclusive: bool = Field(description="The line amounts hold it (else it is added).")
    taxableAmount: DecimalText
    exactAmount: DecimalText
    amount: DecimalText


class Invoice(_Response):
    """An invoice as JSON (SPEC §5, §11). A draft is recomputed as of now on every read; a
    finalized one is served as stored; a void one is the finalized one, marked void."""

    id: str
    number: str | None = Field(
        default=None,
        description="INV-000001, ... once finalized (one gapless sequence); null for drafts. "
        "Absent on invoices finalized before numbers existed.",
    )
    customerId: str
    customerName: str
    offeringId: str
    offeringName: str
    currency: str
    from_: Timestamp = Field(alias="from")
    to: Timestamp
    asOf: Timestamp
    timezone: str
    status: Literal["draft", "finalized", "void"]
    createdAt: Timestamp
    finalizedAt: Timestamp | None
    issuer: InvoiceParty | None = Field(
        default=None, description="billing.issuer as it was when computed; null: none set."
    )
    billTo: InvoiceParty | None = None
    locale: str | None = Field(default=None, description="How the HTML and PDF read, e.g. en_GB.")
    paymentTermsDays: int | None = Field(default=None, description="billing.due_days (net terms).")
    issueDate: date | None = Field(default=None, description="Null for drafts.")
    dueDate: date | None = Field(default=None, description="issueDate + paymentTermsDays.")
    lines: list[InvoiceLine | CreditLine | FeeLine | ItemLine]
    subtotal: DecimalText
    taxes: list[InvoiceTax] | None = None
    tax: DecimalText | None = Field(
        default=None, description="The sum of the lines' exact tax, rounded once."
    )
    total: DecimalText = Field(description="subtotal + an exclusive tax.")
    creditsApplied: DecimalText
    amountDue: DecimalText
    walletBalance: DecimalText
    voidedAt: Timestamp | None = Field(default=None, description="Void invoices only.")
    creditsReturned: DecimalText | None = Field(
        default=None, description="Void invoices only: the credits given back to the wallet."
    )


class InvoiceSummary(_Response):
    id: str
    number: str | None
    customerId: str
    status: Literal["draft", "finalized", "void"]
    currency: str | None
    from_: Timestamp | None = Field(alias="from")
    to: Timestamp | None
    createdAt: Timestamp
    finalizedAt: Timestamp | None
    voidedAt: Timestamp | None
    total: DecimalText | None
    amountDue: DecimalText | None


class InvoiceList(_Response):
    data: list[InvoiceSummary]
    cursor: str | None


class WalletBalance(_Response):
    currency: str
    balance: DecimalText


class WalletEntry(_Response):
    seq: int
    id: str
    kind: Literal["top_up", "invoice", "void", "adjustment"]
    currency: str
    amount: DecimalText
    balance: DecimalText
    createdAt: Timestamp
    reference: str | None


class Wallet(_Response):
    customerId: str
    balances: list[WalletBalance]
    entries: list[WalletEntry]


class MarginLine(_Response):
    dimensionId: str
    quantity: DecimalText
    billed: bool
    revenue: DecimalText
    cost: DecimalText
    margin: DecimalText
    warnings: list[str] | None = None


class Margin(_Response):
    customerId: str
    from_: Timestamp = Field(alias="from")
    to: Timestamp
    asOf: Timestamp
    currency: str | None
    dimensions: list[MarginLine]
    revenue: DecimalText
    cost: DecimalText
    margin: DecimalText


class ThresholdState(_Response):
    key: str
    name: str | None
    value: DecimalText | None
    percent: DecimalText | None
    limit: DecimalText | None
    reached: bool
    reachedAt: Timestamp | None


class MeterState(_Response):
    meterId: str
    customerId: str
    dimensionId: str
    reset: Literal["daily", "monthly", "billing_period", "never"]
    measure: Literal["usage", "billable_quantity"]
    periodStart: Timestamp
    periodEnd: Timestamp | None
    value: DecimalText
    capacity: DecimalText | None
    usageRatio: DecimalText | None
    thresholds: list[ThresholdState]
    lastReset: dict[str, Any] | None


class RejectedRecord(_Response):
    seq: int
    receivedAt: Timestamp
    receiver: Source
    reason: Reason
    field: str | None
    error: str
    record: str | None = Field(description="The record as received (bounded).")


class RejectedPage(_Response):
    data: list[RejectedRecord]
    cursor: str | None


class CancellationResult(_Response):
    id: str
    status: Literal["cancelled", "not_found", "already_cancelled", "invoiced"]
    invoiceId: str | None = Field(
        description="invoiced: the finalized invoice that billed the record (it stays billed)."
    )


class CancellationResults(_Response):
    """What became of each id, in the request's order."""

    results: list[CancellationResult]


class CancelledRecord(_Response):
    """A cancelled record as it was stored, and when and why it was cancelled."""

    seq: int = Field(description="Position in the audit list.")
    id: str
    timestamp: Timestamp
    customerId: str
    dimensionId: str
    recordValue: DecimalText
    metadata: dict[str, Any] | None
    source: str
    receivedAt: Timestamp
    cancelledAt: Timestamp
    reason: str | None


class CancellationPage(_Response):
    """The audit list, oldest cancellation first."""

    data: list[CancelledRecord]
    cursor: str | None = Field(description="Pass it back for the next page; null: last page.")


class Health(_Response):
    status: Literal["ok"]


class Readiness(_Response):
    status: Literal["ready", "draining"]
    queued_records: int | None = None
