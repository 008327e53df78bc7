"""Every sale message ends in an outcome Bookinda can act on, and a sale has at most one valid
invoice: on a real SQLite ledger and a provider that keeps its documents (issue 13)."""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from handlers.classify import RetryPolicy, classify
from handlers.context import Context, Deferred, Handled
from handlers.ledger import SaleKey, SaleState
from handlers.messages import (
    InvoiceCancelled,
    InvoiceIssued,
    InvoiceVoided,
    OutEvent,
    SalePaid,
    SaleStorno,
)
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

TENANT = "hotel-outcome"
GRACE = 60.0
Fault = str  # "ok" | "refused" (503, nothing done) | "lost" (done, the answer lost)


@dataclass
class Doc:
    generation: int
    invoice: IssuedInvoice
    cancellation: Cancellation | None = None


@dataclass
class DocumentProvider(QuietProvider):
    """A provider that keeps its documents, so the test can compare what Bookinda was told with
    what exists. ``faults`` script the creates and cancels, in order; then all succeed."""

    faults: list[Fault] = field(default_factory=list)
    docs: dict[str, Doc] = field(default_factory=dict)
    by_key: dict[str, str] = field(default_factory=dict)
    name: Any = "billingo"
    caps_resends: bool = False

    def _fault(self) -> Fault:
        return self.faults.pop(0) if self.faults else "ok"

    def valid(self) -> list[Doc]:
        return [d for d in self.docs.values() if d.cancellation is None]

    async def issue(
        self, conn: TenantConnection, draft: InvoiceDraft, before_send: BeforeSend = no_hook
    ) -> IssuedInvoice:
        await before_send()
        fault = self._fault()
        if fault == "refused":
            raise InvoicingError(ErrorCode.PROVIDER_UNAVAILABLE, "503, nothing done")
        n = len(self.docs) + 1
        invoice = IssuedInvoice(f"D-{n}", f"INV-{n}", Decimal("100.00"), "HUF")
        self.docs[invoice.document_id] = Doc(draft.invoice_generation, invoice)
        self.by_key[draft.external_key] = invoice.document_id
        # The property that must never break, checked the moment it could.
        assert len(self.valid()) <= 1, "two valid invoices for one sale"
        if fault == "lost":
            raise InvoicingError(ErrorCode.TIMEOUT, "read timed out", outcome_unknown=True)
        return invoice

    async def find_invoice(self, conn: TenantConnection, external_key: str) -> IssuedInvoice | None:
        doc = self.docs.get(self.by_key.get(external_key, ""))
        if doc is None:
            return None
        return replace(doc.invoice, cancelled=doc.cancellation is not None)

    async def cancel(
        self, conn: TenantConnection, invoice: IssuedInvoice, request: CancelRequest
    ) -> Cancellation:
        fault = self._fault()
        if fault == "refused":
            raise InvoicingError(ErrorCode.PROVIDER_UNAVAILABLE, "503, nothing done")
        doc = self.docs[invoice.document_id]
        assert doc.cancellation is None, "cancelled twice"
        doc.cancellation = Cancellation("cancel", f"C-{invoice.document_id}", "STORNO")
        if fault == "lost":
            raise InvoicingError(ErrorCode.TIMEOUT, "read timed out", outcome_unknown=True)
        return doc.cancellation

    async def find_cancellation(
        self, conn: TenantConnection, invoice: IssuedInvoice, request: CancelRequest
    ) -> Cancellation | None:
        return self.docs[invoice.document_id].cancellation


class Registry:
    conn = TenantConnection(
        tenant_id=TENANT, provider="billingo", secret=SecretStr("k"), block_id=1
    )

    def get(self, tenant_id: str) -> TenantConnection | None:
        return self.conn if tenant_id == TENANT else None

    def breaker_error(self, conn: TenantConnection) -> InvoicingError | None:
        return None


@dataclass
class World:
    ledger: SqliteLedger
    provider: DocumentProvider
    clock: list[datetime] = field(default_factory=lambda: [datetime(2026, 12, 2, 9, tzinfo=UTC)])
    owners: itertools.count[int] = field(default_factory=itertools.count)

    def ctx(self) -> Context:
        return Context(
            ledger=self.ledger,
            providers={"billingo": self.provider},  # type: ignore[dict-item]
            connections=Registry(),
            lease_seconds=30,
            max_provider_attempts=5,
            owner=f"w1:{next(self.owners)}",
            today=lambda: date(2026, 12, 2),
            in_doubt_grace_seconds=GRACE,
            now=lambda: self.clock[0],
        )

    def later(self, seconds: float) -> None:
        self.clock[0] += timedelta(seconds=seconds)


async def _world(faults: list[Fault] | None = None) -> World:
    ledger = SqliteLedger(":memory:")
    await ledger.open()
    return World(ledger, DocumentProvider(faults=list(faults or [])))


def paid(generation: int = 1, sale: str = "S-1") -> SalePaid:
    event = event_from(paid_event(TENANT, sale, generation=generation), "sale.paid")
    assert isinstance(event, SalePaid)
    return event


def storno(generation: int = 1, sale: str = "S-1") -> SaleStorno:
    event = event_from(storno_event(TENANT, sale, generation=generation), "sale.storno")
    assert isinstance(event, SaleStorno)
    return event


async def handle(event: SalePaid | SaleStorno, world: World) -> Handled:
    if isinstance(event, SalePaid):
        return await handle_paid(event, world.ctx())
    return await handle_storno(event, world.ctx())


# --------------------------------------------------------------------------- examples


async def test_a_new_generation_waits_while_the_previous_invoice_is_valid() -> None:
    world = await _world()
    await handle(paid(1), world)
    with pytest.raises(InvoicingError) as waited:
        await handle(paid(2), world)
    assert waited.value.code is ErrorCode.PREVIOUS_INVOICE_VALID
    assert waited.value.transient  # the storno may be on its way: a delayed retry
    assert len(world.provider.docs) == 1
    await handle(storno(1), world)
    handled = await handle(paid(2), world)
    assert handled.outcome == "issued"
    assert [d.generation for d in world.provider.valid()] == [2]


async def test_an_earlier_generation_arriving_late_waits_for_its_storno_and_is_voided() -> None:
    world = await _world()
    await handle(paid(2), world)
    with pytest.raises(InvoicingError) as waited:
        await handle(paid(1), world)
    assert waited.value.code is ErrorCode.PREVIOUS_INVOICE_VALID
    voided = await handle(storno(1), world)
    assert isinstance(voided.events[0], InvoiceVoided)
    again = await handle(paid(1), world)
    assert again.outcome == "duplicate"
    assert isinstance(again.events[0], InvoiceVoided)
    assert [d.generation for d in world.provider.valid()] == [2]


async def test_a_create_in_doubt_of_another_generation_also_blocks_a_new_invoice() -> None:
    world = await _world(["lost"])
    with pytest.raises(InvoicingError):
        await handle(paid(1), world)
    with pytest.raises(InvoicingError) as waited:
        await handle(paid(2), world)
    assert waited.value.code is ErrorCode.PREVIOUS_INVOICE_VALID
    assert len(world.provider.docs) == 1


def test_previous_invoice_valid_keeps_its_code_past_the_retry_budget() -> None:
    policy = RetryPolicy(ladder=(1, 5, 300), base_seconds=5, budget_seconds=600)
    now = datetime(2026, 12, 2, 12, tzinfo=UTC)
    error = InvoicingError(ErrorCode.PREVIOUS_INVOICE_VALID, "generation 1: INV-1 is valid")
    early = classify(error, attempt=1, first_failed_at=now, now=now, policy=policy, jitter=0.5)
    assert not hasattr(early, "code")  # retried first
    late = classify(
        error,
        attempt=9,
        first_failed_at=now - timedelta(seconds=590),
        now=now,
        policy=policy,
        jitter=0.5,
    )
    assert getattr(late, "code", None) is ErrorCode.PREVIOUS_INVOICE_VALID
    assert "Another invoice of this sale is still valid" in error.fix


async def test_a_storno_before_the_sale_was_seen_announces_the_generation_voided() -> None:
    world = await _world()
    handled = await handle(storno(1), world)
    assert [type(e) for e in handled.events] == [InvoiceVoided]
    event = handled.events[0]
    assert isinstance(event, InvoiceVoided)
    assert (event.sale_id, event.invoice_generation) == ("S-1", 1)
    assert event.reason
    late = await handle(paid(1), world)
    assert late.outcome == "duplicate"
    assert isinstance(late.events[0], InvoiceVoided)
    assert world.provider.docs == {}
    record = await world.ledger.get(SaleKey(TENANT, "S-1", 1))
    assert record is not None
    assert record.state is SaleState.VOIDED


async def test_a_storno_that_abandons_a_pending_issue_announces_the_generation_voided() -> None:
    world = await _world(["refused"])
    with pytest.raises(InvoicingError):
        await handle(paid(1), world)
    handled = await handle(storno(1), world)
    assert [type(e) for e in handled.events] == [InvoiceVoided]
    again = await handle(storno(1), world)
    assert [type(e) for e in again.events] == [InvoiceVoided]


async def test_a_late_sale_paid_of_a_cancelled_generation_re_announces_the_cancellation() -> None:
    world = await _world()
    await handle(paid(1), world)
    await handle(storno(1), world)
    late = await handle(paid(1), world)
    assert late.outcome == "duplicate"
    assert [type(e) for e in late.events] == [InvoiceCancelled]


# --------------------------------------------------------------------------- the property

#: Attempts per message before it would be dead-lettered (far more than the faults need).
ATTEMPTS = 40


@dataclass
class Told:
    """What Bookinda heard, per generation, in order."""

    events: dict[int, list[str]] = field(default_factory=dict)
    final_failures: list[tuple[int, str]] = field(default_factory=list)

    def hear(self, generation: int, what: str) -> None:
        self.events.setdefault(generation, []).append(what)


def _generation(event: SalePaid | SaleStorno) -> int:
    return event.invoice_generation


def _heard(event: OutEvent) -> str:
    if isinstance(event, InvoiceIssued):
        return f"issued:{event.document_id}"
    if isinstance(event, InvoiceCancelled):
        return f"cancelled:{event.document_id}"
    assert isinstance(event, InvoiceVoided)
    return "voided"


async def _deliver(world: World, queue: list[SalePaid | SaleStorno]) -> Told:
    """Delivers like the broker and the delay queues: a transient failure or a deferral goes to
    the back of the queue (time passes), a permanent one is dead-lettered."""
    told = Told()
    pending = [(event, 1) for event in queue]
    while pending:
        event, attempt = pending.pop(0)
        generation = _generation(event)
        try:
            handled = await handle(event, world)
        except Deferred as wait:
            world.later(max(wait.delay, 1.0) + 1)
            pending.append((event, attempt))
            continue
        except InvoicingError as exc:
            if exc.transient and attempt < ATTEMPTS:
                told.hear(generation, f"failed:{exc.code}")
                world.later(5)
                pending.append((event, attempt + 1))
            else:
                told.hear(generation, f"failed_final:{exc.code}")
                told.final_failures.append((generation, str(exc.code)))
            continue
        # Exactly one outcome per handled message, and it is about this message's generation.
        assert len(handled.events) == 1, handled
        out = handled.events[0]
        assert getattr(out, "invoice_generation", None) == generation
        told.hear(generation, _heard(out))
    return told


@st.composite
def histories(draw: st.DrawFn) -> tuple[list[tuple[str, int]], list[Fault]]:
    """What Bookinda publishes for one sale (generation N+1 only after N's storno), delivered
    in any order, some of it twice; and the provider's faults."""
    generations = draw(st.integers(1, 3))
    messages = [("paid", g) for g in range(1, generations + 1)]
    messages += [("storno", g) for g in range(1, generations)]
    if draw(st.booleans()):
        messages.append(("storno", generations))
    duplicates = draw(st.lists(st.sampled_from(messages), max_size=3))
    order = draw(st.permutations(messages + duplicates))
    faults = draw(st.lists(st.sampled_from(["ok", "refused", "lost"]), max_size=6))
    return list(order), faults


async def _run(order: list[tuple[str, int]], faults: list[Fault]) -> None:
    world = await _world(faults)
    try:
        queue = [paid(g) if kind == "paid" else storno(g) for kind, g in order]
        told = await _deliver(world, queue)
    finally:
        await world.ledger.close()
    assert told.final_failures == []
    docs = {d.generation: d for d in world.provider.docs.values()}
    assert len(docs) == len(world.provider.docs), "two documents for one generation"
    assert len(world.provider.valid()) <= 1
    for generation, heard in told.events.items():
        last, doc = heard[-1], docs.get(generation)
        # Bookinda's last word on the generation is the truth of the provider's documents.
        if doc is None:
            assert last == "voided", (generation, heard)
        elif doc.cancellation is None:
            assert last == f"issued:{doc.invoice.document_id}", (generation, heard)
        else:
            assert last == f"cancelled:{doc.invoice.document_id}", (generation, heard)


@settings(max_examples=150, deadline=None)
@given(histories())
def test_bookinda_last_word_per_generation_is_the_truth_and_one_invoice_is_valid(
    history: tuple[list[tuple[str, int]], list[Fault]],
) -> None:
    asyncio.run(_run(*history))
