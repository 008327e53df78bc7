"""Per-key pacing: requests get slots ``interval`` apart after a small burst."""

from __future__ import annotations

import asyncio

import pytest

from providers.ratelimit import KeyRateLimiter, key_id


async def test_requests_beyond_the_burst_queue_for_their_slots() -> None:
    limiter = KeyRateLimiter(per_minute=6000, burst=2)  # a slot every 10 ms
    tasks = [asyncio.create_task(limiter.acquire("k")) for _ in range(12)]
    await asyncio.sleep(0)  # every task has taken its slot, none has finished waiting
    assert limiter.backlog_seconds("k") == pytest.approx(0.11, abs=0.005)
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
