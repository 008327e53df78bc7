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

from worker.ledger import schema
from worker.ledger.base import TransitionLedger
from worker.ledger.model import SaleKey, SaleRecord

T = TypeVar("T")

_BUSY_TIMEOUT_MS = 30_000


class SqliteLedger(TransitionLedger):
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

    def _bind(self, params: dict[str, Any]) -> dict[str, Any]:
        """Times as fixed-width ISO text (compared as strings) and ``:now`` from this clock."""
        bound = {k: schema.iso(v) if isinstance(v, datetime) else v for k, v in params.items()}
        bound["now"] = schema.iso(self._now())
        return bound

    async def _execute(self, sql: str, params: dict[str, Any]) -> None:
        bound = self._bind(params)
        await self._write(lambda conn: conn.execute(sql, bound))

    async def _fetch_one(self, sql: str, params: dict[str, Any]) -> sqlite3.Row | None:
        bound = self._bind(params)
        row: sqlite3.Row | None = await self._run(lambda conn: conn.execute(sql, bound).fetchone())
        return row

    async def _fetch_all(self, sql: str, params: dict[str, Any]) -> list[sqlite3.Row]:
        bound = self._bind(params)
        return await self._run(lambda conn: conn.execute(sql, bound).fetchall())

    async def _transition_row(
        self, t: schema.Transition, params: dict[str, Any]
    ) -> sqlite3.Row | None:
        # The lease-checked UPDATE and the audit INSERT share one BEGIN IMMEDIATE transaction.
        bound = self._bind(params)
        update = schema.transition_update_sqlite(t)

        def run(conn: sqlite3.Connection) -> sqlite3.Row | None:
            row: sqlite3.Row | None = conn.execute(update, bound).fetchone()
            if row is None:
                return None  # not leased: the UPDATE matched nothing, so there is no audit
            if bound["a_provider"] is None:
                bound["a_provider"] = row["provider"]
            if bound["a_document_id"] is None:
                bound["a_document_id"] = row["document_id"]
            conn.execute(schema.AUDIT_INSERT, bound)
            return row

        return await self._write(run)

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
