"""A bad sale costs no provider request: it is refused before the call and parked with a fix."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from tests.conftest import Env, wait_until
from worker.devtools.samples import COMPANY, ROOM, paid_event

pytestmark = pytest.mark.broker


def _bad(kind: str, tenant: str) -> dict[str, Any]:
    if kind == "check-digit":
        customer = {**COMPANY, "tax_number": "12345678-2-41"}
        return paid_event(tenant, "S-BAD", customer=customer)
    if kind == "company-without-tax-number":
        return paid_event(tenant, "S-BAD", customer={**COMPANY, "tax_number": None})
    if kind == "currency":
        return paid_event(tenant, "S-BAD", currency="EUR")
    if kind == "zero-vat":
        item = {**copy.deepcopy(ROOM), "vat": "0%"}
        return paid_event(tenant, "S-BAD", items=[item])
    if kind == "county":
        return paid_event(tenant, "S-BAD", customer={**COMPANY, "tax_number": "12345676-2-99"})
    raise AssertionError(kind)


@pytest.mark.parametrize("provider", ["billingo", "szamlazz"])
@pytest.mark.parametrize(
    ("kind", "code", "words"),
    [
        ("check-digit", "tax_number_invalid", "check digit"),
        ("county", "tax_number_invalid", "county code 99"),
        ("company-without-tax-number", "invalid_customer_data", "tax number"),
        ("currency", "currency_mismatch", "EUR"),
        ("zero-vat", "invalid_invoice_data", "line 1"),
    ],
)
async def test_bad_sale_is_parked_without_a_provider_request(
    env: Env, provider: str, kind: str, code: str, words: str
) -> None:
    tenant = env.add_tenant(f"pre-{provider}", provider).tenant_id
    await env.start_worker()
    await env.publish(_bad(kind, tenant))

    await env.outbox.wait_for(lambda o: len(o.of_type("invoice.failed")) == 1)
    await wait_until(lambda: _parked(env), what="the dead letter")
    [dead] = await env.dead_letters()
    failed = env.outbox.of_type("invoice.failed")[0]

    assert env.sandbox(tenant).plan.count() == 0  # not a single provider request
    assert dead.headers["x-error-code"] == code
    assert words in str(dead.headers["x-error-message"])
    assert failed["error"]["code"] == code
    assert "replay" in failed["error"]["fix"]
    assert failed["final"] is True
    assert env.outbox.of_type("connection.status") == []  # the connection stays ACTIVE


async def _parked(env: Env) -> bool:
    return await env.queue_depth(env.settings.dead_letter_queue) == 1
