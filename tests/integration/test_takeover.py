"""A crashed worker's sales are taken over in seconds; a late commit never becomes two invoices.

Real RabbitMQ, real worker processes, the Billingo sandbox holding or delaying creates (the
provider commits a request whose client already gave up), PostgreSQL for several workers.
"""

from __future__ import annotations

import asyncio
import collections
import signal
import time
import uuid
from asyncio.subprocess import Process

import pytest

from tests.conftest import POSTGRES_URL, Env, free_port, spawn_worker, wait_until, worker_ready
from tests.integration.test_exactly_once import assert_one_invoice_each
from worker.devtools.faults import Fault
from worker.devtools.samples import paid_event
from worker.devtools.takeover import sigkill_takeover

pytestmark = pytest.mark.broker


@pytest.mark.timeout(180)
async def test_sigkill_with_64_creates_in_flight_restart_issues_each_once_within_10s(
    env: Env,
) -> None:
    tenant = env.add_tenant("takeover", "billingo")
    # As the issue states it: a 3 s provider timeout and a 3 s grace; the default liveness.
    env.settings = env.settings.model_copy(
        update={
            "provider_timeout_seconds": 3.0,
            "in_doubt_grace_seconds": 3.0,
            "liveness_seconds": 6.0,
            "lease_seconds": 90.0,
            "retry_delays": "1s,5s,15s,30s,1m,2m,5m",
        }
    )
    result = await sigkill_takeover(
        env.settings,
        env.billingo,
        tenant.secret,
        tenant.tenant_id,
        env.channel,
        env.outbox,
        env.tmp / "workers.log",
        sales=64,
    )
    assert result.in_flight_at_kill == 64
    assert result.invoices == 64
    assert result.creates == 64  # the held creates committed; each was found, none sent again
    assert result.duplicates == 0
    assert result.seconds_to_all_issued < 10, result


@pytest.mark.timeout(120)
async def test_a_create_the_provider_commits_after_the_worker_gave_up_is_one_invoice(
    env: Env,
) -> None:
    tenant = env.add_tenant("late-commit", "billingo")
    env.settings = env.settings.model_copy(
        update={"provider_timeout_seconds": 2.0, "in_doubt_grace_seconds": 15.0}
    )
    # The provider takes 8 s to commit the first create; the worker gives up after 2 s.
    late = env.billingo.plan.add(
        Fault("commit_late", method="POST", path="/documents", delay=8.0, times=1)
    )
    await env.start_worker()
    started = time.monotonic()
    await env.publish(paid_event(tenant.tenant_id, "S-LATE"))
    await env.outbox.wait_for(lambda o: len(o.of_type("invoice.issued")) == 1, timeout=60)
    plan = env.billingo.plan
    await wait_until(lambda: plan.delayed == 0, 30, "the slow create to commit")

    assert late.times == 0
    # The slow create really committed, 8 s after it arrived, with nobody waiting for it.
    assert [r.status for r in plan.requests if r.operation == "late /v3/documents"] == [201]
    docs = env.documents(tenant.tenant_id)
    assert len(docs) == 1, docs
    (issued,) = env.outbox.of_type("invoice.issued")
    assert issued["document_id"] == str(docs[0]["id"])
    # It was looked up, not created again, and not before the grace was over.
    assert time.monotonic() - started >= 15
    assert env.outbox.of_type("invoice.failed")[0]["error"]["code"] == "timeout"


@pytest.mark.postgres
@pytest.mark.timeout(240)
async def test_two_workers_on_postgres_late_commits_past_the_lease_events_twice(
    env: Env,
) -> None:
    run = uuid.uuid4().hex[:6]
    tenant = env.add_tenant(f"pg-late-{run}", "billingo")
    env.settings = env.settings.model_copy(
        update={
            "ledger_url": POSTGRES_URL,
            "provider_timeout_seconds": 2.0,
            "lease_seconds": 10.0,
            # The sandbox commits some creates 11 s after they arrived: past the lease, within
            # the grace.
            "in_doubt_grace_seconds": 12.0,
        }
    )
    env.billingo.plan.add(
        Fault("commit_late", method="POST", path="/documents", delay=11.0, probability=0.2)
    )
    sales = [paid_event(tenant.tenant_id, f"S-PGL-{i:03d}") for i in range(40)]
    log = env.tmp / "workers.log"
    ports = [free_port(), free_port()]
    workers: list[Process] = [await spawn_worker(env.settings, port, log) for port in ports]
    try:
        for port in ports:
            await wait_until(lambda p=port: worker_ready(p), 30, "the workers to be ready")
        for sale in sales:
            await env.publish(sale)
            await env.publish(sale)  # every event twice
        wanted = {s["sale"]["id"] for s in sales}
        await env.outbox.wait_for(
            lambda o: {e["sale_id"] for e in o.of_type("invoice.issued")} >= wanted, timeout=150
        )
        plan = env.billingo.plan
        await wait_until(lambda: plan.delayed == 0, 30, "every late create to commit")
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        for worker in workers:
            await asyncio.wait_for(worker.wait(), 30)

    late = [r for r in env.billingo.plan.requests if r.operation.startswith("late ")]
    assert late  # some creates committed 11 s after they arrived, long after the worker gave up
    assert_one_invoice_each(env, [tenant.tenant_id], {s["sale"]["id"] for s in sales})
    per_sale = collections.defaultdict(set)
    for event in env.outbox.of_type("invoice.issued"):
        per_sale[event["sale_id"]].add(event["document_id"])
    assert all(len(ids) == 1 for ids in per_sale.values())
