"""This worker's claim to its leases: a row in the ledger that it renews while it runs.

A lease names the worker that holds it. While the worker's ``alive_until`` lies ahead, its
leases stand; once it stops renewing (SIGKILL, a lost host, a frozen process) any other worker,
or its own restart, takes its sales over within ``INVOICING_LIVENESS_SECONDS`` instead of after
the lease (90 s). A graceful stop retires the row, so its sales are free at once.

The worker judges its own liveness more strictly than the others do: it counts from *before*
its renewal was written and keeps a quarter of the period as margin, so it stops sending to a
provider (``Context.may_send``) before anyone else may take its sales over.
"""

from __future__ import annotations

import asyncio
import time

import structlog

from handlers.ledger import Ledger
from worker import metrics

log = structlog.get_logger(__name__)


class Liveness:
    def __init__(self, ledger: Ledger, worker_id: str, ttl_seconds: float) -> None:
        self.ledger = ledger
        self.worker_id = worker_id
        self.ttl = ttl_seconds
        #: Renewals come four times a period: one or two missed ones cost nothing.
        self.interval = ttl_seconds / 4
        self._valid_until = 0.0

    def alive(self) -> bool:
        """True while no other worker can have taken this worker's sales over."""
        return time.monotonic() < self._valid_until

    async def renew(self) -> None:
        started = time.monotonic()
        await self.ledger.heartbeat(self.worker_id, self.ttl)
        self._valid_until = started + self.ttl * 0.75
        metrics.liveness_up.set(1)

    async def run(self) -> None:
        """Renew until cancelled; a failed renewal is logged and tried again next interval."""
        while True:
            await asyncio.sleep(self.interval)
            try:
                await asyncio.wait_for(self.renew(), timeout=self.interval)
            except (Exception, TimeoutError):
                log.warning("liveness.renew_failed", exc_info=True)
                if not self.alive():
                    metrics.liveness_up.set(0)

    async def retire(self) -> None:
        """A graceful stop: whatever this worker still holds may be taken over at once."""
        self._valid_until = 0.0
        metrics.liveness_up.set(0)
        try:
            await self.ledger.retire(self.worker_id)
        except Exception:
            log.warning("liveness.retire_failed", exc_info=True)
