"""Generations of one sale through a real worker and broker (issue 13): a storno that comes
first voids the generation and Bookinda hears it, and generation 2 is issued only after
generation 1's invoice is cancelled."""

from __future__ import annotations

import pytest

from tests.conftest import Env
from worker.devtools.samples import paid_event, storno_event

pytestmark = pytest.mark.broker


async def test_a_storno_before_its_sale_voids_the_generation_and_says_so(env: Env) -> None:
    tenant = env.add_tenant("void", "billingo").tenant_id
    await env.start_worker()
    await env.publish(storno_event(tenant, "S-V"))
    await env.outbox.wait_for(lambda o: len(o.of_type("invoice.voided", sale_id="S-V")) == 1)
    await env.publish(paid_event(tenant, "S-V"))  # the late sale.paid re-announces it
    await env.outbox.wait_for(lambda o: len(o.of_type("invoice.voided", sale_id="S-V")) == 2)

    voided = env.outbox.of_type("invoice.voided", sale_id="S-V")
    assert {(e["invoice_generation"], bool(e["reason"])) for e in voided} == {(1, True)}
    assert env.outbox.of_type("invoice.failed") == []
    assert env.documents(tenant) == []
    assert await env.queue_depth(env.settings.dead_letter_queue) == 0


async def test_generation_2_waits_until_generation_1_is_cancelled(env: Env) -> None:
    tenant = env.add_tenant("gen", "billingo").tenant_id
    await env.start_worker()
    await env.publish(paid_event(tenant, "S-G", generation=1))
    await env.outbox.wait_for(lambda o: len(o.of_type("invoice.issued", sale_id="S-G")) == 1)
    await env.publish(paid_event(tenant, "S-G", generation=2))
    await env.outbox.wait_for(
        lambda o: len(o.of_type("invoice.failed", sale_id="S-G", invoice_generation=2)) >= 1
    )
    [waiting, *_] = env.outbox.of_type("invoice.failed", sale_id="S-G")
    assert waiting["error"]["code"] == "previous_invoice_valid"
    assert waiting["final"] is False
    assert len(env.documents(tenant)) == 1

    await env.publish(storno_event(tenant, "S-G", generation=1))
    await env.outbox.wait_for(
        lambda o: len(o.of_type("invoice.issued", sale_id="S-G", invoice_generation=2)) == 1
    )
    assert len(env.outbox.of_type("invoice.cancelled", sale_id="S-G")) == 1
    assert len(env.documents(tenant)) == 2
    assert len(env.cancellations(tenant)) == 1
