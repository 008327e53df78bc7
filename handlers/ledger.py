"""What the ledger remembers per sale generation, and the interface both backends implement.

The ledger is what makes issuing exactly-once on top of at-least-once delivery: every provider
request that changes state is recorded as started *before* it is sent, so after a crash or a
lost answer the next attempt knows the outcome is in doubt and looks the document up first.
A lease (a conditional update on the row) lets only one worker act on a sale at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Literal, Protocol

from handlers.draft import external_key
from providers.base import Cancellation, IssuedInvoice


class SaleState(StrEnum):
    NEW = "new"  # seen, nothing sent to a provider yet
    PENDING = "pending"  # an issue was started; see issue_in_doubt
    ISSUED = "issued"
    CANCEL_PENDING = "cancel_pending"  # a cancel was started; see cancel_in_doubt
    CANCELLED = "cancelled"
    VOIDED = "voided"  # stornoed before any invoice existed: never issue this generation
    #: A storno came while a create was in doubt: nothing more is sent; once the create's
    #: grace is over the storno looks it up and cancels what it finds, or voids.
    VOIDING = "voiding"
    FAILED = "failed"  # dead-lettered; a replay may pick it up again


@dataclass(frozen=True, slots=True)
class SaleKey:
    tenant_id: str
    sale_id: str
    invoice_generation: int

    @property
    def external_key(self) -> str:
        """Deterministic per tenant + sale + generation: Billingo vendor_id, szamlaKulsoAzon."""
        return external_key(self.tenant_id, self.sale_id, self.invoice_generation)


@dataclass(frozen=True, slots=True)
class SaleRecord:
    key: SaleKey
    state: SaleState
    provider: str | None = None
    document_id: str | None = None
    invoice_number: str | None = None
    gross_total: Decimal | None = None
    currency: str | None = None
    cancel_kind: Literal["cancel", "reverse"] | None = None
    cancel_document_id: str | None = None
    cancel_invoice_number: str | None = None
    #: How many create requests were started (never more than max_provider_attempts).
    issue_attempts: int = 0
    #: True while a started create may have produced a document nobody recorded.
    issue_in_doubt: bool = False
    cancel_attempts: int = 0
    cancel_in_doubt: bool = False
    last_error_code: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    #: When the latest create / cancel was sent (recorded just before it went out).
    issue_sent_at: datetime | None = None
    cancel_sent_at: datetime | None = None

    @property
    def invoice(self) -> IssuedInvoice | None:
        if self.document_id is None or self.invoice_number is None:
            return None
        return IssuedInvoice(
            document_id=self.document_id,
            invoice_number=self.invoice_number,
            gross_total=self.gross_total if self.gross_total is not None else Decimal(0),
            currency=self.currency or "",
            cancelled=self.state is SaleState.CANCELLED,
        )

    @property
    def cancellation(self) -> Cancellation | None:
        if (
            self.cancel_kind is None
            or self.cancel_document_id is None
            or self.cancel_invoice_number is None
        ):
            return None
        return Cancellation(self.cancel_kind, self.cancel_document_id, self.cancel_invoice_number)


@dataclass(frozen=True, slots=True)
class AuditEntry:
    at: datetime
    tenant_id: str
    sale_id: str
    invoice_generation: int
    #: e.g. "issue.requested", "issue.succeeded", "issue.failed", "issue.found",
    #: "cancel.requested", "cancel.succeeded", "voided", "duplicate", "dead_lettered".
    operation: str
    outcome: str
    event_id: str | None = None
    error_code: str | None = None
    provider: str | None = None
    document_id: str | None = None
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class ConnectionState:
    tenant_id: str
    provider: str
    status: Literal["ACTIVE", "ERROR"]
    error_code: str | None
    message: str
    #: TenantConnection.fingerprint() of the configuration the state was observed with.
    fingerprint: str
    updated_at: datetime | None = None


class LeaseLost(Exception):
    """Another worker holds (or took over) the sale; the caller retries later."""


class LedgerUnavailable(Exception):
    """The ledger's store cannot be reached or written (database down, disk full, a command
    timeout). Raised by the backends, which alone know which of their errors are outages, so
    the pipeline tells our own outage (``ledger_unavailable``, retried) from a provider's and
    from a bug. The message names the error's class and a scrubbed text, never a secret."""


class Ledger(Protocol):
    async def open(self) -> None:
        """Connect and create / migrate the schema."""
        ...

    async def close(self) -> None: ...

    async def acquire(
        self, key: SaleKey, owner: str, lease_seconds: float, *, worker: str | None = None
    ) -> SaleRecord | None:
        """Take the lease on the sale generation (creating the row in NEW if missing).
        Returns the record, or None while another owner holds an unexpired lease whose
        ``worker`` (if it named one) is alive (see :meth:`heartbeat`)."""
        ...

    async def lease_free_in(self, key: SaleKey) -> float | None:
        """Seconds until a busy sale's lease can be taken (its expiry or its holder's liveness
        end, whichever is first); None when the sale is not leased."""
        ...

    async def heartbeat(self, worker: str, ttl_seconds: float) -> None:
        """``worker`` is alive for ``ttl_seconds`` more: its leases cannot be taken over."""
        ...

    async def retire(self, worker: str) -> None:
        """``worker`` stopped: its remaining leases can be taken over at once."""
        ...

    async def release(self, key: SaleKey, owner: str) -> None:
        """End ``owner``'s lease (no effect when another owner holds it). Costs no database
        round trip when a terminal transition of this ledger already ended it (``release=True``
        below) and ``owner`` has not acquired the sale again since."""
        ...

    # Every method below raises LeaseLost when ``owner`` no longer holds the lease.
    #
    # The terminal ones (record_issued, record_cancelled, record_voided, record_failed) take
    # ``release=True`` when the caller does nothing more under the lease: the same statement
    # that records the outcome then also ends the lease, so another owner can acquire the sale
    # at once and the caller's later ``release()`` is free. Leave it False (the default) when
    # more transitions follow under the same lease (a storno recording a found invoice before
    # cancelling it).

    async def start_issue(
        self, key: SaleKey, owner: str, provider: str, event_id: str
    ) -> SaleRecord:
        """PENDING, issue_attempts + 1, issue_in_doubt = True; audit "issue.requested"."""
        ...

    async def issue_failed(
        self,
        key: SaleKey,
        owner: str,
        event_id: str,
        error_code: str,
        message: str,
        in_doubt: bool,
        *,
        was_in_doubt: bool = False,
    ) -> None:
        """Stay PENDING; record the error. The record stays in doubt if this send may have
        created something (``in_doubt``) or an earlier one may have (``was_in_doubt``)."""
        ...

    async def record_issued(
        self,
        key: SaleKey,
        owner: str,
        event_id: str,
        provider: str,
        invoice: IssuedInvoice,
        found: bool,
        *,
        release: bool = False,
    ) -> SaleRecord:
        """ISSUED with the document; in_doubt cleared; audit "issue.succeeded" or "issue.found"."""
        ...

    async def start_cancel(self, key: SaleKey, owner: str, event_id: str) -> SaleRecord:
        """CANCEL_PENDING, cancel_attempts + 1, cancel_in_doubt = True; audit."""
        ...

    async def cancel_failed(
        self,
        key: SaleKey,
        owner: str,
        event_id: str,
        error_code: str,
        message: str,
        in_doubt: bool,
        *,
        was_in_doubt: bool = False,
    ) -> None: ...

    async def record_cancelled(
        self,
        key: SaleKey,
        owner: str,
        event_id: str,
        cancellation: Cancellation,
        found: bool,
        *,
        release: bool = False,
    ) -> SaleRecord: ...

    async def record_voiding(self, key: SaleKey, owner: str, event_id: str) -> SaleRecord:
        """VOIDING: a storno waits out an in-doubt create; no sale.paid may send another."""
        ...

    async def record_voided(
        self, key: SaleKey, owner: str, event_id: str, reason: str, *, release: bool = False
    ) -> SaleRecord:
        """VOIDED: no invoice may ever be issued for this generation."""
        ...

    async def record_failed(
        self,
        key: SaleKey,
        owner: str,
        event_id: str,
        error_code: str,
        message: str,
        *,
        release: bool = False,
    ) -> None:
        """FAILED (dead-lettered) unless a document exists; audit "dead_lettered"."""
        ...

    async def audit(
        self,
        key: SaleKey,
        operation: str,
        outcome: str,
        *,
        event_id: str | None = None,
        error_code: str | None = None,
        provider: str | None = None,
        document_id: str | None = None,
        detail: str | None = None,
    ) -> None:
        """Append to the audit trail without touching the state (no lease needed)."""
        ...

    async def get(self, key: SaleKey) -> SaleRecord | None: ...

    async def generations(self, tenant_id: str, sale_id: str) -> list[SaleRecord]:
        """Every generation of the sale the ledger knows, lowest first."""
        ...

    async def history(self, sale_id: str, tenant_id: str | None = None) -> list[AuditEntry]:
        """The audit trail of every generation of the sale, oldest first."""
        ...

    async def state_counts(self, since: datetime) -> list[tuple[str, SaleState, int]]:
        """(tenant, state, number of sale generations) for rows created since ``since``."""
        ...

    async def uninvoiced(self, older_than: datetime, limit: int = 100) -> list[SaleRecord]:
        """Paid sale generations with no invoice yet (new / pending / failed), oldest first."""
        ...

    async def load_connection_states(self) -> list[ConnectionState]: ...

    async def save_connection_state(self, state: ConnectionState) -> None: ...
