"""Per-key pacing: requests get slots ``interval`` apart after a small burst."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from providers import ratelimit
from providers.ratelimit import KeyRateLimiter, key_id


@contextlib.contextmanager
def frozen_clock() -> Iterator[None]:
    """The limiter's clock stands still while a test books slots and reads the schedule, so
    the figures are exact however busy the machine is (the waits still run on the loop)."""
    now = time.monotonic()
    real = ratelimit.time
    ratelimit.time = SimpleNamespace(monotonic=lambda: now)  # type: ignore[assignment]
    try:
        yield
    finally:
        ratelimit.time = real


@pytest.fixture
def frozen() -> Iterator[None]:
    with frozen_clock():
        yield


async def test_requests_beyond_the_burst_queue_for_their_slots() -> None:
    limiter = KeyRateLimiter(per_minute=6000, burst=2)  # a slot every 10 ms
    with frozen_clock():
        tasks = [asyncio.create_task(limiter.acquire("k")) for _ in range(12)]
        await asyncio.sleep(0)  # every task has taken its slot, none has finished waiting
        assert limiter.backlog_seconds("k") == pytest.approx(0.11, abs=0.001)
        assert limiter.backlog_seconds("other") == 0  # keys do not share a schedule
    await asyncio.gather(*tasks)
    assert limiter.backlog_seconds("k") <= 0.02


async def test_disabled_limiter_never_waits() -> None:
    limiter = KeyRateLimiter(per_minute=0)
    await asyncio.gather(*(limiter.acquire("k") for _ in range(100)))
    assert limiter.backlog_seconds("k") == 0


def test_key_id_hides_the_secret() -> None:
    assert "secret" not in key_id("my-secret-key")
    assert key_id("a") == key_id("a") != key_id("b")


@pytest.mark.usefixtures("frozen")
async def test_deferred_requests_get_slots_one_interval_apart() -> None:
    limiter = KeyRateLimiter(per_minute=600, burst=1)  # a slot every 100 ms
    assert limiter.defer("k", max_wait=0.25) == 0  # nothing queued: go ahead
    tasks = [asyncio.create_task(limiter.acquire("k")) for _ in range(5)]
    await asyncio.sleep(0)  # five slots taken: the schedule is 0.5 s ahead
    first = limiter.defer("k", max_wait=0.25)
    second = limiter.defer("k", max_wait=0.25)
    assert first == pytest.approx(0.6, abs=0.02)  # after the backlog, one interval later
    assert second - first == pytest.approx(0.1, abs=0.001)
    for task in tasks:
        task.cancel()


@pytest.mark.usefixtures("frozen")
async def test_a_due_request_goes_to_the_front_not_behind_the_burst() -> None:
    limiter = KeyRateLimiter(per_minute=600, burst=1)
    tasks = [asyncio.create_task(limiter.acquire("k")) for _ in range(5)]
    await asyncio.sleep(0)  # 0.5 s of admitted work queued
    for _ in range(100):
        limiter.defer("k", max_wait=0.25)  # a burst books slots up to ~10.6 s out
    due = limiter.defer("k", max_wait=0.25, due=True)
    assert due == pytest.approx(0.35, abs=0.02)  # back when there is room, not in 10 s
    for task in tasks:
        task.cancel()
