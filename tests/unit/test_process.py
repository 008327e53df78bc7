"""One delivery through handle_delivery: the attempt ends by its deadline, below the lease,
whatever the provider does, and what it started stays in doubt for whoever comes next."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from handlers.ledger import LedgerUnavailable, SaleKey
from providers.base import BeforeSend, InvoiceDraft, IssuedInvoice, TenantConnection, no_hook
from providers.errors import ErrorCode, InvoicingError
from tests.unit.test_sale_doubt import ScriptedProvider
from worker.connections import ConnectionRegistry
from worker.devtools.samples import paid_event
from worker.ledger.sqlite import SqliteLedger
from worker.logging import register_secrets
from worker.process import Delivery, Runtime, decide_delivery, handle_delivery
from worker.settings import Settings
from worker.topology import Names


class NeverAnswers(ScriptedProvider):
    """A create that the provider never answers (and the client never times out on)."""

    async def issue(
        self, conn: TenantConnection, draft: InvoiceDraft, before_send: BeforeSend = no_hook
    ) -> IssuedInvoice:
        await before_send()
        self.calls.append("issue")
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


class Message:
    def __init__(self, body: bytes) -> None:
        self.body = body
        self.headers: dict[str, Any] = {}
        self.routing_key = "sale.paid"
        self.message_id = "m-1"


@pytest.fixture
async def runtime(tmp_path: Path) -> AsyncIterator[Runtime]:
    # lease 1.5 s → the attempt's deadline is 1.2 s; the provider timeout would be 0.3 s but
    # this provider ignores it (as a stuck rate-limit wait or database call would).
    rt = await _runtime_with(
        tmp_path,
        SqliteLedger(str(tmp_path / "ledger.db")),
        NeverAnswers(),
        lease_seconds=1.5,
        provider_timeout_seconds=0.3,
    )
    await rt.liveness.renew()
    yield rt
    await rt.ledger.close()


async def test_an_attempt_ends_by_its_deadline_below_the_lease(runtime: Runtime) -> None:
    body = orjson.dumps(paid_event("hotel", "S-STUCK"))
    message = Message(body)
    delivery = Delivery(message, runtime.attempt(message), time.monotonic())  # type: ignore[arg-type]
    started = time.monotonic()
    result = await handle_delivery(delivery, runtime)
    took = time.monotonic() - started

    assert isinstance(result, InvoicingError)
    assert result.code is ErrorCode.TIMEOUT
    assert took < runtime.settings.lease_seconds  # over before anyone may take the sale
    assert took >= runtime.settings.attempt_deadline_seconds - 0.05
    record = await runtime.ledger.get(SaleKey("hotel", "S-STUCK", 1))
    assert record is not None
    # The create was sent and never answered: whoever comes next waits out the grace and
    # looks it up first.
    assert record.issue_in_doubt
    assert record.issue_sent_at is not None


# ---- issue 13: an internal error is bounded, a ledger outage is our own ------------------


class OverflowingLedger(SqliteLedger):
    """A bug below the handler: a value the store cannot take (as 2**63 was for SQLite)."""

    async def acquire(self, *args: Any, **kwargs: Any) -> Any:
        raise OverflowError("Python int too large to convert to SQLite INTEGER (sekrit-key-1)")


class BrokenDiskLedger(SqliteLedger):
    """The store itself failing, through the backend's own write path."""

    async def _acquire(self, *args: Any, **kwargs: Any) -> Any:
        def run(conn: Any) -> None:
            error = sqlite3.OperationalError("disk I/O error")
            error.sqlite_errorcode = sqlite3.SQLITE_IOERR  # as sqlite3 sets it
            raise error

        return await self._write(run)


async def _runtime_with(
    tmp_path: Path,
    ledger: SqliteLedger,
    billingo: ScriptedProvider | None = None,
    **settings: Any,
) -> Runtime:
    connections = tmp_path / "connections.toml"
    connections.write_text(
        '[tenants."hotel"]\nprovider = "billingo"\napi_key = "sekrit-key-1"\nblock_id = 1\n',
        encoding="utf-8",
    )
    registry = ConnectionRegistry(connections)
    registry.load()
    await ledger.open()
    config = Settings(connections_file=str(connections), **settings)
    providers = {
        "billingo": billingo or ScriptedProvider(),
        "szamlazz": ScriptedProvider(name="szamlazz"),
    }
    return Runtime(config, Names.from_settings(config), ledger, providers, registry)  # type: ignore[arg-type]


async def _attempt(rt: Runtime, body: bytes, headers: dict[str, Any]) -> Any:
    message = Message(body)
    message.headers = headers
    delivery = Delivery(message, rt.attempt(message), time.monotonic())  # type: ignore[arg-type]
    delivery.result = await handle_delivery(delivery, rt)
    return delivery.result, decide_delivery(delivery, rt)


async def test_an_internal_error_is_dead_lettered_after_its_bounded_retries(
    tmp_path: Path,
) -> None:
    register_secrets(["sekrit-key-1"])
    rt = await _runtime_with(
        tmp_path, OverflowingLedger(str(tmp_path / "ledger.db")), internal_error_retries=3
    )
    body = orjson.dumps(paid_event("hotel", "S-BUG"))
    headers: dict[str, Any] = {}
    outcomes = []
    try:
        for _ in range(4):
            result, outcome = await _attempt(rt, body, headers)
            assert isinstance(result, InvoicingError)
            assert result.code is ErrorCode.INTERNAL_ERROR
            outcomes.append(outcome)
            headers = dict(outcome.headers)
    finally:
        await rt.ledger.close()
    assert [o.kind for o in outcomes] == ["retry", "retry", "retry", "dead_letter"]
    parked = outcomes[-1]
    assert parked.code is ErrorCode.INTERNAL_ERROR
    assert parked.headers["x-error-code"] == "internal_error"
    assert parked.headers["x-attempts"] == 4
    assert "OverflowError" in parked.headers["x-error-message"]
    assert "sekrit-key-1" not in parked.headers["x-error-message"]
    failed = parked.events[-1]
    assert failed.error.code == "internal_error"
    assert failed.final is True
    assert "sekrit-key-1" not in failed.error.message
    assert rt.providers["billingo"].calls == []  # type: ignore[attr-defined]


async def test_a_ledger_outage_is_ledger_unavailable_and_retried(tmp_path: Path) -> None:
    rt = await _runtime_with(
        tmp_path, BrokenDiskLedger(str(tmp_path / "ledger.db")), internal_error_retries=3
    )
    try:
        result, outcome = await _attempt(rt, orjson.dumps(paid_event("hotel", "S-DISK")), {})
    finally:
        await rt.ledger.close()
    assert isinstance(result, InvoicingError)
    assert result.code is ErrorCode.LEDGER_UNAVAILABLE
    assert "OperationalError: disk I/O error" in result.message
    assert outcome.kind == "retry"
    assert outcome.code is ErrorCode.LEDGER_UNAVAILABLE
    assert outcome.events[-1].error.code == "ledger_unavailable"
    assert rt.providers["billingo"].calls == []  # type: ignore[attr-defined]


async def test_the_backends_report_their_outages_as_ledger_unavailable(tmp_path: Path) -> None:
    ledger = BrokenDiskLedger(str(tmp_path / "ledger.db"))
    await ledger.open()
    try:
        with pytest.raises(LedgerUnavailable, match="OperationalError"):
            await ledger.acquire(SaleKey("hotel", "S-1", 1), "me", 10.0)
    finally:
        await ledger.close()
