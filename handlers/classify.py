"""Pure decision: what happens to a message after a failed attempt (CONTRACTS §6).

Transient errors back off exponentially with jitter, capped at the longest delay tier
("wait 5 min, auto-retry"), honouring the provider's Retry-After, until the retry budget is
spent. An ``internal_error`` (a bug in the worker) is retried too, in case it was a passing
state of the process, but only ``internal_error_retries`` times: the same bug fails the same
way every time, and a day of retries would only bury it. Everything else is dead-lettered with
its code.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from providers.errors import ErrorCode, InvoicingError

#: Transient waits that are not a provider outage: past the budget they are dead-lettered with
#: their own code, so the person reading the dead-letter queue sees what is really wrong.
KEEP_CODE_WHEN_EXHAUSTED: frozenset[ErrorCode] = frozenset({ErrorCode.PREVIOUS_INVOICE_VALID})


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    #: The delay tiers in seconds, shortest first (one delay queue each).
    ladder: tuple[float, ...]
    base_seconds: float
    budget_seconds: float
    #: INVOICING_INTERNAL_ERROR_RETRIES: attempts after the first that an internal error gets.
    internal_error_retries: int = 3


@dataclass(frozen=True, slots=True)
class Retry:
    #: The tier the message waits in before it is tried again.
    delay: float
    next_attempt_at: datetime
    #: Set when the provider's Retry-After outlasts the longest tier: the message is not
    #: tried before this instant (it waits through more delay-queue rounds).
    not_before: datetime | None = None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    code: ErrorCode
    message: str


def backoff(attempt: int, policy: RetryPolicy, jitter: float) -> float:
    """Seconds to wait after failed attempt ``attempt`` (1-based).

    "Equal jitter": half the exponential step is fixed, half random, so a wave of messages that
    failed together spreads over the next tiers instead of returning in lockstep.
    ``jitter`` is a number in [0, 1).
    """
    cap = policy.ladder[-1]
    step: float = min(cap, policy.base_seconds * 2.0 ** max(0, attempt - 1))
    return step / 2 + step / 2 * jitter


def pick_tier(seconds: float, ladder: tuple[float, ...]) -> float:
    """The shortest tier at least ``seconds`` long; the longest tier caps it."""
    for tier in ladder:
        if tier >= seconds:
            return tier
    return ladder[-1]


def classify(
    error: InvoicingError,
    *,
    attempt: int,
    first_failed_at: datetime,
    now: datetime,
    policy: RetryPolicy,
    jitter: float,
) -> Retry | DeadLetter:
    if error.code is ErrorCode.INTERNAL_ERROR:
        # Counted by the attempt number the headers carry (x-retry-count), so a failure that
        # follows other transient ones does not get a fresh allowance.
        if attempt > policy.internal_error_retries:
            return DeadLetter(
                error.code, f"failed the same way on {attempt} attempts; last: {error.message}"
            )
    elif not error.transient:
        return DeadLetter(error.code, error.message)
    elapsed = (now - first_failed_at).total_seconds()
    wanted = backoff(attempt, policy, jitter)
    if error.retry_after is not None:
        wanted = max(wanted, error.retry_after)
    delay = pick_tier(wanted, policy.ladder)
    if elapsed + delay > policy.budget_seconds:
        if error.code in KEEP_CODE_WHEN_EXHAUSTED:
            return DeadLetter(error.code, f"still so after {attempt} attempts: {error.message}")
        return DeadLetter(
            ErrorCode.RETRIES_EXHAUSTED,
            f"gave up after {attempt} attempts over {elapsed:.0f}s; "
            f"last error {error.code}: {error.message}",
        )
    if error.retry_after is not None and error.retry_after > delay:
        not_before = now + timedelta(seconds=error.retry_after)
        return Retry(delay=delay, next_attempt_at=not_before, not_before=not_before)
    return Retry(delay=delay, next_attempt_at=now + timedelta(seconds=delay))
