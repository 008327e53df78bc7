"""The ledger: what makes issuing exactly-once (see :mod:`handlers.ledger`).

``open_ledger(settings.ledger_url)`` picks the backend by URL scheme; the caller then awaits
``ledger.open()`` (connect + migrate) and ``ledger.close()``.
"""

from __future__ import annotations

from handlers.ledger import (
    AuditEntry,
    ConnectionState,
    LeaseLost,
    Ledger,
    SaleKey,
    SaleRecord,
    SaleState,
)
from worker.ledger.history import format_history

__all__ = [
    "AuditEntry",
    "ConnectionState",
    "LeaseLost",
    "Ledger",
    "SaleKey",
    "SaleRecord",
    "SaleState",
    "format_history",
    "open_ledger",
    "sqlite_path",
]


def sqlite_path(url: str) -> str:
    """``sqlite:///relative/path`` → ``relative/path``, ``sqlite:////abs/path`` → ``/abs/path``,
    ``sqlite:///:memory:`` (or ``sqlite://``) → ``:memory:``."""
    if not url.startswith("sqlite://"):
        raise ValueError(f"not a sqlite URL: {url!r}")
    rest = url[len("sqlite://") :]
    if rest in ("", "/"):
        return ":memory:"
    if not rest.startswith("/"):
        raise ValueError(f"sqlite URL needs three slashes (sqlite:///path): {url!r}")
    path = rest[1:].split("?", 1)[0]
    if not path:
        raise ValueError(f"sqlite URL without a path: {url!r}")
    return path


def open_ledger(url: str) -> Ledger:
    """The ledger for ``INVOICING_LEDGER_URL``, not yet opened: await ``open()`` before use."""
    scheme = url.split(":", 1)[0].lower()
    if scheme == "sqlite":
        from worker.ledger.sqlite import SqliteLedger

        return SqliteLedger(sqlite_path(url))
    if scheme in ("postgresql", "postgres"):
        from worker.ledger.postgres import PostgresLedger

        return PostgresLedger(url)
    raise ValueError(f"unsupported ledger URL scheme {scheme!r} (use sqlite:/// or postgresql://)")
