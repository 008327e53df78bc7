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
from typing import Any, Literal

import structlog
from pydantic import SecretStr, ValidationError

from handlers.ledger import ConnectionState
from handlers.messages import ConnectionStatus
from providers.base import TenantConnection
from providers.errors import CONNECTION_ERRORS, ErrorCode, InvoicingError
from worker import metrics

log = structlog.get_logger(__name__)

_SECRET_FIELDS = {"billingo": "api_key", "szamlazz": "agent_key"}


class ConnectionsFileError(Exception):
    pass


class KeyUnusable(ConnectionsFileError):
    """The tenant is configured but its key cannot be used as it stands (file missing or
    unreadable, variable unset, a character an HTTP header cannot carry). The tenant stays
    known, in connection ERROR, until the key is fixed; never ``unknown_tenant``."""


def _header_unsafe(value: str) -> str | None:
    """What in ``value`` an HTTP header (or the Agent's XML) cannot carry, named without the
    key itself; None when it is fine."""
    for char in value:
        if char in "\r\n":
            return "a line break"
        if ord(char) < 0x20 or ord(char) == 0x7F:
            return "a control character"
        if ord(char) > 0xFF:
            return "a character outside latin-1"
    return None


def _checked(tenant: str, source: str, value: str) -> str:
    problem = _header_unsafe(value)
    if problem is not None:
        raise KeyUnusable(
            f"tenant {tenant!r}: the key in {source} contains {problem}, which an HTTP header "
            "cannot carry (one key, on one line)"
        )
    return value


def _secret(tenant: str, table: dict[str, Any], name: str, base: Path, files: list[Path]) -> str:
    if isinstance(table.get(name), str) and table[name]:
        return _checked(tenant, name, str(table[name]))
    if isinstance(table.get(f"{name}_file"), str):
        path = Path(table[f"{name}_file"])
        path = path if path.is_absolute() else base / path
        # Watched even while missing: the poll notices when it appears.
        files.append(path)
        try:
            text = path.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError:
            raise KeyUnusable(
                f"tenant {tenant!r}: {name}_file {str(path)!r} is not UTF-8 text"
            ) from None
        except OSError as exc:
            raise KeyUnusable(
                f"tenant {tenant!r}: cannot read {name}_file {str(path)!r}: {exc.strerror}"
            ) from None
        if not text:
            raise KeyUnusable(f"tenant {tenant!r}: {name}_file {str(path)!r} is empty")
        return _checked(tenant, f"{name}_file {str(path)!r}", text)
    if isinstance(table.get(f"{name}_env"), str):
        value = os.environ.get(table[f"{name}_env"])
        if not value:
            raise KeyUnusable(
                f"tenant {tenant!r}: environment variable {table[f'{name}_env']!r} is not set"
            )
        return _checked(tenant, f"environment variable {table[f'{name}_env']!r}", value)
    raise ConnectionsFileError(f"tenant {tenant!r}: no {name}, {name}_file or {name}_env")


@dataclass(frozen=True, slots=True)
class ParsedConnections:
    #: Every tenant the file configures, including those whose key is unusable.
    tenants: dict[str, TenantConnection]
    #: One line per tenant that is not configured at all (unknown provider, bad fields).
    problems: list[str]
    #: Tenant → why its key cannot be used; such a tenant is in ``tenants`` with no key.
    unusable: dict[str, str]
    #: The secret files the tenants point to (read or not), so a caller can watch them.
    files: list[Path]


def parse_connections(text: str, base: Path) -> ParsedConnections:
    """All tenants of the file. A broken tenant never takes the others down with it; one whose
    key is unusable stays known (its sales are parked as a connection ERROR, not
    ``unknown_tenant``)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConnectionsFileError(f"not valid TOML: {exc}") from None
    parsed = ParsedConnections({}, [], {}, [])
    for tenant_id, table in (data.get("tenants") or {}).items():
        try:
            provider = table.get("provider")
            if provider not in _SECRET_FIELDS:
                raise ConnectionsFileError(
                    f"tenant {tenant_id!r}: provider must be billingo or szamlazz"
                )
            try:
                secret = _secret(tenant_id, table, _SECRET_FIELDS[provider], base, parsed.files)
            except KeyUnusable as exc:
                secret = ""
                parsed.unusable[tenant_id] = str(exc)
            fields = {k: v for k, v in table.items() if not k.startswith(_SECRET_FIELDS[provider])}
            parsed.tenants[tenant_id] = TenantConnection(
                tenant_id=tenant_id, secret=SecretStr(secret), **fields
            )
        except ConnectionsFileError as exc:
            parsed.problems.append(str(exc))
        except ValidationError as exc:
            parsed.unusable.pop(tenant_id, None)
            parsed.problems.append(f"tenant {tenant_id!r}: {exc.errors(include_input=False)}")
    return parsed


class BreakerError(InvoicingError):
    """The error a sale is parked with while its tenant's connection is in ERROR. It says
    nothing new about the connection: :meth:`ConnectionRegistry.assess` leaves the health as it
    is, so the stored message is never wrapped into itself once per parked sale."""

    def __init__(self, code: ErrorCode, health_message: str) -> None:
        super().__init__(
            code, f"connection is in ERROR ({health_message}); parked without a provider call"
        )
        #: The provider's own words from the call that failed, as stored in the health.
        self.health_message = health_message


@dataclass(frozen=True, slots=True)
class Health:
    status: str
    error_code: str | None
    message: str
    fingerprint: str


@dataclass(frozen=True, slots=True)
class HealthChange:
    conn: TenantConnection
    health: Health
    #: The announcement and the state to persist, when the status itself changed.
    event: ConnectionStatus | None
    state: ConnectionState | None


class ConnectionRegistry:
    """Current tenants, re-read on change, and each tenant's ACTIVE / ERROR state."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._mtime: tuple[tuple[float, int, int] | None, ...] | None = None
        self._secret_files: list[Path] = []
        self._tenants: dict[str, TenantConnection] = {}
        self._unusable: dict[str, str] = {}
        self._health: dict[str, Health] = {}
        #: False until the file was read once: without it every sale would be dead-lettered
        #: as unknown_tenant, so the worker does not consume until then.
        self.configured = False

    # -- the file ------------------------------------------------------------------------

    def _stamp(self) -> tuple[tuple[float, int, int] | None, ...]:
        """Changes when the file or any secret file it points to changes (a key rotated in
        ``api_key_file``, a missing one mounted; in Kubernetes the kubelet swaps a symlink, so
        stat follows links)."""
        stamps: list[tuple[float, int, int] | None] = []
        for path in (self.path, *self._secret_files):
            try:
                st = path.stat()
            except OSError:
                stamps.append(None)
                continue
            stamps.append((st.st_mtime, st.st_size, st.st_ino))
        return tuple(stamps)

    def load(self) -> bool:
        """Read the file; False when it cannot be read. A missing file (deleted, or not
        mounted yet) keeps the last good configuration: dropping it would dead-letter every
        sale as unknown_tenant."""
        stamp = self._stamp()
        try:
            text = self.path.read_text(encoding="utf-8")
        except OSError as exc:
            self._mtime = stamp
            log.error(
                "connections.file_missing",
                path=str(self.path),
                error=exc.strerror,
                kept_tenants=len(self._tenants),
                consuming=self.configured,
            )
            return False
        parsed = parse_connections(text, self.path.parent)
        for problem in parsed.problems:
            log.error("connections.tenant_invalid", problem=problem)
        for problem in parsed.unusable.values():
            log.error("connections.key_unusable", problem=problem)
        self._tenants, self._unusable = parsed.tenants, parsed.unusable
        self._secret_files = parsed.files
        self._mtime = self._stamp()
        self.configured = True
        for conn in self._tenants.values():
            self._export(conn, self._health.get(conn.tenant_id))
        log.info("connections.loaded", tenants=len(self._tenants))
        return True

    def reload_if_changed(self) -> list[TenantConnection]:
        """Re-read the file when it changed; returns the tenants whose configuration changed.
        A file that no longer parses, or is gone, is ignored (the last good configuration
        stays)."""
        stamp = self._stamp()
        if stamp == self._mtime:
            return []
        before = {t: c.fingerprint() for t, c in self._tenants.items()}
        try:
            if not self.load():
                return []
        except ConnectionsFileError as exc:
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

    def config_error(self, conn: TenantConnection) -> InvoicingError | None:
        """Why the tenant's key cannot be used as the file stands, if it cannot."""
        problem = self._unusable.get(conn.tenant_id)
        current = self._tenants.get(conn.tenant_id)
        if problem is None or current is None or current.fingerprint() != conn.fingerprint():
            return None
        return InvoicingError(ErrorCode.AUTH_FAILED, problem)

    def config_changes(self) -> list[HealthChange]:
        """The connection ERRORs the file itself causes (an unusable key), not yet announced."""
        changes = []
        for conn in self._tenants.values():
            error = self.config_error(conn)
            change = self.assess(conn, error) if error is not None else None
            if change is not None:
                changes.append(change)
        return changes

    def breaker_error(self, conn: TenantConnection) -> InvoicingError | None:
        config = self.config_error(conn)
        if config is not None:
            # No usable key to send: park at once, whether or not the ERROR is announced yet.
            return BreakerError(config.code, config.message)
        health = self._health.get(conn.tenant_id)
        if health is None or health.status != "ERROR" or health.fingerprint != conn.fingerprint():
            return None
        # The same key that failed would fail again: park the sale without another call.
        code = ErrorCode(health.error_code) if health.error_code else ErrorCode.AUTH_FAILED
        return BreakerError(code, health.message)

    def assess(self, conn: TenantConnection, error: InvoicingError | None) -> HealthChange | None:
        """What a provider call's outcome means for the tenant's health, without applying it:
        the caller publishes the announcement first and applies the change only once the
        broker confirmed it, so a failed publish cannot swallow a status change. The breaker's
        own error changes nothing: no provider was asked (and storing its text would nest the
        message one level deeper with every parked sale)."""
        if isinstance(error, BreakerError):
            return None
        if error is not None and error.code not in CONNECTION_ERRORS:
            return None
        new = Health(
            "ERROR" if error else "ACTIVE",
            str(error.code) if error else None,
            error.message if error else "connection works",
            conn.fingerprint(),
        )
        old = self._health.get(conn.tenant_id)
        if old == new:
            return None
        news = not (
            (old is not None and old.status == new.status and old.error_code == new.error_code)
            or (old is None and new.status == "ACTIVE")  # a tenant that simply works is no news
        )
        if not news:
            return HealthChange(conn, new, None, None)
        status: Literal["ACTIVE", "ERROR"] = "ERROR" if error else "ACTIVE"
        event = ConnectionStatus(
            causation_id=None,
            tenant_id=conn.tenant_id,
            provider=conn.provider,
            status=status,
            error_code=new.error_code,
            message=new.message,
        )
        state = ConnectionState(
            tenant_id=conn.tenant_id,
            provider=conn.provider,
            status=status,
            error_code=new.error_code,
            message=new.message,
            fingerprint=new.fingerprint,
            updated_at=datetime.now(UTC),
        )
        return HealthChange(conn, new, event, state)

    def apply(self, change: HealthChange) -> None:
        self._health[change.conn.tenant_id] = change.health
        self._export(change.conn, change.health)
        if change.event is not None:
            log.warning(
                "connection.status",
                tenant_id=change.conn.tenant_id,
                status=change.health.status,
                error_code=change.health.error_code,
            )

    def _export(self, conn: TenantConnection, health: Health | None) -> None:
        down = conn.tenant_id in self._unusable or (health is not None and health.status == "ERROR")
        metrics.connection_up.labels(conn.tenant_id, conn.provider).set(0 if down else 1)
