"""Messages on the bus (CONTRACTS §4–5) as pydantic models. Money is Decimal, never float."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    StrictInt,
    StringConstraints,
    field_validator,
)

from providers.values import Address as Address
from providers.values import Customer as Customer
from providers.values import Inbound
from providers.values import PaymentMethod as PaymentMethod
from providers.values import ProviderName as ProviderName


def _decimal_from_string(value: Any) -> Any:
    # A float would already have lost cents on the way in; money must travel as a string.
    if isinstance(value, float):
        raise ValueError("money must be a decimal string, not a float")
    if isinstance(value, bool):
        raise ValueError("money must be a decimal string")
    return value


Money = Annotated[
    Decimal,
    BeforeValidator(_decimal_from_string),
    PlainSerializer(lambda d: format(d, "f"), return_type=str),
]

#: What an incoming amount or quantity can be at all (the plausibility limits are the
#: settings' job, in validation): beyond it, a provider's JSON integer or a float would
#: overflow or lose digits, which is the same failure on every attempt.
_WIRE_LIMIT = Decimal(10**15)


def _on_the_wire(value: Decimal) -> Decimal:
    if not -_WIRE_LIMIT < value < _WIRE_LIMIT:
        raise ValueError(f"{value} is out of range (amounts and quantities stay below 10^15)")
    return value


InMoney = Annotated[Money, AfterValidator(_on_the_wire)]

#: The ledger stores a generation in a 32-bit INTEGER column (PostgreSQL); strict: a bool, a
#: float or a string is a publisher's bug, not a generation.
Generation = Annotated[StrictInt, Field(ge=1, le=2**31 - 1)]


#: Ids are keys (the ledger's, the provider's external key): taken exactly as given, never
#: trimmed, and without control characters (PostgreSQL text refuses NUL).
def _no_control_characters(value: str) -> str:
    if _CONTROL.search(value):
        raise ValueError("must not contain control characters (tabs, line breaks, NUL)")
    return value


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
Id = Annotated[
    str,
    StringConstraints(strip_whitespace=False, min_length=1, max_length=100),
    AfterValidator(_no_control_characters),
]


# Unknown extra fields are ignored (CONTRACTS §4); the models are read-only once parsed.
_In = Inbound


class Item(_In):
    name: str = Field(min_length=1, max_length=500)
    quantity: InMoney
    unit: str = Field(min_length=1, max_length=50)
    unit_price: InMoney
    price_type: Literal["gross", "net"]
    vat: str = Field(min_length=1, max_length=16)


class Sale(_In):
    id: Id
    invoice_generation: Generation
    trigger: Literal["auto", "manual"]
    paid_at: datetime
    fulfillment_date: date
    currency: str = Field(min_length=3, max_length=3)
    payment_method: PaymentMethod
    customer: Customer
    items: list[Item] = Field(min_length=1, max_length=500)


class _Event(_In):
    event_id: Id
    occurred_at: datetime
    tenant_id: Id


class SalePaid(_Event):
    event_type: Literal["sale.paid"]
    sale: Sale

    @property
    def sale_id(self) -> str:
        return self.sale.id

    @property
    def invoice_generation(self) -> int:
        return self.sale.invoice_generation


class SaleStorno(_Event):
    event_type: Literal["sale.storno"]
    sale_id: Id
    invoice_generation: Generation
    reason: str | None = Field(default=None, max_length=1000)
    document_id: str | None = Field(default=None, max_length=100)

    @field_validator("document_id", mode="before")
    @classmethod
    def _document_id_as_string(cls, value: Any) -> Any:
        # Bookinda may hold Billingo's integer id; compare ids as strings everywhere.
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


SaleEvent = SalePaid | SaleStorno
INBOUND_TYPES: dict[str, type[SalePaid] | type[SaleStorno]] = {
    "sale.paid": SalePaid,
    "sale.storno": SaleStorno,
}


# ---- outgoing (CONTRACTS §5) -------------------------------------------------------------


def _now() -> datetime:
    return datetime.now(UTC)


def _new_id() -> str:
    return str(uuid.uuid4())


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    event_id: str = Field(default_factory=_new_id)
    occurred_at: datetime = Field(default_factory=_now)
    causation_id: str | None
    tenant_id: str


class InvoiceIssued(_Out):
    event_type: Literal["invoice.issued"] = "invoice.issued"
    sale_id: str
    invoice_generation: int
    provider: ProviderName
    document_id: str
    invoice_number: str
    gross_total: Money
    currency: str


class CancellationInfo(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["cancel", "reverse"]
    document_id: str
    invoice_number: str


class InvoiceCancelled(_Out):
    event_type: Literal["invoice.cancelled"] = "invoice.cancelled"
    sale_id: str
    invoice_generation: int
    provider: ProviderName
    document_id: str
    invoice_number: str
    cancellation: CancellationInfo


class ErrorInfo(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    code: str
    message: str
    fix: str


class InvoiceFailed(_Out):
    event_type: Literal["invoice.failed"] = "invoice.failed"
    sale_id: str | None
    invoice_generation: int | None
    provider: ProviderName | None
    operation: Literal["issue", "cancel"]
    error: ErrorInfo
    attempt: int
    final: bool
    next_attempt_at: datetime | None


class ConnectionStatus(_Out):
    event_type: Literal["connection.status"] = "connection.status"
    provider: ProviderName
    status: Literal["ACTIVE", "ERROR"]
    error_code: str | None
    message: str


class InvoiceVoided(_Out):
    """The generation ended with no invoice: a storno came before one existed."""

    event_type: Literal["invoice.voided"] = "invoice.voided"
    sale_id: str
    invoice_generation: int
    reason: str


OutEvent = InvoiceIssued | InvoiceCancelled | InvoiceFailed | ConnectionStatus | InvoiceVoided
