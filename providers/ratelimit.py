"""Per-key request pacing, so one process never exceeds a provider's limit for a key.

Billingo allows 300 requests a minute per API key. A generic cell-rate (GCRA) schedule per key:
each request gets the next slot ``interval`` after the previous one, with a small burst
allowance. ``backlog_seconds`` tells callers how long a new request would wait, so the worker
can defer a throttled tenant's message instead of letting it hold a prefetch slot.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import time


@functools.lru_cache(maxsize=4096)
def key_id(secret: str) -> str:
    """A stable, non-reversible name for a key (limiter and cache keys never hold secrets).
    Cached: it is asked for on every request and every pacing check."""
    return hashlib.sha256(secret.encode()).hexdigest()[:16]


class KeyRateLimiter:
    def __init__(self, per_minute: float, burst: int = 10) -> None:
        self.enabled = per_minute > 0
        self._interval = 60.0 / per_minute if self.enabled else 0.0
        self._tolerance = self._interval * max(0, burst - 1)
        self._tat: dict[str, float] = {}
        #: Per key: the last slot reserved by a deferred request.
        self._deferred: dict[str, float] = {}

    def backlog_seconds(self, key: str) -> float:
        """How long a request for ``key`` made now would wait for its slot."""
        if not self.enabled:
            return 0.0
        now = time.monotonic()
        return max(0.0, self._tat.get(key, now) - now - self._tolerance)

    def defer(self, key: str, max_wait: float, *, due: bool = False) -> float:
        """0 when a request for ``key`` may go ahead now (waiting at most ``max_wait``);
        otherwise the seconds until a slot this caller reserves for later. Deferred callers
        get slots one interval apart, so a burst comes back at the pace it can be served,
        each message about once, instead of churning through the queue."""
        backlog = self.backlog_seconds(key)
        if backlog <= max_wait:
            return 0.0
        if due:
            # It already waited for its slot: back as soon as there is room, ahead of the
            # burst's later slots (never behind all of them again).
            return backlog - max_wait + self._interval
        now = time.monotonic()
        slot = max(self._deferred.get(key, 0.0), now + backlog) + self._interval
        self._deferred[key] = slot
        return slot - now

    async def acquire(self, key: str) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        tat = max(self._tat.get(key, now), now)
        wait = tat - now - self._tolerance
        self._tat[key] = tat + self._interval
        if len(self._tat) > 10_000:
            self._forget(now)
        if wait > 0:
            await asyncio.sleep(wait)

    def _forget(self, now: float) -> None:
        # Keys whose schedule is in the past carry no state worth keeping.
        for key in [k for k, t in self._tat.items() if t < now]:
            del self._tat[key]
        for key in [k for k, t in self._deferred.items() if t < now]:
            del self._deferred[key]
