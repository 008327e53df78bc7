"""The one small interface every invoicing provider implements, and the values it speaks in.

A provider turns an :class:`InvoiceDraft` (provider-neutral, amounts already computed) into a
real document, cancels one, and finds documents again by the deterministic external key.
Providers raise :class:`providers.errors.InvoicingError` with contract codes; they never decide
retries, never touch the broker and never log secrets.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from functools import cached_property
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, SecretStr

from providers.values import Customer, PaymentMethod, ProviderName


class TenantConnection(BaseModel):
    """One tenant's provider connection, as read from the connections file (CONTRACTS §3)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    tenant_id: str
    provider: ProviderName
    #: Billingo API key or Számla Agent key. SecretStr keeps it out of reprs and logs.
    secret: SecretStr
    currency: str = "HUF"
    language: str = "hu"
    auto_invoice: bool = True
    e_invoice: bool = False
    #: Billingo document block (invoice pad).
    block_id: int | None = None
    #: Számlázz.hu invoice number prefix (szamlaszamElotag).
    invoice_prefix: str | None = None
    #: Days between fulfillment and due date for invoices that are not yet paid.
    due_days: int = 0

    @cached_property
    def _fingerprint(self) -> str:
        raw = self.model_dump_json(exclude={"secret"}) + self.secret.get_secret_value()
        return hashlib.sha256(raw.encode()).hexdigest()[:16]

    def fingerprint(self) -> str:
        """Changes whenever anything about the connection (including the key) changes.
        Computed once per connection object: it is asked for on every handled sale."""
        return self._fingerprint


@dataclass(frozen=True, slots=True)
class InvoiceLine:
    """One invoice line with every amount computed (see :mod:`handlers.amounts`)."""

    name: str
    quantity: Decimal
    unit: str
    #: The contract's VAT label: "27%", "18%", "5%" or a special code ("AAM", "TAM", ...).
    vat: str
    #: The percentage used for arithmetic (0 for special codes).
    vat_rate: Decimal
    price_type: Literal["gross", "net"]
    #: The unit price exactly as the sale gave it (gross or net per ``price_type``).
    unit_price: Decimal
    net_unit_price: Decimal
    net_amount: Decimal
    vat_amount: Decimal
    gross_amount: Decimal


@dataclass(frozen=True, slots=True)
class InvoiceDraft:
    """Everything a provider needs to issue one invoice for one sale generation."""

    tenant_id: str
    sale_id: str
    invoice_generation: int
    #: Deterministic key of tenant + sale + generation; Billingo vendor_id, szamlaKulsoAzon.
    external_key: str
    currency: str
    language: str
    payment_method: PaymentMethod
    fulfillment_date: date
    issue_date: date
    due_date: date
    paid: bool
    customer: Customer
    lines: tuple[InvoiceLine, ...]
    net_total: Decimal
    vat_total: Decimal
    gross_total: Decimal
    comment: str | None = None


@dataclass(frozen=True, slots=True)
class IssuedInvoice:
    document_id: str
    invoice_number: str
    gross_total: Decimal
    currency: str
    #: True when the provider already shows the invoice as cancelled / reversed.
    cancelled: bool = False


@dataclass(frozen=True, slots=True)
class Cancellation:
    kind: Literal["cancel", "reverse"]
    document_id: str
    invoice_number: str


@dataclass(frozen=True, slots=True)
class CancelRequest:
    tenant_id: str
    sale_id: str
    invoice_generation: int
    #: Deterministic key of the cancellation (external key + ":storno").
    external_key: str
    reason: str | None
    fulfillment_date: date | None = None


#: Awaited by ``Provider.issue`` right before each request that may create the invoice: the
#: caller records the send there (and may refuse it), so the in-doubt grace is counted from
#: the send itself, not from before the lookups and partner calls that precede it.
BeforeSend = Callable[[], Awaitable[None]]


async def no_hook() -> None:
    """The default BeforeSend: nothing to record."""


#: Called once per HTTP request: (provider, operation, status, seconds). ``status`` is the
#: HTTP status as a string, or an error class ("timeout", "network_error").
RequestObserver = Callable[[str, str, str, float], None]


@dataclass(frozen=True, slots=True)
class ProviderRules:
    """What one provider accepts. ``vat_labels`` maps each contract VAT label the provider
    can invoice to the provider's own VAT key (Billingo ``vat``, Számla Agent ``afakulcs``)."""

    display_name: str
    currencies: frozenset[str]
    languages: frozenset[str]
    vat_labels: Mapping[str, str]


def no_observer(provider: str, operation: str, status: str, seconds: float) -> None:
    """The default observer: record nothing."""


class Provider(Protocol):
    """What the handlers need from Billingo or Számlázz.hu."""

    name: ProviderName
    #: True when the provider forbids sending one request more than a few times (the Számla
    #: Agent's rule); otherwise only the retry budget bounds resends (each after a lookup).
    caps_resends: bool

    async def issue(
        self, conn: TenantConnection, draft: InvoiceDraft, before_send: BeforeSend = no_hook
    ) -> IssuedInvoice:
        """Create the invoice. Not idempotent at the provider: callers look up first
        whenever an earlier attempt's outcome is unknown. ``before_send`` is awaited right
        before every create request (a provider may send one twice, e.g. Billingo after a
        stale partner id's 403); an exception from it sends nothing."""
        ...

    async def find_invoice(self, conn: TenantConnection, external_key: str) -> IssuedInvoice | None:
        """The invoice created with this external key, or None when there is none."""
        ...

    async def cancel(
        self, conn: TenantConnection, invoice: IssuedInvoice, request: CancelRequest
    ) -> Cancellation:
        """Cancel (Billingo) or reverse (Számlázz.hu) the invoice."""
        ...

    async def find_cancellation(
        self, conn: TenantConnection, invoice: IssuedInvoice, request: CancelRequest
    ) -> Cancellation | None:
        """The cancellation / reverse document that already exists for the invoice, if any."""
        ...

    async def check_connection(self, conn: TenantConnection) -> None:
        """The help pages' "Test": return when the key works, raise InvoicingError otherwise."""
        ...

    def defer_seconds(self, conn: TenantConnection, max_wait: float, *, due: bool = False) -> float:
        """0 when a sale for this connection's key may go ahead (its pacing wait is at most
        ``max_wait``); otherwise the delay until a slot reserved for it (``due``: a sale that
        already waited for its slot goes to the front)."""
        ...

    async def close(self) -> None: ...
