"""The PostgreSQL ledger: several worker replicas share one database.

Every method is a single statement (one round trip, its own implicit transaction, prepared
once per connection by asyncpg's statement cache): a state change is a CTE that updates the
row only while the caller holds the lease and appends the audit entry in the same statement, so
both commit together or not at all, and the method returns after the commit. Lease times come
from the server's clock, so replicas on different hosts never compare clocks with each other.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import asyncpg  # type: ignore[import-untyped]

from handlers.ledger import SaleKey, SaleRecord
from worker.ledger import schema
from worker.ledger.base import TransitionLedger, outage

#: What an unreachable database looks like (refused or lost connections, an admin shutdown or
#: recovery, no disk or connection slots left, the command timeout): ledger_unavailable.
_OUTAGES: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    # A connection terminated while a query was on it can leave asyncpg's protocol state
    # confused ("cannot switch to state 11; another operation is in progress"): the same
    # outage, seen from the client (the pool replaces the connection).
    asyncpg.InternalClientError,
    OSError,
    TimeoutError,
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


_COMMAND_TIMEOUT_SECONDS = 10.0
_ACQUIRE = schema.ACQUIRE.replace(":until", "now() + make_interval(secs => :lease_seconds)")
_HEARTBEAT = schema.HEARTBEAT.replace(":until", "now() + make_interval(secs => :ttl)")
_FORGET_DEAD_WORKERS = schema.FORGET_DEAD_WORKERS.replace(":before", "now() - interval '1 day'")


@functools.cache
def _prepared(sql: str) -> _Statement:
    return _Statement(sql)


@functools.cache
def _prepared_transition(t: schema.Transition) -> _Statement:
    return _Statement.transition(t)


async def _no_session_reset(conn: Any) -> None:
    """The pool's reset hook: nothing beyond what asyncpg always does (roll back an open
    transaction, drop listeners).

    asyncpg's default reset sends ``SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *;
    RESET ALL`` every time a connection goes back to the pool, i.e. a second round trip after
    each one-statement ledger call. The pool is private to this ledger and its statements leave
    no session state behind: no session advisory locks (migrations use the transaction-scoped
    one), cursors, LISTENs or SETs (``search_path`` is a startup parameter, which RESET ALL
    would keep anyway)."""


class PostgresLedger(TransitionLedger):
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
        super().__init__()
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

    async def _execute(self, sql: str, params: dict[str, Any]) -> None:
        stmt = _prepared(sql)
        with outage(_OUTAGES):
            await self.pool.execute(stmt.sql, *stmt.args(params))

    async def _fetch_one(self, sql: str, params: dict[str, Any]) -> Any:
        stmt = _prepared(sql)
        with outage(_OUTAGES):
            return await self.pool.fetchrow(stmt.sql, *stmt.args(params))

    async def _fetch_all(self, sql: str, params: dict[str, Any]) -> list[Any]:
        stmt = _prepared(sql)
        with outage(_OUTAGES):
            rows: list[Any] = await self.pool.fetch(stmt.sql, *stmt.args(params))
        return rows

    async def _transition_row(self, t: schema.Transition, params: dict[str, Any]) -> Any:
        # One statement: the UPDATE checks the lease and the audit INSERT rides in the same
        # CTE, so both commit together (or neither does); no row means the lease is not held.
        stmt = _prepared_transition(t)
        with outage(_OUTAGES):
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
            reset=_no_session_reset,
            # A database that stops answering must fail the call, not hold the sale's lease
            # (and the attempt's deadline) forever.
            command_timeout=_COMMAND_TIMEOUT_SECONDS,
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

    # ------------------------------------------------------------------ leases

    async def _acquire(
        self, key: SaleKey, owner: str, lease_seconds: float, worker: str | None
    ) -> SaleRecord | None:
        params = {
            **schema.key_params(key),
            "owner": owner,
            "worker": worker,
            "lease_seconds": float(lease_seconds),
        }
        row = await self._fetch_one(_ACQUIRE, params)
        return schema.sale_from_row(row) if row is not None else None

    async def heartbeat(self, worker: str, ttl_seconds: float) -> None:
        # The server's clock, like every lease: replicas on other hosts compare against it.
        await self._execute(_HEARTBEAT, {"worker": worker, "ttl": float(ttl_seconds)})
        await self._execute(_FORGET_DEAD_WORKERS, {})
