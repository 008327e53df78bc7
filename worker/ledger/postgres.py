"""The PostgreSQL ledger: several worker replicas share one database.

Every method is a single statement (one round trip, its own implicit transaction, prepared
once per connection by asyncpg's statement cache): a state change is a CTE that updates the
row only while the caller holds the lease and appends the audit entry in the same statement, so
both commit together or not at all, and the method returns after the commit. Lease times come
from the server's clock, so replicas on different hosts never compare clocks with each other.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

import asyncpg  # type: ignore[import-untyped]

from providers.base import Cancellation, IssuedInvoice
from worker.ledger import schema
from worker.ledger.model import (
    AuditEntry,
    ConnectionState,
    LeaseLost,
    SaleKey,
    SaleRecord,
    SaleState,
)

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


class _Statement:
    """A ``:name`` statement rendered for asyncpg, binding parameters by name."""

    def __init__(self, sql: str) -> None:
        self.sql, self.names = schema.render_postgres(sql)

    @classmethod
    def transition(cls, t: schema.Transition) -> _Statement:
        stmt = cls.__new__(cls)
        stmt.sql, stmt.names = schema.transition_sql_postgres(t)
        return stmt

    def args(self, params: dict[str, Any]) -> list[Any]:
        return [params[name] for name in self.names]


_ACQUIRE = _Statement(
    schema.ACQUIRE.replace(":until", "now() + make_interval(secs => :lease_seconds)")
)
_RELEASE = _Statement(schema.RELEASE)
_GET = _Statement(schema.GET)
_AUDIT = _Statement(schema.AUDIT_INSERT)
_HISTORY_ALL = _Statement(schema.HISTORY_ALL)
_HISTORY_TENANT = _Statement(schema.HISTORY_TENANT)
_STATE_COUNTS = _Statement(schema.STATE_COUNTS)
_UNINVOICED = _Statement(schema.UNINVOICED)
_LOAD_CONNECTIONS = _Statement(schema.LOAD_CONNECTIONS)
_SAVE_CONNECTION = _Statement(schema.SAVE_CONNECTION)
_TRANSITIONS = {
    t: _Statement.transition(t)
    for t in (
        schema.START_ISSUE,
        schema.ISSUE_FAILED,
        schema.RECORD_ISSUED,
        schema.START_CANCEL,
        schema.CANCEL_FAILED,
        schema.RECORD_CANCELLED,
        schema.RECORD_VOIDED,
        schema.RECORD_FAILED,
    )
}


class PostgresLedger:
    def __init__(
        self,
        url: str,
        *,
        schema_name: str | None = None,
        min_size: int = 1,
        max_size: int = 10,
    ) -> None:
        """``schema_name``: keep the tables in this schema (created if missing) instead of the
        connection's default search_path; lets several deployments or test runs share a
        database without meeting."""
        if schema_name is not None and not _IDENTIFIER.match(schema_name):
            raise ValueError(f"invalid schema name {schema_name!r}")
        self.url = url
        self.schema_name = schema_name
        self._min_size = min_size
        self._max_size = max_size
        self._pool: Any = None

    # ------------------------------------------------------------------ plumbing

    @property
    def pool(self) -> Any:
        if self._pool is None:
            raise RuntimeError("ledger is not open")
        return self._pool

    async def _fetchrow(self, stmt: _Statement, params: dict[str, Any]) -> Any:
        return await self.pool.fetchrow(stmt.sql, *stmt.args(params))

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        if self._pool is not None:
            return
        server_settings = {"application_name": "invoicing-worker"}
        if self.schema_name is not None:
            server_settings["search_path"] = self.schema_name
        self._pool = await asyncpg.create_pool(
            self.url,
            min_size=self._min_size,
            max_size=self._max_size,
            server_settings=server_settings,
        )
        try:
            await self._migrate()
        except BaseException:
            await self.close()
            raise

    async def _migrate(self) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            # Replicas starting together migrate one after the other, each seeing the
            # versions the previous one applied.
            lock_name = f"invoicing-ledger:{self.schema_name or 'default'}"
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", lock_name)
            if self.schema_name is not None:
                await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema_name}"')
            await conn.execute(schema.SCHEMA_VERSION_TABLE["postgres"])
            applied = {r["version"] for r in await conn.fetch("SELECT version FROM schema_version")}
            for migration in schema.MIGRATIONS:
                if migration.version in applied:
                    continue
                for statement in migration.statements("postgres"):
                    await conn.execute(statement)
                await conn.execute(
                    "INSERT INTO schema_version (version, description) VALUES ($1, $2)",
                    migration.version,
                    migration.description,
                )

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    async def schema_version(self) -> int:
        return int(await self.pool.fetchval("SELECT max(version) FROM schema_version") or 0)

    # ------------------------------------------------------------------ leases

    async def acquire(self, key: SaleKey, owner: str, lease_seconds: float) -> SaleRecord | None:
        params = {**schema.key_params(key), "owner": owner, "lease_seconds": float(lease_seconds)}
        row = await self._fetchrow(_ACQUIRE, params)
        return schema.sale_from_row(row) if row is not None else None

    async def release(self, key: SaleKey, owner: str) -> None:
        params = {**schema.key_params(key), "owner": owner}
        await self.pool.execute(_RELEASE.sql, *_RELEASE.args(params))

    # ------------------------------------------------------------------ transitions

    async def _transition(
        self,
        t: schema.Transition,
        key: SaleKey,
        owner: str,
        values: dict[str, Any],
        audit: dict[str, Any],
    ) -> SaleRecord:
        params = {**values, **audit, **schema.key_params(key), "owner": owner}
        row = await self._fetchrow(_TRANSITIONS[t], params)
        if row is None:
            raise LeaseLost(f"{key.external_key} is not leased by {owner}")
        return schema.sale_from_row(row)

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
    ) -> None:
        await self._transition(
            schema.ISSUE_FAILED,
            key,
            owner,
            {"error_code": error_code, "in_doubt": in_doubt},
            schema.audit_params(
                "issue.failed",
                "in_doubt" if in_doubt else "failed",
                event_id=event_id,
                error_code=error_code,
                detail=message,
            ),
        )

    async def record_issued(
        self,
        key: SaleKey,
        owner: str,
        event_id: str,
        provider: str,
        invoice: IssuedInvoice,
        found: bool,
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
    ) -> None:
        await self._transition(
            schema.CANCEL_FAILED,
            key,
            owner,
            {"error_code": error_code, "in_doubt": in_doubt},
            schema.audit_params(
                "cancel.failed",
                "in_doubt" if in_doubt else "failed",
                event_id=event_id,
                error_code=error_code,
                detail=message,
            ),
        )

    async def record_cancelled(
        self,
        key: SaleKey,
        owner: str,
        event_id: str,
        cancellation: Cancellation,
        found: bool,
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
        )

    async def record_voided(
        self, key: SaleKey, owner: str, event_id: str, reason: str
    ) -> SaleRecord:
        return await self._transition(
            schema.RECORD_VOIDED,
            key,
            owner,
            {},
            schema.audit_params("voided", "voided", event_id=event_id, detail=reason),
        )

    async def record_failed(
        self,
        key: SaleKey,
        owner: str,
        event_id: str,
        error_code: str,
        message: str,
    ) -> None:
        await self._transition(
            schema.RECORD_FAILED,
            key,
            owner,
            {"error_code": error_code},
            schema.audit_params(
                "dead_lettered", "failed", event_id=event_id, error_code=error_code, detail=message
            ),
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
        await self.pool.execute(_AUDIT.sql, *_AUDIT.args(params))

    async def get(self, key: SaleKey) -> SaleRecord | None:
        row = await self._fetchrow(_GET, schema.key_params(key))
        return schema.sale_from_row(row) if row is not None else None

    async def history(self, sale_id: str, tenant_id: str | None = None) -> list[AuditEntry]:
        stmt = _HISTORY_ALL if tenant_id is None else _HISTORY_TENANT
        rows = await self.pool.fetch(
            stmt.sql, *stmt.args({"sale_id": sale_id, "tenant_id": tenant_id})
        )
        return [schema.audit_from_row(row) for row in rows]

    async def state_counts(self, since: datetime) -> list[tuple[str, SaleState, int]]:
        rows = await self.pool.fetch(_STATE_COUNTS.sql, *_STATE_COUNTS.args({"since": since}))
        return [(r["tenant_id"], SaleState(r["state"]), int(r["n"])) for r in rows]

    async def uninvoiced(self, older_than: datetime, limit: int = 100) -> list[SaleRecord]:
        rows = await self.pool.fetch(
            _UNINVOICED.sql, *_UNINVOICED.args({"older_than": older_than, "limit": limit})
        )
        return [schema.sale_from_row(r) for r in rows]

    async def load_connection_states(self) -> list[ConnectionState]:
        rows = await self.pool.fetch(_LOAD_CONNECTIONS.sql)
        return [schema.connection_from_row(row) for row in rows]

    async def save_connection_state(self, state: ConnectionState) -> None:
        params = schema.connection_params(state)
        await self.pool.execute(_SAVE_CONNECTION.sql, *_SAVE_CONNECTION.args(params))
