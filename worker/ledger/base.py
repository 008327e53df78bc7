"""What both ledger backends share: every Protocol method that does not depend on the store.

:class:`TransitionLedger` writes the state changes and readers once, in terms of the
statements in :mod:`worker.ledger.schema` (``:name`` parameters) and a few I/O primitives.
A backend implements only those primitives (connections, dialect rendering, parameter
binding) plus ``open`` / ``close`` / ``_acquire``; see :mod:`worker.ledger.sqlite` and
:mod:`worker.ledger.postgres`.
"""

from __future__ import annotations

from abc import abstractmethod
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from handlers.ledger import (
    AuditEntry,
    ConnectionState,
    LeaseLost,
    Ledger,
    LedgerUnavailable,
    SaleKey,
    SaleRecord,
    SaleState,
)
from providers.base import Cancellation, IssuedInvoice
from worker.ledger import schema
from worker.logging import scrub_text

#: How many leases ended by a terminal transition (``release=True``) are remembered until their
#: ``release()``. A handler releases right after, so this holds about one entry per sale in
#: flight; the bound only protects against callers that never release. Forgetting one is
#: harmless: that ``release()`` runs its (no-op) UPDATE as before.
_RELEASED_MAX = 4096


@contextmanager
def outage(kinds: tuple[type[BaseException], ...]) -> Iterator[None]:
    """A backend's store errors of ``kinds`` (the ones that mean "cannot reach or write the
    store", each backend names its own) as :class:`LedgerUnavailable`. Anything else (a bug,
    a value the schema refuses) stays what it is."""
    try:
        yield
    except kinds as exc:
        detail = scrub_text(str(exc))[:300]
        raise LedgerUnavailable(
            f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
        ) from exc


class TransitionLedger(Ledger):
    def __init__(self) -> None:
        #: (key, owner) whose lease a terminal transition of this instance ended, so the
        #: caller's ``release(key, owner)`` needs no round trip. Only the event loop thread
        #: touches it.
        self._released: OrderedDict[tuple[SaleKey, str], None] = OrderedDict()

    # ------------------------------------------------------------------ per backend

    @abstractmethod
    async def open(self) -> None: ...

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def _acquire(
        self, key: SaleKey, owner: str, lease_seconds: float, worker: str | None
    ) -> SaleRecord | None:
        """The lease-taking upsert (see :meth:`Ledger.acquire`)."""

    @abstractmethod
    async def heartbeat(self, worker: str, ttl_seconds: float) -> None: ...

    # ------------------------------------------------------------------ I/O primitives

    @abstractmethod
    async def _transition_row(
        self, t: schema.Transition, params: dict[str, Any]
    ) -> schema.Row | None:
        """Apply ``t`` and append its audit entry atomically, returning after the commit.

        The UPDATE must check the lease (``params["owner"]``, unexpired) in the same
        statement / transaction that changes the row, and the audit entry must commit together
        with it or not at all. Returns the updated row, or None, with nothing changed, when the
        owner does not hold the lease.
        """

    @abstractmethod
    async def _execute(self, sql: str, params: dict[str, Any]) -> None:
        """Run one ``:name`` write statement; returns after its commit."""

    @abstractmethod
    async def _fetch_one(self, sql: str, params: dict[str, Any]) -> schema.Row | None:
        """The first row of a ``:name`` query, or None."""

    @abstractmethod
    async def _fetch_all(self, sql: str, params: dict[str, Any]) -> Sequence[schema.Row]:
        """All rows of a ``:name`` query."""

    # ------------------------------------------------------------------ schema

    async def schema_version(self) -> int:
        row = await self._fetch_one("SELECT max(version) AS version FROM schema_version", {})
        return int((row["version"] if row is not None else None) or 0)

    # ------------------------------------------------------------------ leases

    async def acquire(
        self, key: SaleKey, owner: str, lease_seconds: float, *, worker: str | None = None
    ) -> SaleRecord | None:
        # Taken again (whatever the outcome): a later release() must really run its UPDATE.
        self._released.pop((key, owner), None)
        return await self._acquire(key, owner, lease_seconds, worker)

    async def lease_free_in(self, key: SaleKey) -> float | None:
        row = await self._fetch_one(schema.LEASE_FREE_AT, schema.key_params(key))
        if row is None or row["lease_until"] is None:
            return None
        free_at = schema.to_utc(row["lease_until"])
        alive_until = schema.to_utc(row["alive_until"])
        assert free_at is not None
        if alive_until is not None and alive_until < free_at:
            free_at = alive_until
        return max(0.0, (free_at - datetime.now(UTC)).total_seconds())

    async def retire(self, worker: str) -> None:
        await self._execute(schema.RETIRE, {"worker": worker})

    async def release(self, key: SaleKey, owner: str) -> None:
        if (key, owner) in self._released:
            # A terminal transition already set lease_owner = NULL in the statement that
            # checked ``owner`` held the lease, and ``owner`` has not acquired since: the
            # UPDATE below would match nothing.
            del self._released[key, owner]
            return
        await self._execute(schema.RELEASE, {**schema.key_params(key), "owner": owner})

    def _remember_released(self, key: SaleKey, owner: str) -> None:
        self._released[key, owner] = None
        self._released.move_to_end((key, owner))
        while len(self._released) > _RELEASED_MAX:
            self._released.popitem(last=False)

    # ------------------------------------------------------------------ transitions

    async def _transition(
        self,
        t: schema.Transition,
        key: SaleKey,
        owner: str,
        values: dict[str, Any],
        audit: dict[str, Any],
        release: bool = False,
    ) -> SaleRecord:
        params = {**values, **audit, **schema.key_params(key), "owner": owner}
        row = await self._transition_row(schema.releasing(t) if release else t, params)
        if row is None:
            raise LeaseLost(f"{key.external_key} is not leased by {owner}")
        if release:
            self._remember_released(key, owner)
        return schema.sale_from_row(row)

    async def _attempt_failed(
        self,
        t: schema.Transition,
        operation: str,
        key: SaleKey,
        owner: str,
        event_id: str,
        error_code: str,
        message: str,
        in_doubt: bool,
        was_in_doubt: bool,
    ) -> None:
        await self._transition(
            t,
            key,
            owner,
            {"error_code": error_code, "in_doubt": in_doubt, "was_in_doubt": was_in_doubt},
            schema.audit_params(
                operation,
                "in_doubt" if in_doubt else "failed",
                event_id=event_id,
                error_code=error_code,
                detail=message,
            ),
        )

    async def start_issue(
        self, key: SaleKey, owner: str, provider: str, event_id: str
    ) -> SaleRecord:
        return await self._transition(
            schema.START_ISSUE,
            key,
            owner,
            {"provider": provider},
            schema.audit_params("issue.requested", "started", event_id=event_id),
        )

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
        await self._attempt_failed(
            schema.ISSUE_FAILED,
            "issue.failed",
            key,
            owner,
            event_id,
            error_code,
            message,
            in_doubt,
            was_in_doubt,
        )

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
        return await self._transition(
            schema.RECORD_ISSUED,
            key,
            owner,
            schema.issued_values(provider, invoice),
            schema.audit_params(
                "issue.found" if found else "issue.succeeded",
                "issued",
                event_id=event_id,
                detail=invoice.invoice_number,
            ),
            release,
        )

    async def start_cancel(self, key: SaleKey, owner: str, event_id: str) -> SaleRecord:
        return await self._transition(
            schema.START_CANCEL,
            key,
            owner,
            {},
            schema.audit_params("cancel.requested", "started", event_id=event_id),
        )

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
    ) -> None:
        await self._attempt_failed(
            schema.CANCEL_FAILED,
            "cancel.failed",
            key,
            owner,
            event_id,
            error_code,
            message,
            in_doubt,
            was_in_doubt,
        )

    async def record_cancelled(
        self,
        key: SaleKey,
        owner: str,
        event_id: str,
        cancellation: Cancellation,
        found: bool,
        *,
        release: bool = False,
    ) -> SaleRecord:
        return await self._transition(
            schema.RECORD_CANCELLED,
            key,
            owner,
            schema.cancelled_values(cancellation),
            schema.audit_params(
                "cancel.found" if found else "cancel.succeeded",
                "cancelled",
                event_id=event_id,
                document_id=cancellation.document_id,
                detail=f"{cancellation.kind} {cancellation.invoice_number}",
            ),
            release,
        )

    async def record_voiding(self, key: SaleKey, owner: str, event_id: str) -> SaleRecord:
        return await self._transition(
            schema.RECORD_VOIDING,
            key,
            owner,
            {},
            schema.audit_params(
                "void.requested",
                "waiting",
                event_id=event_id,
                detail="storno while a create is in doubt: nothing more is sent",
            ),
        )

    async def record_voided(
        self, key: SaleKey, owner: str, event_id: str, reason: str, *, release: bool = False
    ) -> SaleRecord:
        return await self._transition(
            schema.RECORD_VOIDED,
            key,
            owner,
            {},
            schema.audit_params("voided", "voided", event_id=event_id, detail=reason),
            release,
        )

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
        await self._transition(
            schema.RECORD_FAILED,
            key,
            owner,
            {"error_code": error_code},
            schema.audit_params(
                "dead_lettered", "failed", event_id=event_id, error_code=error_code, detail=message
            ),
            release,
        )

    # ------------------------------------------------------------------ reads and the rest

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
        params = {
            **schema.key_params(key),
            **schema.audit_params(
                operation,
                outcome,
                event_id=event_id,
                error_code=error_code,
                provider=provider,
                document_id=document_id,
                detail=detail,
            ),
        }
        await self._execute(schema.AUDIT_INSERT, params)

    async def get(self, key: SaleKey) -> SaleRecord | None:
        row = await self._fetch_one(schema.GET, schema.key_params(key))
        return schema.sale_from_row(row) if row is not None else None

    async def generations(self, tenant_id: str, sale_id: str) -> list[SaleRecord]:
        rows = await self._fetch_all(
            schema.GENERATIONS, {"tenant_id": tenant_id, "sale_id": sale_id}
        )
        return [schema.sale_from_row(row) for row in rows]

    async def history(self, sale_id: str, tenant_id: str | None = None) -> list[AuditEntry]:
        sql = schema.HISTORY_ALL if tenant_id is None else schema.HISTORY_TENANT
        rows = await self._fetch_all(sql, {"sale_id": sale_id, "tenant_id": tenant_id})
        return [schema.audit_from_row(row) for row in rows]

    async def state_counts(self, since: datetime) -> list[tuple[str, SaleState, int]]:
        rows = await self._fetch_all(schema.STATE_COUNTS, {"since": since})
        return [(r["tenant_id"], SaleState(r["state"]), int(r["n"])) for r in rows]

    async def uninvoiced(self, older_than: datetime, limit: int = 100) -> list[SaleRecord]:
        params = {"older_than": older_than, "limit": limit}
        rows = await self._fetch_all(schema.UNINVOICED, params)
        return [schema.sale_from_row(r) for r in rows]

    async def load_connection_states(self) -> list[ConnectionState]:
        rows = await self._fetch_all(schema.LOAD_CONNECTIONS, {})
        return [schema.connection_from_row(row) for row in rows]

    async def save_connection_state(self, state: ConnectionState) -> None:
        await self._execute(schema.SAVE_CONNECTION, schema.connection_params(state))
