"""End to end on the real RabbitMQ and both provider sandboxes, one suite for both providers.

Given tenants on a provider, when Bookinda publishes sale events, then the sandbox holds the
invoices the sales imply and the bus carries what Bookinda must hear.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from decimal import Decimal
from typing import Any

import aio_pika
import pytest
import structlog
from prometheus_client import REGISTRY

from tests.conftest import Env, wait_until
from worker.devtools.faults import Fault
from worker.devtools.samples import PERSON, paid_event, storno_event

pytestmark = pytest.mark.broker

CREATE = {"billingo": "/documents", "szamlazz": "action-xmlagentxmlfile"}


@pytest.fixture(params=["billingo", "szamlazz"])
def provider(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def gross(doc: dict[str, Any]) -> Decimal:
    return Decimal(str(doc.get("gross_total", doc.get("gross"))))


def issued(env: Env, **match: Any) -> list[dict[str, Any]]:
    return env.outbox.of_type("invoice.issued", **match)


async def test_batch_of_sales_for_three_tenants_is_invoiced_once_each(
    env: Env, provider: str
) -> None:
    tenants = [env.add_tenant(f"t{i}-{provider}", provider).tenant_id for i in range(3)]
    await env.start_worker()
    sales = [
        paid_event(tenants[i % 3], f"S-{i:04d}", customer=PERSON if i % 2 else None)
        for i in range(200)
    ]
    for sale in sales:
        await env.publish(sale)

    await env.outbox.wait_for(lambda o: len(o.of_type("invoice.issued")) >= 200, timeout=60)

    assert len(issued(env)) == 200
    assert {e["sale_id"] for e in issued(env)} == {s["sale"]["id"] for s in sales}
    for tenant in tenants:
        docs = env.documents(tenant)
        assert len(docs) == len([s for s in sales if s["tenant_id"] == tenant])
        # 2 nights at 24,990 HUF gross: every invoice is 49,980 HUF.
        assert {gross(d) for d in docs} == {Decimal("49980")}
    assert {e["gross_total"] for e in issued(env)} == {"49980"}
    assert {e["currency"] for e in issued(env)} == {"HUF"}
    by_id = {e["sale_id"]: e for e in issued(env)}
    assert by_id["S-0000"]["causation_id"] == sales[0]["event_id"]
    correlations = {m.correlation_id for m in env.outbox.messages}
    assert {s["event_id"] for s in sales} <= correlations
    await env.stop_worker()
    assert await env.queue_depth(env.settings.queue) == 0  # nothing was left unacked
    assert await env.queue_depth(env.settings.dead_letter_queue) == 0


async def test_each_handled_sale_logs_its_document_and_time(env: Env, provider: str) -> None:
    # The one info line per sale ops read: which document, and how long delivery → ack took.
    tenant = env.add_tenant(f"log-{provider}", provider).tenant_id
    await env.start_worker()
    with structlog.testing.capture_logs() as logs:
        await env.publish(paid_event(tenant, "S-LOG"))
        await env.outbox.wait_for(lambda o: len(o.of_type("invoice.issued")) == 1)
        await wait_until(lambda: any(e["event"] == "message.handled" for e in logs), 5, "the log")
    [line] = [e for e in logs if e["event"] == "message.handled"]
    [event] = issued(env)
    assert line["outcome"] == "issued"
    assert line["document_id"] == event["document_id"]
    assert 0 < line["elapsed_ms"] < 30_000
    await env.stop_worker()


async def test_storno_cancels_exactly_once_even_when_delivered_twice(
    env: Env, provider: str
) -> None:
    tenant = env.add_tenant(f"storno-{provider}", provider).tenant_id
    await env.start_worker()
    await env.publish(paid_event(tenant, "S-1"))
    await env.outbox.wait_for(lambda o: len(issued(env, sale_id="S-1")) == 1)
    document_id = issued(env)[0]["document_id"]

    storno = storno_event(tenant, "S-1", document_id=document_id)
    await env.publish(storno)
    await env.publish(storno)  # at-least-once: the same event again
    await env.outbox.wait_for(lambda o: len(o.of_type("invoice.cancelled")) == 2)

    assert len(env.cancellations(tenant)) == 1
    cancelled = env.outbox.of_type("invoice.cancelled")
    assert {c["cancellation"]["document_id"] for c in cancelled} == {
        cancelled[0]["cancellation"]["document_id"]
    }
    assert cancelled[0]["document_id"] == document_id
    assert cancelled[0]["cancellation"]["kind"] == (
        "cancel" if provider == "billingo" else "reverse"
    )


async def test_revoked_key_dead_letters_and_a_new_key_recovers(env: Env, provider: str) -> None:
    tenant = env.add_tenant(f"revoked-{provider}", provider)
    env.sandbox(tenant.tenant_id).revoke(tenant.secret)
    await env.start_worker()
    sale = paid_event(tenant.tenant_id, "S-REV-1")
    await env.publish(sale)

    await env.outbox.wait_for(lambda o: any(e["final"] for e in o.of_type("invoice.failed")))
    failed = env.outbox.of_type("invoice.failed")[0]
    assert failed["error"]["code"] == "auth_failed"
    assert "new API key" in failed["error"]["fix"]
    assert failed["final"] is True
    assert failed["next_attempt_at"] is None
    status = env.outbox.of_type("connection.status", tenant_id=tenant.tenant_id)
    assert status[-1]["status"] == "ERROR"
    assert status[-1]["error_code"] == "auth_failed"
    labels = {"tenant": tenant.tenant_id, "provider": provider}

    def up() -> float | None:
        return REGISTRY.get_sample_value("invoicing_connection_up", labels)

    # The change applies right after its announcement is confirmed: poll, do not race it.
    await wait_until(lambda: up() == 0, what="invoicing_connection_up to drop to 0")
    await wait_until(lambda: _depth_is(env, 1), what="the dead letter")
    [dead] = await env.dead_letters()
    headers = dead.headers
    for name in (
        "x-error-code",
        "x-error-message",
        "x-original-routing-key",
        "x-tenant-id",
        "x-attempts",
        "x-first-failed-at",
        "x-dead-lettered-at",
    ):
        assert name in headers, name
    assert headers["x-error-code"] == "auth_failed"
    assert headers["x-original-routing-key"] == "sale.paid"
    assert headers["x-tenant-id"] == tenant.tenant_id
    assert json.loads(dead.body) == sale  # the original body, unchanged
    assert tenant.secret not in json.dumps([str(v) for v in headers.values()])

    # Ops rotate the key: a new one in the provider and in the connections file.
    new = env.add_tenant(tenant.tenant_id, provider)
    await env.outbox.wait_for(
        lambda o: (
            o.of_type("connection.status", tenant_id=tenant.tenant_id)[-1]["status"] == "ACTIVE"
        )
    )
    await env.publish(paid_event(tenant.tenant_id, "S-REV-2"))
    await env.outbox.wait_for(lambda o: len(issued(env, sale_id="S-REV-2")) == 1)
    assert len(env.documents(new.tenant_id)) == 1
    await wait_until(lambda: up() == 1, what="invoicing_connection_up back to 1")


async def _depth_is(env: Env, n: int) -> bool:
    return await env.queue_depth(env.settings.dead_letter_queue) == n


async def test_transient_503s_are_retried_through_delay_queues(env: Env, provider: str) -> None:
    tenant = env.add_tenant(f"flaky-{provider}", provider).tenant_id
    env.sandbox(tenant).plan.add(
        Fault("status", method="POST", path=CREATE[provider], status=503, times=3)
    )
    await env.start_worker()
    await env.publish(paid_event(tenant, "S-503"))

    await env.outbox.wait_for(lambda o: len(issued(env, sale_id="S-503")) == 1, timeout=30)

    failed = env.outbox.of_type("invoice.failed", sale_id="S-503")
    assert len(failed) == 3
    assert all(f["final"] is False and f["next_attempt_at"] for f in failed)
    assert [f["attempt"] for f in failed] == [1, 2, 3]
    assert {f["error"]["code"] for f in failed} == {"provider_unavailable"}
    assert len(env.documents(tenant)) == 1


@pytest.mark.parametrize(
    ("routing_key", "body", "code", "message_part"),
    [
        ("sale.paid", b"{not json", "invalid_message", "not JSON"),
        ("sale.paid", None, "invalid_message", "sale.items"),
        ("sale.paid", b"x" * 5_000_000, "invalid_message", "exceeds the limit"),
        ("sale.refund", b"{}", "invalid_message", "unknown routing key"),
    ],
    ids=["malformed-json", "no-items", "5MB-body", "unknown-routing-key"],
)
async def test_bad_messages_are_dead_lettered_and_the_worker_keeps_going(
    env: Env, routing_key: str, body: bytes | None, code: str, message_part: str
) -> None:
    tenant = env.add_tenant("bad-msg", "billingo").tenant_id
    await env.start_worker()
    if body is None:
        event = paid_event(tenant, "S-NOITEMS")
        del event["sale"]["items"]
        body = json.dumps(event).encode()
    if routing_key == "sale.refund":
        # Only sale.paid / sale.storno are bound; a stray key reaches us straight to the queue.
        await env.channel.default_exchange.publish(
            aio_pika.Message(body=body), routing_key=env.settings.queue
        )
    else:
        await env.publish_raw(routing_key, body)
    await env.publish(paid_event(tenant, "S-AFTER"))

    await env.outbox.wait_for(lambda o: len(issued(env, sale_id="S-AFTER")) == 1)
    await wait_until(lambda: _depth_is(env, 1), what="the dead letter")
    [dead] = await env.dead_letters()
    assert dead.headers["x-error-code"] == code
    assert message_part in str(dead.headers["x-error-message"])


async def test_unknown_tenant_is_dead_lettered(env: Env) -> None:
    env.add_tenant("known", "billingo")
    await env.start_worker()
    await env.publish(paid_event("nobody", "S-X"))
    await wait_until(lambda: _depth_is(env, 1), what="the dead letter")
    [dead] = await env.dead_letters()
    assert dead.headers["x-error-code"] == "unknown_tenant"
    assert dead.headers["x-tenant-id"] == "nobody"
    failed = env.outbox.of_type("invoice.failed")
    assert failed
    assert failed[0]["provider"] is None
    assert failed[0]["final"] is True


def _close_worker_connections(tag: str) -> int:
    out = subprocess.run(
        ["rabbitmqctl", "-q", "list_connections", "pid", "client_properties"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    pids = [line.split("\t")[0] for line in out.splitlines() if tag in line]
    for pid in pids:
        subprocess.run(
            ["rabbitmqctl", "-q", "close_connection", pid, "test: broker restart"],
            capture_output=True,
            check=False,
        )
    return len(pids)


async def test_worker_reconnects_after_the_broker_closes_its_connection(
    env: Env, provider: str
) -> None:
    tenant = env.add_tenant(f"reconnect-{provider}", provider).tenant_id
    env.sandbox(tenant).plan.latency = 0.02  # keep work in flight while the connection drops
    app = await env.start_worker()
    for i in range(60):
        await env.publish(paid_event(tenant, f"S-RC-{i}"))
    await env.outbox.wait_for(lambda o: len(o.of_type("invoice.issued")) >= 5)

    assert _close_worker_connections(app.runtime.instance_id) >= 1

    await env.outbox.wait_for(
        lambda o: (
            {e["sale_id"] for e in o.of_type("invoice.issued")} >= {f"S-RC-{i}" for i in range(60)}
        ),
        timeout=60,
    )
    assert app.consumer.sessions >= 2
    assert len(env.documents(tenant)) == 60  # every sale issued once, none twice


async def test_a_paced_tenants_burst_does_not_delay_another_tenant(env: Env) -> None:
    env.settings = env.settings.model_copy(
        update={"billingo_requests_per_minute": 600, "throttle_max_wait_seconds": 0.5}
    )
    env.billingo.rate_limit_per_minute = 600  # the sandbox enforces the same limit with 429s
    busy = env.add_tenant("burst", "billingo").tenant_id
    quiet = env.add_tenant("quiet", "billingo").tenant_id
    await env.start_worker()
    for i in range(80):
        await env.publish(paid_event(busy, f"S-BURST-{i}"))
    await env.publish(paid_event(quiet, "S-QUIET"))
    loop = asyncio.get_running_loop()
    published = loop.time()

    await env.outbox.wait_for(lambda o: len(issued(env, sale_id="S-QUIET")) == 1)
    quiet_delay = loop.time() - published
    burst_done = len(issued(env, tenant_id=busy))
    await env.outbox.wait_for(lambda o: len(issued(env, tenant_id=busy)) == 80, timeout=60)

    # 80 sales need ~8 s of the burst tenant's pacing; the quiet tenant does not wait for it.
    assert burst_done < 60
    assert quiet_delay < 3
    assert not [r for r in env.billingo.plan.requests if r.status == 429]
    assert len(env.documents(busy)) == 80
