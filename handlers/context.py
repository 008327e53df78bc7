"""What a handler needs from the outside world, and what it hands back."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import date
from typing import Literal, Protocol

import structlog

from handlers.ledger import Ledger, SaleKey, SaleRecord
from handlers.messages import OutEvent
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

    def __init__(self, reason: str, delay: float = 0.0) -> None:
        super().__init__(reason)
        self.delay = delay


class SaleBusy(Deferred):
    """Another worker holds the sale right now."""


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

    def connection(self, tenant_id: str) -> TenantConnection:
        conn = self.connections.get(tenant_id)
        if conn is None:
            raise InvoicingError(
                ErrorCode.UNKNOWN_TENANT, f"tenant {tenant_id!r} is not in the connections file"
            )
        return conn

    def provider(self, conn: TenantConnection) -> Provider:
        breaker = self.connections.breaker_error(conn)
        if breaker is not None:
            raise breaker
        return self.providers[conn.provider]

    @asynccontextmanager
    async def lease(self, key: SaleKey) -> AsyncIterator[SaleRecord]:
        record = await self.ledger.acquire(key, self.owner, self.lease_seconds)
        if record is None:
            raise SaleBusy(f"sale {key.sale_id} generation {key.invoice_generation} is busy")
        try:
            yield record
        finally:
            try:
                await self.ledger.release(key, self.owner)
            except Exception:  # the lease expires by itself; never mask the real outcome
                log.warning("ledger.release_failed", exc_info=True)
