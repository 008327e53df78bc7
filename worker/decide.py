"""What becomes of one delivery: a pure decision, carried out by :mod:`worker.settle`.

``decide`` turns what happened to a delivery (a :class:`Handled`, a :class:`Deferred`, or an
:class:`InvoicingError`, with the attempt history read from our own headers) into one
:data:`Outcome`:

- :class:`Ack`: publish these events, then ack;
- :class:`Park`: copy the message to this delay or dead-letter queue with these headers, publish
  these events, then ack;
- :class:`HandBack`: no ack; the broker delivers the message again.

Nothing here does I/O or reads a clock: ``now`` and ``jitter`` come in as arguments, so every
branch has a fast unit test (tests/unit/test_decide.py).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from handlers.classify import DeadLetter, Retry, RetryPolicy, backoff, classify
from handlers.context import Deferred, Handled
from handlers.messages import INBOUND_TYPES, ErrorInfo, InvoiceFailed, OutEvent, ProviderName
from providers.errors import ErrorCode, InvoicingError
from worker.logging import scrub_text
from worker.topology import Names

#: Headers only the worker writes (CONTRACTS §7 adds the dead-letter ones).
H_RETRY_COUNT = "x-retry-count"
H_FIRST_FAILED = "x-first-failed-at"
H_ORIGINAL_RK = "x-original-routing-key"
H_DEFER_COUNT = "x-defer-count"
H_NOT_BEFORE = "x-not-before"
H_LAST_ERROR = "x-last-error-code"
#: The worker's HMAC over the headers above: only sealed retry state counts (see HeaderSeal).
H_SEAL = "x-retry-seal"
#: What a replay resets, so the replayed message gets a fresh retry budget.
RETRY_STATE_HEADERS = (
    H_RETRY_COUNT,
    H_FIRST_FAILED,
    H_LAST_ERROR,
    H_DEFER_COUNT,
    H_NOT_BEFORE,
    H_SEAL,
)
#: What the seal covers.
SEALED_HEADERS = (
    H_RETRY_COUNT,
    H_FIRST_FAILED,
    H_DEFER_COUNT,
    H_NOT_BEFORE,
    H_ORIGINAL_RK,
    H_LAST_ERROR,
)
#: CONTRACTS §7: what a dead-lettered message carries besides our retry state.
H_ERROR_CODE = "x-error-code"
H_ERROR_MESSAGE = "x-error-message"
H_TENANT = "x-tenant-id"
H_ATTEMPTS = "x-attempts"
H_DEAD_LETTERED_AT = "x-dead-lettered-at"
#: Error text in headers and events is cut here (a provider may answer with a whole page).
MAX_HEADER_TEXT = 2000


# --------------------------------------------------------------------------- the delivery


@dataclass(frozen=True, slots=True)
class HeaderSeal:
    """An HMAC over the worker's own retry headers, bound to one message (its ``message_id``
    and a digest of its body), so that state copied from another message, typed in by hand or
    published by anyone but a worker of this deployment counts as absent.

    The key is ``INVOICING_HEADER_KEY``; unset, it is derived from the ledger URL, which every
    replica of a deployment shares (and which publishers do not know)."""

    key: bytes = field(repr=False)

    @classmethod
    def derive(cls, header_key: str | None, ledger_url: str) -> HeaderSeal:
        secret = header_key if header_key else f"derived from the ledger: {ledger_url}"
        return cls(hashlib.sha256(b"invoicing-header-key\0" + secret.encode()).digest())

    def sign(self, headers: dict[str, Any], identity: str) -> None:
        headers[H_SEAL] = self._mac(headers, identity)

    def valid(self, headers: Mapping[str, Any], identity: str) -> bool:
        seal = _text(headers.get(H_SEAL))
        if seal is None or not seal.isascii():
            return False  # compare_digest refuses non-ASCII text: such a seal is simply wrong
        return hmac.compare_digest(seal.encode(), self._mac(headers, identity).encode())

    def _mac(self, headers: Mapping[str, Any], identity: str) -> str:
        parts = [identity, *(f"{name}={_canonical(headers.get(name))}" for name in SEALED_HEADERS)]
        return "v1:" + hmac.new(self.key, "\n".join(parts).encode(), hashlib.sha256).hexdigest()


def identity_of(message_id: str | None, body: bytes) -> str:
    """What a seal is bound to: headers moved onto another message do not verify."""
    return f"{message_id or ''}:{hashlib.sha256(body).hexdigest()}"


def _canonical(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return f"bool:{value}"
    if isinstance(value, int):
        return f"int:{value}"
    text = _text(value)
    return f"str:{text}" if text is not None else f"other:{value!r}"


@dataclass(frozen=True, slots=True)
class Attempt:
    """What a delivery says about its own history, read from the headers the worker wrote.
    A header that does not parse (wrong type, a time without a zone) counts as absent: a
    malformed header must not crash the decision and loop the message to the delivery limit.

    Only the worker's own, sealed retry state counts. Unsealed (forged, copied, from a
    dead-lettered message moved back by hand) it is dropped, so it can shorten no budget; an
    unsealed ``x-not-before`` delays the message by at most ``longest_wait`` (the longest
    tier)."""

    routing_key: str
    #: 1 for the first delivery, 2 after one failed attempt, ...
    number: int
    first_failed_at: datetime | None
    deferrals: int
    not_before: datetime | None
    #: The delivery's headers, without retry state that was not sealed.
    headers: Mapping[str, Any]
    seal: HeaderSeal | None = None
    identity: str = ""

    @classmethod
    def read(
        cls,
        routing_key: str | None,
        headers: Mapping[str, Any] | None,
        *,
        seal: HeaderSeal,
        identity: str,
        now: datetime,
        longest_wait: float,
    ) -> Attempt:
        headers = dict(headers or {})
        sealed = seal.valid(headers, identity)
        real = routing_key or ""
        original = _text(headers.get(H_ORIGINAL_RK))
        # The real routing key decides the event type. Only a message that came back from a
        # delay queue (routed by the work queue's name) takes it from our header; the body's
        # event_type must still equal it (handlers.parse), so no message changes its type.
        if real not in INBOUND_TYPES and original:
            real = original
        not_before = _instant(headers.get(H_NOT_BEFORE))
        if not sealed:
            for name in RETRY_STATE_HEADERS:
                headers.pop(name, None)
            if not_before is not None:
                not_before = min(not_before, now + timedelta(seconds=longest_wait))
        return cls(
            routing_key=real,
            number=_count(headers.get(H_RETRY_COUNT)) + 1,
            first_failed_at=_instant(headers.get(H_FIRST_FAILED)),
            deferrals=_count(headers.get(H_DEFER_COUNT)),
            not_before=not_before,
            headers=headers,
            seal=seal,
            identity=identity,
        )

    def sealed(self, headers: dict[str, Any]) -> dict[str, Any]:
        """``headers`` with the worker's seal over its retry state, for the next delivery."""
        if self.seal is not None:
            self.seal.sign(headers, self.identity)
        return headers

    @property
    def label(self) -> str:
        """The routing key as a metrics label: a stray key must not create a time series."""
        return self.routing_key if self.routing_key in INBOUND_TYPES else "unknown"

    @property
    def operation(self) -> Literal["issue", "cancel"]:
        return "cancel" if self.routing_key == "sale.storno" else "issue"


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value if isinstance(value, str) else None


def _count(value: Any) -> int:
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return max(0, value)
    text = _text(value)
    if text is None or not text.strip().isdigit():
        return 0
    return int(text)


def _instant(value: Any) -> datetime | None:
    text = _text(value)
    if not text:
        return None
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None


# --------------------------------------------------------------------------- outcomes


@dataclass(frozen=True, slots=True)
class Ack:
    """Publish ``events`` (confirmed), then ack."""

    #: The metrics outcome: issued, cancelled, duplicate or skipped.
    label: str
    events: tuple[OutEvent, ...]
    document_id: str | None = None


@dataclass(frozen=True, slots=True)
class Park:
    """Copy the message to ``queue`` with ``headers`` (confirmed), publish ``events``
    (confirmed), then ack."""

    kind: Literal["defer", "retry", "dead_letter"]
    queue: str
    headers: Mapping[str, Any]
    events: tuple[OutEvent, ...]
    #: The delay tier the copy waits in (defer, retry).
    delay: float | None = None
    #: What failed, as announced (retry, dead_letter).
    code: ErrorCode | None = None
    message: str = ""
    next_attempt_at: datetime | None = None
    #: Why a deferral waits (defer).
    reason: str = ""
    #: A reserved slot or a known moment (the tier did not overshoot it).
    exact: bool = False

    @property
    def label(self) -> str:
        return "dead_lettered" if self.kind == "dead_letter" else "retried"


@dataclass(frozen=True, slots=True)
class HandBack:
    """No ack: the broker delivers the message again."""

    reason: str


Outcome = Ack | Park | HandBack


@dataclass(frozen=True, slots=True)
class Subject:
    """Whom an ``invoice.failed`` is about: the parsed event's ids, or what could be read of a
    message that did not parse (the tenant only)."""

    tenant_id: str
    sale_id: str | None = None
    invoice_generation: int | None = None
    provider: ProviderName | None = None
    causation_id: str | None = None


# --------------------------------------------------------------------------- the decision


def decide(
    attempt: Attempt,
    result: Handled | Deferred | InvoicingError,
    *,
    subject: Subject | None,
    extra_events: tuple[OutEvent, ...] = (),
    names: Names,
    policy: RetryPolicy,
    now: datetime,
    jitter: float,
) -> Outcome:
    """The one decision per delivery. ``extra_events`` (a connection.status) ride along with
    the outcome so that they are confirmed before the ack, like the outcome's own events."""
    if isinstance(result, Handled):
        document_id = getattr(result.events[0], "document_id", None) if result.events else None
        return Ack(result.outcome, (*result.events, *extra_events), document_id)
    if isinstance(result, Deferred):
        return _defer(attempt, result, names, policy, now, jitter)
    return _failed(attempt, result, subject, extra_events, names, policy, now, jitter)


def _defer(
    attempt: Attempt,
    why: Deferred,
    names: Names,
    policy: RetryPolicy,
    now: datetime,
    jitter: float,
) -> Park:
    """Not a failure (a busy sale, a paced key, a request still in its grace): come back later.
    Exact waits take a tier that does not overshoot them and carry the rest in
    ``x-not-before``; the others back off with jitter the more often the message was deferred,
    so a long backlog does not churn the queue."""
    deferrals = attempt.deferrals + 1
    if why.exact:
        wanted = why.delay
        delay, queue = names.delay_queue_within(wanted)
    else:
        wanted = max(why.delay, backoff(deferrals, policy, jitter))
        delay, queue = names.delay_queue_for(wanted)
    headers = dict(attempt.headers)
    headers.pop(H_NOT_BEFORE, None)
    if wanted > delay:
        headers[H_NOT_BEFORE] = (now + timedelta(seconds=wanted)).isoformat()
    headers[H_DEFER_COUNT] = deferrals
    headers[H_ORIGINAL_RK] = attempt.routing_key
    return Park(
        "defer", queue, attempt.sealed(headers), (), delay=delay, reason=str(why), exact=why.exact
    )


def _failed(
    attempt: Attempt,
    error: InvoicingError,
    subject: Subject | None,
    extra_events: tuple[OutEvent, ...],
    names: Names,
    policy: RetryPolicy,
    now: datetime,
    jitter: float,
) -> Park:
    first = attempt.first_failed_at or now
    decision = classify(
        error,
        attempt=attempt.number,
        first_failed_at=first,
        now=now,
        policy=policy,
        jitter=jitter,
    )
    if isinstance(decision, Retry):
        queue = names.delay_queue_for(decision.delay)[1]
        headers = retry_headers(attempt, error.code, first, decision)
        code, message, next_at = error.code, error.message, decision.next_attempt_at
        kind: Literal["retry", "dead_letter"] = "retry"
    else:
        queue = names.dead_letter_queue
        headers = dead_letter_headers(attempt, decision, subject, first, now)
        code, message, next_at = decision.code, decision.message, None
        kind = "dead_letter"
    events = list(extra_events)
    if subject is not None:
        events.append(failed_event(attempt, subject, code, message, kind, next_at))
    return Park(
        kind,
        queue,
        headers,
        tuple(events),
        delay=decision.delay if isinstance(decision, Retry) else None,
        code=code,
        message=message,
        next_attempt_at=next_at,
    )


def retry_headers(
    attempt: Attempt, code: ErrorCode, first: datetime, decision: Retry
) -> dict[str, Any]:
    headers = dict(attempt.headers)
    headers.pop(H_NOT_BEFORE, None)
    if decision.not_before is not None:
        headers[H_NOT_BEFORE] = decision.not_before.isoformat()
    # Our own counter: x-death counting changed between RabbitMQ 3.13 and 4.0.
    headers[H_RETRY_COUNT] = attempt.number
    headers[H_FIRST_FAILED] = first.astimezone(UTC).isoformat()
    headers[H_ORIGINAL_RK] = attempt.routing_key
    headers[H_LAST_ERROR] = str(code)
    return attempt.sealed(headers)


def dead_letter_headers(
    attempt: Attempt,
    decision: DeadLetter,
    subject: Subject | None,
    first: datetime,
    now: datetime,
) -> dict[str, Any]:
    """CONTRACTS §7. Unsealed: moved back to the work queue by hand (not by ``dlq replay``,
    which strips the retry state), the message starts a fresh budget instead of dying of it."""
    headers = dict(attempt.headers)
    headers.pop(H_SEAL, None)
    headers.update(
        {
            H_ERROR_CODE: str(decision.code),
            H_ERROR_MESSAGE: scrub_text(decision.message)[:MAX_HEADER_TEXT],
            H_ORIGINAL_RK: attempt.routing_key,
            H_TENANT: subject.tenant_id if subject is not None else "",
            H_ATTEMPTS: attempt.number,
            H_FIRST_FAILED: first.astimezone(UTC).isoformat(),
            H_DEAD_LETTERED_AT: now.isoformat(),
        }
    )
    return headers


def failed_event(
    attempt: Attempt,
    subject: Subject,
    code: ErrorCode,
    message: str,
    kind: Literal["retry", "dead_letter"],
    next_attempt_at: datetime | None,
) -> InvoiceFailed:
    return InvoiceFailed(
        causation_id=subject.causation_id,
        tenant_id=subject.tenant_id,
        sale_id=subject.sale_id,
        invoice_generation=subject.invoice_generation,
        provider=subject.provider,
        operation=attempt.operation,
        error=ErrorInfo(
            code=str(code),
            message=scrub_text(message)[:MAX_HEADER_TEXT],
            fix=InvoicingError(code, "").fix,
        ),
        attempt=attempt.number,
        final=kind == "dead_letter",
        next_attempt_at=next_attempt_at,
    )
