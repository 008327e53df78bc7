"""The exactly-once holes of the issue and cancel flows, on a real SQLite ledger and a scripted
provider: what is in doubt stays in doubt, lookups wait out the grace and go to the provider
the documents are at, and a storno never cancels an invoice the provider shows cancelled."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from pydantic import SecretStr

from handlers.context import Context, Deferred, InDoubtWait
from handlers.ledger import SaleKey, SaleState
from handlers.messages import SalePaid, SaleStorno
from handlers.parse import event_from
from handlers.sale import handle_paid, handle_storno
from providers.base import (
    BeforeSend,
    Cancellation,
    CancelRequest,
    InvoiceDraft,
    IssuedInvoice,
    TenantConnection,
    no_hook,
)
from providers.errors import ErrorCode, InvoicingError
from tests.unit.fakes import QuietProvider
from worker.devtools.samples import paid_event, storno_event
from worker.ledger.sqlite import SqliteLedger

TENANT = "hotel-doubt"
GRACE = 60.0


@dataclass
class ScriptedProvider(QuietProvider):
    """Answers from scripts; records every call."""

    name: Any = "billingo"
    caps_resends: bool = False
    issue_script: list[Exception | IssuedInvoice] = field(default_factory=list)
    found: IssuedInvoice | None = None
    found_cancellation: Cancellation | None = None
    calls: list[str] = field(default_factory=list)

    async def issue(
        self, conn: TenantConnection, draft: InvoiceDraft, before_send: BeforeSend = no_hook
    ) -> IssuedInvoice:
        await before_send()
        self.calls.append("issue")
        answer = self.issue_script.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def find_invoice(self, conn: TenantConnection, external_key: str) -> IssuedInvoice | None:
        self.calls.append("find_invoice")
        return self.found

    async def cancel(
        self, conn: TenantConnection, invoice: IssuedInvoice, request: CancelRequest
    ) -> Cancellation:
        self.calls.append("cancel")
        return Cancellation("cancel", "C-2", "STORNO-2")

    async def find_cancellation(
        self, conn: TenantConnection, invoice: IssuedInvoice, request: CancelRequest
    ) -> Cancellation | None:
        self.calls.append("find_cancellation")
        return self.found_cancellation


class Registry:
    def __init__(self, provider: str) -> None:
        self.conn = TenantConnection(
            tenant_id=TENANT, provider=provider, secret=SecretStr("k"), block_id=1
        )

    def get(self, tenant_id: str) -> TenantConnection | None:
        return self.conn if tenant_id == TENANT else None

    def breaker_error(self, conn: TenantConnection) -> InvoicingError | None:
        return None


@dataclass
class World:
    ledger: SqliteLedger
    providers: dict[str, ScriptedProvider]
    registry: Registry
    clock: list[datetime]

    def ctx(self, owner: str = "w1:1") -> Context:
        return Context(
            ledger=self.ledger,
            providers=self.providers,  # type: ignore[arg-type]
            connections=self.registry,
            lease_seconds=30,
            max_provider_attempts=5,
            owner=owner,
            today=lambda: date(2026, 12, 2),
            in_doubt_grace_seconds=GRACE,
            now=lambda: self.clock[0],
        )

    def later(self, seconds: float) -> None:
        self.clock[0] += timedelta(seconds=seconds)


@pytest.fixture
async def world() -> AsyncIterator[World]:
    ledger = SqliteLedger(":memory:")
    await ledger.open()
    providers = {"billingo": ScriptedProvider(), "szamlazz": ScriptedProvider(name="szamlazz")}
    yield World(ledger, providers, Registry("billingo"), [datetime.now(UTC)])
    await ledger.close()


def paid(sale: str = "S-1") -> SalePaid:
    event = event_from(paid_event(TENANT, sale), "sale.paid")
    assert isinstance(event, SalePaid)
    return event


def storno(sale: str = "S-1") -> SaleStorno:
    event = event_from(storno_event(TENANT, sale), "sale.storno")
    assert isinstance(event, SaleStorno)
    return event


def invoice(cancelled: bool = False) -> IssuedInvoice:
    return IssuedInvoice("D-1", "INV-1", Decimal("100.00"), "HUF", cancelled=cancelled)


def lost_answer() -> InvoicingError:
    return InvoicingError(ErrorCode.TIMEOUT, "read timed out", outcome_unknown=True)


def refused() -> InvoicingError:
    return InvoicingError(ErrorCode.PROVIDER_UNAVAILABLE, "503, nothing done")


async def test_a_refused_send_after_a_missed_lookup_keeps_the_earlier_doubt(world: World) -> None:
    billingo = world.providers["billingo"]
    billingo.issue_script = [lost_answer(), refused(), invoice()]
    with pytest.raises(InvoicingError):
        await handle_paid(paid(), world.ctx())
    world.later(GRACE + 1)
    # The lookup misses a create that is still running at the provider; the next send is
    # refused outright. That refusal says nothing about the first create.
    with pytest.raises(InvoicingError):
        await handle_paid(paid(), world.ctx())
    record = await world.ledger.get(SaleKey(TENANT, "S-1", 1))
    assert record is not None
    assert record.issue_in_doubt

    billingo.found = invoice()  # the first create landed after all
    world.later(GRACE + 1)
    handled = await handle_paid(paid(), world.ctx())
    assert handled.outcome == "issued"
    assert billingo.calls == ["issue", "find_invoice", "issue", "find_invoice"]


async def test_an_in_doubt_create_is_looked_up_only_after_the_grace(world: World) -> None:
    billingo = world.providers["billingo"]
    billingo.issue_script = [lost_answer()]
    with pytest.raises(InvoicingError):
        await handle_paid(paid(), world.ctx())

    world.later(GRACE / 2)  # another worker (another owner) picks the sale up early
    with pytest.raises(InDoubtWait) as waited:
        await handle_paid(paid(), world.ctx(owner="w2:1"))
    assert GRACE / 2 - 1 < waited.value.delay < GRACE / 2 + 1
    assert billingo.calls == ["issue"]  # no lookup, no second create inside the grace

    billingo.found = invoice()
    world.later(GRACE / 2 + 0.1)
    assert (await handle_paid(paid(), world.ctx(owner="w2:2"))).outcome == "issued"
    assert billingo.calls == ["issue", "find_invoice"]


async def test_a_storno_inside_the_grace_of_a_lost_create_waits_instead_of_voiding(
    world: World,
) -> None:
    billingo = world.providers["billingo"]
    billingo.issue_script = [lost_answer()]
    with pytest.raises(InvoicingError):
        await handle_paid(paid(), world.ctx())
    with pytest.raises(InDoubtWait):
        await handle_storno(storno(), world.ctx())
    record = await world.ledger.get(SaleKey(TENANT, "S-1", 1))
    assert record is not None
    assert record.state is SaleState.VOIDING
    # The sale.paid's retry sends nothing more (another send would restart the grace); it
    # waits for the storno's outcome, to announce that.
    world.later(GRACE + 1)
    with pytest.raises(Deferred):
        await handle_paid(paid(), world.ctx())
    assert billingo.calls == ["issue"]
    # Once the grace is over the storno looks the create up; it never landed: voided.
    assert (await handle_storno(storno(), world.ctx())).outcome == "skipped"
    record = await world.ledger.get(SaleKey(TENANT, "S-1", 1))
    assert record is not None
    assert record.state is SaleState.VOIDED
    assert billingo.calls == ["issue", "find_invoice"]


async def test_a_storno_of_an_invoice_the_provider_shows_cancelled_never_cancels_again(
    world: World,
) -> None:
    # The ledger was lost: the sale is NEW here, but the provider has the invoice, cancelled.
    billingo = world.providers["billingo"]
    billingo.found = invoice(cancelled=True)
    billingo.found_cancellation = Cancellation("cancel", "C-1", "STORNO-1")
    handled = await handle_storno(storno(), world.ctx())

    assert "cancel" not in billingo.calls
    assert handled.outcome == "cancelled"
    announced = handled.events[0]
    assert announced.cancellation.document_id == "C-1"
    record = await world.ledger.get(SaleKey(TENANT, "S-1", 1))
    assert record is not None
    assert record.state is SaleState.CANCELLED
    assert record.cancel_document_id == "C-1"


async def test_a_cancel_goes_to_the_provider_the_invoice_is_at(world: World) -> None:
    world.providers["billingo"].issue_script = [invoice()]
    await handle_paid(paid(), world.ctx())
    world.registry = Registry("szamlazz")  # the tenant switched providers since

    with pytest.raises(InvoicingError) as refused_here:
        await handle_storno(storno(), world.ctx())
    assert refused_here.value.code is ErrorCode.PROVIDER_REJECTED
    assert "billingo" in refused_here.value.message
    assert world.providers["szamlazz"].calls == []
    assert "cancel" not in world.providers["billingo"].calls


async def test_an_in_doubt_create_is_looked_up_at_the_provider_it_was_sent_to(
    world: World,
) -> None:
    world.providers["billingo"].issue_script = [lost_answer()]
    with pytest.raises(InvoicingError):
        await handle_paid(paid(), world.ctx())
    world.registry = Registry("szamlazz")
    world.later(GRACE + 1)

    with pytest.raises(InvoicingError) as parked:
        await handle_paid(paid(), world.ctx())
    assert parked.value.code is ErrorCode.PROVIDER_REJECTED
    assert world.providers["szamlazz"].calls == []  # never created at the new provider


async def test_a_worker_that_lost_its_liveness_sends_nothing(world: World) -> None:
    dead = Context(
        ledger=world.ledger,
        providers=world.providers,  # type: ignore[arg-type]
        connections=world.registry,
        lease_seconds=30,
        max_provider_attempts=5,
        owner="w1:9",
        today=lambda: date(2026, 12, 2),
        alive=lambda: False,
    )
    with pytest.raises(Deferred):  # handed on to another worker, not failed
        await handle_paid(paid(), dead)
    assert world.providers["billingo"].calls == []


async def test_the_grace_counts_from_the_create_request_not_from_before_the_provider_calls(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Billingo's issue() makes rate and partner calls before the create: up to a minute on a
    # slow day. The grace must count from the create itself (review finding).
    monkeypatch.setattr(world.ledger, "_now", lambda: world.clock[0])

    class SlowBeforeTheCreate(ScriptedProvider):
        async def issue(
            self, conn: TenantConnection, draft: InvoiceDraft, before_send: BeforeSend = no_hook
        ) -> IssuedInvoice:
            world.later(25)  # the partner and rate calls (inside the 30 s lease)
            return await super().issue(conn, draft, before_send)

    slow = SlowBeforeTheCreate(issue_script=[lost_answer()])
    world.providers["billingo"] = slow
    with pytest.raises(InvoicingError):
        await handle_paid(paid(), world.ctx())
    world.later(40)  # 65 s after the attempt began, only 40 s after the create went out
    with pytest.raises(InDoubtWait):
        await handle_paid(paid(), world.ctx(owner="w2:1"))
    assert slow.calls == ["issue"]
