"""The Számlázz.hu provider's reading of Agent answers: errors arrive with HTTP 200 in the
``szlahu_*`` headers, the body or both; what may have been done is flagged outcome_unknown;
the agent key never appears in an error.

aioresponses 0.7.9 cannot build responses for aiohttp 3.14 (ClientResponse needs a
stream_writer), so the answers come from a scripted server on 127.0.0.1 instead.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any
from urllib.parse import quote_plus

import pytest
from aiohttp import BodyPartReader, web

from providers.base import IssuedInvoice
from providers.errors import ErrorCode, InvoicingError
from providers.szamlazz import SzamlazzProvider
from providers.szamlazz.client import agent_error
from providers.szamlazz.xml import AgentAnswer
from tests.unit.test_szamlazz_xml import KEY, conn, draft, storno

Observed = list[tuple[str, str, str]]


@dataclass
class Answer:
    status: int = 200
    body: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    hang: bool = False


@dataclass
class Part:
    name: str
    filename: str | None
    content_type: str
    content: bytes


class ScriptedAgent:
    """Answers each POST with the next scripted answer and records the multipart parts."""

    def __init__(self) -> None:
        self.url = ""
        self.answers: list[Answer] = []
        self.parts: list[Part] = []
        self.release = asyncio.Event()
        self.app = web.Application()
        self.app.router.add_post("/szamla/", self._handle)

    def post(self, url: str, **answer: Any) -> None:
        self.answers.append(Answer(**answer))

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        async for part in await request.multipart():
            assert isinstance(part, BodyPartReader)
            self.parts.append(
                Part(
                    name=part.name or "",
                    filename=part.filename,
                    content_type=part.headers.get("Content-Type", ""),
                    content=await part.read(),
                )
            )
        answer = self.answers.pop(0)
        if answer.hang:
            await self.release.wait()
        return web.Response(status=answer.status, text=answer.body, headers=answer.headers)


def answer(
    ok: bool = True,
    code: int | None = None,
    message: str = "",
    number: str = "BELLA-2026-001",
    gross: str = "49980",
) -> str:
    if ok:
        inner = (
            f"<sikeres>true</sikeres><szamlaszam>{number}</szamlaszam>"
            f"<szamlabrutto>{gross}</szamlabrutto>"
        )
    else:
        inner = (
            f"<sikeres>false</sikeres><hibakod><![CDATA[{code}]]></hibakod>"
            f"<hibauzenet><![CDATA[{message}]]></hibauzenet>"
        )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f'<xmlszamlavalasz xmlns="http://www.szamlazz.hu/xmlszamlavalasz">{inner}</xmlszamlavalasz>'
    )


def error_headers(code: int, message: str) -> dict[str, str]:
    return {"szlahu_error_code": str(code), "szlahu_error": quote_plus(message)}


@pytest.fixture
def observed() -> Observed:
    return []


@pytest.fixture
async def agent() -> AsyncIterator[ScriptedAgent]:
    scripted = ScriptedAgent()
    runner = web.AppRunner(scripted.app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    scripted.url = f"http://127.0.0.1:{runner.addresses[0][1]}/szamla/"
    yield scripted
    scripted.release.set()
    await runner.cleanup()


@pytest.fixture
async def provider(agent: ScriptedAgent, observed: Observed) -> AsyncIterator[SzamlazzProvider]:
    def observe(name: str, operation: str, status: str, seconds: float) -> None:
        observed.append((name, operation, status))

    provider = SzamlazzProvider(agent.url, timeout=TIMEOUT, observer=observe)
    yield provider
    await provider.close()


URL = "ignored: the scripted agent answers every POST"
# Generous: a busy machine must not turn a normal answer into a timeout (only the tests
# whose server hangs wait for it).
TIMEOUT = 1.5


async def issue_error(provider: SzamlazzProvider) -> InvoicingError:
    with pytest.raises(InvoicingError) as caught:
        await provider.issue(conn(), draft())
    return caught.value


async def test_success_is_read_from_the_body(
    provider: SzamlazzProvider, agent: ScriptedAgent, observed: Observed
) -> None:
    agent.post(URL, body=answer(), headers={"szlahu_szamlaszam": "BELLA-2026-001"})
    issued = await provider.issue(conn(), draft())
    assert issued == IssuedInvoice("BELLA-2026-001", "BELLA-2026-001", Decimal(49980), "HUF")
    assert observed == [("szamlazz", "issue", "ok")]


async def test_the_request_is_a_multipart_file_part_named_after_the_action(
    provider: SzamlazzProvider, agent: ScriptedAgent
) -> None:
    agent.post(URL, body=answer())
    await provider.issue(conn(), draft())
    [part] = agent.parts
    assert part.name == "action-xmlagentxmlfile"
    assert part.filename == "request.xml"
    assert part.content_type == "text/xml"
    assert part.content.startswith(b"<?xml")


@pytest.mark.parametrize("code", [3, 135, 136, 164])
async def test_auth_codes_in_headers_only(
    provider: SzamlazzProvider, agent: ScriptedAgent, code: int
) -> None:
    agent.post(URL, body="", headers=error_headers(code, "Bejelentkezési hiba"))
    error = await issue_error(provider)
    assert error.code == ErrorCode.AUTH_FAILED
    assert not error.outcome_unknown
    assert "Bejelentkezési hiba" in error.message


async def test_error_in_the_body_only(
    provider: SzamlazzProvider, agent: ScriptedAgent, observed: Observed
) -> None:
    agent.post(URL, body=answer(ok=False, code=202, message="Nincs ilyen előtag"))
    error = await issue_error(provider)
    assert error.code == ErrorCode.DOCUMENT_BLOCK_NOT_FOUND
    assert observed == [("szamlazz", "issue", "202")]


async def test_line_errors_and_bad_xml_are_invalid_invoice_data(
    provider: SzamlazzProvider, agent: ScriptedAgent
) -> None:
    message = "Hibás áfa érték a(z) 2. tételben (row 2)"
    agent.post(
        URL, body=answer(ok=False, code=263, message=message), headers=error_headers(263, message)
    )
    error = await issue_error(provider)
    assert error.code == ErrorCode.INVALID_INVOICE_DATA
    assert "row 2" in error.message

    validator = "cvc-complex-type.2.4.a: Invalid content was found starting with element 'fizmod'"
    agent.post(URL, body=answer(ok=False, code=57, message=validator))
    error = await issue_error(provider)
    assert error.code == ErrorCode.INVALID_INVOICE_DATA
    assert validator in error.message


async def test_szlahu_down_is_unavailable_and_may_have_been_done(
    provider: SzamlazzProvider, agent: ScriptedAgent, observed: Observed
) -> None:
    agent.post(URL, body="", headers={"szlahu_down": "true"})
    error = await issue_error(provider)
    assert error.code == ErrorCode.PROVIDER_UNAVAILABLE
    assert error.transient
    assert observed[-1][2] == "szlahu_down"


async def test_code_1_on_a_create_is_unavailable_and_unknown(
    provider: SzamlazzProvider, agent: ScriptedAgent
) -> None:
    agent.post(URL, body=answer(ok=False, code=1, message="Rendszerkarbantartás"))
    error = await issue_error(provider)
    assert error.code == ErrorCode.PROVIDER_UNAVAILABLE
    assert error.outcome_unknown


async def test_http_5xx_without_agent_headers_came_from_a_proxy(
    provider: SzamlazzProvider, agent: ScriptedAgent, observed: Observed
) -> None:
    agent.post(URL, status=502, body="<html>Bad Gateway</html>")
    error = await issue_error(provider)
    assert error.code == ErrorCode.PROVIDER_UNAVAILABLE
    assert error.outcome_unknown
    assert observed == [("szamlazz", "issue", "502")]

    agent.post(URL, status=503, body="")
    with pytest.raises(InvoicingError) as caught:
        await provider.find_invoice(conn(), "bookinda:x")
    assert caught.value.code == ErrorCode.PROVIDER_UNAVAILABLE
    assert not caught.value.outcome_unknown  # a lookup changes nothing


async def test_http_429_is_rate_limited_with_retry_after(
    provider: SzamlazzProvider, agent: ScriptedAgent
) -> None:
    agent.post(URL, status=429, body="", headers={"Retry-After": "30"})
    error = await issue_error(provider)
    assert error.code == ErrorCode.RATE_LIMITED
    assert error.retry_after == 30


async def test_unknown_code_on_a_create_is_outcome_unknown(
    provider: SzamlazzProvider, agent: ScriptedAgent
) -> None:
    agent.post(URL, body=answer(ok=False, code=999, message="valami"))
    error = await issue_error(provider)
    assert error.code == ErrorCode.PROVIDER_REJECTED
    assert error.outcome_unknown


async def test_unreadable_200_on_a_create_is_outcome_unknown(
    provider: SzamlazzProvider, agent: ScriptedAgent
) -> None:
    agent.post(URL, body="<html>maintenance</html>")
    error = await issue_error(provider)
    assert error.code == ErrorCode.PROVIDER_UNAVAILABLE
    assert error.outcome_unknown


async def test_timeout_on_a_create_is_outcome_unknown(
    provider: SzamlazzProvider, agent: ScriptedAgent, observed: Observed
) -> None:
    agent.post(URL, body=answer(), hang=True)
    error = await issue_error(provider)
    assert error.code == ErrorCode.TIMEOUT
    assert error.outcome_unknown
    assert observed == [("szamlazz", "issue", "timeout")]


async def test_connection_refused_is_a_network_error_and_nothing_was_sent(
    observed: Observed,
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    provider = SzamlazzProvider(
        f"http://127.0.0.1:{port}/szamla/",
        observer=lambda *args: observed.append(args[:3]),
    )
    try:
        error = await issue_error(provider)
    finally:
        await provider.close()
    assert error.code == ErrorCode.NETWORK_ERROR
    assert not error.outcome_unknown
    assert observed == [("szamlazz", "issue", "network_error")]


async def test_code_7_on_lookups_is_not_found(
    provider: SzamlazzProvider, agent: ScriptedAgent, observed: Observed
) -> None:
    not_found = answer(ok=False, code=7, message="Hiányzó adat: számla xml")
    agent.post(URL, body=not_found)
    assert await provider.find_invoice(conn(), "bookinda:x") is None
    agent.post(URL, body=not_found)
    invoice = IssuedInvoice("BELLA-2026-001", "BELLA-2026-001", Decimal(1270), "HUF")
    assert await provider.find_cancellation(conn(), invoice, storno()) is None
    agent.post(URL, body=not_found)
    await provider.check_connection(conn())
    assert [status for *_, status in observed] == ["7", "7", "7"]
    assert [op for _, op, _ in observed] == ["query", "query", "check_connection"]


async def test_check_connection_refuses_a_bad_key(
    provider: SzamlazzProvider, agent: ScriptedAgent
) -> None:
    agent.post(URL, body=answer(ok=False, code=3, message="Bejelentkezési hiba"))
    with pytest.raises(InvoicingError) as caught:
        await provider.check_connection(conn())
    assert caught.value.code == ErrorCode.AUTH_FAILED


async def test_reverse_must_be_a_new_negative_document(
    provider: SzamlazzProvider, agent: ScriptedAgent
) -> None:
    invoice = IssuedInvoice("BELLA-2026-001", "BELLA-2026-001", Decimal(49980), "HUF")
    agent.post(URL, body=answer(number="BELLA-2026-002", gross="-49980"))
    reverse = await provider.cancel(conn(), invoice, storno())
    assert (reverse.kind, reverse.invoice_number, reverse.document_id) == (
        "reverse",
        "BELLA-2026-002",
        "BELLA-2026-002",
    )

    # A pro-forma "reversed": success-shaped, but the original number and positive totals.
    agent.post(URL, body=answer(number="BELLA-2026-001", gross="49980"))
    with pytest.raises(InvoicingError) as caught:
        await provider.cancel(conn(), invoice, storno())
    assert caught.value.code == ErrorCode.PROVIDER_REJECTED


async def test_the_agent_key_never_appears_in_an_error(
    provider: SzamlazzProvider, agent: ScriptedAgent
) -> None:
    echoed = f"Hibás kulcs: {KEY.upper()} (szamlaagentkulcs={KEY})"
    agent.post(URL, body=answer(ok=False, code=3, message=echoed), headers=error_headers(3, echoed))
    error = await issue_error(provider)
    assert KEY.lower() not in str(error).lower()
    assert KEY.lower() not in error.message.lower()
    assert "[agent key]" in error.message

    agent.post(URL, body=answer(ok=False, code=999, message=echoed))
    with pytest.raises(InvoicingError) as caught:
        await provider.find_invoice(conn(), "bookinda:x")
    assert KEY.lower() not in str(caught.value).lower()


def test_classification_table() -> None:
    def code(number: int, writes: bool = True) -> tuple[ErrorCode, bool]:
        error = agent_error(
            AgentAnswer(ok=False, error_code=number, error_message="x"), writes=writes
        )
        return error.code, error.outcome_unknown

    assert code(3) == (ErrorCode.AUTH_FAILED, False)
    assert code(54) == (ErrorCode.SUBSCRIPTION_REQUIRED, False)
    assert code(57) == (ErrorCode.INVALID_INVOICE_DATA, False)
    assert code(259) == (ErrorCode.INVALID_INVOICE_DATA, False)
    assert code(14) == (ErrorCode.PROVIDER_REJECTED, False)
    assert code(352) == (ErrorCode.PROVIDER_REJECTED, False)
    assert code(152) == (ErrorCode.PROVIDER_REJECTED, True)
    assert code(55) == (ErrorCode.PROVIDER_UNAVAILABLE, True)
    assert code(55, writes=False) == (ErrorCode.PROVIDER_UNAVAILABLE, False)
    assert code(12345) == (ErrorCode.PROVIDER_REJECTED, True)
