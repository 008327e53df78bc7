"""The worker as ops run it: a separate process, stopped with SIGTERM, restarted."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess

import aiohttp
import pytest

from tests.conftest import Env, free_port, spawn_worker, wait_until, worker_ready
from worker.devtools.samples import paid_event

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

    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/healthz") as response:
            assert response.status == 200
        async with http.get(f"http://127.0.0.1:{port}/metrics") as response:
            metrics_text = await response.text()
    for name in (
        "invoicing_events_total",
        "invoicing_provider_requests_total",
        "invoicing_provider_request_duration_seconds",
        "invoicing_broker_connected 1.0",
        'invoicing_connection_up{provider="billingo",tenant="sigterm"} 1.0',
    ):
        assert name in metrics_text, name
    assert 'outcome="issued"' in metrics_text

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


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=120)


@pytest.mark.timeout(240)
async def test_broker_restart_mid_batch_each_sale_issued_once(env: Env) -> None:
    tenant = env.add_tenant("restart", "billingo")
    env.billingo.plan.latency = 0.02
    log = env.tmp / "worker.log"
    port = free_port()
    worker = await spawn_worker(env.settings, port, log)
    try:
        await wait_until(lambda: worker_ready(port), 20, "the worker to be ready")
        sales = [paid_event(tenant.tenant_id, f"S-BR-{i}") for i in range(150)]
        for sale in sales:
            await env.publish(sale)
        await wait_until(lambda: len(env.documents(tenant.tenant_id)) >= 10, what="progress")

        await asyncio.to_thread(_rabbitmqctl, "stop_app")
        await asyncio.to_thread(_rabbitmqctl, "start_app")
        await asyncio.to_thread(_rabbitmqctl, "await_startup")

        # The worker reconnects by itself and finishes the batch (quorum queues kept it).
        await wait_until(lambda: worker_ready(port), 60, "the worker to consume again")
        await wait_until(lambda: len(env.documents(tenant.tenant_id)) >= 150, 90, "the batch")
    finally:
        worker.send_signal(signal.SIGTERM)
        await asyncio.wait_for(worker.wait(), 30)
    vendor_ids = [d["vendor_id"] for d in env.documents(tenant.tenant_id)]
    assert len(vendor_ids) == 150
    assert len(set(vendor_ids)) == 150  # each sale issued once
    lines = [json.loads(line) for line in log.read_text("utf-8").splitlines() if line[:1] == "{"]
    assert any(line.get("session") == 2 for line in lines), "no second AMQP session logged"
