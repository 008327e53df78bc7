"""The worker as ops run it: a separate process, stopped with SIGTERM, restarted."""

from __future__ import annotations

import asyncio
import json
import signal

import pytest

from tests.conftest import Env, free_port, spawn_worker, wait_until, worker_ready
from worker.samples import paid_event

pytestmark = pytest.mark.broker


async def test_sigterm_mid_batch_exits_0_and_a_restart_issues_each_sale_once(env: Env) -> None:
    tenant = env.add_tenant("sigterm", "billingo")
    revoked = env.add_tenant("sigterm-revoked", "billingo")
    env.billingo.revoke(revoked.secret)
    env.billingo.plan.latency = 0.05  # creates take a while: some are in flight at SIGTERM
    log = env.tmp / "worker.log"
    port = free_port()
    worker = await spawn_worker(env.settings, port, log)
    await wait_until(lambda: worker_ready(port), 20, "the worker to be ready")
    sales = [paid_event(tenant.tenant_id, f"S-T-{i}") for i in range(120)]
    for sale in sales:
        await env.publish(sale)
    await env.publish(paid_event(revoked.tenant_id, "S-T-REVOKED"))
    await env.outbox.wait_for(lambda o: len(o.of_type("invoice.issued")) >= 10)

    worker.send_signal(signal.SIGTERM)
    grace = env.settings.shutdown_grace_seconds
    assert await asyncio.wait_for(worker.wait(), grace + 5) == 0
    issued_before_restart = len(env.outbox.of_type("invoice.issued"))
    assert issued_before_restart < len(sales), "the batch finished before SIGTERM; no test"

    worker = await spawn_worker(env.settings, port, log)
    try:
        await env.outbox.wait_for(
            lambda o: (
                {e["sale_id"] for e in o.of_type("invoice.issued")}
                >= {s["sale"]["id"] for s in sales}
            ),
            timeout=60,
        )
    finally:
        worker.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(worker.wait(), grace + 5) == 0

    documents = env.documents(tenant.tenant_id)
    vendor_ids = [d.get("vendor_id") for d in documents]
    assert len(documents) == len(sales)
    assert len(set(vendor_ids)) == len(sales)  # exactly one invoice per sale
    text = log.read_text(encoding="utf-8")
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    assert any(line.get("event") == "consumer.draining" for line in lines)
    assert any(line.get("error_code") == "auth_failed" for line in lines)
    for secret in (tenant.secret, revoked.secret):
        assert secret not in text  # keys never reach the logs
