"""One delivery, start to ack: parse → handle → publish the outcome (confirmed) → ack.

Every path ends in exactly one of: the outcome events confirmed then ack; a copy in a delay
queue (plus a non-final ``invoice.failed``) confirmed then ack; a copy in the dead-letter queue
(plus a final ``invoice.failed``) confirmed then ack; or no ack at all, so the broker delivers
the message again. Nothing is acked before what it caused is durable.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import structlog
from aio_pika.abc import AbstractIncomingMessage

from handlers.classify import DeadLetter, Retry, RetryPolicy, backoff, classify
from handlers.context import Context, Deferred, Handled, SaleBusy, Throttled
from handlers.ledger import LeaseLost, Ledger, SaleKey
from handlers.messages import (
    INBOUND_TYPES,
    ErrorInfo,
    InvoiceFailed,
    OutEvent,
    SalePaid,
    SaleStorno,
)
from handlers.parse import decode_body, event_from, peek_tenant, tenant_of
from handlers.sale import handle_paid, handle_storno
from providers.base import Provider
from providers.errors import ErrorCode, InvoicingError
from worker import metrics
from worker.connections import ConnectionRegistry, HealthChange
from worker.logging import scrub_text
from worker.publisher import Publisher
from worker.settings import Settings
from worker.topology import Names

log = structlog.get_logger(__name__)

H_RETRY_COUNT = "x-retry-count"
H_FIRST_FAILED = "x-first-failed-at"
H_ORIGINAL_RK = "x-original-routing-key"
H_DEFER_COUNT = "x-defer-count"
H_NOT_BEFORE = "x-not-before"
MAX_HEADER_TEXT = 2000
_BUDAPEST = ZoneInfo("Europe/Budapest")


def budapest_today() -> date:
    """Invoices are dated in Hungarian time, whatever the server's zone."""
    return datetime.now(_BUDAPEST).date()


@dataclass
class Runtime:
    """Everything the pipeline needs that lives longer than one broker connection."""

    settings: Settings
    names: Names
    ledger: Ledger
    providers: Mapping[str, Provider]
    connections: ConnectionRegistry
    instance_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    policy: RetryPolicy = field(init=False)
    #: Numbers deliveries: lease owners are unique per process (instance_id) and delivery.
    _deliveries: Iterator[int] = field(init=False, default_factory=itertools.count)

    def __post_init__(self) -> None:
        self.policy = RetryPolicy(
            ladder=self.settings.retry_ladder,
            base_seconds=self.settings.retry_base_seconds,
            budget_seconds=self.settings.retry_budget_seconds,
        )

    def context(self) -> Context:
        return Context(
            ledger=self.ledger,
            providers=self.providers,
            connections=self.connections,
            lease_seconds=self.settings.lease_seconds,
            max_provider_attempts=self.settings.max_provider_attempts,
            owner=f"{self.instance_id}:{next(self._deliveries)}",
            today=budapest_today,
        )


@dataclass(frozen=True)
class Delivery:
    """What the pipeline reads off an incoming message."""

    message: AbstractIncomingMessage
    routing_key: str
    attempt: int
    first_failed_at: datetime | None

    @classmethod
    def of(cls, message: AbstractIncomingMessage) -> Delivery:
        headers = message.headers or {}
        # After a delay queue the routing key is the work queue's; our header keeps the real one.
        routing_key = _text(headers.get(H_ORIGINAL_RK)) or message.routing_key or ""
        attempt = _int(headers.get(H_RETRY_COUNT)) + 1
        first = _text(headers.get(H_FIRST_FAILED))
        try:
            first_failed_at = datetime.fromisoformat(first) if first else None
        except ValueError:
            first_failed_at = None
        return cls(message, routing_key, attempt, first_failed_at)


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value if isinstance(value, str) else None


async def process(message: AbstractIncomingMessage, rt: Runtime, publisher: Publisher) -> None:
    """Handle one delivery; never lets an exception escape into aiormq (it would only log a
    line and leave the delivery unacked until the channel dies)."""
    try:
        await _process(message, rt, publisher)
    except Exception:
        log.exception("message.pipeline_failed")
        await _requeue(message)


async def _process(message: AbstractIncomingMessage, rt: Runtime, publisher: Publisher) -> None:
    started = time.monotonic()
    delivery = Delivery.of(message)
    event: SalePaid | SaleStorno | None = None
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(
        message_id=message.message_id, routing_key=delivery.routing_key, attempt=delivery.attempt
    )
    metrics.in_flight.inc()
    try:
        wait = _not_yet(delivery)
        if wait is not None and wait > rt.settings.throttle_max_wait_seconds:
            # Its time has not come (a Retry-After or a reserved pacing slot): another round
            # in the delay queues, without parsing or a provider call.
            raise Throttled("not before its reserved time", delay=wait)
        data = decode_body(message.body, max_bytes=rt.settings.max_body_bytes)
        _check_pace(tenant_of(data), rt, due=wait is not None)
        event = event_from(data, delivery.routing_key)
        structlog.contextvars.bind_contextvars(
            event_id=event.event_id, tenant_id=event.tenant_id, sale_id=_sale_id(event)
        )
        ctx = rt.context()
        handled = await (
            handle_paid(event, ctx) if isinstance(event, SalePaid) else handle_storno(event, ctx)
        )
    except Deferred as exc:
        await _defer(delivery, rt, publisher, exc)
    except LeaseLost as exc:
        await _defer(delivery, rt, publisher, SaleBusy(str(exc)))
    except InvoicingError as exc:
        await _failed(delivery, event, exc, rt, publisher)
    except Exception as exc:
        # A bug or an outage of our own (ledger down): retried like a provider outage, so
        # nothing is lost; the traceback says which.
        log.exception("message.unexpected_error")
        error = InvoicingError(
            ErrorCode.PROVIDER_UNAVAILABLE, f"internal error: {type(exc).__name__}: {exc}"
        )
        await _failed(delivery, event, error, rt, publisher)
    else:
        await _succeeded(delivery, event, handled, rt, publisher, started)
    finally:
        metrics.in_flight.dec()
        metrics.handle_seconds.labels(delivery.routing_key if event else "invalid").observe(
            time.monotonic() - started
        )


def _check_pace(tenant: str | None, rt: Runtime, *, due: bool) -> None:
    """Before validation and the ledger: a sale for a key that is at its pacing limit is
    deferred to a reserved slot, which costs one confirmed copy and nothing else, so a
    tenant's burst of thousands passes through quickly and other tenants' sales get through."""
    conn = rt.connections.get(tenant) if tenant else None
    if conn is None:
        return
    delay = rt.providers[conn.provider].defer_seconds(
        conn, rt.settings.throttle_max_wait_seconds, due=due
    )
    if delay > 0:
        raise Throttled(f"{conn.provider} key of {conn.tenant_id} is paced", delay=delay)


def _not_yet(delivery: Delivery) -> float | None:
    """Seconds until the message's ``x-not-before`` (negative when due), None without one."""
    not_before = _text((delivery.message.headers or {}).get(H_NOT_BEFORE))
    if not not_before:
        return None
    try:
        return (datetime.fromisoformat(not_before) - datetime.now(UTC)).total_seconds()
    except ValueError:
        return None


def _event_label(delivery: Delivery) -> str:
    # Bounded label values: a stray routing key must not create a new time series.
    return delivery.routing_key if delivery.routing_key in INBOUND_TYPES else "unknown"


def _sale_id(event: SalePaid | SaleStorno) -> str:
    return event.sale.id if isinstance(event, SalePaid) else event.sale_id


async def _succeeded(
    delivery: Delivery,
    event: SalePaid | SaleStorno,
    handled: Handled,
    rt: Runtime,
    publisher: Publisher,
    started: float,
) -> None:
    events: list[OutEvent] = list(handled.events)
    change = None
    if handled.provider_ok:
        conn = rt.connections.get(event.tenant_id)
        change = rt.connections.assess(conn, None) if conn is not None else None
    if change is not None and change.event is not None:
        events.append(change.event)
    # Outcome first, ack second: a crash in between re-delivers, and the ledger turns the
    # re-delivery into the same announcement instead of a second invoice.
    if await _publish_all(publisher, events, event.event_id, delivery.message):
        await _apply(change, rt)
        await _ack(delivery.message)
        metrics.events_total.labels(event.event_type, handled.outcome).inc()
        document_id = getattr(handled.events[0], "document_id", None) if handled.events else None
        # elapsed_ms: our callback's start → outcome confirmed and acked, provider calls
        # included (not the time a frame waited in the socket while the loop was busy).
        elapsed_ms = round((time.monotonic() - started) * 1000, 1)
        log.info(
            "message.handled",
            outcome=handled.outcome,
            document_id=document_id,
            elapsed_ms=elapsed_ms,
        )


async def _apply(change: HealthChange | None, rt: Runtime) -> None:
    """A health change takes effect once its announcement is confirmed, never before."""
    if change is None:
        return
    rt.connections.apply(change)
    if change.state is not None:
        await rt.ledger.save_connection_state(change.state)


async def _defer(delivery: Delivery, rt: Runtime, publisher: Publisher, why: Deferred) -> None:
    """Not a failure (a busy sale, a paced key): come back later, backing off with jitter the
    more often the message was deferred, so a long backlog does not churn the queue."""
    headers = dict(delivery.message.headers or {})
    deferrals = _int(headers.get(H_DEFER_COUNT)) + 1
    headers.pop(H_NOT_BEFORE, None)
    if why.exact:
        # A reserved slot: wait in a tier that does not overshoot it and carry the rest in
        # x-not-before, so the message is back by its slot, not a tier's length after it.
        wanted = why.delay
        delay, queue = rt.names.delay_queue_within(wanted)
    else:
        wanted = max(why.delay, backoff(deferrals, rt.policy, random.random()))
        delay, queue = rt.names.delay_queue_for(wanted)
    if wanted > delay:
        headers[H_NOT_BEFORE] = (datetime.now(UTC) + timedelta(seconds=wanted)).isoformat()
    headers[H_DEFER_COUNT] = deferrals
    headers[H_ORIGINAL_RK] = delivery.routing_key
    try:
        await publisher.copy_to_queue(queue, delivery.message, headers)
    except Exception:
        log.warning("message.defer_failed", exc_info=True)
        await _requeue(delivery.message)
        return
    await _ack(delivery.message)
    metrics.events_total.labels(_event_label(delivery), "retried").inc()
    metrics.deferred_total.labels("paced" if why.exact else "busy").inc()
    # Paced deferrals come by the thousand in a burst: a line each only at debug level.
    (log.debug if why.exact else log.info)(
        "message.deferred", reason=str(why), delay=delay, deferrals=deferrals
    )


def _int(value: Any) -> int:
    try:
        return int(str(value)) if value is not None else 0
    except ValueError:
        return 0


async def _failed(
    delivery: Delivery,
    event: SalePaid | SaleStorno | None,
    error: InvoicingError,
    rt: Runtime,
    publisher: Publisher,
) -> None:
    now = datetime.now(UTC)
    first = delivery.first_failed_at or now
    decision = classify(
        error,
        attempt=delivery.attempt,
        first_failed_at=first,
        now=now,
        policy=rt.policy,
        jitter=random.random(),
    )
    conn = rt.connections.get(event.tenant_id) if event else None
    change = rt.connections.assess(conn, error) if conn is not None else None
    events: list[OutEvent] = [change.event] if change and change.event else []
    tenant = (
        event.tenant_id if event else peek_tenant(delivery.message.body, rt.settings.max_body_bytes)
    )
    if isinstance(decision, Retry):
        headers = _retry_headers(delivery, error, first, decision)
        queue = rt.names.delay_queue_for(decision.delay)[1]
        copy = publisher.copy_to_queue(queue, delivery.message, headers)
        code, message, final, next_at = error.code, error.message, False, decision.next_attempt_at
        outcome = "retried"
    else:
        headers = _dead_letter_headers(delivery, decision, tenant, first, now)
        copy = publisher.copy_to_queue(rt.names.dead_letter_queue, delivery.message, headers)
        code, message, final, next_at = decision.code, decision.message, True, None
        outcome = "dead_lettered"
    if tenant is not None:
        events.append(_failed_event(delivery, event, tenant, conn, code, message, final, next_at))
    log.warning(
        "retry.scheduled" if not final else "message.dead_lettered",
        error_code=str(code),
        error=message,
        next_attempt_at=next_at,
    )
    try:
        # The copy first: invoice.failed must never announce a parking that did not happen.
        await copy
        await _publish_events(publisher, events, _event_id(event))
    except Exception:
        log.warning("message.park_failed", exc_info=True)
        await _requeue(delivery.message)
        return
    await _apply(change, rt)
    await _audit_failure(event, code, message, final, rt)
    await _ack(delivery.message)
    metrics.events_total.labels(_event_label(delivery), outcome).inc()
    if final:
        metrics.dead_lettered_total.labels(str(code)).inc()


def _event_id(event: SalePaid | SaleStorno | None) -> str | None:
    return event.event_id if event else None


def _failed_event(
    delivery: Delivery,
    event: SalePaid | SaleStorno | None,
    tenant: str,
    conn: Any,
    code: ErrorCode,
    message: str,
    final: bool,
    next_at: datetime | None,
) -> InvoiceFailed:
    sale_id = _sale_id(event) if event else None
    generation = (
        (event.sale.invoice_generation if isinstance(event, SalePaid) else event.invoice_generation)
        if event
        else None
    )
    return InvoiceFailed(
        causation_id=event.event_id if event else delivery.message.message_id,
        tenant_id=tenant,
        sale_id=sale_id,
        invoice_generation=generation,
        provider=conn.provider if conn is not None else None,
        operation="cancel" if delivery.routing_key == "sale.storno" else "issue",
        error=ErrorInfo(
            code=str(code),
            message=scrub_text(message)[:MAX_HEADER_TEXT],
            fix=InvoicingError(code, "").fix,
        ),
        attempt=delivery.attempt,
        final=final,
        next_attempt_at=next_at,
    )


async def _audit_failure(
    event: SalePaid | SaleStorno | None,
    code: ErrorCode,
    message: str,
    final: bool,
    rt: Runtime,
) -> None:
    if event is None or code is ErrorCode.UNKNOWN_TENANT:
        return
    generation = (
        event.sale.invoice_generation if isinstance(event, SalePaid) else event.invoice_generation
    )
    key = SaleKey(event.tenant_id, _sale_id(event), generation)
    operation = "issue" if isinstance(event, SalePaid) else "cancel"
    try:
        await rt.ledger.audit(
            key,
            operation,
            "dead_lettered" if final else "retry_scheduled",
            event_id=event.event_id,
            error_code=str(code),
            detail=message[:MAX_HEADER_TEXT],
        )
    except Exception:  # the audit trail must not turn a parked message into a lost one
        log.warning("ledger.audit_failed", exc_info=True)


def _retry_headers(
    delivery: Delivery, error: InvoicingError, first: datetime, decision: Retry
) -> dict[str, Any]:
    headers = dict(delivery.message.headers or {})
    headers.pop(H_NOT_BEFORE, None)
    if decision.not_before is not None:
        headers[H_NOT_BEFORE] = decision.not_before.isoformat()
    # Our own counter: x-death counting changed between RabbitMQ 3.13 and 4.0.
    headers[H_RETRY_COUNT] = delivery.attempt
    headers[H_FIRST_FAILED] = first.isoformat()
    headers[H_ORIGINAL_RK] = delivery.routing_key
    headers["x-last-error-code"] = str(error.code)
    return headers


def _dead_letter_headers(
    delivery: Delivery, decision: DeadLetter, tenant: str | None, first: datetime, now: datetime
) -> dict[str, Any]:
    headers = dict(delivery.message.headers or {})
    headers.update(
        {
            "x-error-code": str(decision.code),
            "x-error-message": scrub_text(decision.message)[:MAX_HEADER_TEXT],
            "x-original-routing-key": delivery.routing_key,
            "x-tenant-id": tenant or "",
            "x-attempts": delivery.attempt,
            "x-first-failed-at": first.isoformat(),
            "x-dead-lettered-at": now.isoformat(),
        }
    )
    return headers


async def _publish_events(
    publisher: Publisher, events: list[OutEvent], correlation_id: str | None
) -> None:
    await asyncio.gather(*(publisher.event(e, correlation_id) for e in events))


async def _publish_all(
    publisher: Publisher,
    events: list[OutEvent],
    correlation_id: str,
    message: AbstractIncomingMessage,
) -> bool:
    try:
        await _publish_events(publisher, events, correlation_id)
    except Exception:
        # Not acked: handed back so it is handled (and announced) again.
        log.warning("message.publish_failed", exc_info=True)
        await _requeue(message)
        return False
    return True


async def _ack(message: AbstractIncomingMessage) -> None:
    try:
        await message.ack()
    except Exception:
        # The channel that delivered the message is gone; the broker re-delivers it and the
        # ledger makes the second run a duplicate, not a second invoice.
        metrics.ack_failures_total.inc()
        log.warning("message.ack_failed", exc_info=True)


async def _requeue(message: AbstractIncomingMessage) -> None:
    # A pause first: whatever failed (a broker alarm, a missing queue) is not fixed by an
    # immediate redelivery, and a hot loop would burn the quorum queue's delivery limit.
    await asyncio.sleep(0.5 + random.random())
    try:
        await message.nack(requeue=True)
    except Exception:
        log.warning("message.requeue_failed", exc_info=True)
