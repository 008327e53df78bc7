"""The pure decision: what becomes of a delivery, from what happened to it and its history."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from handlers.classify import RetryPolicy
from handlers.context import Handled, SaleBusy, Throttled
from handlers.messages import InvoiceFailed, InvoiceIssued
from providers.errors import ErrorCode, InvoicingError
from worker.decide import (
    RETRY_STATE_HEADERS,
    Ack,
    Attempt,
    HeaderSeal,
    Park,
    Subject,
    decide,
    identity_of,
)
from worker.settings import Settings
from worker.topology import Names

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
NAMES = Names.from_settings(Settings(queue="q", retry_delays="1s,5s,15s,30s,1m,2m,5m"))
POLICY = RetryPolicy(ladder=(1, 5, 15, 30, 60, 120, 300), base_seconds=5, budget_seconds=86400)
SUBJECT = Subject("hotel", "S-1", 1, "billingo", "ev-1")


SEAL = HeaderSeal.derive("test key", "sqlite:///unused")
IDENTITY = identity_of("ev-1", b'{"event_id": "ev-1"}')
LONGEST = POLICY.ladder[-1]


def read(headers: dict[str, object] | None, rk: str | None = "sale.paid") -> Attempt:
    return Attempt.read(rk, headers, seal=SEAL, identity=IDENTITY, now=NOW, longest_wait=LONGEST)


def sealed(headers: dict[str, object], identity: str = IDENTITY) -> dict[str, object]:
    """Headers as a worker of this deployment wrote them."""
    headers = dict(headers)
    SEAL.sign(headers, identity)
    return headers


def attempt(headers: dict[str, object] | None = None, rk: str = "sale.paid") -> Attempt:
    """The worker's own (sealed) headers."""
    return read(sealed(headers) if headers else None, rk)


def run(
    result: object,
    headers: dict[str, object] | None = None,
    *,
    forged: bool = False,
    rk: str = "sale.paid",
    **kw: object,
) -> object:
    return decide(
        read(headers, rk) if forged else attempt(headers, rk),
        result,  # type: ignore[arg-type]
        subject=SUBJECT,
        names=NAMES,
        policy=POLICY,
        now=NOW,
        jitter=0.5,
        **kw,  # type: ignore[arg-type]
    )


def issued() -> InvoiceIssued:
    return InvoiceIssued(
        causation_id="ev-1",
        tenant_id="hotel",
        sale_id="S-1",
        invoice_generation=1,
        provider="billingo",
        document_id="D-1",
        invoice_number="INV-1",
        gross_total=Decimal("100"),
        currency="HUF",
    )


def test_a_handled_sale_is_acked_after_its_events_and_any_status_change() -> None:
    status = object()
    outcome = run(Handled("issued", (issued(),)), extra_events=(status,))
    assert isinstance(outcome, Ack)
    assert outcome.label == "issued"
    assert outcome.events[0].document_id == "D-1"  # type: ignore[union-attr]
    assert outcome.events[1] is status
    assert outcome.document_id == "D-1"


def test_a_transient_error_parks_a_copy_in_a_delay_queue_with_a_non_final_failure() -> None:
    outcome = run(InvoicingError(ErrorCode.PROVIDER_UNAVAILABLE, "503"))
    assert isinstance(outcome, Park)
    assert outcome.kind == "retry"
    assert outcome.queue == "q.retry.5s"  # 5 s · 2^0, equal jitter 0.5 → 3.75 s → the 5 s tier
    assert outcome.headers["x-retry-count"] == 1
    assert outcome.headers["x-first-failed-at"] == NOW.isoformat()
    assert outcome.headers["x-original-routing-key"] == "sale.paid"
    (failed,) = outcome.events
    assert isinstance(failed, InvoiceFailed)
    assert (failed.final, failed.attempt, failed.error.code) == (False, 1, "provider_unavailable")
    assert failed.next_attempt_at == NOW + timedelta(seconds=5)


def test_a_permanent_error_is_dead_lettered_with_the_contract_headers() -> None:
    outcome = run(InvoicingError(ErrorCode.TAX_NUMBER_INVALID, "bad check digit"))
    assert isinstance(outcome, Park)
    assert outcome.kind == "dead_letter"
    assert outcome.queue == NAMES.dead_letter_queue
    for header in (
        "x-error-code",
        "x-error-message",
        "x-original-routing-key",
        "x-tenant-id",
        "x-attempts",
        "x-first-failed-at",
        "x-dead-lettered-at",
    ):
        assert header in outcome.headers
    assert outcome.headers["x-error-code"] == "tax_number_invalid"
    (failed,) = outcome.events
    assert isinstance(failed, InvoiceFailed)
    assert failed.final
    assert failed.next_attempt_at is None


def test_transient_errors_past_the_budget_are_dead_lettered_as_retries_exhausted() -> None:
    first = (NOW - timedelta(days=2)).isoformat()
    outcome = run(InvoicingError(ErrorCode.TIMEOUT, "slow"), {"x-first-failed-at": first})
    assert isinstance(outcome, Park)
    assert outcome.code is ErrorCode.RETRIES_EXHAUSTED


def test_malformed_retry_headers_count_as_absent_instead_of_raising() -> None:
    # A naive time used to make classify raise TypeError, looping the message to the limit.
    naive = {"x-first-failed-at": "2026-12-01T10:00:00", "x-retry-count": "abc"}
    read = attempt(naive)
    assert (read.first_failed_at, read.number) == (None, 1)
    outcome = run(InvoicingError(ErrorCode.TIMEOUT, "slow"), naive)
    assert isinstance(outcome, Park)
    assert outcome.kind == "retry"
    assert outcome.headers["x-first-failed-at"] == NOW.isoformat()
    for bad in ({"x-retry-count": True}, {"x-retry-count": -4}, {"x-retry-count": b"x"}):
        assert attempt(bad).number == 1
    assert attempt({"x-not-before": "tomorrow"}).not_before is None
    assert attempt({"x-retry-count": b"3"}).number == 4


def test_an_exact_deferral_waits_in_a_tier_that_does_not_overshoot_it() -> None:
    outcome = run(Throttled("paced", delay=40))
    assert isinstance(outcome, Park)
    assert outcome.kind == "defer"
    assert outcome.delay == 30
    assert outcome.queue == "q.retry.30s"
    assert outcome.headers["x-not-before"] == (NOW + timedelta(seconds=40)).isoformat()
    assert outcome.headers["x-defer-count"] == 1
    assert outcome.events == ()  # a deferral is not a failure: nothing to announce


def test_a_busy_sale_backs_off_the_more_it_was_deferred() -> None:
    first = run(SaleBusy("busy"))
    later = run(SaleBusy("busy"), {"x-defer-count": 4})
    assert isinstance(first, Park)
    assert isinstance(later, Park)
    assert first.delay is not None
    assert later.delay is not None
    assert later.delay > first.delay


def test_a_message_without_a_tenant_is_parked_without_an_event() -> None:
    outcome = decide(
        attempt(),
        InvoicingError(ErrorCode.INVALID_MESSAGE, "not JSON"),
        subject=None,
        names=NAMES,
        policy=POLICY,
        now=NOW,
        jitter=0.0,
    )
    assert isinstance(outcome, Park)
    assert outcome.kind == "dead_letter"
    assert outcome.events == ()
    assert outcome.headers["x-tenant-id"] == ""


# --------------------------------------------------------------------------- forged headers

OLD = (NOW - timedelta(days=30)).isoformat()


def test_a_forged_not_before_delays_a_sale_by_the_longest_tier_at_most() -> None:
    forged = read({"x-not-before": "2100-01-01T00:00:00+00:00"})
    assert forged.not_before == NOW + timedelta(seconds=LONGEST)
    assert "x-not-before" not in forged.headers
    # What the worker then writes is its own, sealed, and no later than that.
    outcome = run(Throttled("not before its reserved time", delay=LONGEST))
    assert isinstance(outcome, Park)
    assert outcome.delay == LONGEST
    assert "x-not-before" not in outcome.headers
    assert SEAL.valid(outcome.headers, IDENTITY)
    # The worker's own x-not-before (a long Retry-After) still counts.
    own = attempt({"x-not-before": "2100-01-01T00:00:00+00:00"})
    assert own.not_before == datetime(2100, 1, 1, tzinfo=UTC)


def test_a_forged_retry_count_and_first_failure_shorten_no_budget() -> None:
    forged = {"x-retry-count": 999, "x-first-failed-at": OLD, "x-defer-count": 999}
    read_back = read(forged)
    assert (read_back.number, read_back.first_failed_at, read_back.deferrals) == (1, None, 0)
    outcome = run(InvoicingError(ErrorCode.PROVIDER_UNAVAILABLE, "503"), forged, forged=True)
    assert isinstance(outcome, Park)
    assert outcome.kind == "retry"
    assert outcome.headers["x-retry-count"] == 1
    assert outcome.headers["x-first-failed-at"] == NOW.isoformat()
    # Nothing forged is carried into the sealed copy (it would be laundered by the seal).
    assert "x-defer-count" not in outcome.headers
    assert SEAL.valid(outcome.headers, IDENTITY)
    # The worker's own state still spends the budget.
    own = run(InvoicingError(ErrorCode.PROVIDER_UNAVAILABLE, "503"), forged)
    assert isinstance(own, Park)
    assert own.code is ErrorCode.RETRIES_EXHAUSTED


def test_the_real_routing_key_decides_the_event_type() -> None:
    header = {"x-original-routing-key": "sale.storno"}
    assert read(header, "sale.paid").routing_key == "sale.paid"
    assert attempt(header, "sale.paid").routing_key == "sale.paid"  # even sealed
    # Back from a delay queue the message is routed by the work queue's name: our header
    # restores the event type (the body's event_type must still match it when parsed).
    assert attempt(header, "q").routing_key == "sale.storno"


def test_retry_state_sealed_for_another_message_or_edited_counts_as_absent() -> None:
    state = {"x-retry-count": 7, "x-first-failed-at": OLD}
    other = sealed(state, identity_of("ev-2", b"another body"))
    assert read(other).number == 1
    edited = sealed(state)
    edited["x-retry-count"] = 999
    assert (read(edited).number, read(edited).first_failed_at) == (1, None)
    assert read(sealed(state)).number == 8


def test_a_dead_lettered_copy_loses_its_seal_and_a_replay_strips_the_rest() -> None:
    outcome = run(InvoicingError(ErrorCode.TAX_NUMBER_INVALID, "bad"), {"x-retry-count": 3})
    assert isinstance(outcome, Park)
    assert "x-retry-seal" not in outcome.headers
    # Moved back by hand (routed by the queue's name): a fresh budget, the type restored.
    moved = read(dict(outcome.headers), "q")
    assert (moved.number, moved.first_failed_at, moved.routing_key) == (1, None, "sale.paid")
    assert "x-retry-seal" in RETRY_STATE_HEADERS


def test_a_seal_that_is_not_even_ascii_counts_as_absent_instead_of_raising() -> None:
    # hmac.compare_digest raises TypeError on non-ASCII text: that escaped process() and left
    # the delivery neither acked nor nacked (review finding).
    state = {"x-retry-count": 7, "x-first-failed-at": OLD}
    for seal in ("é", b"\xff", "x" * 64 + "é"):
        assert read({**state, "x-retry-seal": seal}).number == 1
