"""One delivery, start to ack (README "How a sale flows"):

    process(message)                        the consumer's callback
      → handle_delivery                     decode + parse, then handle_paid / handle_storno
                                            under a deadline below the lease
      → decide_delivery → decide            pure: Ack | Park | HandBack  (worker/decide.py)
      → settle                              copy → events → ack, the only ack (worker/settle.py)
      → AFTER_SETTLE hooks                  health, audit trail, metrics, the log line

Everything a handler can end with (an outcome, a deferral, an error, a bug) is turned into a
value before anything is published, so there is one path to the broker and one place where
the ack guarantee is kept.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import structlog
from aio_pika.abc import AbstractIncomingMessage

from handlers.classify import RetryPolicy
from handlers.context import Context, Deferred, Handled, InDoubtWait, SaleBusy, Throttled
from handlers.ledger import LeaseLost, Ledger, LedgerUnavailable, SaleKey
from handlers.messages import ProviderName, SalePaid, SaleStorno
from handlers.parse import decode_body, event_from, peek_tenant, tenant_of
from handlers.sale import handle_paid, handle_storno
from handlers.validation import Limits
from providers.base import Provider
from providers.errors import ErrorCode, InvoicingError
from worker import metrics
from worker.connections import ConnectionRegistry, HealthChange
from worker.decide import (
    Ack,
    Attempt,
    HandBack,
    HeaderSeal,
    Outcome,
    Park,
    Subject,
    decide,
    identity_of,
)
from worker.liveness import Liveness
from worker.logging import scrub_text
from worker.publisher import Publisher
from worker.settings import Settings
from worker.settle import Settled, settle
from worker.topology import Names

log = structlog.get_logger(__name__)

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
    limits: Limits = field(init=False)
    liveness: Liveness = field(init=False)
    seal: HeaderSeal = field(init=False)
    #: Numbers deliveries: lease owners are unique per process (instance_id) and delivery.
    _deliveries: Iterator[int] = field(init=False, default_factory=itertools.count)

    def __post_init__(self) -> None:
        self.policy = RetryPolicy(
            ladder=self.settings.retry_ladder,
            base_seconds=self.settings.retry_base_seconds,
            budget_seconds=self.settings.retry_budget_seconds,
            internal_error_retries=self.settings.internal_error_retries,
        )
        self.liveness = Liveness(self.ledger, self.instance_id, self.settings.liveness_seconds)
        self.limits = Limits(
            max_gross_huf=Decimal(self.settings.max_gross_huf),
            max_gross_other=Decimal(self.settings.max_gross_other),
            fulfillment_window_days=self.settings.fulfillment_window_days,
        )
        key = self.settings.header_key
        self.seal = HeaderSeal.derive(
            key.get_secret_value() if key is not None else None, self.settings.ledger_url
        )

    def attempt(
        self, message: AbstractIncomingMessage, headers: Mapping[str, Any] | None = None
    ) -> Attempt:
        """The delivery's history, as far as the worker's own sealed headers tell it."""
        return Attempt.read(
            message.routing_key,
            message.headers if headers is None else headers,
            seal=self.seal,
            identity=identity_of(message.message_id, message.body),
            now=datetime.now(UTC),
            longest_wait=self.policy.ladder[-1],
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
            in_doubt_grace_seconds=self.settings.in_doubt_grace_seconds,
            worker=self.instance_id,
            alive=self.liveness.alive,
            limits=self.limits,
        )


@dataclass
class Delivery:
    """One delivery as it goes through the pipeline; what the hooks read afterwards."""

    message: AbstractIncomingMessage
    attempt: Attempt
    started: float
    event: SalePaid | SaleStorno | None = None
    result: Handled | Deferred | InvoicingError | None = None
    #: A tenant health change the outcome announces; applied once it is confirmed.
    change: HealthChange | None = None

    @property
    def event_id(self) -> str | None:
        return self.event.event_id if self.event is not None else None


#: Called after every settled delivery, in this order (Dramatiq's after_process_message).
AfterSettle = Callable[[Settled, Delivery, Runtime], Awaitable[None]]


async def process(message: AbstractIncomingMessage, rt: Runtime, publisher: Publisher) -> None:
    """Handle one delivery; never lets an exception escape into aiormq (it would only log a
    line and leave the delivery unacked until the channel dies)."""
    try:
        attempt = rt.attempt(message)
    except Exception:
        # Headers nobody can read (a publisher's, not ours): handled as a first delivery.
        log.exception("message.headers_unreadable")
        attempt = rt.attempt(message, headers={})
    delivery = Delivery(message, attempt, 0.0)
    delivery.started = time.monotonic()
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(
        message_id=message.message_id,
        routing_key=delivery.attempt.routing_key,
        attempt=delivery.attempt.number,
    )
    metrics.in_flight.inc()
    try:
        delivery.result = await handle_delivery(delivery, rt)
        outcome = decide_delivery(delivery, rt)
    except Exception:
        log.exception("message.pipeline_failed")
        outcome = HandBack("the pipeline failed before an outcome was decided")
    try:
        settled = await settle(outcome, message, publisher, delivery.event_id)
        for hook in AFTER_SETTLE:
            await hook(settled, delivery, rt)
    except Exception:
        log.exception("message.settle_failed")
    finally:
        metrics.in_flight.dec()


async def handle_delivery(d: Delivery, rt: Runtime) -> Handled | Deferred | InvoicingError:
    """Parse and handle; whatever happens comes back as a value for :func:`decide`."""
    try:
        wait = _not_yet(d.attempt)
        if wait is not None and wait > rt.settings.throttle_max_wait_seconds:
            # Its time has not come (a Retry-After, a reserved slot, a grace period): another
            # round in the delay queues, without parsing or a provider call.
            return Throttled("not before its reserved time", delay=wait)
        data = decode_body(d.message.body, max_bytes=rt.settings.max_body_bytes)
        _check_pace(tenant_of(data), rt, due=wait is not None)
        d.event = event = event_from(data, d.attempt.routing_key)
        structlog.contextvars.bind_contextvars(
            event_id=event.event_id, tenant_id=event.tenant_id, sale_id=_sale_id(event)
        )
        ctx = rt.context()
        # The deadline covers everything under the lease (ledger calls, rate-limit waits,
        # every provider call of a lookup-then-create), so the lease outlives the attempt and
        # no other worker can take the sale over while this one may still send.
        async with asyncio.timeout(rt.settings.attempt_deadline_seconds):
            if isinstance(event, SalePaid):
                return await handle_paid(event, ctx)
            return await handle_storno(event, ctx)
    except Deferred as exc:
        return exc
    except LeaseLost as exc:
        return SaleBusy(str(exc))
    except InvoicingError as exc:
        return exc
    except TimeoutError:
        return InvoicingError(
            ErrorCode.TIMEOUT,
            f"the attempt ran past its {rt.settings.attempt_deadline_seconds:g} s deadline "
            "(below the sale's lease); it is tried again",
        )
    except LedgerUnavailable as exc:
        # Our own store is down, not the provider: retried (nothing was decided without it),
        # and told apart so nobody chases the provider's status page.
        log.warning("ledger.unavailable", error=str(exc))
        return InvoicingError(ErrorCode.LEDGER_UNAVAILABLE, f"the ledger is unavailable: {exc}")
    except Exception as exc:
        # A bug: retried a bounded number of times (INVOICING_INTERNAL_ERROR_RETRIES) in case
        # it was a passing state of the process, then parked as internal_error, not a day of
        # retries. The message carries the class and a scrubbed, short text; the traceback
        # is in the log.
        log.exception("message.unexpected_error")
        detail = scrub_text(str(exc))[:300]
        return InvoicingError(
            ErrorCode.INTERNAL_ERROR,
            f"unexpected {type(exc).__name__} in the worker" + (f": {detail}" if detail else ""),
        )


def decide_delivery(d: Delivery, rt: Runtime) -> Outcome:
    """Gathers what :func:`decide` needs (the tenant's health change, whom a failure is about)
    and asks it."""
    result = d.result
    assert result is not None
    conn = rt.connections.get(d.event.tenant_id) if d.event is not None else None
    if conn is not None and isinstance(result, Handled) and result.provider_ok:
        d.change = rt.connections.assess(conn, None)
    elif conn is not None and isinstance(result, InvoicingError):
        d.change = rt.connections.assess(conn, result)
    extra = (d.change.event,) if d.change is not None and d.change.event is not None else ()
    return decide(
        d.attempt,
        result,
        subject=_subject(d, rt, conn.provider if conn is not None else None),
        extra_events=extra,
        names=rt.names,
        policy=rt.policy,
        now=datetime.now(UTC),
        jitter=random.random(),
    )


def _subject(d: Delivery, rt: Runtime, provider: ProviderName | None) -> Subject | None:
    event = d.event
    if event is not None:
        return Subject(
            tenant_id=event.tenant_id,
            sale_id=_sale_id(event),
            invoice_generation=_generation(event),
            provider=provider,
            causation_id=event.event_id,
        )
    tenant = peek_tenant(d.message.body, rt.settings.max_body_bytes)
    if tenant is None:
        return None
    return Subject(tenant_id=tenant, causation_id=d.message.message_id)


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


def _not_yet(attempt: Attempt) -> float | None:
    """Seconds until the message's ``x-not-before`` (negative when due), None without one."""
    if attempt.not_before is None:
        return None
    return (attempt.not_before - datetime.now(UTC)).total_seconds()


def _sale_id(event: SalePaid | SaleStorno) -> str:
    return event.sale.id if isinstance(event, SalePaid) else event.sale_id


def _generation(event: SalePaid | SaleStorno) -> int:
    return (
        event.sale.invoice_generation if isinstance(event, SalePaid) else event.invoice_generation
    )


# --------------------------------------------------------------------------- hooks


async def apply_health(settled: Settled, d: Delivery, rt: Runtime) -> None:
    """A health change takes effect once its announcement is confirmed, never before."""
    change = d.change
    if change is None or not settled.announced or settled.status != "acked":
        return
    rt.connections.apply(change)
    if change.state is not None:
        await rt.ledger.save_connection_state(change.state)


async def audit_failure(settled: Settled, d: Delivery, rt: Runtime) -> None:
    """The audit trail's word on a parked attempt (the ledger's own transitions record the
    rest)."""
    outcome, event = settled.outcome, d.event
    if settled.status != "acked" or not isinstance(outcome, Park) or outcome.code is None:
        return
    if event is None or outcome.code is ErrorCode.UNKNOWN_TENANT:
        return
    key = SaleKey(event.tenant_id, _sale_id(event), _generation(event))
    try:
        await rt.ledger.audit(
            key,
            d.attempt.operation,
            "dead_lettered" if outcome.kind == "dead_letter" else "retry_scheduled",
            event_id=event.event_id,
            error_code=str(outcome.code),
            detail=outcome.message[:2000],
        )
    except Exception:  # the audit trail must not turn a parked message into a lost one
        log.warning("ledger.audit_failed", exc_info=True)


async def count(settled: Settled, d: Delivery, rt: Runtime) -> None:
    outcome = settled.outcome
    metrics.handle_seconds.labels(d.attempt.label if d.event else "invalid").observe(
        time.monotonic() - d.started
    )
    if settled.status != "acked":
        return
    metrics.events_total.labels(d.attempt.label, outcome.label).inc()  # type: ignore[union-attr]
    if isinstance(outcome, Park) and outcome.kind == "dead_letter" and outcome.code:
        metrics.dead_lettered_total.labels(str(outcome.code)).inc()
    if isinstance(outcome, Park) and outcome.kind == "defer":
        metrics.deferred_total.labels(_defer_reason(d.result)).inc()


def _defer_reason(result: object) -> str:
    if isinstance(result, Throttled):
        return "paced"
    return "in_doubt" if isinstance(result, InDoubtWait) else "busy"


async def log_line(settled: Settled, d: Delivery, rt: Runtime) -> None:
    """One line per delivery, written once the outcome is settled (never "retry.scheduled"
    for a copy the broker did not confirm)."""
    outcome = settled.outcome
    if settled.status == "handed_back":
        reason = outcome.reason if isinstance(outcome, HandBack) else "settling failed"
        log.warning("message.handed_back", reason=reason)
    elif isinstance(outcome, Ack):
        # elapsed_ms: our callback's start → outcome confirmed and acked, provider calls
        # included (not the time a frame waited in the socket while the loop was busy).
        log.info(
            "message.handled",
            outcome=outcome.label,
            document_id=outcome.document_id,
            elapsed_ms=round((time.monotonic() - d.started) * 1000, 1),
        )
    elif isinstance(outcome, Park) and outcome.kind == "defer":
        # Paced deferrals come by the thousand in a burst: a line each only at debug level.
        (log.debug if isinstance(d.result, Throttled) else log.info)(
            "message.deferred",
            reason=outcome.reason,
            delay=outcome.delay,
            deferrals=d.attempt.deferrals + 1,
        )
    elif isinstance(outcome, Park):
        log.warning(
            "retry.scheduled" if outcome.kind == "retry" else "message.dead_lettered",
            error_code=str(outcome.code),
            error=outcome.message,
            next_attempt_at=outcome.next_attempt_at,
        )


AFTER_SETTLE: list[AfterSettle] = [apply_health, audit_failure, count, log_line]
