"""What a handler needs from the outside world, and what it hands back."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Literal, Protocol

import structlog

from handlers.ledger import Ledger, SaleKey, SaleRecord
from handlers.messages import OutEvent
from handlers.validation import DEFAULT_LIMITS, Limits
from providers.base import Provider, TenantConnection
from providers.errors import ErrorCode, InvoicingError

log = structlog.get_logger(__name__)

Outcome = Literal["issued", "cancelled", "duplicate", "skipped"]


@dataclass(frozen=True, slots=True)
class Handled:
    """A message fully handled: publish ``events`` (confirmed), then ack."""

    outcome: Outcome
    events: tuple[OutEvent, ...] = ()
    #: True when a provider call succeeded for the tenant (its connection works).
    provider_ok: bool = False


class Deferred(Exception):
    """Not now, and not a failure: handle the message again in ``delay`` seconds or later.
    ``exact`` delays are reserved slots; the others back off with jitter per deferral."""

    exact = False

    def __init__(self, reason: str, delay: float = 0.0, *, exact: bool | None = None) -> None:
        super().__init__(reason)
        self.delay = delay
        if exact is not None:
            self.exact = exact


class SaleBusy(Deferred):
    """Another worker holds the sale right now; ``delay`` (exact) when we know until when."""


class InDoubtWait(Deferred):
    """An earlier create or cancel may still be committing at the provider: look it up only
    once the grace after its send is over (exact: come back at that moment, not later)."""

    exact = True


class Throttled(Deferred):
    """The tenant's provider key is at its rate limit: waiting here would hold a prefetch slot
    that other tenants' sales need, so the message waits in a delay queue for its slot."""

    exact = True


class Connections(Protocol):
    def get(self, tenant_id: str) -> TenantConnection | None: ...

    def breaker_error(self, conn: TenantConnection) -> InvoicingError | None:
        """The error to park with, without a provider call, while the tenant's connection is
        known to be broken and its configuration has not changed since."""
        ...


@dataclass(frozen=True, slots=True)
class Context:
    ledger: Ledger
    providers: Mapping[str, Provider]
    connections: Connections
    lease_seconds: float
    max_provider_attempts: int
    #: Unique per delivery: the lease owner.
    owner: str
    today: Callable[[], date]
    #: INVOICING_IN_DOUBT_GRACE_SECONDS: an in-doubt request is looked up no sooner.
    in_doubt_grace_seconds: float = 60.0
    #: This worker's liveness id: its leases are taken over as soon as it stops renewing it.
    worker: str | None = None
    #: False once this worker could not renew its liveness in time: others may have taken
    #: its sales over, so it must not send anything more to a provider.
    alive: Callable[[], bool] = lambda: True
    now: Callable[[], datetime] = lambda: datetime.now(UTC)
    #: The plausibility limits pre-flight validation holds a sale to (INVOICING_MAX_GROSS_*,
    #: INVOICING_FULFILLMENT_WINDOW_DAYS).
    limits: Limits = DEFAULT_LIMITS

    def connection(self, tenant_id: str) -> TenantConnection:
        conn = self.connections.get(tenant_id)
        if conn is None:
            raise InvoicingError(
                ErrorCode.UNKNOWN_TENANT, f"tenant {tenant_id!r} is not in the connections file"
            )
        return conn

    def provider(self, conn: TenantConnection, record: SaleRecord | None = None) -> Provider:
        """The provider to act on ``record`` with: the one its documents (or in-doubt requests)
        are at, never simply the tenant's current one. Raises while the connection's breaker
        is open."""
        if (
            record is not None
            and record.provider not in (None, conn.provider)
            and (record.issue_in_doubt or record.cancel_in_doubt or record.document_id)
        ):
            # The connections file now names another provider: its key opens the new one, so
            # the old provider's document cannot be looked up or cancelled from here.
            raise InvoicingError(
                ErrorCode.PROVIDER_REJECTED,
                f"sale {record.key.sale_id} generation {record.key.invoice_generation} has a "
                f"{record.provider} document (or a request in doubt there) but the tenant is "
                f"now connected to {conn.provider}: handle it in {record.provider}'s UI, or "
                f"connect the tenant to {record.provider} again and replay",
            )
        breaker = self.connections.breaker_error(conn)
        if breaker is not None:
            raise breaker
        return self.providers[conn.provider]

    def wait_out_grace(self, sent_at: datetime | None, what: str) -> None:
        """Raise :class:`InDoubtWait` while a request sent at ``sent_at`` may still commit.
        (Callers pass the record's ``updated_at`` for a request recorded before the ledger
        kept send times: no later than the send, so the wait is only longer.)"""
        if sent_at is None:
            return
        left = (sent_at - self.now()).total_seconds() + self.in_doubt_grace_seconds
        if left > 0:
            raise InDoubtWait(f"{what} sent at {sent_at.isoformat()} is in doubt", delay=left)

    def may_send(self) -> None:
        """Called right before a request that may create something at the provider."""
        if not self.alive():
            raise SaleBusy("this worker could not renew its liveness in time; not sending")

    @asynccontextmanager
    async def lease(self, key: SaleKey) -> AsyncIterator[SaleRecord]:
        record = await self.ledger.acquire(key, self.owner, self.lease_seconds, worker=self.worker)
        if record is None:
            free_in = await self.ledger.lease_free_in(key)
            raise SaleBusy(
                f"sale {key.sale_id} generation {key.invoice_generation} is busy",
                delay=free_in or 0.0,
                exact=free_in is not None,
            )
        try:
            yield record
        finally:
            try:
                await self.ledger.release(key, self.owner)
            except Exception:  # the lease expires by itself; never mask the real outcome
                log.warning("ledger.release_failed", exc_info=True)
