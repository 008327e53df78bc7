"""BillingoProvider against a scripted HTTP server on 127.0.0.1: every answer Billingo can give
(status, body shape, lost answer, refused connection) becomes the right contract error.

aioresponses 0.7.9 cannot build responses for aiohttp 3.14 (ClientResponse needs a
stream_writer), so answers come from a tiny real server instead of a patched session.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

import pytest
from aiohttp import web
from pydantic import SecretStr

from providers.base import CancelRequest, IssuedInvoice, TenantConnection
from providers.billingo import BillingoProvider
from providers.errors import ErrorCode, InvoicingError
from tests.unit.test_billingo_mapping import make_draft

API_KEY = "sk-live-5ecret-billingo-key"
# Generous: a busy machine must not turn a normal answer into a timeout (only the tests
# whose server hangs wait for it).
TIMEOUT = 1.5


@dataclass
class Answer:
    status: int = 200
    #: dict/list: sent as JSON; str: sent as is (HTML, truncated JSON, ...).
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    action: Literal["answer", "hang", "drop"] = "answer"


@dataclass
class Seen:
    route: str
    query: dict[str, str]
    api_key: str | None
    body: Any


class ScriptedBillingo:
    """Answers each "METHOD /path" with its scripted answers in turn; the last one repeats."""

    def __init__(self) -> None:
        self.script: dict[str, list[Answer]] = {}
        self.seen: list[Seen] = []
        self.app = web.Application()
        self.app.router.add_route("*", "/{tail:.*}", self._handle)

    def on(self, route: str, *answers: Answer) -> None:
        self.script[route] = list(answers)

    def routes(self) -> list[str]:
        return [s.route for s in self.seen]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        route = f"{request.method} {request.raw_path.split('?')[0].removeprefix('/v3')}"
        raw = await request.read()
        body = json.loads(raw) if raw else None
        self.seen.append(Seen(route, dict(request.query), request.headers.get("X-API-KEY"), body))
        answers = self.script.get(route)
        if not answers:
            return web.Response(status=599, text=f"unscripted {route}")
        answer = answers.pop(0) if len(answers) > 1 else answers[0]
        if answer.action == "hang":
            await asyncio.sleep(30)
        if answer.action == "drop":
            assert request.transport is not None
            request.transport.abort()
            raise asyncio.CancelledError
        text = answer.body if isinstance(answer.body, str) else json.dumps(answer.body)
        return web.Response(status=answer.status, text=text, headers=answer.headers)


@pytest.fixture
async def server() -> AsyncIterator[tuple[ScriptedBillingo, str]]:
    fake = ScriptedBillingo()
    runner = web.AppRunner(fake.app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield fake, f"http://127.0.0.1:{port}/v3"
    await runner.cleanup()


Observed = list[tuple[str, str, str, float]]


@pytest.fixture
async def client(
    server: tuple[ScriptedBillingo, str],
) -> AsyncIterator[tuple[BillingoProvider, ScriptedBillingo, Observed]]:
    fake, base_url = server
    observed: Observed = []
    provider = BillingoProvider(
        base_url, timeout=TIMEOUT, observer=lambda *args: observed.append(args)
    )
    yield provider, fake, observed
    await provider.close()


Client = tuple[BillingoProvider, ScriptedBillingo, Observed]


def conn(key: str = API_KEY, block_id: int | None = 111) -> TenantConnection:
    return TenantConnection(
        tenant_id="hotel-aurora",
        provider="billingo",
        secret=SecretStr(key),
        block_id=block_id,
        e_invoice=True,
    )


def document(doc_id: int = 5001, **changes: Any) -> dict[str, Any]:
    return {
        "id": doc_id,
        "invoice_number": f"B111-2026-{doc_id:06d}",
        "type": "invoice",
        "cancelled": False,
        "gross_total": 49980.0,
        "currency": "HUF",
        "related_documents": [],
        **changes,
    }


PARTNER = Answer(201, {"id": 77})
CREATED = Answer(201, document())
STORNO = Answer(200, document(6001, type="cancellation", gross_total=-49980.0))
REQUEST = CancelRequest("hotel-aurora", "S-1", 1, "bookinda:hotel-aurora:S-1:1:storno", "dispute")
INVOICE = IssuedInvoice("5001", "B111-2026-005001", make_draft().gross_total, "HUF")


def error(message: str, **extra: str) -> dict[str, Any]:
    return {"error": {"message": message, **extra}}


async def failure(coro: Any) -> InvoicingError:
    with pytest.raises(InvoicingError) as caught:
        await coro
    return caught.value


# ---- issue -----------------------------------------------------------------------------


async def test_issue_creates_partner_then_document(client: Client) -> None:
    provider, fake, observed = client
    fake.on("POST /partners", PARTNER)
    fake.on("POST /documents", CREATED)

    issued = await provider.issue(conn(), make_draft())

    assert issued == IssuedInvoice("5001", "B111-2026-005001", issued.gross_total, "HUF")
    assert str(issued.gross_total) == "49980"
    assert fake.routes() == ["POST /partners", "POST /documents"]
    assert all(s.api_key == API_KEY for s in fake.seen)
    assert fake.seen[0].body["tax_type"] == "HAS_TAX_NUMBER"
    sent = fake.seen[1].body
    assert sent["partner_id"] == 77
    assert sent["vendor_id"] == "bookinda:hotel-aurora:S-1:1"
    assert sent["block_id"] == 111
    assert sent["electronic"] is True
    assert [(o[0], o[1], o[2]) for o in observed] == [
        ("billingo", "create_partner", "201"),
        ("billingo", "create_document", "201"),
    ]


async def test_returning_customer_costs_no_partner_request(client: Client) -> None:
    provider, fake, _ = client
    fake.on("POST /partners", PARTNER)
    fake.on("POST /documents", CREATED)

    await provider.issue(conn(), make_draft())
    await provider.issue(conn(), make_draft(key="bookinda:hotel-aurora:S-2:1"))
    await provider.issue(conn("another-key"), make_draft(key="bookinda:other:S-3:1"))

    assert fake.routes() == [
        "POST /partners",
        "POST /documents",
        "POST /documents",
        # A different API key is a different Billingo account: its own partner.
        "POST /partners",
        "POST /documents",
    ]


async def test_concurrent_sales_of_a_new_customer_share_one_partner(client: Client) -> None:
    provider, fake, _ = client
    fake.on("POST /partners", PARTNER)
    fake.on("POST /documents", CREATED)

    await asyncio.gather(*(provider.issue(conn(), make_draft(key=f"k{i}")) for i in range(5)))

    assert fake.routes().count("POST /partners") == 1


async def test_stale_cached_partner_is_recreated_once(client: Client) -> None:
    provider, fake, _ = client
    fake.on("POST /partners", PARTNER, Answer(201, {"id": 78}))
    fake.on("POST /documents", CREATED, Answer(403, error("Forbidden")), CREATED)
    await provider.issue(conn(), make_draft())

    issued = await provider.issue(conn(), make_draft(key="k2"))

    assert issued.document_id == "5001"
    assert fake.routes() == [
        "POST /partners",
        "POST /documents",
        "POST /documents",
        "POST /partners",
        "POST /documents",
    ]
    assert fake.seen[-1].body["partner_id"] == 78


async def test_second_403_is_auth_failed(client: Client) -> None:
    provider, fake, _ = client
    fake.on("POST /partners", PARTNER)
    fake.on("POST /documents", CREATED, Answer(403, error("Forbidden")))
    await provider.issue(conn(), make_draft())

    err = await failure(provider.issue(conn(), make_draft(key="k2")))

    assert err.code is ErrorCode.AUTH_FAILED
    assert "write scope" in err.message
    assert fake.routes().count("POST /partners") == 2
    assert fake.routes().count("POST /documents") == 3


async def test_403_with_a_fresh_partner_is_not_retried(client: Client) -> None:
    provider, fake, _ = client
    fake.on("POST /partners", PARTNER)
    fake.on("POST /documents", Answer(403, error("Forbidden")))

    err = await failure(provider.issue(conn(), make_draft()))

    assert err.code is ErrorCode.AUTH_FAILED
    assert fake.routes() == ["POST /partners", "POST /documents"]


async def test_foreign_currency_uses_a_cached_conversion_rate(client: Client) -> None:
    provider, fake, observed = client
    fake.on("GET /currencies", Answer(200, {"conversation_rate": 400.5}))
    fake.on("POST /partners", PARTNER)
    fake.on("POST /documents", Answer(201, document(currency="EUR", gross_total=124.9)))

    issued = await provider.issue(conn(), make_draft(currency="EUR", unit_price="62.45"))
    await provider.issue(conn(), make_draft(key="k2", currency="EUR", unit_price="62.45"))

    assert str(issued.gross_total) == "124.90"
    assert fake.seen[0].query == {"from": "EUR", "to": "HUF", "date": "2026-11-21"}
    assert fake.routes().count("GET /currencies") == 1
    assert fake.seen[-1].body["conversion_rate"] == 400.5
    assert observed[0][1:3] == ("get_currency", "200")


@pytest.mark.parametrize(
    ("draft_changes", "code"),
    [
        ({"language": "pt"}, ErrorCode.UNSUPPORTED_LANGUAGE),
        ({"currency": "XAU"}, ErrorCode.UNSUPPORTED_CURRENCY),
    ],
)
async def test_data_errors_cost_no_request(
    client: Client, draft_changes: dict[str, Any], code: ErrorCode
) -> None:
    provider, fake, _ = client
    err = await failure(provider.issue(conn(), make_draft(**draft_changes)))
    assert err.code is code
    assert fake.seen == []


async def test_missing_block_id_costs_no_request(client: Client) -> None:
    provider, fake, _ = client
    err = await failure(provider.issue(conn(block_id=None), make_draft()))
    assert err.code is ErrorCode.DOCUMENT_BLOCK_NOT_FOUND
    assert fake.seen == []


VALIDATION_BLOCK = {
    "message": "Validation Failed",
    "errors": [{"field": "block_id", "message": "x"}],
}


@pytest.mark.parametrize(
    ("answer", "code", "unknown"),
    [
        (Answer(401, error("Authorization information is missing")), ErrorCode.AUTH_FAILED, False),
        (Answer(402, error("No subscription")), ErrorCode.SUBSCRIPTION_REQUIRED, False),
        (Answer(422, VALIDATION_BLOCK), ErrorCode.DOCUMENT_BLOCK_NOT_FOUND, False),
        (Answer(400, error("Malformed")), ErrorCode.PROVIDER_REJECTED, False),
        (Answer(400, error("Daily quota exceeded")), ErrorCode.RATE_LIMITED, False),
        (Answer(429, error("Too many requests")), ErrorCode.RATE_LIMITED, False),
        (Answer(500, error("Internal", trace_id="t1")), ErrorCode.PROVIDER_UNAVAILABLE, True),
        (Answer(502, "<html>502 Bad Gateway</html>"), ErrorCode.PROVIDER_UNAVAILABLE, True),
        (Answer(503, "Service Unavailable"), ErrorCode.PROVIDER_UNAVAILABLE, True),
        (Answer(201, "<html>oops</html>"), ErrorCode.PROVIDER_UNAVAILABLE, True),
        (Answer(201, '{"id": 5001, "invoice_'), ErrorCode.PROVIDER_UNAVAILABLE, True),
        (Answer(201, {"unexpected": True}), ErrorCode.PROVIDER_UNAVAILABLE, True),
        (Answer(action="hang"), ErrorCode.TIMEOUT, True),
        (Answer(action="drop"), ErrorCode.NETWORK_ERROR, True),
    ],
)
async def test_create_document_answers(
    client: Client, answer: Answer, code: ErrorCode, unknown: bool
) -> None:
    provider, fake, _ = client
    fake.on("POST /partners", PARTNER)
    fake.on("POST /documents", answer)

    err = await failure(provider.issue(conn(), make_draft()))

    assert err.code is code
    assert err.outcome_unknown is unknown
    assert fake.routes().count("POST /documents") == 1


async def test_rate_limited_carries_retry_after(client: Client) -> None:
    provider, fake, _ = client
    fake.on("POST /partners", Answer(429, error("Too many requests"), {"Retry-After": "42"}))
    err = await failure(provider.issue(conn(), make_draft()))
    assert err.code is ErrorCode.RATE_LIMITED
    assert err.retry_after == 42.0


async def test_server_error_names_trace_id(client: Client) -> None:
    provider, fake, _ = client
    fake.on("POST /partners", PARTNER)
    fake.on("POST /documents", Answer(500, error("Internal Server Error.", trace_id="664b21")))
    err = await failure(provider.issue(conn(), make_draft()))
    assert "664b21" in err.message


async def test_lost_partner_answer_is_not_outcome_unknown(client: Client) -> None:
    provider, fake, observed = client
    fake.on("POST /partners", Answer(action="hang"))
    err = await failure(provider.issue(conn(), make_draft()))
    assert err.code is ErrorCode.TIMEOUT
    assert not err.outcome_unknown
    assert observed[-1][1:3] == ("create_partner", "timeout")


async def test_refused_connection_is_network_error_with_known_outcome() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    observed: Observed = []
    provider = BillingoProvider(
        f"http://127.0.0.1:{port}/v3", timeout=TIMEOUT, observer=lambda *a: observed.append(a)
    )
    try:
        err = await failure(provider.cancel(conn(), INVOICE, REQUEST))
    finally:
        await provider.close()
    assert err.code is ErrorCode.NETWORK_ERROR
    assert not err.outcome_unknown
    assert API_KEY not in str(err)
    assert observed[0][1:3] == ("cancel_document", "network_error")


@pytest.mark.parametrize(
    "answer",
    [
        Answer(401, error(f"Authorization information (Header: {API_KEY}) is invalid.")),
        Answer(
            422, {"message": "Validation Failed", "errors": [{"field": API_KEY, "message": "x"}]}
        ),
        Answer(500, f"<html>{API_KEY}</html>"),
        Answer(400, API_KEY),
    ],
)
async def test_api_key_never_appears_in_errors(client: Client, answer: Answer) -> None:
    provider, fake, _ = client
    fake.on("POST /partners", answer)
    err = await failure(provider.issue(conn(), make_draft()))
    assert API_KEY not in str(err)
    assert API_KEY not in err.message
    assert API_KEY not in repr(err.args)


# ---- find_invoice ----------------------------------------------------------------------


async def test_find_invoice_by_vendor_id(client: Client) -> None:
    provider, fake, observed = client
    fake.on("GET /documents/vendor/bookinda:hotel:S%2F1:1", Answer(200, document()))
    found = await provider.find_invoice(conn(), "bookinda:hotel:S/1:1")
    assert found is not None
    assert found.document_id == "5001"
    assert not found.cancelled
    assert observed[0][1:3] == ("find_document", "200")


async def test_find_invoice_not_found(client: Client) -> None:
    provider, fake, _ = client
    fake.on("GET /documents/vendor/k1", Answer(404, error("Document not found.")))
    assert await provider.find_invoice(conn(), "k1") is None


async def test_find_invoice_reports_cancelled(client: Client) -> None:
    provider, fake, _ = client
    fake.on("GET /documents/vendor/k1", Answer(200, document(cancelled=True)))
    found = await provider.find_invoice(conn(), "k1")
    assert found is not None
    assert found.cancelled


async def test_find_invoice_follows_a_storno_to_its_invoice(client: Client) -> None:
    provider, fake, _ = client
    storno = document(6001, type="cancellation", related_documents=[{"id": 5001}])
    fake.on("GET /documents/vendor/k1", Answer(200, storno))
    fake.on("GET /documents/5001", Answer(200, document(cancelled=True)))
    found = await provider.find_invoice(conn(), "k1")
    assert found is not None
    assert (found.document_id, found.cancelled) == ("5001", True)


async def test_find_invoice_refuses_other_document_types(client: Client) -> None:
    provider, fake, _ = client
    fake.on("GET /documents/vendor/k1", Answer(200, document(type="proforma")))
    err = await failure(provider.find_invoice(conn(), "k1"))
    assert err.code is ErrorCode.PROVIDER_REJECTED


async def test_find_invoice_errors_are_mapped(client: Client) -> None:
    provider, fake, _ = client
    fake.on("GET /documents/vendor/k1", Answer(503, "down"))
    err = await failure(provider.find_invoice(conn(), "k1"))
    assert err.code is ErrorCode.PROVIDER_UNAVAILABLE
    assert not err.outcome_unknown


# ---- cancel ----------------------------------------------------------------------------


async def test_cancel_sends_the_reason(client: Client) -> None:
    provider, fake, observed = client
    fake.on("POST /documents/5001/cancel", STORNO)
    cancellation = await provider.cancel(conn(), INVOICE, REQUEST)
    assert (cancellation.kind, cancellation.document_id) == ("cancel", "6001")
    assert cancellation.invoice_number == "B111-2026-006001"
    assert fake.seen[0].body == {"cancellation_reason": "dispute"}
    assert observed[0][1:3] == ("cancel_document", "200")


async def test_cancel_without_reason_sends_no_body(client: Client) -> None:
    provider, fake, _ = client
    fake.on("POST /documents/5001/cancel", STORNO)
    request = CancelRequest("hotel-aurora", "S-1", 1, "k:storno", None)
    await provider.cancel(conn(), INVOICE, request)
    assert fake.seen[0].body is None


@pytest.mark.parametrize(
    ("answer", "code", "unknown"),
    [
        (Answer(action="hang"), ErrorCode.TIMEOUT, True),
        (Answer(action="drop"), ErrorCode.NETWORK_ERROR, True),
        (Answer(500, error("boom")), ErrorCode.PROVIDER_UNAVAILABLE, True),
        (Answer(404, error("Not found")), ErrorCode.PROVIDER_REJECTED, False),
        (Answer(403, error("Forbidden")), ErrorCode.AUTH_FAILED, False),
    ],
)
async def test_cancel_is_never_retried(
    client: Client, answer: Answer, code: ErrorCode, unknown: bool
) -> None:
    provider, fake, _ = client
    fake.on("POST /documents/5001/cancel", answer)
    err = await failure(provider.cancel(conn(), INVOICE, REQUEST))
    assert (err.code, err.outcome_unknown) == (code, unknown)
    assert fake.routes() == ["POST /documents/5001/cancel"]


# ---- find_cancellation -----------------------------------------------------------------


async def test_find_cancellation_of_a_valid_invoice(client: Client) -> None:
    provider, fake, _ = client
    fake.on("GET /documents/5001", Answer(200, document()))
    assert await provider.find_cancellation(conn(), INVOICE, REQUEST) is None


async def test_find_cancellation_follows_related_documents(client: Client) -> None:
    provider, fake, observed = client
    related = [{"id": 5002}, {"id": 6001}]
    fake.on("GET /documents/5001", Answer(200, document(cancelled=True, related_documents=related)))
    fake.on("GET /documents/5002", Answer(200, document(5002, type="modification")))
    fake.on("GET /documents/6001", STORNO)
    found = await provider.find_cancellation(conn(), INVOICE, REQUEST)
    assert found is not None
    assert found.document_id == "6001"
    assert {o[1] for o in observed} == {"get_document"}


async def test_cancelled_invoice_without_storno_is_not_none(client: Client) -> None:
    provider, fake, _ = client
    fake.on("GET /documents/5001", Answer(200, document(cancelled=True)))
    err = await failure(provider.find_cancellation(conn(), INVOICE, REQUEST))
    assert err.code is ErrorCode.PROVIDER_REJECTED


async def test_find_cancellation_of_an_unknown_document(client: Client) -> None:
    provider, fake, _ = client
    fake.on("GET /documents/5001", Answer(404, error("Not found")))
    err = await failure(provider.find_cancellation(conn(), INVOICE, REQUEST))
    assert err.code is ErrorCode.PROVIDER_REJECTED


# ---- check_connection ------------------------------------------------------------------

ORGANIZATION = Answer(200, {"tax_code": "12345676-2-41", "subscription": {"features": []}})


def blocks(*ids: int, page: int = 1, last_page: int = 1) -> Answer:
    data = [{"id": i, "prefix": f"B{i}", "type": "invoice"} for i in ids]
    return Answer(200, {"data": data, "current_page": page, "last_page": last_page})


async def test_check_connection_ok(client: Client) -> None:
    provider, fake, observed = client
    fake.on("GET /organization", ORGANIZATION)
    fake.on(
        "GET /document-blocks", blocks(5, page=1, last_page=2), blocks(111, page=2, last_page=2)
    )
    await provider.check_connection(conn())
    assert fake.seen[1].query == {"type": "invoice", "page": "1", "per_page": "100"}
    assert fake.seen[2].query["page"] == "2"
    assert {o[1] for o in observed} == {"check_connection"}


async def test_check_connection_missing_block(client: Client) -> None:
    provider, fake, _ = client
    fake.on("GET /organization", ORGANIZATION)
    fake.on("GET /document-blocks", blocks(5))
    err = await failure(provider.check_connection(conn()))
    assert err.code is ErrorCode.DOCUMENT_BLOCK_NOT_FOUND


@pytest.mark.parametrize(
    ("answer", "code"),
    [
        (Answer(401, error("invalid key")), ErrorCode.AUTH_FAILED),
        (Answer(402, error("no subscription")), ErrorCode.SUBSCRIPTION_REQUIRED),
        (Answer(502, "<html>bad gateway</html>"), ErrorCode.PROVIDER_UNAVAILABLE),
        (Answer(action="hang"), ErrorCode.TIMEOUT),
    ],
)
async def test_check_connection_failures(client: Client, answer: Answer, code: ErrorCode) -> None:
    provider, fake, _ = client
    fake.on("GET /organization", answer)
    err = await failure(provider.check_connection(conn()))
    assert err.code is code
    assert not err.outcome_unknown


async def test_close_is_idempotent_and_the_session_comes_back(client: Client) -> None:
    provider, fake, _ = client
    fake.on("GET /organization", ORGANIZATION)
    fake.on("GET /document-blocks", blocks(111))
    await provider.close()
    await provider.close()
    await provider.check_connection(conn())


async def test_a_body_the_encoder_refuses_is_not_counted_as_a_network_error(
    client: Client,
) -> None:
    # Issue 13: a 1e20 amount made orjson refuse the body before anything was sent; the
    # request was counted as network_error and the sale retried for a day.
    provider, _, observed = client
    with pytest.raises(TypeError):  # orjson.JSONEncodeError: the pipeline's internal_error
        await provider._send(conn(), "POST", "/documents", "create_document", json={"x": 10**20})
    assert observed[-1][1:3] == ("create_document", "internal_error")
