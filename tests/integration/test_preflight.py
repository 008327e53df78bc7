"""A bad sale costs no provider request: it is refused before the call and parked with a fix."""

from __future__ import annotations

import copy
from typing import Any

import orjson
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


def _implausible(tenant: str) -> dict[str, tuple[dict[str, Any], str, str]]:
    """Issue 13's findings, by sale id: the event, the code it is parked with, words of it."""

    def sale(sale_id: str, **changes: Any) -> dict[str, Any]:
        event = paid_event(tenant, sale_id)
        event["sale"].update(changes)
        return event

    def priced(sale_id: str, **item: Any) -> dict[str, Any]:
        return paid_event(tenant, sale_id, items=[{**copy.deepcopy(ROOM), **item}])

    return {
        "S-1E20": (priced("S-1E20", unit_price="1e20"), "invalid_message", "unit_price"),
        "S-2P63": (sale("S-2P63", invoice_generation=2**63), "invalid_message", "generation"),
        "S-TRUE": (sale("S-TRUE", invoice_generation=True), "invalid_message", "generation"),
        "S-STR": (sale("S-STR", invoice_generation="1"), "invalid_message", "generation"),
        "S-2E15": (
            priced("S-2E15", unit_price="999999999999999", quantity="2"),
            "invalid_invoice_data",
            "plausible maximum",
        ),
        "S-9999": (sale("S-9999", fulfillment_date="9999-12-31"), "invalid_invoice_data", "days"),
        "S-1900": (sale("S-1900", fulfillment_date="1900-01-01"), "invalid_invoice_data", "days"),
        "S-PAID": (
            sale("S-PAID", paid_at="9999-12-31T12:00:00Z", fulfillment_date="9999-12-31"),
            "invalid_invoice_data",
            "sale.paid_at 9999-12-31",
        ),
        "S-ZERO": (priced("S-ZERO", unit_price="0"), "invalid_invoice_data", "total is 0"),
        "S-MAIL": (
            paid_event(tenant, "S-MAIL", customer={**COMPANY, "email": "billing@aurora"}),
            "invalid_customer_data",
            "e-mail address",
        ),
    }


@pytest.mark.parametrize("provider", ["billingo", "szamlazz"])
async def test_implausible_sales_are_parked_at_once_without_a_provider_request(
    env: Env, provider: str
) -> None:
    tenant = env.add_tenant(f"implausible-{provider}", provider).tenant_id
    cases = _implausible(tenant)
    await env.start_worker()
    for event, _, _ in cases.values():
        await env.publish(event)

    await wait_until(
        lambda: _depth_is(env, len(cases)), what="every implausible sale dead-lettered"
    )
    parked = {orjson.loads(m.body)["sale"]["id"]: m for m in await env.dead_letters()}

    assert env.sandbox(tenant).plan.count() == 0  # not a single provider request
    for sale_id, (_, code, words) in cases.items():
        headers = parked[sale_id].headers
        assert headers["x-error-code"] == code, sale_id
        assert words in str(headers["x-error-message"]), sale_id
        assert headers["x-attempts"] == 1, sale_id  # at once: no retry round first
    await env.outbox.wait_for(lambda o: len(o.of_type("invoice.failed")) == len(cases))
    assert all(f["final"] for f in env.outbox.of_type("invoice.failed"))


async def _depth_is(env: Env, depth: int) -> bool:
    return await env.queue_depth(env.settings.dead_letter_queue) == depth
