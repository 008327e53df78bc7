"""The tenants' provider connections (CONTRACTS §3) and their health (ACTIVE / ERROR).

The file is re-read when it changes, so a rotated key works without a restart. Health is kept
per tenant, exported as ``invoicing_connection_up`` and announced as ``connection.status``
events; it is persisted in the ledger so an ERROR survives a restart.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
from pydantic import SecretStr, ValidationError

from handlers.errors import CONNECTION_ERRORS, ErrorCode, InvoicingError
from handlers.messages import ConnectionStatus
from providers.base import TenantConnection
from worker import metrics
from worker.ledger.model import ConnectionState

log = structlog.get_logger(__name__)

_SECRET_FIELDS = {"billingo": "api_key", "szamlazz": "agent_key"}


class ConnectionsFileError(Exception):
    pass


def _secret(tenant: str, table: dict[str, Any], name: str, base: Path) -> str:
    if isinstance(table.get(name), str) and table[name]:
        return str(table[name])
    if isinstance(table.get(f"{name}_file"), str):
        path = Path(table[f"{name}_file"])
        path = path if path.is_absolute() else base / path
        try:
            return path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConnectionsFileError(
                f"tenant {tenant!r}: cannot read {name}_file {str(path)!r}: {exc.strerror}"
            ) from None
    if isinstance(table.get(f"{name}_env"), str):
        value = os.environ.get(table[f"{name}_env"])
        if not value:
            raise ConnectionsFileError(
                f"tenant {tenant!r}: environment variable {table[f'{name}_env']!r} is not set"
            )
        return value
    raise ConnectionsFileError(f"tenant {tenant!r}: no {name}, {name}_file or {name}_env")


def parse_connections(text: str, base: Path) -> tuple[dict[str, TenantConnection], list[str]]:
    """All tenants that are configured correctly, and one problem line per tenant that is not.
    A broken tenant never takes the others down with it."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConnectionsFileError(f"not valid TOML: {exc}") from None
    tenants: dict[str, TenantConnection] = {}
    problems: list[str] = []
    for tenant_id, table in (data.get("tenants") or {}).items():
        try:
            provider = table.get("provider")
            if provider not in _SECRET_FIELDS:
                raise ConnectionsFileError(
                    f"tenant {tenant_id!r}: provider must be billingo or szamlazz"
                )
            secret = _secret(tenant_id, table, _SECRET_FIELDS[provider], base)
            fields = {k: v for k, v in table.items() if not k.startswith(_SECRET_FIELDS[provider])}
            tenants[tenant_id] = TenantConnection(
                tenant_id=tenant_id, secret=SecretStr(secret), **fields
            )
        except ConnectionsFileError as exc:
            problems.append(str(exc))
        except ValidationError as exc:
            problems.append(f"tenant {tenant_id!r}: {exc.errors(include_input=False)}")
    return tenants, problems


def load_connections(path: Path) -> dict[str, TenantConnection]:
    tenants, problems = parse_connections(path.read_text(encoding="utf-8"), path.parent)
    for problem in problems:
        log.error("connections.tenant_invalid", problem=problem)
    return tenants


@dataclass(frozen=True, slots=True)
class Health:
    status: str
    error_code: str | None
    message: str
    fingerprint: str


class ConnectionRegistry:
    """Current tenants, re-read on change, and each tenant's ACTIVE / ERROR state."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._mtime: tuple[float, int] | None = None
        self._tenants: dict[str, TenantConnection] = {}
        self._health: dict[str, Health] = {}

    # -- the file ------------------------------------------------------------------------

    def _stamp(self) -> tuple[float, int] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return (st.st_mtime, st.st_size)

    def load(self) -> None:
        self._tenants = load_connections(self.path) if self.path.exists() else {}
        self._mtime = self._stamp()
        if not self.path.exists():
            log.warning("connections.file_missing", path=str(self.path))
        for conn in self._tenants.values():
            self._export(conn, self._health.get(conn.tenant_id))
        log.info("connections.loaded", tenants=len(self._tenants))

    def reload_if_changed(self) -> list[TenantConnection]:
        """Re-read the file when it changed; returns the tenants whose configuration changed.
        A file that no longer parses is ignored (the last good configuration stays)."""
        stamp = self._stamp()
        if stamp == self._mtime:
            return []
        before = {t: c.fingerprint() for t, c in self._tenants.items()}
        try:
            self.load()
        except (ConnectionsFileError, OSError) as exc:
            log.error("connections.reload_failed", error=str(exc))
            self._mtime = stamp
            return []
        changed = [c for t, c in self._tenants.items() if before.get(t) != c.fingerprint()]
        log.info("connections.reloaded", changed=[c.tenant_id for c in changed])
        return changed

    def get(self, tenant_id: str) -> TenantConnection | None:
        return self._tenants.get(tenant_id)

    def tenants(self) -> list[TenantConnection]:
        return list(self._tenants.values())

    # -- health --------------------------------------------------------------------------

    def restore(self, states: list[ConnectionState]) -> None:
        """Health persisted by an earlier run, so an ERROR survives a restart."""
        for state in states:
            self._health[state.tenant_id] = Health(
                state.status, state.error_code, state.message, state.fingerprint
            )
            conn = self._tenants.get(state.tenant_id)
            if conn is not None:
                self._export(conn, self._health[state.tenant_id])

    def health(self, tenant_id: str) -> Health | None:
        return self._health.get(tenant_id)

    def breaker_error(self, conn: TenantConnection) -> InvoicingError | None:
        health = self._health.get(conn.tenant_id)
        if health is None or health.status != "ERROR" or health.fingerprint != conn.fingerprint():
            return None
        # The same key that failed would fail again: park the sale without another call.
        code = ErrorCode(health.error_code) if health.error_code else ErrorCode.AUTH_FAILED
        return InvoicingError(
            code, f"connection is in ERROR ({health.message}); parked without a provider call"
        )

    def mark(
        self, conn: TenantConnection, error: InvoicingError | None
    ) -> tuple[ConnectionStatus, ConnectionState] | None:
        """Record the outcome of a provider call; returns the event and state to persist when
        the tenant's status changed."""
        if error is not None and error.code not in CONNECTION_ERRORS:
            return None
        new = Health(
            "ERROR" if error else "ACTIVE",
            str(error.code) if error else None,
            error.message if error else "connection works",
            conn.fingerprint(),
        )
        old = self._health.get(conn.tenant_id)
        self._health[conn.tenant_id] = new
        self._export(conn, new)
        if old is not None and old.status == new.status and old.error_code == new.error_code:
            return None
        if old is None and new.status == "ACTIVE":
            return None  # a tenant that simply works is no news
        log.warning(
            "connection.status",
            tenant_id=conn.tenant_id,
            status=new.status,
            error_code=new.error_code,
        )
        event = ConnectionStatus(
            causation_id=None,
            tenant_id=conn.tenant_id,
            provider=conn.provider,
            status="ERROR" if error else "ACTIVE",
            error_code=new.error_code,
            message=new.message,
        )
        state = ConnectionState(
            tenant_id=conn.tenant_id,
            provider=conn.provider,
            status="ERROR" if error else "ACTIVE",
            error_code=new.error_code,
            message=new.message,
            fingerprint=new.fingerprint,
            updated_at=datetime.now(UTC),
        )
        return event, state

    @staticmethod
    def _export(conn: TenantConnection, health: Health | None) -> None:
        up = 0 if health is not None and health.status == "ERROR" else 1
        metrics.connection_up.labels(conn.tenant_id, conn.provider).set(up)
