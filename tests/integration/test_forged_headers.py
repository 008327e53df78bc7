"""Headers only the worker writes, forged by a publisher, through a real worker and broker:
they delay a sale by the longest tier at most, shorten no retry budget, and never change a
message's event type (issue 13)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import pytest

from tests.conftest import Env
from worker.devtools.faults import Fault
from worker.devtools.samples import paid_event, storno_event

pytestmark = pytest.mark.broker

OLD = (datetime.now(UTC) - timedelta(days=30)).isoformat()


async def publish_with(env: Env, routing_key: str, event: dict[str, Any], **headers: Any) -> None:
    exchange = await env.channel.get_exchange(env.settings.exchange)
    await exchange.publish(
        aio_pika.Message(
            body=json.dumps(event).encode(),
            content_type="application/json",
            message_id=event["event_id"],
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            headers=headers,
        ),
        routing_key=routing_key,
    )


async def test_a_forged_not_before_does_not_park_a_valid_sale(env: Env) -> None:
    tenant = env.add_tenant("nb", "billingo").tenant_id
    await env.start_worker()
    await publish_with(
        env, "sale.paid", paid_event(tenant, "S-NB"), **{"x-not-before": "2100-01-01T00:00:00Z"}
    )
    # The longest tier here is 1 s: issued within a few, not in 2100.
    await env.outbox.wait_for(lambda o: len(o.of_type("invoice.issued", sale_id="S-NB")) == 1, 15)
    assert len(env.documents(tenant)) == 1


async def test_a_forged_retry_count_does_not_exhaust_the_budget(env: Env) -> None:
    tenant = env.add_tenant("rc", "billingo").tenant_id
    env.sandbox(tenant).plan.add(
        Fault("status", method="POST", path="/documents", status=503, times=1)
    )
    await env.start_worker()
    forged = {"x-retry-count": 999, "x-first-failed-at": OLD, "x-last-error-code": "timeout"}
    await publish_with(env, "sale.paid", paid_event(tenant, "S-RC"), **forged)

    await env.outbox.wait_for(lambda o: len(o.of_type("invoice.issued", sale_id="S-RC")) == 1, 15)
    [failed] = env.outbox.of_type("invoice.failed", sale_id="S-RC")
    assert failed["final"] is False
    assert failed["attempt"] == 1
    assert failed["error"]["code"] == "provider_unavailable"


async def test_a_storno_body_published_as_sale_paid_is_not_processed_as_a_storno(
    env: Env,
) -> None:
    tenant = env.add_tenant("rk", "billingo").tenant_id
    await env.start_worker()
    await env.publish(paid_event(tenant, "S-RK"))
    await env.outbox.wait_for(lambda o: len(o.of_type("invoice.issued", sale_id="S-RK")) == 1)

    storno = storno_event(tenant, "S-RK")
    await publish_with(env, "sale.paid", storno, **{"x-original-routing-key": "sale.storno"})

    await env.outbox.wait_for(
        lambda o: any(e["final"] for e in o.of_type("invoice.failed", tenant_id=tenant)), 15
    )
    [failed] = env.outbox.of_type("invoice.failed", tenant_id=tenant)
    assert failed["error"]["code"] == "invalid_message"
    assert env.outbox.of_type("invoice.cancelled") == []
    assert env.cancellations(tenant) == []
