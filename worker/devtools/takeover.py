"""The fast-takeover scenario: SIGKILL a worker with creates in flight, restart it, time it.

A worker process takes ``sales`` sales of one Billingo tenant; the sandbox holds every create
(the request arrived, no answer yet) until all of them are in flight. Then the worker is
killed, the sandbox lets the held creates commit (their answers are lost with the process),
and a new worker starts. It must find each of those invoices (look up after the in-doubt
grace) instead of creating a second one, and it must not wait for the dead worker's 90 s
leases: the dead worker stops renewing its liveness, so its sales are free within
``INVOICING_LIVENESS_SECONDS``.

Used by tests/integration/test_takeover.py (asserts) and bench/takeover.py (prints figures).
"""

from __future__ import annotations

import asyncio
import collections
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from aio_pika.abc import AbstractChannel

from worker.devtools.billingo_sandbox import BillingoSandbox
from worker.devtools.faults import Fault
from worker.devtools.procs import free_port, spawn_worker, wait_until, worker_ready
from worker.devtools.samples import Outbox, paid_event, publish_event
from worker.settings import Settings


@dataclass(frozen=True)
class TakeoverResult:
    sales: int
    #: Creates the provider was holding (sent, unanswered) when the worker was killed.
    in_flight_at_kill: int
    #: From the restarted worker's /readyz answering 200 to the last invoice.issued.
    seconds_to_all_issued: float
    #: Create requests the provider received in all (the held ones included).
    creates: int
    #: Invoices at the provider, and external keys with more than one.
    invoices: int
    duplicates: int


async def sigkill_takeover(
    settings: Settings,
    sandbox: BillingoSandbox,
    secret: str,
    tenant_id: str,
    channel: AbstractChannel,
    outbox: Outbox,
    log: Path,
    *,
    sales: int = 64,
    timeout: float = 60.0,
) -> TakeoverResult:
    settings = settings.model_copy(update={"prefetch": max(settings.prefetch, sales)})
    hold = sandbox.plan.add(Fault("hold", method="POST", path="/documents"))
    ids = [f"S-TAKE-{n:03d}" for n in range(sales)]
    worker = await spawn_worker(settings, port := free_port(), log)
    try:
        await wait_until(lambda: worker_ready(port), 30, "the first worker to be ready")
        for sale_id in ids:
            await publish_event(channel, settings.exchange, paid_event(tenant_id, sale_id))
        await wait_until(lambda: sandbox.plan.held >= sales, timeout, "every create in flight")
        in_flight = sandbox.plan.held
    finally:
        worker.send_signal(signal.SIGKILL)
        await worker.wait()
    # The provider finishes what it received: the invoices exist, their answers are lost.
    hold.times = 0
    sandbox.plan.release()
    await wait_until(lambda: sandbox.plan.delayed == 0, 10, "the held creates to commit")

    worker = await spawn_worker(settings, port := free_port(), log)
    try:
        await wait_until(lambda: worker_ready(port), 30, "the restarted worker to be ready")
        ready = time.monotonic()
        wanted = set(ids)
        await outbox.wait_for(
            lambda o: {e["sale_id"] for e in o.of_type("invoice.issued")} >= wanted, timeout
        )
        took = time.monotonic() - ready
    finally:
        worker.send_signal(signal.SIGTERM)
        await asyncio.wait_for(worker.wait(), 30)
    keys = collections.Counter(
        str(d.get("vendor_id")) for d in sandbox.documents(secret) if d["type"] == "invoice"
    )
    return TakeoverResult(
        sales=sales,
        in_flight_at_kill=in_flight,
        seconds_to_all_issued=took,
        creates=sandbox.plan.count("POST /documents"),
        invoices=sum(keys.values()),
        duplicates=sum(1 for n in keys.values() if n > 1),
    )
