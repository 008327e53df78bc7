"""The ledger's tables, their migrations, and what both backends share about rows and statements.

Migrations are ordered and applied automatically by ``Ledger.open()``: each backend takes a
lock (SQLite ``BEGIN IMMEDIATE``, PostgreSQL an advisory transaction lock), reads
``schema_version`` and applies the missing ones in one transaction, so several replicas starting
at once migrate exactly once. Never edit a released migration; append a new one.

The state-changing statements are written once, with ``:name`` parameters and ``:now`` for the
current time, and rendered per dialect (SQLite binds ``:now`` from Python; PostgreSQL uses the
server clock, so leases between replicas on different hosts compare against one clock).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal, Protocol, cast

from handlers.ledger import AuditEntry, ConnectionState, SaleKey, SaleRecord, SaleState
from providers.base import Cancellation, IssuedInvoice

Dialect = Literal["sqlite", "postgres"]


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    description: str
    sqlite: tuple[str, ...]
    postgres: tuple[str, ...]

    def statements(self, dialect: Dialect) -> tuple[str, ...]:
        return self.sqlite if dialect == "sqlite" else self.postgres


_SALES = """
CREATE TABLE IF NOT EXISTS sales (
    tenant_id TEXT NOT NULL,
    sale_id TEXT NOT NULL,
    invoice_generation INTEGER NOT NULL,
    state TEXT NOT NULL,
    provider TEXT,
    document_id TEXT,
    invoice_number TEXT,
    gross_total TEXT,
    currency TEXT,
    cancel_kind TEXT,
    cancel_document_id TEXT,
    cancel_invoice_number TEXT,
    issue_attempts INTEGER NOT NULL DEFAULT 0,
    issue_in_doubt BOOLEAN NOT NULL DEFAULT FALSE,
    cancel_attempts INTEGER NOT NULL DEFAULT 0,
    cancel_in_doubt BOOLEAN NOT NULL DEFAULT FALSE,
    last_error_code TEXT,
    created_at {ts} NOT NULL,
    updated_at {ts} NOT NULL,
    lease_owner TEXT,
    lease_until {ts},
    PRIMARY KEY (tenant_id, sale_id, invoice_generation)
)"""

_AUDIT = """
CREATE TABLE IF NOT EXISTS audit (
    id {id},
    at {ts} NOT NULL,
    tenant_id TEXT NOT NULL,
    sale_id TEXT NOT NULL,
    invoice_generation INTEGER NOT NULL,
    operation TEXT NOT NULL,
    outcome TEXT NOT NULL,
    event_id TEXT,
    error_code TEXT,
    provider TEXT,
    document_id TEXT,
    detail TEXT
)"""

# (sale_id, tenant_id) rather than (tenant_id, sale_id): serves history() with a tenant (both
# equalities) and without one (the leading column), with one index to maintain on the hot path.
_AUDIT_INDEX = "CREATE INDEX IF NOT EXISTS audit_sale_idx ON audit (sale_id, tenant_id, id)"

_CONNECTION_STATES = """
CREATE TABLE IF NOT EXISTS connection_states (
    tenant_id TEXT PRIMARY KEY,
    provider TEXT NOT NULL,
    status TEXT NOT NULL,
    error_code TEXT,
    message TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    updated_at {ts} NOT NULL
)"""

# Version 2. ``*_sent_at``: an in-doubt create or cancel is looked up no sooner than the grace
# after it was sent (a provider may commit a request whose client already gave up), whichever
# worker does the lookup. ``lease_worker`` + ``workers``: a lease whose holder stopped renewing
# its liveness may be taken over at once instead of after ``lease_until``.
_V2 = (
    "ALTER TABLE sales ADD COLUMN issue_sent_at {ts}",
    "ALTER TABLE sales ADD COLUMN cancel_sent_at {ts}",
    "ALTER TABLE sales ADD COLUMN lease_worker TEXT",
    """
CREATE TABLE IF NOT EXISTS workers (
    worker_id TEXT PRIMARY KEY,
    started_at {ts} NOT NULL,
    alive_until {ts} NOT NULL
)""",
)

_SQLITE = {"ts": "TEXT", "id": "INTEGER PRIMARY KEY AUTOINCREMENT"}
_POSTGRES = {"ts": "TIMESTAMPTZ", "id": "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"}

MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "sales, audit trail, connection states",
        sqlite=(
            _SALES.format(**_SQLITE),
            _AUDIT.format(**_SQLITE),
            _AUDIT_INDEX,
            _CONNECTION_STATES.format(**_SQLITE),
        ),
        postgres=(
            _SALES.format(**_POSTGRES),
            _AUDIT.format(**_POSTGRES),
            _AUDIT_INDEX,
            _CONNECTION_STATES.format(**_POSTGRES),
        ),
    ),
    Migration(
        2,
        "when each create / cancel was sent, which worker holds a lease, worker liveness",
        sqlite=tuple(m.format(**_SQLITE) for m in _V2),
        postgres=tuple(m.format(**_POSTGRES) for m in _V2),
    ),
)

SCHEMA_VERSION_TABLE = {
    "sqlite": (
        "CREATE TABLE IF NOT EXISTS schema_version ("
        "version INTEGER PRIMARY KEY, description TEXT NOT NULL, applied_at TEXT NOT NULL)"
    ),
    "postgres": (
        "CREATE TABLE IF NOT EXISTS schema_version ("
        "version INTEGER PRIMARY KEY, description TEXT NOT NULL, "
        "applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
    ),
}

# --------------------------------------------------------------------------- statements

SALE_COLUMNS = (
    "tenant_id",
    "sale_id",
    "invoice_generation",
    "state",
    "provider",
    "document_id",
    "invoice_number",
    "gross_total",
    "currency",
    "cancel_kind",
    "cancel_document_id",
    "cancel_invoice_number",
    "issue_attempts",
    "issue_in_doubt",
    "cancel_attempts",
    "cancel_in_doubt",
    "last_error_code",
    "created_at",
    "updated_at",
    "issue_sent_at",
    "cancel_sent_at",
)
SALE_SELECT = ", ".join(SALE_COLUMNS)

AUDIT_COLUMNS = (
    "at",
    "tenant_id",
    "sale_id",
    "invoice_generation",
    "operation",
    "outcome",
    "event_id",
    "error_code",
    "provider",
    "document_id",
    "detail",
)
AUDIT_SELECT = ", ".join(AUDIT_COLUMNS)

CONNECTION_COLUMNS = (
    "tenant_id",
    "provider",
    "status",
    "error_code",
    "message",
    "fingerprint",
    "updated_at",
)

KEY_WHERE = "tenant_id = :tenant_id AND sale_id = :sale_id AND invoice_generation = :generation"
LEASE_WHERE = "lease_owner = :owner AND lease_until >= :now"

#: States that keep a document (or must never get one); record_failed does not overwrite them.
_KEEP_ON_FAILURE = "state IN ('voided', 'voiding') OR document_id IS NOT NULL"


@dataclass(frozen=True, slots=True)
class Transition:
    """One lease-checked state change plus its audit entry.

    ``set_sql`` is the UPDATE's SET list. The audit entry takes ``:a_operation``,
    ``:a_outcome``, ``:event_id``, ``:a_error_code``, ``:a_detail`` from parameters and its
    provider / document from ``:a_provider`` / ``:a_document_id`` when given, else from the row.
    """

    set_sql: str


START_ISSUE = Transition(
    "state = 'pending', provider = :provider, issue_attempts = issue_attempts + 1, "
    "issue_in_doubt = TRUE, issue_sent_at = :now"
)
# A send that provably created nothing (refused connection, 4xx, 429) does not count towards
# max_provider_attempts: the cap is on sends that may have produced a document. It clears the
# doubt only if no earlier send is in doubt (:was_in_doubt): a lookup that missed a slow,
# still-running create must not turn into a create without a lookup next time.
ISSUE_FAILED = Transition(
    "last_error_code = :error_code, issue_in_doubt = (:in_doubt OR :was_in_doubt), "
    "issue_attempts = issue_attempts - CASE WHEN :in_doubt THEN 0 ELSE 1 END"
)
RECORD_ISSUED = Transition(
    "state = 'issued', provider = :provider, document_id = :document_id, "
    "invoice_number = :invoice_number, gross_total = :gross_total, currency = :currency, "
    "issue_in_doubt = FALSE, last_error_code = NULL"
)
START_CANCEL = Transition(
    "state = 'cancel_pending', cancel_attempts = cancel_attempts + 1, cancel_in_doubt = TRUE, "
    "cancel_sent_at = :now"
)
CANCEL_FAILED = Transition(
    "last_error_code = :error_code, cancel_in_doubt = (:in_doubt OR :was_in_doubt), "
    "cancel_attempts = cancel_attempts - CASE WHEN :in_doubt THEN 0 ELSE 1 END"
)
RECORD_CANCELLED = Transition(
    "state = 'cancelled', cancel_kind = :cancel_kind, cancel_document_id = :cancel_document_id, "
    "cancel_invoice_number = :cancel_invoice_number, cancel_in_doubt = FALSE, "
    "last_error_code = NULL"
)
RECORD_VOIDED = Transition("state = 'voided'")
RECORD_VOIDING = Transition("state = 'voiding'")
RECORD_FAILED = Transition(
    f"state = CASE WHEN {_KEEP_ON_FAILURE} THEN state ELSE 'failed' END, "
    "last_error_code = :error_code"
)

#: Appended to a terminal transition's SET list when the caller is done with the sale: the
#: lease ends in the same statement that records the outcome (the UPDATE's WHERE still checks
#: the caller held it), which saves the separate RELEASE write.
_END_LEASE = ", lease_owner = NULL, lease_until = NULL, lease_worker = NULL"


@functools.cache
def releasing(t: Transition) -> Transition:
    """``t`` that also ends the caller's lease, atomically with the state change."""
    return Transition(t.set_sql + _END_LEASE)


_PARAM = re.compile(r"(?<![:\w]):([a-z_]+)\b")


def render_postgres(sql: str) -> tuple[str, tuple[str, ...]]:
    """``:name`` → ``$n`` (``:now`` → the server's ``now()``); returns the parameter order."""
    names: list[str] = []

    def sub(match: re.Match[str]) -> str:
        name = match.group(1)
        if name == "now":
            return "now()"
        if name not in names:
            names.append(name)
        return f"${names.index(name) + 1}"

    return _PARAM.sub(sub, sql), tuple(names)


def transition_sql_postgres(t: Transition) -> tuple[str, tuple[str, ...]]:
    """One statement: the lease-checked UPDATE and the audit INSERT, atomic, one round trip."""
    sql = f"""
WITH u AS (
    UPDATE sales SET {t.set_sql}, updated_at = :now
    WHERE {KEY_WHERE} AND {LEASE_WHERE}
    RETURNING *
), a AS (
    INSERT INTO audit ({AUDIT_SELECT})
    SELECT u.updated_at, u.tenant_id, u.sale_id, u.invoice_generation, :a_operation,
           :a_outcome, :event_id, :a_error_code, COALESCE(:a_provider, u.provider),
           COALESCE(:a_document_id, u.document_id), :a_detail
    FROM u
)
SELECT {SALE_SELECT} FROM u"""
    return render_postgres(sql)


def transition_update_sqlite(t: Transition) -> str:
    """The UPDATE half for SQLite; the audit row is inserted in the same transaction."""
    return (
        f"UPDATE sales SET {t.set_sql}, updated_at = :now "
        f"WHERE {KEY_WHERE} AND {LEASE_WHERE} RETURNING {SALE_SELECT}"
    )


AUDIT_INSERT = (
    f"INSERT INTO audit ({AUDIT_SELECT}) VALUES (:now, :tenant_id, :sale_id, :generation, "
    ":a_operation, :a_outcome, :event_id, :a_error_code, :a_provider, :a_document_id, :a_detail)"
)

#: A lease can be taken when nobody holds it, when it expired, or when its holder is known to
#: be dead: a worker that stopped renewing its liveness row (SIGKILL, lost host) holds nothing,
#: so a crashed worker's sales are taken over in seconds, not after ``lease_until``. A lease
#: without a worker (written before migration 2) waits for its expiry as it always did.
_LEASE_HOLDER_DEAD = (
    "s.lease_worker IS NOT NULL AND NOT EXISTS (SELECT 1 FROM workers w "
    "WHERE w.worker_id = s.lease_worker AND w.alive_until >= :now)"
)

ACQUIRE = f"""
INSERT INTO sales AS s (tenant_id, sale_id, invoice_generation, state, created_at, updated_at,
                        lease_owner, lease_until, lease_worker)
VALUES (:tenant_id, :sale_id, :generation, 'new', :now, :now, :owner, :until, :worker)
ON CONFLICT (tenant_id, sale_id, invoice_generation) DO UPDATE
SET lease_owner = excluded.lease_owner, lease_until = excluded.lease_until,
    lease_worker = excluded.lease_worker
WHERE s.lease_owner IS NULL OR s.lease_until < :now OR s.lease_owner = excluded.lease_owner
   OR {_LEASE_HOLDER_DEAD}
RETURNING {SALE_SELECT}"""

#: When a busy sale's lease can next be taken: its expiry, or its holder's liveness end,
#: whichever comes first (so a deferral comes back in time for a takeover).
LEASE_FREE_AT = f"""
SELECT s.lease_until AS lease_until, w.alive_until AS alive_until
FROM sales s LEFT JOIN workers w ON w.worker_id = s.lease_worker
WHERE s.{KEY_WHERE.replace(" AND ", " AND s.")}"""

RELEASE = (
    f"UPDATE sales SET lease_owner = NULL, lease_until = NULL, lease_worker = NULL "
    f"WHERE {KEY_WHERE} AND lease_owner = :owner"
)

#: Liveness: a worker renews its row while it runs; ``alive_until`` ends its claim.
HEARTBEAT = """
INSERT INTO workers (worker_id, started_at, alive_until) VALUES (:worker, :now, :until)
ON CONFLICT (worker_id) DO UPDATE SET alive_until = excluded.alive_until"""
RETIRE = "DELETE FROM workers WHERE worker_id = :worker"
#: Rows of workers dead for a day: kept that long only so ``history`` readers can see them.
FORGET_DEAD_WORKERS = "DELETE FROM workers WHERE alive_until < :before"
GET = f"SELECT {SALE_SELECT} FROM sales WHERE {KEY_WHERE}"
GENERATIONS = (
    f"SELECT {SALE_SELECT} FROM sales WHERE tenant_id = :tenant_id AND sale_id = :sale_id "
    "ORDER BY invoice_generation"
)
HISTORY_ALL = f"SELECT {AUDIT_SELECT} FROM audit WHERE sale_id = :sale_id ORDER BY at, id"
HISTORY_TENANT = (
    f"SELECT {AUDIT_SELECT} FROM audit WHERE sale_id = :sale_id AND tenant_id = :tenant_id "
    "ORDER BY at, id"
)
STATE_COUNTS = (
    "SELECT tenant_id, state, COUNT(*) AS n FROM sales WHERE created_at >= :since "
    "GROUP BY tenant_id, state ORDER BY tenant_id, state"
)
UNINVOICED = (
    f"SELECT {SALE_SELECT} FROM sales WHERE state IN ('new', 'pending', 'failed') "
    "AND created_at < :older_than ORDER BY created_at LIMIT :limit"
)
LOAD_CONNECTIONS = (
    f"SELECT {', '.join(CONNECTION_COLUMNS)} FROM connection_states ORDER BY tenant_id"
)
SAVE_CONNECTION = f"""
INSERT INTO connection_states ({", ".join(CONNECTION_COLUMNS)})
VALUES (:tenant_id, :provider, :status, :error_code, :message, :fingerprint, :updated_at)
ON CONFLICT (tenant_id) DO UPDATE SET provider = excluded.provider, status = excluded.status,
    error_code = excluded.error_code, message = excluded.message,
    fingerprint = excluded.fingerprint, updated_at = excluded.updated_at"""


def key_params(key: SaleKey) -> dict[str, Any]:
    return {
        "tenant_id": key.tenant_id,
        "sale_id": key.sale_id,
        "generation": key.invoice_generation,
    }


def audit_params(
    operation: str,
    outcome: str,
    *,
    event_id: str | None = None,
    error_code: str | None = None,
    provider: str | None = None,
    document_id: str | None = None,
    detail: str | None = None,
) -> dict[str, Any]:
    return {
        "a_operation": operation,
        "a_outcome": outcome,
        "event_id": event_id,
        "a_error_code": error_code,
        "a_provider": provider,
        "a_document_id": document_id,
        "a_detail": detail,
    }


def issued_values(provider: str, invoice: IssuedInvoice) -> dict[str, Any]:
    return {
        "provider": provider,
        "document_id": invoice.document_id,
        "invoice_number": invoice.invoice_number,
        # Money as text: Decimal round-trips exactly ("24990.00" stays "24990.00").
        "gross_total": str(invoice.gross_total),
        "currency": invoice.currency,
    }


def cancelled_values(cancellation: Cancellation) -> dict[str, Any]:
    return {
        "cancel_kind": cancellation.kind,
        "cancel_document_id": cancellation.document_id,
        "cancel_invoice_number": cancellation.invoice_number,
    }


def connection_params(state: ConnectionState) -> dict[str, Any]:
    return {
        "tenant_id": state.tenant_id,
        "provider": state.provider,
        "status": state.status,
        "error_code": state.error_code,
        "message": state.message,
        "fingerprint": state.fingerprint,
        "updated_at": to_utc(state.updated_at) or datetime.now(UTC),
    }


# --------------------------------------------------------------------------- rows


class Row(Protocol):
    """sqlite3.Row and asyncpg.Record both index by column name and iterate over values."""

    def __getitem__(self, key: str, /) -> Any: ...

    def __iter__(self) -> Iterator[Any]: ...


def to_utc(value: datetime | str | None) -> datetime | None:
    """An aware UTC datetime from a TIMESTAMPTZ value or SQLite's ISO text."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def iso(value: datetime) -> str:
    """Fixed-width UTC ISO text, so SQLite compares times correctly as strings."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    elif value.tzinfo is not UTC:
        value = value.astimezone(UTC)
    # isoformat with a UTC datetime and microseconds is exactly this fixed width, in a fifth
    # of strftime's time ("2026-11-21T16:13:23.198148+00:00").
    return value.isoformat(timespec="microseconds")


def sale_from_row(row: Row) -> SaleRecord:
    """A row of ``SALE_SELECT`` (every statement that returns a sale selects exactly those
    columns, in that order) → its record. Unpacked by position: it runs up to three times
    per sale, and name lookups on sqlite3.Row were most of its cost."""
    values: tuple[Any, ...] = tuple(row)
    (
        tenant_id,
        sale_id,
        generation,
        state,
        provider,
        document_id,
        invoice_number,
        gross,
        currency,
        cancel_kind,
        cancel_document_id,
        cancel_invoice_number,
        issue_attempts,
        issue_in_doubt,
        cancel_attempts,
        cancel_in_doubt,
        last_error_code,
        created_at,
        updated_at,
        issue_sent_at,
        cancel_sent_at,
    ) = values
    return SaleRecord(
        key=SaleKey(tenant_id, sale_id, int(generation)),
        state=SaleState(state),
        provider=provider,
        document_id=document_id,
        invoice_number=invoice_number,
        gross_total=Decimal(gross) if gross is not None else None,
        currency=currency,
        cancel_kind=cancel_kind,
        cancel_document_id=cancel_document_id,
        cancel_invoice_number=cancel_invoice_number,
        issue_attempts=int(issue_attempts),
        issue_in_doubt=bool(issue_in_doubt),
        cancel_attempts=int(cancel_attempts),
        cancel_in_doubt=bool(cancel_in_doubt),
        last_error_code=last_error_code,
        created_at=to_utc(created_at),
        updated_at=to_utc(updated_at),
        issue_sent_at=to_utc(issue_sent_at),
        cancel_sent_at=to_utc(cancel_sent_at),
    )


def audit_from_row(row: Row) -> AuditEntry:
    at = to_utc(row["at"])
    assert at is not None
    return AuditEntry(
        at=at,
        tenant_id=row["tenant_id"],
        sale_id=row["sale_id"],
        invoice_generation=int(row["invoice_generation"]),
        operation=row["operation"],
        outcome=row["outcome"],
        event_id=row["event_id"],
        error_code=row["error_code"],
        provider=row["provider"],
        document_id=row["document_id"],
        detail=row["detail"],
    )


def connection_from_row(row: Row) -> ConnectionState:
    return ConnectionState(
        tenant_id=row["tenant_id"],
        provider=row["provider"],
        status=cast(Literal["ACTIVE", "ERROR"], row["status"]),
        error_code=row["error_code"],
        message=row["message"],
        fingerprint=row["fingerprint"],
        updated_at=to_utc(row["updated_at"]),
    )
