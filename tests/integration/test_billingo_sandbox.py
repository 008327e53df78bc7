"""BillingoProvider against the Billingo sandbox over real HTTP on 127.0.0.1."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import aiohttp
import pytest
from pydantic import SecretStr

from providers.base import CancelRequest, TenantConnection
from providers.billingo import BillingoProvider
from providers.errors import ErrorCode, InvoicingError
from tests.unit.test_billingo_mapping import make_draft
from worker.devtools.billingo_sandbox import BillingoSandbox
from worker.devtools.faults import Fault

KEY = "sandbox-key-aurora"
OTHER_KEY = "sandbox-key-bella"
VENDOR = "bookinda:hotel-aurora:S-1:1"


class Env:
    def __init__(self, sandbox: BillingoSandbox, base_url: str, provider: BillingoProvider):
        self.sandbox = sandbox
        self.base_url = base_url
        self.root = base_url.removesuffix("/v3")
        self.provider = provider


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    sandbox = BillingoSandbox(seed=1)
    sandbox.add_account(KEY, block_ids=(111, 222))
    sandbox.add_account(OTHER_KEY)
    base_url = await sandbox.start()
    provider = BillingoProvider(base_url, timeout=2.0)
    try:
        yield Env(sandbox, base_url, provider)
    finally:
        await provider.close()
        await sandbox.stop()


def conn(key: str = KEY, block_id: int = 111) -> TenantConnection:
    return TenantConnection(
        tenant_id="hotel-aurora", provider="billingo", secret=SecretStr(key), block_id=block_id
    )


def storno_request(reason: str | None = "customer dispute") -> CancelRequest:
    return CancelRequest("hotel-aurora", "S-1", 1, f"{VENDOR}:storno", reason)


async def failure(coro: Any) -> InvoicingError:
    with pytest.raises(InvoicingError) as caught:
        await coro
    return caught.value


def invoices(sandbox: BillingoSandbox, key: str = KEY) -> list[dict[str, Any]]:
    return [d for d in sandbox.documents(key) if d["type"] == "invoice"]


# ---- the happy path --------------------------------------------------------------------


async def test_issue_find_cancel_find_cancellation(env: Env) -> None:
    issued = await env.provider.issue(conn(), make_draft(key=VENDOR))

    assert re.fullmatch(r"B111-\d{4}-000001", issued.invoice_number)
    assert issued.gross_total == Decimal(49980)
    [stored] = env.sandbox.documents(KEY)
    assert stored["vendor_id"] == VENDOR
    assert stored["items"][0]["net_amount"] == 39354
    assert stored["items"][0]["vat_amount"] == 10626
    assert stored["document_partner"]["tax_type"] == "HAS_TAX_NUMBER"

    assert await env.provider.find_invoice(conn(), VENDOR) == issued
    assert await env.provider.find_cancellation(conn(), issued, storno_request()) is None

    cancellation = await env.provider.cancel(conn(), issued, storno_request())

    assert cancellation.kind == "cancel"
    assert re.fullmatch(r"B111-\d{4}-000002", cancellation.invoice_number)
    storno = next(d for d in env.sandbox.documents(KEY) if d["type"] == "cancellation")
    assert storno["gross_total"] == -49980
    assert storno["comment"] == "customer dispute"
    found = await env.provider.find_invoice(conn(), VENDOR)
    assert found is not None
    assert found.cancelled
    assert await env.provider.find_cancellation(conn(), issued, storno_request()) == cancellation


async def test_returning_customer_reuses_the_partner(env: Env) -> None:
    await env.provider.issue(conn(), make_draft(key="k1"))
    await env.provider.issue(conn(), make_draft(key="k2"))
    assert len(env.sandbox.partners(KEY)) == 1
    assert env.sandbox.plan.count("POST /partners") == 1
    assert len(invoices(env.sandbox)) == 2


async def test_foreign_currency_invoice(env: Env) -> None:
    issued = await env.provider.issue(conn(), make_draft(currency="EUR", unit_price="62.45"))
    assert (issued.currency, str(issued.gross_total)) == ("EUR", "124.90")
    [stored] = env.sandbox.documents(KEY)
    assert stored["conversion_rate"] == 400.5


async def test_exempt_line_travels_with_its_entitlement(env: Env) -> None:
    await env.provider.issue(conn(), make_draft(vat="EU"))
    [stored] = env.sandbox.documents(KEY)
    assert (stored["items"][0]["vat"], stored["items"][0]["entitlement"]) == ("EU", "KBAET")
    assert stored["items"][0]["vat_amount"] == 0


async def test_partner_lost_at_billingo_is_recreated(env: Env) -> None:
    await env.provider.issue(conn(), make_draft(key="k1"))
    # The sandbox forgets the partner, as Billingo does for an id from another account.
    env.sandbox.reset()

    issued = await env.provider.issue(conn(), make_draft(key="k2"))

    assert issued.document_id
    assert len(env.sandbox.partners(KEY)) == 1


async def test_documents_are_private_to_their_account(env: Env) -> None:
    issued = await env.provider.issue(conn(), make_draft(key=VENDOR))
    assert await env.provider.find_invoice(conn(OTHER_KEY), VENDOR) is None
    err = await failure(env.provider.cancel(conn(OTHER_KEY), issued, storno_request()))
    assert err.code is ErrorCode.PROVIDER_REJECTED


async def test_a_second_cancel_makes_a_second_storno(env: Env) -> None:
    # Billingo does not refuse it (worst case), so the worker must look before it cancels.
    issued = await env.provider.issue(conn(), make_draft(key=VENDOR))
    first = await env.provider.cancel(conn(), issued, storno_request())
    second = await env.provider.cancel(conn(), issued, storno_request(None))
    assert first.document_id != second.document_id
    stornos = [d for d in env.sandbox.documents(KEY) if d["type"] == "cancellation"]
    assert len(stornos) == 2


# ---- connection errors -----------------------------------------------------------------


async def test_revoked_key_is_auth_failed(env: Env) -> None:
    env.sandbox.revoke(KEY)
    err = await failure(env.provider.issue(conn(), make_draft()))
    assert err.code is ErrorCode.AUTH_FAILED
    assert KEY not in str(err)
    assert (await failure(env.provider.check_connection(conn()))).code is ErrorCode.AUTH_FAILED


async def test_unknown_key_is_auth_failed(env: Env) -> None:
    err = await failure(env.provider.check_connection(conn("nobody")))
    assert err.code is ErrorCode.AUTH_FAILED


async def test_account_without_subscription(env: Env) -> None:
    env.sandbox.add_account("starter-plan", subscription=False)
    err = await failure(env.provider.issue(conn("starter-plan"), make_draft()))
    assert err.code is ErrorCode.SUBSCRIPTION_REQUIRED


async def test_missing_block(env: Env) -> None:
    err = await failure(env.provider.issue(conn(block_id=999), make_draft()))
    assert err.code is ErrorCode.DOCUMENT_BLOCK_NOT_FOUND
    assert "block_id" in err.message
    assert env.sandbox.documents() == []
    check = await failure(env.provider.check_connection(conn(block_id=999)))
    assert check.code is ErrorCode.DOCUMENT_BLOCK_NOT_FOUND


async def test_check_connection_ok(env: Env) -> None:
    await env.provider.check_connection(conn(block_id=222))


# ---- lost answers ----------------------------------------------------------------------


async def test_commit_then_fail_is_outcome_unknown_and_found_later(env: Env) -> None:
    env.sandbox.plan.add(Fault("commit_then_fail", method="POST", path="/documents", times=1))

    err = await failure(env.provider.issue(conn(), make_draft(key=VENDOR)))

    assert (err.code, err.outcome_unknown) == (ErrorCode.PROVIDER_UNAVAILABLE, True)
    found = await env.provider.find_invoice(conn(), VENDOR)
    assert found is not None
    assert [d["id"] for d in invoices(env.sandbox)] == [int(found.document_id)]


async def test_commit_then_hang_times_out_and_is_found_later(env: Env) -> None:
    impatient = BillingoProvider(env.base_url, timeout=0.3)
    env.sandbox.plan.add(Fault("commit_then_hang", method="POST", path="/documents", times=1))
    try:
        err = await failure(impatient.issue(conn(), make_draft(key=VENDOR)))
        assert (err.code, err.outcome_unknown) == (ErrorCode.TIMEOUT, True)
        assert await impatient.find_invoice(conn(), VENDOR) is not None
    finally:
        await impatient.close()


async def test_dropped_create_is_outcome_unknown_but_nothing_exists(env: Env) -> None:
    env.sandbox.plan.add(Fault("drop", method="POST", path="/documents", times=1))
    err = await failure(env.provider.issue(conn(), make_draft(key=VENDOR)))
    assert (err.code, err.outcome_unknown) == (ErrorCode.NETWORK_ERROR, True)
    assert await env.provider.find_invoice(conn(), VENDOR) is None


async def test_commit_then_fail_on_cancel_is_found_by_find_cancellation(env: Env) -> None:
    issued = await env.provider.issue(conn(), make_draft(key=VENDOR))
    env.sandbox.plan.add(Fault("commit_then_fail", method="POST", path="/cancel", status=504))

    err = await failure(env.provider.cancel(conn(), issued, storno_request()))

    assert err.outcome_unknown
    assert await env.provider.find_cancellation(conn(), issued, storno_request()) is not None


# ---- rate limit ------------------------------------------------------------------------


async def test_rate_limit_answers_429_with_retry_after(env: Env) -> None:
    env.sandbox.rate_limit_per_minute = 2
    env.sandbox.clock = lambda: 1_800_000_015.0  # 45 s before the window turns
    await env.provider.check_connection(conn())  # two requests: the whole budget

    err = await failure(env.provider.find_invoice(conn(), VENDOR))

    assert err.code is ErrorCode.RATE_LIMITED
    assert err.retry_after == 45.0
    # Another key has its own window.
    assert await env.provider.find_invoice(conn(OTHER_KEY), VENDOR) is None
    env.sandbox.clock = lambda: 1_800_000_060.0
    assert await env.provider.find_invoice(conn(), VENDOR) is None


async def test_rate_limit_headers(env: Env) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{env.base_url}/organization", headers={"X-API-KEY": KEY}) as response,
    ):
        assert response.status == 200
        assert response.headers["X-RateLimit-Limit"] == "300"
        assert response.headers["X-RateLimit-Remaining"] == "299"


async def test_rate_limit_off(env: Env) -> None:
    env.sandbox.rate_limit_per_minute = 0
    for _ in range(3):
        assert await env.provider.find_invoice(conn(), VENDOR) is None


# ---- the wire protocol -----------------------------------------------------------------


async def call(env: Env, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession(headers={"X-API-KEY": KEY}) as http,
        http.request(method, f"{env.base_url}{path}", json=body) as response,
    ):
        return response.status, await response.json(content_type=None)


async def test_partner_without_address_is_validation_failed(env: Env) -> None:
    status, body = await call(env, "POST", "/partners", {})
    assert status == 422
    assert body["message"] == "Validation Failed"
    fields = {e["field"] for e in body["errors"]}
    assert {"address.country_code", "address.post_code", "address.city"} <= fields


async def test_document_validation(env: Env) -> None:
    status, partner = await call(env, "POST", "/partners", {"name": "X", "address": ADDRESS})
    assert status == 201
    body = {**DOCUMENT, "partner_id": partner["id"], "currency": "EUR"}
    body["items"] = [{**ITEM, "vat": "0,5%"}]
    status, answer = await call(env, "POST", "/documents", body)
    assert status == 422
    assert {e["field"] for e in answer["errors"]} == {"conversion_rate", "items.0.vat"}


async def test_partner_of_another_account_is_forbidden(env: Env) -> None:
    env.sandbox.add_account("third")
    other = BillingoProvider(env.base_url)
    try:
        await other.issue(conn("third"), make_draft())
    finally:
        await other.close()
    [partner] = env.sandbox.partners("third")
    status, answer = await call(
        env, "POST", "/documents", {**DOCUMENT, "partner_id": partner["id"]}
    )
    assert status == 403
    assert "message" in answer["error"]


async def test_vendor_lookup_miss_and_currencies(env: Env) -> None:
    status, body = await call(env, "GET", "/documents/vendor/nothing")
    assert (status, body) == (404, {"error": {"message": "Document not found."}})
    status, rate = await call(env, "GET", "/currencies?from=EUR&to=HUF&date=2026-11-21")
    assert status == 200
    assert rate == {
        "from_currency": "EUR",
        "to_currency": "HUF",
        "conversation_rate": 400.5,
        "date": "2026-11-21",
    }


async def test_request_log_names_operations(env: Env) -> None:
    issued = await env.provider.issue(conn(), make_draft(key=VENDOR))
    await env.provider.cancel(conn(), issued, storno_request())
    operations = [r.operation for r in env.sandbox.plan.requests]
    assert operations == ["POST /partners", "POST /documents", "POST /documents/{id}/cancel"]


async def test_control_routes(env: Env) -> None:
    async with aiohttp.ClientSession() as http:
        sandbox_url = f"{env.root}/_sandbox"
        account = {"api_key": "over-http", "block_ids": [333], "subscription": True}
        async with http.post(f"{sandbox_url}/accounts", json=account) as response:
            assert response.status == 201
        await env.provider.issue(conn("over-http", block_id=333), make_draft())
        async with http.get(f"{sandbox_url}/documents", params={"api_key": "over-http"}) as r:
            assert [d["block_id"] for d in await r.json()] == [333]
        async with http.put(f"{sandbox_url}/rate-limit", json={"per_minute": 1}) as response:
            assert (await response.json()) == {"per_minute": 1}
        async with http.delete(f"{sandbox_url}/accounts/over-http") as response:
            assert response.status == 204
        err = await failure(env.provider.check_connection(conn("over-http", block_id=333)))
        assert err.code is ErrorCode.AUTH_FAILED
        async with http.post(f"{sandbox_url}/reset") as response:
            assert response.status == 204
        async with http.get(f"{sandbox_url}/documents") as response:
            assert await response.json() == []


async def test_fault_control_route_from_sandbox_faults(env: Env) -> None:
    fault = {"action": "status", "status": 503, "path": "/organization", "times": 1}
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{env.root}/_sandbox/faults", json=fault) as response,
    ):
        assert response.status == 201
    err = await failure(env.provider.check_connection(conn()))
    assert err.code is ErrorCode.PROVIDER_UNAVAILABLE
    await env.provider.check_connection(conn())


ADDRESS = {"country_code": "HU", "post_code": "1051", "city": "Budapest", "address": "Fő u. 1."}
ITEM = {
    "name": "Room",
    "unit_price": 1000,
    "unit_price_type": "gross",
    "quantity": 1,
    "unit": "night",
    "vat": "27%",
}
DOCUMENT: dict[str, Any] = {
    "block_id": 111,
    "type": "invoice",
    "fulfillment_date": "2026-11-21",
    "due_date": "2026-11-21",
    "payment_method": "cash",
    "language": "hu",
    "currency": "HUF",
    "items": [ITEM],
}
