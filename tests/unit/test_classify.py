"""The retry / dead-letter decision, table-tested (CONTRACTS §6)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from handlers.classify import DeadLetter, Retry, RetryPolicy, backoff, classify, pick_tier
from providers.errors import TRANSIENT, ErrorCode, InvoicingError

POLICY = RetryPolicy(ladder=(5, 15, 30, 60, 120, 300), base_seconds=5, budget_seconds=24 * 3600)
NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)


def decide(
    code: ErrorCode,
    *,
    attempt: int = 1,
    since: float = 0,
    jitter: float = 0.5,
    retry_after: float | None = None,
) -> Retry | DeadLetter:
    return classify(
        InvoicingError(code, "boom", retry_after=retry_after),
        attempt=attempt,
        first_failed_at=NOW - timedelta(seconds=since),
        now=NOW,
        policy=POLICY,
        jitter=jitter,
    )


@pytest.mark.parametrize("code", sorted(set(ErrorCode) - TRANSIENT - {ErrorCode.INTERNAL_ERROR}))
def test_permanent_errors_are_dead_lettered_with_their_own_code(code: ErrorCode) -> None:
    assert decide(code) == DeadLetter(code, "boom")


@pytest.mark.parametrize("code", sorted(TRANSIENT))
def test_transient_errors_are_retried(code: ErrorCode) -> None:
    decision = decide(code)
    assert isinstance(decision, Retry)
    assert decision.next_attempt_at == NOW + timedelta(seconds=decision.delay)


def test_a_ledger_outage_is_transient_and_not_the_providers() -> None:
    assert ErrorCode.LEDGER_UNAVAILABLE in TRANSIENT
    assert isinstance(decide(ErrorCode.LEDGER_UNAVAILABLE), Retry)


def test_an_internal_error_is_retried_a_bounded_number_of_times_then_dead_lettered() -> None:
    # Given the default of 3 retries: attempts 1-3 are retried, the 4th is parked at once,
    # long before the retry budget (a day) would end it.
    assert POLICY.internal_error_retries == 3
    for attempt in (1, 2, 3):
        assert isinstance(decide(ErrorCode.INTERNAL_ERROR, attempt=attempt), Retry)
    parked = decide(ErrorCode.INTERNAL_ERROR, attempt=4, since=60)
    assert isinstance(parked, DeadLetter)
    assert parked.code is ErrorCode.INTERNAL_ERROR
    assert "4 attempts" in parked.message
    assert "boom" in parked.message


def test_no_internal_error_retries_parks_the_first_failure() -> None:
    policy = RetryPolicy(ladder=(5,), base_seconds=5, budget_seconds=3600, internal_error_retries=0)
    decision = classify(
        InvoicingError(ErrorCode.INTERNAL_ERROR, "bug"),
        attempt=1,
        first_failed_at=NOW,
        now=NOW,
        policy=policy,
        jitter=0.0,
    )
    assert decision == DeadLetter(
        ErrorCode.INTERNAL_ERROR, "failed the same way on 1 attempts; last: bug"
    )


@pytest.mark.parametrize(
    ("attempt", "jitter", "tier"),
    [
        (1, 0.0, 5),
        (1, 0.99, 5),
        (2, 0.0, 5),
        (2, 0.99, 15),
        (3, 0.5, 15),
        (4, 0.9, 60),
        (6, 0.5, 120),
        (7, 0.0, 300),
        (20, 0.99, 300),
    ],
)
def test_backoff_grows_exponentially_with_jitter_and_caps_at_five_minutes(
    attempt: int, jitter: float, tier: float
) -> None:
    decision = decide(ErrorCode.NETWORK_ERROR, attempt=attempt, jitter=jitter)
    assert isinstance(decision, Retry)
    assert decision.delay == tier


def test_jitter_spreads_the_wanted_delay_between_half_and_all_of_the_step() -> None:
    assert backoff(3, POLICY, 0.0) == 10
    assert backoff(3, POLICY, 0.999) == pytest.approx(20, abs=0.01)
    assert backoff(50, POLICY, 0.999) <= 300


def test_retry_after_is_honoured() -> None:
    decision = decide(ErrorCode.RATE_LIMITED, retry_after=40)
    assert isinstance(decision, Retry)
    assert decision.delay == 60  # the shortest tier that waits at least 40 s


def test_a_spent_retry_budget_dead_letters_as_retries_exhausted() -> None:
    decision = decide(ErrorCode.TIMEOUT, attempt=300, since=24 * 3600 - 10)
    assert isinstance(decision, DeadLetter)
    assert decision.code is ErrorCode.RETRIES_EXHAUSTED
    assert "timeout: boom" in decision.message


def test_pick_tier() -> None:
    assert pick_tier(0, (1, 2)) == 1
    assert pick_tier(1.5, (1, 2)) == 2
    assert pick_tier(99, (1, 2)) == 2


def test_every_code_has_a_fix() -> None:
    for code in ErrorCode:
        assert InvoicingError(code, "x").fix


def test_a_retry_after_beyond_the_longest_tier_sets_not_before() -> None:
    decision = decide(ErrorCode.RATE_LIMITED, retry_after=3600)
    assert isinstance(decision, Retry)
    assert decision.delay == 300  # waits in the longest tier, then again until not_before
    assert decision.not_before == NOW + timedelta(seconds=3600)
    assert decision.next_attempt_at == decision.not_before


def test_paced_waits_use_the_longest_tier_that_does_not_overshoot() -> None:
    from worker.settings import Settings
    from worker.topology import Names

    names = Names.from_settings(Settings(_env_file=None))
    assert names.delay_queue_within(7)[0] == 5
    assert names.delay_queue_within(0.4)[0] == 1  # below every tier: the shortest
    assert names.delay_queue_within(3600)[0] == 300
    assert names.delay_queue_for(7)[0] == 15  # retries round up instead
