"""The worker as ops run it: a separate process, stopped with SIGTERM, restarted."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import pytest

from tests.conftest import Env, free_port, spawn_worker, wait_until, worker_ready
from worker.devtools.broker import OwnBroker
from worker.devtools.faults import Fault
from worker.devtools.samples import paid_event, publish_event
from worker.settings import Settings
from worker.topology import declare

pytestmark = pytest.mark.broker

#: Creates held in the sandbox before the test acts: work that is certainly in flight.
HELD = 16


def _patient(settings: Settings) -> Settings:
    """The worker's client must not give up on a held create while the test holds it (the
    tests' 2 s provider timeout could pass on a busy machine before the release)."""
    return settings.model_copy(update={"provider_timeout_seconds": 60.0, "lease_seconds": 300.0})


def _log_lines(log: Path) -> list[dict[str, Any]]:
    text = log.read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


async def test_sigterm_mid_batch_exits_0_and_a_restart_issues_each_sale_once(env: Env) -> None:
    tenant = env.add_tenant("sigterm", "billingo")
    revoked = env.add_tenant("sigterm-revoked", "billingo")
    env.billingo.revoke(revoked.secret)
    settings = _patient(env.settings)
    log = env.tmp / "worker.log"
    port = free_port()
    worker = await spawn_worker(settings, port, log)
    await wait_until(lambda: worker_ready(port), 20, "the worker to be ready")
    sales = [paid_event(tenant.tenant_id, f"S-T-{i}") for i in range(120)]
    # A first part goes through, so the metrics below have issued sales and a revoked tenant.
    for sale in sales[:10]:
        await env.publish(sale)
    await env.publish(paid_event(revoked.tenant_id, "S-T-REVOKED"))
    await env.outbox.wait_for(
        lambda o: (
            len(o.of_type("invoice.issued")) >= 10
            and bool(o.of_type("invoice.failed", sale_id="S-T-REVOKED"))
        )
    )

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

    # The rest: every create is held in the sandbox until the test lets it go, so SIGTERM
    # lands with work in flight and most of the batch still queued, however busy the machine.
    hold = env.billingo.plan.add(Fault("hold", method="POST", path="/documents"))
    for sale in sales[10:]:
        await env.publish(sale)
    await wait_until(lambda: env.billingo.plan.held >= HELD, 30, f"{HELD} creates held")
    worker.send_signal(signal.SIGTERM)
    await wait_until(
        lambda: any(line.get("event") == "consumer.draining" for line in _log_lines(log)),
        30,
        "the worker to start draining",
    )
    in_flight = env.billingo.plan.held
    assert len(env.documents(tenant.tenant_id)) == 10  # nothing held has been created yet
    hold.times = 0  # no more holds, then let the held creates finish within the grace
    env.billingo.plan.release()
    grace = settings.shutdown_grace_seconds
    assert await asyncio.wait_for(worker.wait(), grace + 5) == 0
    issued_before_restart = len(env.documents(tenant.tenant_id))
    # The drain finished the held work instead of handing it back, and stopped there.
    assert issued_before_restart >= 10 + in_flight
    assert issued_before_restart < len(sales)
    assert not any(line.get("event") == "consumer.handed_back" for line in _log_lines(log))

    worker = await spawn_worker(settings, port, log)
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
    lines = _log_lines(log)
    assert any(line.get("error_code") == "auth_failed" for line in lines)
    for secret in (tenant.secret, revoked.secret):
        assert secret not in text  # keys never reach the logs


@pytest.fixture
async def own_broker() -> AsyncIterator[OwnBroker]:
    """A RabbitMQ node of this test's own: restarting the machine's default node would break
    every other test run (and person) using it."""
    broker = OwnBroker()
    await broker.start()
    try:
        yield broker
    finally:
        await broker.shutdown()


@pytest.mark.timeout(300)
async def test_broker_restart_mid_batch_each_sale_issued_once(
    env: Env, own_broker: OwnBroker
) -> None:
    tenant = env.add_tenant("restart", "billingo")
    settings = _patient(env.settings).model_copy(update={"amqp_url": own_broker.url})
    connection = await aio_pika.connect(own_broker.url)
    await declare(connection, settings)
    channel = await connection.channel()
    log = env.tmp / "worker.log"
    port = free_port()
    worker = await spawn_worker(settings, port, log)
    try:
        await wait_until(lambda: worker_ready(port), 20, "the worker to be ready")
        # Creates are held until the broker is down: the restart certainly lands mid batch
        # (with 0.02 s per create the batch could finish before the broker stopped).
        hold = env.billingo.plan.add(Fault("hold", method="POST", path="/documents"))
        sales = [paid_event(tenant.tenant_id, f"S-BR-{i}") for i in range(150)]
        for sale in sales:
            await publish_event(channel, settings.exchange, sale)
        await wait_until(lambda: env.billingo.plan.held >= HELD, 30, f"{HELD} creates held")

        await own_broker.stop_app()
        # The held creates finish while the broker is away: their outcomes cannot be
        # announced or acked, so the ledger must turn the re-deliveries into no second invoice.
        assert env.documents(tenant.tenant_id) == []
        hold.times = 0
        env.billingo.plan.release()
        await own_broker.start_app()

        # The worker reconnects by itself and finishes the batch (quorum queues kept it).
        await wait_until(lambda: worker_ready(port), 60, "the worker to consume again")
        await wait_until(lambda: len(env.documents(tenant.tenant_id)) >= 150, 90, "the batch")
    finally:
        worker.send_signal(signal.SIGTERM)
        await asyncio.wait_for(worker.wait(), 30)
        with contextlib.suppress(Exception):
            await connection.close()
    vendor_ids = [d["vendor_id"] for d in env.documents(tenant.tenant_id)]
    assert len(vendor_ids) == 150
    assert len(set(vendor_ids)) == 150  # each sale issued once
    lines = [json.loads(line) for line in log.read_text("utf-8").splitlines() if line[:1] == "{"]
    assert any(line.get("session") == 2 for line in lines), "no second AMQP session logged"
