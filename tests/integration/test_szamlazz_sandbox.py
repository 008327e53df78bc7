"""The Számlázz.hu provider against the Számla Agent sandbox, over real HTTP on 127.0.0.1."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import date
from decimal import Decimal
from typing import Any
from urllib.parse import unquote_plus

import aiohttp
import pytest
from lxml import etree
from pydantic import SecretStr

from providers.base import TenantConnection
from providers.errors import ErrorCode, InvoicingError
from providers.szamlazz import SzamlazzProvider
from providers.szamlazz.xml import (
    ACTION_INVOICE,
    ACTION_QUERY,
    ACTION_REVERSE,
    build_invoice,
    build_query,
    schema_errors,
)
from tests.unit.test_szamlazz_xml import customer, draft, line, storno
from worker.devtools.faults import Fault
from worker.devtools.szamlazz_sandbox import SzamlazzSandbox

KEY = "sandboxkey0123456789abcdefghijklmnopqrstu"
Observed = list[tuple[str, str, str]]


@pytest.fixture
def sandbox() -> SzamlazzSandbox:
    sandbox = SzamlazzSandbox(seed=1)
    sandbox.add_account(KEY, prefixes=("BELLA", "AURORA"))
    return sandbox


@pytest.fixture
async def url(sandbox: SzamlazzSandbox) -> AsyncIterator[str]:
    yield await sandbox.start()
    await sandbox.stop()


@pytest.fixture
def observed() -> Observed:
    return []


@pytest.fixture
async def provider(url: str, observed: Observed) -> AsyncIterator[SzamlazzProvider]:
    def observe(name: str, operation: str, status: str, seconds: float) -> None:
        observed.append((name, operation, status))

    provider = SzamlazzProvider(url, timeout=5, observer=observe)
    yield provider
    await provider.close()


def conn(**changes: Any) -> TenantConnection:
    base: dict[str, Any] = {
        "tenant_id": "panzio-bella",
        "provider": "szamlazz",
        "secret": SecretStr(KEY),
        "invoice_prefix": "BELLA",
    }
    return TenantConnection(**(base | changes))


async def test_issue_find_reverse(
    provider: SzamlazzProvider, sandbox: SzamlazzSandbox, observed: Observed
) -> None:
    sale = draft()
    issued = await provider.issue(conn(), sale)

    year = date.today().year
    assert issued.invoice_number == f"BELLA-{year}-001"
    assert issued.document_id == issued.invoice_number
    assert issued.gross_total == Decimal(49980)
    assert issued.currency == "HUF"
    assert await provider.find_invoice(conn(), sale.external_key) == issued
    assert await provider.find_invoice(conn(), "bookinda:nothing:here:1") is None

    request = storno()
    assert await provider.find_cancellation(conn(), issued, request) is None
    reversed_ = await provider.cancel(conn(), issued, request)
    assert reversed_.kind == "reverse"
    assert reversed_.invoice_number == f"BELLA-{year}-002"
    assert await provider.find_cancellation(conn(), issued, request) == reversed_
    found = await provider.find_invoice(conn(), sale.external_key)
    assert found is not None
    assert found.cancelled

    # The Agent answers a repeated reverse with the reverse invoice it already made.
    assert await provider.cancel(conn(), issued, request) == reversed_
    stored = sandbox.invoices(KEY)
    assert [(i["kind"], i["reverses"], i["gross"]) for i in stored] == [
        ("invoice", None, Decimal(49980)),
        ("reverse", issued.invoice_number, Decimal(-49980)),
    ]
    assert stored[0]["external_id"] == sale.external_key
    assert stored[0]["order_number"] == sale.sale_id
    assert stored[1]["external_id"] == request.external_key
    assert stored[1]["fulfillment_date"] == sale.fulfillment_date
    assert [x["quantity"] for x in stored[1]["lines"]] == [Decimal(-2)]

    assert {status for _, _, status in observed} == {"ok", "7"}
    assert [op for _, op, _ in observed] == [
        "issue",
        "query",
        "query",
        "query",
        "reverse",
        "query",
        "query",
        "reverse",
    ]
    # One session for the whole conversation: the JSESSIONID cookie came back every time.
    assert len(sandbox.sessions) == 1


async def test_eur_invoice_and_several_prefixes(provider: SzamlazzProvider) -> None:
    item = line("99.99", "net", "27%", "EUR", quantity="3")
    issued = await provider.issue(conn(invoice_prefix="AURORA"), draft((item,), currency="EUR"))
    assert issued.invoice_number.startswith("AURORA-")
    assert issued.gross_total == Decimal("380.96")
    assert issued.currency == "EUR"


async def test_revoked_key_is_auth_failed(
    provider: SzamlazzProvider, sandbox: SzamlazzSandbox
) -> None:
    await provider.check_connection(conn())
    sandbox.revoke(KEY)
    for call in (
        provider.check_connection(conn()),
        provider.issue(conn(), draft()),
        provider.find_invoice(conn(), "bookinda:x"),
    ):
        with pytest.raises(InvoicingError) as caught:
            await call
        assert caught.value.code == ErrorCode.AUTH_FAILED
        assert not caught.value.outcome_unknown
        assert KEY not in str(caught.value)


async def test_unknown_key_is_auth_failed(provider: SzamlazzProvider) -> None:
    with pytest.raises(InvoicingError) as caught:
        await provider.check_connection(conn(secret=SecretStr("not-a-key")))
    assert caught.value.code == ErrorCode.AUTH_FAILED


async def test_unknown_prefix_is_document_block_not_found(provider: SzamlazzProvider) -> None:
    with pytest.raises(InvoicingError) as caught:
        await provider.issue(conn(invoice_prefix="NOPE"), draft())
    assert caught.value.code == ErrorCode.DOCUMENT_BLOCK_NOT_FOUND
    assert not caught.value.outcome_unknown


async def test_line_error_names_the_row(
    provider: SzamlazzProvider, sandbox: SzamlazzSandbox
) -> None:
    good = line("24990", "gross", "27%", "HUF")
    bad = replace(line("1500", "gross", "5%", "HUF"), vat_amount=Decimal(100))
    with pytest.raises(InvoicingError) as caught:
        await provider.issue(conn(), draft((good, bad)))
    assert caught.value.code == ErrorCode.INVALID_INVOICE_DATA
    assert "263" in caught.value.message
    assert "row 2" in caught.value.message
    assert sandbox.invoices() == []


async def test_commit_then_fail_is_outcome_unknown_and_found_once(
    provider: SzamlazzProvider, sandbox: SzamlazzSandbox
) -> None:
    sandbox.plan.add(Fault(action="commit_then_fail", path=ACTION_INVOICE, status=502, times=1))
    sale = draft()
    with pytest.raises(InvoicingError) as caught:
        await provider.issue(conn(), sale)
    assert caught.value.code == ErrorCode.PROVIDER_UNAVAILABLE
    assert caught.value.outcome_unknown

    found = await provider.find_invoice(conn(), sale.external_key)
    assert found is not None
    assert [i["number"] for i in sandbox.invoices(KEY)] == [found.invoice_number]
    assert sandbox.plan.count(ACTION_INVOICE) == 1


async def test_commit_then_fail_on_reverse_then_found(
    provider: SzamlazzProvider, sandbox: SzamlazzSandbox
) -> None:
    issued = await provider.issue(conn(), draft())
    sandbox.plan.add(Fault(action="commit_then_fail", path=ACTION_REVERSE, status=503, times=1))
    with pytest.raises(InvoicingError) as caught:
        await provider.cancel(conn(), issued, storno())
    assert caught.value.outcome_unknown
    found = await provider.find_cancellation(conn(), issued, storno())
    assert found is not None
    assert found.invoice_number == sandbox.invoices(KEY)[1]["number"]


async def test_client_timeout_after_commit_is_outcome_unknown(
    url: str, sandbox: SzamlazzSandbox
) -> None:
    sandbox.plan.add(Fault(action="commit_then_hang", path=ACTION_INVOICE, delay=0.2, times=1))
    provider = SzamlazzProvider(url, timeout=0.1)
    try:
        with pytest.raises(InvoicingError) as caught:
            await provider.issue(conn(), draft())
        assert caught.value.code == ErrorCode.TIMEOUT
        assert caught.value.outcome_unknown
    finally:
        await provider.close()


async def test_injected_503_on_a_query_is_transient_and_not_unknown(
    provider: SzamlazzProvider, sandbox: SzamlazzSandbox, observed: Observed
) -> None:
    sandbox.plan.add(Fault(action="status", path=ACTION_QUERY, status=503, times=1))
    with pytest.raises(InvoicingError) as caught:
        await provider.find_invoice(conn(), "bookinda:x")
    assert caught.value.code == ErrorCode.PROVIDER_UNAVAILABLE
    assert not caught.value.outcome_unknown
    assert observed[-1][2] == "503"


async def test_dropped_connection_on_create_is_outcome_unknown(
    provider: SzamlazzProvider, sandbox: SzamlazzSandbox
) -> None:
    sandbox.plan.add(Fault(action="drop", path=ACTION_INVOICE, times=1))
    with pytest.raises(InvoicingError) as caught:
        await provider.issue(conn(), draft())
    assert caught.value.code == ErrorCode.NETWORK_ERROR
    assert caught.value.outcome_unknown
    assert sandbox.invoices() == []


async def test_reverse_of_a_reverse_is_refused(provider: SzamlazzProvider) -> None:
    issued = await provider.issue(conn(), draft())
    reverse = await provider.cancel(conn(), issued, storno())
    as_invoice = replace(
        issued, document_id=reverse.document_id, invoice_number=reverse.invoice_number
    )
    with pytest.raises(InvoicingError) as caught:
        await provider.cancel(conn(), as_invoice, storno(external_key="other"))
    assert caught.value.code == ErrorCode.PROVIDER_REJECTED
    assert "14" in caught.value.message


async def test_find_cancellation_refuses_a_document_that_reverses_something_else(
    provider: SzamlazzProvider,
) -> None:
    first = await provider.issue(conn(), draft())
    second = await provider.issue(conn(), replace(draft(), external_key="bookinda:second"))
    await provider.cancel(conn(), first, storno())
    with pytest.raises(InvoicingError) as caught:
        await provider.find_cancellation(conn(), second, storno())
    assert caught.value.code == ErrorCode.DOCUMENT_MISMATCH


# ---- the wire, seen from outside -----------------------------------------------------------


async def post(
    url: str, action: str, document: bytes, *, as_file: bool = True
) -> tuple[int, dict[str, str], bytes]:
    form = aiohttp.FormData()
    if as_file:
        form.add_field(action, document, filename="request.xml", content_type="text/xml")
    else:
        form.add_field(action, document.decode())
    async with aiohttp.ClientSession() as session, session.post(url, data=form) as response:
        return response.status, dict(response.headers), await response.read()


async def test_invalid_xml_is_57_with_the_validator_message(url: str) -> None:
    document = build_invoice(conn(), draft())
    broken = document.replace(b"<fizmod>", b"<fizetesimod>").replace(
        b"</fizmod>", b"</fizetesimod>"
    )
    status, headers, body = await post(url, ACTION_INVOICE, broken)
    assert status == 200
    assert headers["szlahu_error_code"] == "57"
    assert "fizetesimod" in unquote_plus(headers["szlahu_error"])
    assert b"<hibakod>57</hibakod>" in body


async def test_xml_not_sent_as_a_file_is_53(url: str) -> None:
    document = build_query(KEY, external_key="x")
    status, headers, body = await post(url, ACTION_QUERY, document, as_file=False)
    assert status == 200
    assert b"<hibakod>53</hibakod>" in body
    assert "szlahu_error_code" not in headers  # queries answer in the body only


async def test_answer_version_1_is_text_or_pdf(url: str, sandbox: SzamlazzSandbox) -> None:
    document = build_invoice(conn(), draft())
    version_1 = document.replace(
        b"<valaszVerzio>2</valaszVerzio>", b"<valaszVerzio>1</valaszVerzio>"
    )
    async with aiohttp.ClientSession() as session:
        form = aiohttp.FormData()
        form.add_field(ACTION_INVOICE, version_1, filename="a.xml", content_type="text/xml")
        async with session.post(url, data=form) as response:
            text = await response.text()
            number = response.headers["szlahu_szamlaszam"]
        assert text == f"xmlagentresponse=DONE;{number}"
        pdf = version_1.replace(b"<szamlaLetoltes>false", b"<szamlaLetoltes>true")
        form = aiohttp.FormData()
        form.add_field(ACTION_INVOICE, pdf, filename="a.xml", content_type="text/xml")
        async with session.post(url, data=form) as response:
            assert (await response.read()).startswith(b"%PDF")
            assert response.headers["szlahu_bruttovegosszeg"] == "49980"
        bad = version_1.replace(b"<szamlaszamElotag>BELLA", b"<szamlaszamElotag>NOPE")
        form = aiohttp.FormData()
        form.add_field(ACTION_INVOICE, bad, filename="a.xml", content_type="text/xml")
        async with session.post(url, data=form) as response:
            assert response.status == 200
            assert (await response.text()).startswith("[ERR] ")
            assert response.headers["szlahu_error_code"] == "202"


async def test_query_answers_validate_against_the_published_schema(
    url: str, provider: SzamlazzProvider, sandbox: SzamlazzSandbox
) -> None:
    items = (line("24990", "gross", "27%", "HUF"), line("3000", "gross", "AAM", "HUF", "1"))
    buyer = customer("company", "DE", eu_vat_number="DE123456789")
    issued = await provider.issue(conn(), draft(items, buyer=buyer))
    await provider.cancel(conn(), issued, storno())
    for number in (issued.invoice_number, sandbox.invoices()[1]["number"]):
        async with aiohttp.ClientSession() as session:
            form = aiohttp.FormData()
            form.add_field(ACTION_QUERY, build_query(KEY, number=number), filename="q.xml")
            async with session.post(url, data=form) as response:
                body = await response.read()
        assert schema_errors(body, "szamla.xsd") == []
        assert etree.fromstring(body).tag == "{http://www.szamlazz.hu/szamla}szamla"


async def test_http_control_routes(url: str, sandbox: SzamlazzSandbox) -> None:
    base = url.removesuffix("/szamla/")
    provider = SzamlazzProvider(url)
    other = conn(secret=SecretStr("http-added-key"), invoice_prefix="HTTP")
    try:
        async with aiohttp.ClientSession() as http:
            created = await http.post(
                f"{base}/_sandbox/accounts",
                json={"agent_key": "http-added-key", "prefixes": ["HTTP"]},
            )
            assert created.status == 201
            issued = await provider.issue(other, draft())
            listed = await (
                await http.get(f"{base}/_sandbox/invoices?agent_key=http-added-key")
            ).json()
            assert [(i["number"], i["gross"]) for i in listed] == [(issued.invoice_number, "49980")]
            assert (await http.delete(f"{base}/_sandbox/accounts/http-added-key")).status == 204
            with pytest.raises(InvoicingError) as caught:
                await provider.check_connection(other)
            assert caught.value.code == ErrorCode.AUTH_FAILED
            assert (await http.post(f"{base}/_sandbox/reset")).status == 204
            assert await (await http.get(f"{base}/_sandbox/invoices")).json() == []
            log = await (await http.get(f"{base}/_sandbox/requests")).json()
            assert log == []
    finally:
        await provider.close()
