"""One delivery through handle_delivery: the attempt ends by its deadline, below the lease,
whatever the provider does, and what it started stays in doubt for whoever comes next."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from handlers.ledger import SaleKey
from providers.base import InvoiceDraft, IssuedInvoice, TenantConnection
from providers.errors import ErrorCode, InvoicingError
from tests.unit.test_sale_doubt import ScriptedProvider
from worker.connections import ConnectionRegistry
from worker.devtools.samples import paid_event
from worker.ledger.sqlite import SqliteLedger
from worker.process import Delivery, Runtime, handle_delivery
from worker.settings import Settings
from worker.topology import Names


class NeverAnswers(ScriptedProvider):
    """A create that the provider never answers (and the client never times out on)."""

    async def issue(self, conn: TenantConnection, draft: InvoiceDraft) -> IssuedInvoice:
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
    connections = tmp_path / "connections.toml"
    connections.write_text(
        '[tenants."hotel"]\nprovider = "billingo"\napi_key = "k-1"\nblock_id = 1\n',
        encoding="utf-8",
    )
    registry = ConnectionRegistry(connections)
    registry.load()
    ledger = SqliteLedger(str(tmp_path / "ledger.db"))
    await ledger.open()
    # lease 1.5 s → the attempt's deadline is 1.2 s; the provider timeout would be 0.3 s but
    # this provider ignores it (as a stuck rate-limit wait or database call would).
    settings = Settings(
        lease_seconds=1.5, provider_timeout_seconds=0.3, connections_file=str(connections)
    )
    providers = {"billingo": NeverAnswers(), "szamlazz": ScriptedProvider(name="szamlazz")}
    rt = Runtime(settings, Names.from_settings(settings), ledger, providers, registry)  # type: ignore[arg-type]
    await rt.liveness.renew()
    yield rt
    await ledger.close()


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
