"""What ``sale.paid`` and ``sale.storno`` mean: the exactly-once issue and cancel flows.

Each flow holds the sale generation's lease, reads its ledger record and acts on its state.
The ledger is written *before* every provider request that creates something, so a crash or
a lost answer leaves the record "in doubt", and the next attempt looks the document up by
its deterministic external key instead of creating a second one.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import structlog

from handlers.context import Context, Deferred, Handled
from handlers.draft import STORNO_SUFFIX, build_draft, lookup_keys
from handlers.ledger import SaleKey, SaleRecord, SaleState
from handlers.messages import (
    CancellationInfo,
    InvoiceCancelled,
    InvoiceIssued,
    InvoiceVoided,
    ProviderName,
    SalePaid,
    SaleStorno,
)
from handlers.validation import validate_sale
from providers.base import Cancellation, CancelRequest, IssuedInvoice, Provider, TenantConnection
from providers.errors import ErrorCode, InvoicingError

log = structlog.get_logger(__name__)


def _about(record: SaleRecord, causation_id: str) -> dict[str, Any]:
    """What invoice.issued and invoice.cancelled both say about the sale and its invoice."""
    invoice = record.invoice
    assert invoice is not None
    provider: ProviderName = "szamlazz" if record.provider == "szamlazz" else "billingo"
    return {
        "causation_id": causation_id,
        "tenant_id": record.key.tenant_id,
        "sale_id": record.key.sale_id,
        "invoice_generation": record.key.invoice_generation,
        "provider": provider,
        "document_id": invoice.document_id,
        "invoice_number": invoice.invoice_number,
    }


def issued_event(record: SaleRecord, causation_id: str) -> InvoiceIssued:
    invoice = record.invoice
    assert invoice is not None
    return InvoiceIssued(
        **_about(record, causation_id),
        gross_total=invoice.gross_total,
        currency=invoice.currency,
    )


def cancelled_event(record: SaleRecord, causation_id: str) -> InvoiceCancelled:
    cancellation = record.cancellation
    assert cancellation is not None
    return InvoiceCancelled(
        **_about(record, causation_id),
        cancellation=CancellationInfo(
            kind=cancellation.kind,
            document_id=cancellation.document_id,
            invoice_number=cancellation.invoice_number,
        ),
    )


#: The ``reason`` of invoice.voided; a re-announcement cannot tell the two cases apart.
VOIDED_BEFORE_INVOICE = "a storno arrived before the generation's invoice existed"
VOIDED_PENDING_ABANDONED = "a storno arrived while the invoice was pending; it was not issued"


def voided_event(record: SaleRecord, causation_id: str, reason: str) -> InvoiceVoided:
    return InvoiceVoided(
        causation_id=causation_id,
        tenant_id=record.key.tenant_id,
        sale_id=record.key.sale_id,
        invoice_generation=record.key.invoice_generation,
        reason=reason,
    )


def _attempts_left(used: int, provider: Provider, ctx: Context, what: str) -> None:
    # The Számla Agent's rule: never send one request more than max_provider_attempts times,
    # however many times the message comes back. Only sends that may have created something
    # count (the ledger forgets provable refusals).
    if provider.caps_resends and used >= ctx.max_provider_attempts:
        raise InvoicingError(
            ErrorCode.RETRIES_EXHAUSTED,
            f"{what} was already sent {used} times without a recorded result; not sending it again",
        )


async def handle_paid(event: SalePaid, ctx: Context) -> Handled:
    conn = ctx.connection(event.tenant_id)
    key = SaleKey(event.tenant_id, event.sale.id, event.sale.invoice_generation)
    async with ctx.lease(key) as record:
        if record.state is SaleState.ISSUED:
            # At-least-once delivery: announce the same document again, never a second one.
            await ctx.ledger.audit(
                key,
                "issue",
                "duplicate",
                event_id=event.event_id,
                provider=record.provider,
                document_id=record.document_id,
            )
            return Handled("duplicate", (issued_event(record, event.event_id),))
        if record.state in (SaleState.CANCEL_PENDING, SaleState.CANCELLED, SaleState.VOIDED):
            # A late duplicate of a generation that was stornoed: nothing to issue, and the
            # generation's known outcome is announced again (Bookinda's last word must be true).
            await ctx.ledger.audit(
                key,
                "issue",
                "ignored",
                event_id=event.event_id,
                detail=f"generation is {record.state}",
            )
            return Handled("duplicate", (_known_outcome(record, event.event_id),))
        if record.state is SaleState.VOIDING:
            # The storno is waiting out an in-doubt create: its outcome is not known yet.
            raise Deferred("a storno is settling this generation's in-doubt create")
        # Checked after the ledger, so a re-delivered sale that was already invoiced is
        # announced again even if the tenant's settings changed since.
        if not conn.auto_invoice and event.sale.trigger == "auto":
            log.info("sale.skipped", reason="auto_invoice is off for the tenant")
            return Handled("skipped")
        # Pre-flight: a bad sale costs no API call and never reaches the provider.
        validate_sale(event.sale, conn, ctx.limits, today=ctx.today())
        provider = ctx.provider(conn, record)
        record = await _issue(event, conn, provider, record, ctx)
        return Handled("issued", (issued_event(record, event.event_id),), provider_ok=True)


def _known_outcome(
    record: SaleRecord, causation_id: str
) -> InvoiceIssued | InvoiceCancelled | InvoiceVoided:
    """What a duplicate re-announces: the generation's state as the ledger knows it."""
    if record.state is SaleState.CANCELLED:
        return cancelled_event(record, causation_id)
    if record.state is SaleState.VOIDED:
        return voided_event(record, causation_id, VOIDED_BEFORE_INVOICE)
    # CANCEL_PENDING: the invoice is valid until its cancel is recorded.
    return issued_event(record, causation_id)


async def _issue(
    event: SalePaid, conn: TenantConnection, provider: Provider, record: SaleRecord, ctx: Context
) -> SaleRecord:
    key = record.key
    if record.issue_in_doubt:
        # An earlier create may have succeeded without us hearing the answer: look first, and
        # only once the provider can no longer be committing it (whoever sent it).
        ctx.wait_out_grace(record.issue_sent_at or record.updated_at, "an earlier create")
        found = await _find_invoice(provider, conn, key)
        if found is not None:
            log.info("invoice.found", document_id=found.document_id)
            return await ctx.ledger.record_issued(
                key, ctx.owner, event.event_id, provider.name, found, found=True, release=True
            )
    await _no_other_valid_invoice(key, ctx)
    _attempts_left(record.issue_attempts, provider, ctx, "the invoice")
    draft = build_draft(event, conn, ctx.today())
    sends = 0

    async def record_send() -> None:
        # Right before the create request itself (after the provider's lookups, partner and
        # rate calls): the send time the next attempt's grace counts from, written first.
        nonlocal sends
        ctx.may_send()
        await ctx.ledger.start_issue(key, ctx.owner, provider.name, event.event_id)
        sends += 1

    try:
        invoice = await provider.issue(conn, draft, before_send=record_send)
    except InvoicingError as exc:
        if sends:  # otherwise no create went out: nothing about the invoice changed
            await ctx.ledger.issue_failed(
                key,
                ctx.owner,
                event.event_id,
                exc.code,
                exc.message,
                in_doubt=exc.outcome_unknown,
                # A lookup that missed does not end an earlier send's doubt: it may still land.
                was_in_doubt=record.issue_in_doubt,
            )
        raise
    # Recorded before invoice.issued is published: a crash now re-announces, never re-creates.
    record = await ctx.ledger.record_issued(
        key, ctx.owner, event.event_id, provider.name, invoice, found=False, release=True
    )
    # One line per sale at info ("message.handled", with the document id): this one is detail.
    log.debug(
        "invoice.issued", document_id=invoice.document_id, invoice_number=invoice.invoice_number
    )
    return record


#: States of another generation whose invoice stands, or may (a create in doubt may land).
_MAY_BE_VALID = (SaleState.ISSUED, SaleState.CANCEL_PENDING)


async def _no_other_valid_invoice(key: SaleKey, ctx: Context) -> None:
    """At most one valid invoice per sale: a new generation is issued only once every other
    generation's invoice is cancelled (or never existed). Waits (a transient error) rather than
    refusing, because the storno that cancels the other one may still be on its way."""
    for other in await ctx.ledger.generations(key.tenant_id, key.sale_id):
        if other.key.invoice_generation == key.invoice_generation:
            continue
        if other.state in _MAY_BE_VALID or (
            other.issue_in_doubt and other.state not in (SaleState.CANCELLED, SaleState.VOIDED)
        ):
            what = (
                f"invoice {other.invoice_number} is still valid"
                if other.invoice_number
                else "a create may have produced an invoice that is not cancelled"
            )
            raise InvoicingError(
                ErrorCode.PREVIOUS_INVOICE_VALID,
                f"sale {key.sale_id} generation {other.key.invoice_generation}: {what}; "
                f"generation {key.invoice_generation} is issued only after its storno",
            )


async def handle_storno(event: SaleStorno, ctx: Context) -> Handled:
    conn = ctx.connection(event.tenant_id)
    key = SaleKey(event.tenant_id, event.sale_id, event.invoice_generation)
    async with ctx.lease(key) as record:
        if record.state is SaleState.CANCELLED:
            _check_document(event, record)
            await ctx.ledger.audit(
                key,
                "cancel",
                "duplicate",
                event_id=event.event_id,
                provider=record.provider,
                document_id=record.document_id,
            )
            return Handled("duplicate", (cancelled_event(record, event.event_id),))
        if record.state is SaleState.VOIDED:
            await ctx.ledger.audit(
                key,
                "cancel",
                "duplicate",
                event_id=event.event_id,
                detail="generation already voided",
            )
            return Handled(
                "duplicate", (voided_event(record, event.event_id, VOIDED_BEFORE_INVOICE),)
            )
        provider = ctx.provider(conn, record)
        if record.state not in (SaleState.ISSUED, SaleState.CANCEL_PENDING):
            found_record = await _find_issued(event, conn, provider, record, ctx)
            if found_record is None:
                return await _void(event, record, ctx)
            record = found_record
            _check_document(event, record)
            if record.state is SaleState.CANCELLED:
                # The provider already shows the invoice cancelled (the ledger was lost, or a
                # cancel's answer was): recorded as it is, never cancelled a second time.
                return Handled(
                    "cancelled", (cancelled_event(record, event.event_id),), provider_ok=True
                )
        _check_document(event, record)
        record = await _cancel(event, conn, provider, record, ctx)
        return Handled("cancelled", (cancelled_event(record, event.event_id),), provider_ok=True)


async def _find_issued(
    event: SaleStorno,
    conn: TenantConnection,
    provider: Provider,
    record: SaleRecord,
    ctx: Context,
) -> SaleRecord | None:
    """Before a storno gives up on a sale we have no invoice for, ask the provider: an attempt
    may have created one, or the ledger may have been lost. An invoice the provider shows as
    cancelled comes back CANCELLED, with its cancellation document."""
    if record.state is not SaleState.NEW and not record.issue_in_doubt:
        return None
    if record.issue_in_doubt:
        # Voiding while a create may still land would leave a valid invoice nobody cancels.
        # VOIDING first, so no sale.paid retry sends another create (and starts another
        # grace) while the storno waits.
        if record.state is not SaleState.VOIDING:
            await ctx.ledger.record_voiding(record.key, ctx.owner, event.event_id)
        ctx.wait_out_grace(record.issue_sent_at or record.updated_at, "an earlier create")
    found = await _find_invoice(provider, conn, record.key)
    if found is None:
        return None
    issued = await ctx.ledger.record_issued(
        record.key, ctx.owner, event.event_id, provider.name, found, found=True
    )
    if not found.cancelled:
        return issued
    cancellation = await _find_cancellation(provider, conn, found, _cancel_request(event, issued))
    if cancellation is None:
        raise InvoicingError(
            ErrorCode.PROVIDER_REJECTED,
            f"{provider.name} shows invoice {found.invoice_number} as cancelled but its "
            "cancellation document cannot be found: check it in the provider's UI (it is not "
            "cancelled again)",
        )
    return await ctx.ledger.record_cancelled(
        record.key, ctx.owner, event.event_id, cancellation, found=True, release=True
    )


async def _void(event: SaleStorno, record: SaleRecord, ctx: Context) -> Handled:
    # No invoice exists and none may appear later: a sale.paid still waiting in a delay queue
    # (or replayed from the dead-letter queue) finds the generation VOIDED and issues nothing.
    # invoice.voided is the outcome, also for a generation never seen (CONTRACTS §5: "a storno
    # arrived before its invoice existed", so Bookinda can close it); dead-lettering it as
    # not_invoiced as well would ask a person to act on a storno that did all it had to.
    reason = VOIDED_BEFORE_INVOICE if record.state is SaleState.NEW else VOIDED_PENDING_ABANDONED
    voided = await ctx.ledger.record_voided(
        record.key, ctx.owner, event.event_id, reason, release=True
    )
    log.info("generation.voided", reason=reason)
    return Handled("skipped", (voided_event(voided, event.event_id, reason),))


def _cancel_request(event: SaleStorno, record: SaleRecord) -> CancelRequest:
    key = record.key
    return CancelRequest(
        tenant_id=key.tenant_id,
        sale_id=key.sale_id,
        invoice_generation=key.invoice_generation,
        external_key=key.external_key + STORNO_SUFFIX,
        reason=event.reason,
    )


async def _find_invoice(
    provider: Provider, conn: TenantConnection, key: SaleKey
) -> IssuedInvoice | None:
    # Only by keys that name this sale generation alone (handlers.draft.legacy_key): tenants
    # may share a provider account, and whatever is found here is adopted and may be cancelled.
    for lookup in lookup_keys(key.tenant_id, key.sale_id, key.invoice_generation):
        found = await provider.find_invoice(conn, lookup)
        if found is not None:
            return found
    return None


async def _find_cancellation(
    provider: Provider, conn: TenantConnection, invoice: IssuedInvoice, request: CancelRequest
) -> Cancellation | None:
    """The invoice's cancellation, by its own key or the one a pre-quoting cancel carries."""
    keys = lookup_keys(request.tenant_id, request.sale_id, request.invoice_generation)
    for lookup in keys:
        found = await provider.find_cancellation(
            conn, invoice, replace(request, external_key=lookup + STORNO_SUFFIX)
        )
        if found is not None:
            return found
    return None


def _check_document(event: SaleStorno, record: SaleRecord) -> None:
    if event.document_id is not None and event.document_id != record.document_id:
        raise InvoicingError(
            ErrorCode.DOCUMENT_MISMATCH,
            f"storno names document {event.document_id} but sale {event.sale_id} generation "
            f"{event.invoice_generation} was invoiced as document {record.document_id}",
        )


async def _cancel(
    event: SaleStorno,
    conn: TenantConnection,
    provider: Provider,
    record: SaleRecord,
    ctx: Context,
) -> SaleRecord:
    key = record.key
    invoice = record.invoice
    assert invoice is not None
    request = _cancel_request(event, record)
    if record.cancel_in_doubt:
        # A cancel is never idempotent at Billingo: look for the storno before asking again,
        # once the earlier cancel can no longer be committing.
        ctx.wait_out_grace(record.cancel_sent_at or record.updated_at, "an earlier cancel")
        found = await _find_cancellation(provider, conn, invoice, request)
        if found is not None:
            return await ctx.ledger.record_cancelled(
                key, ctx.owner, event.event_id, found, found=True, release=True
            )
    _attempts_left(record.cancel_attempts, provider, ctx, "the cancellation")
    ctx.may_send()
    await ctx.ledger.start_cancel(key, ctx.owner, event.event_id)
    try:
        cancellation = await provider.cancel(conn, invoice, request)
    except InvoicingError as exc:
        await ctx.ledger.cancel_failed(
            key,
            ctx.owner,
            event.event_id,
            exc.code,
            exc.message,
            in_doubt=exc.outcome_unknown,
            was_in_doubt=record.cancel_in_doubt,
        )
        raise
    log.info(
        "invoice.cancelled",
        document_id=invoice.document_id,
        cancellation_id=cancellation.document_id,
    )
    return await ctx.ledger.record_cancelled(
        key, ctx.owner, event.event_id, cancellation, found=False, release=True
    )
