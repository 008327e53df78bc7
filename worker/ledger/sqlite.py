"""The SQLite ledger: one file, one worker process (or a few on one host).

All sqlite3 calls run on one dedicated thread with one connection, so the event loop never
blocks on disk and the connection is never shared between threads. Every write is one
``BEGIN IMMEDIATE`` transaction (the write lock is taken up front, so two processes on the same
file queue on ``busy_timeout`` instead of failing on a lock upgrade) and a method returns only
after its COMMIT.

Durability: WAL with ``synchronous=NORMAL``. A committed transaction survives the worker
process crashing or being killed (the WAL is in the OS page cache and is replayed on the next
open); only an OS crash or power loss may lose the last transactions before a checkpoint.
That is the failure model of a single-host deployment; use PostgreSQL for more.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

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

T = TypeVar("T")

_BUSY_TIMEOUT_MS = 30_000


class SqliteLedger:
    def __init__(self, path: str) -> None:
        #: A file path, or ":memory:" (tests; gone when the ledger closes).
        self.path = path
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None

    # ------------------------------------------------------------------ plumbing

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        executor, conn = self._executor, self._conn
        if executor is None or conn is None:
            raise RuntimeError("ledger is not open")
        return await asyncio.get_running_loop().run_in_executor(executor, fn, conn)

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def tx(conn: sqlite3.Connection) -> T:
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(conn)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return result

        return await self._run(tx)

    @staticmethod
    def _now() -> datetime:
        return datetime.now(UTC)

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        if self._conn is not None:
            return
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-sqlite")
        loop = asyncio.get_running_loop()
        try:
            self._conn = await loop.run_in_executor(self._executor, self._connect)
            await self._write(self._migrate)
        except BaseException:
            await self.close()
            raise

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: no implicit transactions; every write says BEGIN IMMEDIATE.
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA journal_mode = WAL")
        # NORMAL is crash-safe for process crashes in WAL mode (see the module docstring).
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
        return conn

    @staticmethod
    def _migrate(conn: sqlite3.Connection) -> None:
        conn.execute(schema.SCHEMA_VERSION_TABLE["sqlite"])
        applied = {row[0] for row in conn.execute("SELECT version FROM schema_version")}
        for migration in schema.MIGRATIONS:
            if migration.version in applied:
                continue
            for statement in migration.statements("sqlite"):
                conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_version (version, description, applied_at) VALUES (?, ?, ?)",
                (migration.version, migration.description, schema.iso(datetime.now(UTC))),
            )

    async def close(self) -> None:
        executor, conn = self._executor, self._conn
        self._executor = self._conn = None
        if executor is None:
            return
        if conn is not None:
            await asyncio.get_running_loop().run_in_executor(executor, conn.close)
        executor.shutdown(wait=True)

    async def schema_version(self) -> int:
        def read(conn: sqlite3.Connection) -> int:
            row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
            return int(row[0] or 0)

        return await self._run(read)

    # ------------------------------------------------------------------ leases

    async def acquire(self, key: SaleKey, owner: str, lease_seconds: float) -> SaleRecord | None:
        now = self._now()
        params = {
            **schema.key_params(key),
            "owner": owner,
            "now": schema.iso(now),
            "until": schema.iso(now + timedelta(seconds=lease_seconds)),
        }

        def run(conn: sqlite3.Connection) -> SaleRecord | None:
            row = conn.execute(schema.ACQUIRE, params).fetchone()
            return schema.sale_from_row(row) if row is not None else None

        return await self._write(run)

    async def release(self, key: SaleKey, owner: str) -> None:
        params = {**schema.key_params(key), "owner": owner}
        await self._write(lambda conn: conn.execute(schema.RELEASE, params))

    # ------------------------------------------------------------------ transitions

    async def _transition(
        self,
        t: schema.Transition,
        key: SaleKey,
        owner: str,
        values: dict[str, Any],
        audit: dict[str, Any],
    ) -> SaleRecord:
        params = {
            **values,
            **audit,
            **schema.key_params(key),
            "owner": owner,
            "now": schema.iso(self._now()),
        }
        update = schema.transition_update_sqlite(t)

        def run(conn: sqlite3.Connection) -> SaleRecord:
            row = conn.execute(update, params).fetchone()
            if row is None:
                raise LeaseLost(f"{key.external_key} is not leased by {owner}")
            if params["a_provider"] is None:
                params["a_provider"] = row["provider"]
            if params["a_document_id"] is None:
                params["a_document_id"] = row["document_id"]
            conn.execute(schema.AUDIT_INSERT, params)
            return schema.sale_from_row(row)

        return await self._write(run)

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
            "now": schema.iso(self._now()),
        }
        await self._write(lambda conn: conn.execute(schema.AUDIT_INSERT, params))

    async def get(self, key: SaleKey) -> SaleRecord | None:
        params = schema.key_params(key)

        def run(conn: sqlite3.Connection) -> SaleRecord | None:
            row = conn.execute(schema.GET, params).fetchone()
            return schema.sale_from_row(row) if row is not None else None

        return await self._run(run)

    async def history(self, sale_id: str, tenant_id: str | None = None) -> list[AuditEntry]:
        sql = schema.HISTORY_ALL if tenant_id is None else schema.HISTORY_TENANT
        params = {"sale_id": sale_id, "tenant_id": tenant_id}

        def run(conn: sqlite3.Connection) -> list[AuditEntry]:
            return [schema.audit_from_row(row) for row in conn.execute(sql, params)]

        return await self._run(run)

    async def state_counts(self, since: datetime) -> list[tuple[str, SaleState, int]]:
        params = {"since": schema.iso(since)}

        def run(conn: sqlite3.Connection) -> list[tuple[str, SaleState, int]]:
            rows = conn.execute(schema.STATE_COUNTS, params)
            return [(r["tenant_id"], SaleState(r["state"]), int(r["n"])) for r in rows]

        return await self._run(run)

    async def uninvoiced(self, older_than: datetime, limit: int = 100) -> list[SaleRecord]:
        params = {"older_than": schema.iso(older_than), "limit": limit}

        def run(conn: sqlite3.Connection) -> list[SaleRecord]:
            return [schema.sale_from_row(r) for r in conn.execute(schema.UNINVOICED, params)]

        return await self._run(run)

    async def load_connection_states(self) -> list[ConnectionState]:
        def run(conn: sqlite3.Connection) -> list[ConnectionState]:
            return [
                schema.connection_from_row(row) for row in conn.execute(schema.LOAD_CONNECTIONS)
            ]

        return await self._run(run)

    async def save_connection_state(self, state: ConnectionState) -> None:
        params = schema.connection_params(state)
        params["updated_at"] = schema.iso(params["updated_at"])
        await self._write(lambda conn: conn.execute(schema.SAVE_CONNECTION, params))
