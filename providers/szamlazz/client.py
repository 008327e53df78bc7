"""The Számlázz.hu provider: the Számla Agent over multipart HTTP.

One POST per operation; the name of the XML file part selects the action. The Agent answers
HTTP 200 for its own errors, so every answer is read from the ``szlahu_*`` headers and the
body together. The provider never resends: the vendor allows at most five sends of one request
and the caller's ledger counts them, looking the invoice up by ``szamlaKulsoAzon`` first.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Callable, Mapping
from typing import TypeVar

import aiohttp

from providers.base import (
    BeforeSend,
    Cancellation,
    CancelRequest,
    InvoiceDraft,
    IssuedInvoice,
    RequestObserver,
    TenantConnection,
    no_hook,
    no_observer,
)
from providers.errors import ErrorCode, InvoicingError
from providers.ratelimit import KeyRateLimiter, key_id
from providers.szamlazz.xml import (
    ACTION_INVOICE,
    ACTION_QUERY,
    ACTION_REVERSE,
    REVERSE_TYPE,
    AgentAnswer,
    InvoiceRecord,
    UnreadableAnswer,
    build_invoice,
    build_query,
    build_reverse,
    read_answer,
    read_query,
)
from providers.values import ProviderName

T = TypeVar("T", AgentAnswer, InvoiceRecord | AgentAnswer)

#: Key refused or account blocked: 3 login failed, 135 browser session of the same user,
#: 136 subscription expired / unpaid, 164 the user sees several accounts.
AUTH_CODES = frozenset({3, 135, 136, 164})
CODE_NOT_FOUND = 7
CODE_BAD_XML = 57
CODE_UNKNOWN_PREFIX = 202
LINE_CODES = frozenset(range(259, 265))
#: Refusals that name what is wrong with the request: nothing was created.
_REFUSALS: dict[int, str] = {
    7: "a required field is missing or the referenced invoice is unknown",
    14: "a reverse invoice cannot itself be reversed",
    53: "the XML was not sent as a file part",
    73: "the referenced prepayment invoice cannot be identified",
    221: "the invoice has a corrective invoice and cannot be reversed",
    352: "the issue date may only be today",
}
#: The Agent may have done the work: 1 internal error / maintenance, 55 e-invoice signing.
_MAYBE_DONE = frozenset({1, 55})
#: Duplicate order number (the account forbids repeating it): a document already exists.
_DUPLICATE_ORDER = frozenset({71, 152})

_CONNECTION_CHECK_PREFIX = "bookinda:connection-check:"


def agent_error(answer: AgentAnswer, *, writes: bool) -> InvoicingError:
    """The contract error for an Agent refusal. ``writes``: the call creates a document, so
    any answer that does not prove nothing was created leaves the outcome unknown."""
    code, text = answer.error_code, (answer.error_message or "").strip()
    if answer.down:
        return InvoicingError(
            ErrorCode.PROVIDER_UNAVAILABLE,
            "Számla Agent is temporarily unavailable (szlahu_down)",
            outcome_unknown=writes,
        )
    said = f"Számla Agent error {code}: {text}" if code is not None else f"Számla Agent: {text}"
    if code in AUTH_CODES:
        return InvoicingError(ErrorCode.AUTH_FAILED, said)
    if code == CODE_UNKNOWN_PREFIX:
        return InvoicingError(ErrorCode.DOCUMENT_BLOCK_NOT_FOUND, said)
    if code in LINE_CODES:
        return InvoicingError(ErrorCode.INVALID_INVOICE_DATA, said)
    if code == CODE_BAD_XML:
        return InvoicingError(
            ErrorCode.INVALID_INVOICE_DATA, f"Számla Agent refused the request XML (57): {text}"
        )
    if code == 54:
        return InvoicingError(
            ErrorCode.SUBSCRIPTION_REQUIRED,
            f"{said} (e-invoicing is not enabled on the account; set e_invoice = false or "
            "enable it in Számlázz.hu)",
        )
    if code in _MAYBE_DONE:
        return InvoicingError(ErrorCode.PROVIDER_UNAVAILABLE, said, outcome_unknown=writes)
    if code in _DUPLICATE_ORDER:
        return InvoicingError(
            ErrorCode.PROVIDER_REJECTED,
            f"{said} (a document with this order number already exists)",
            outcome_unknown=writes,
        )
    if code is not None and code in _REFUSALS:
        return InvoicingError(ErrorCode.PROVIDER_REJECTED, f"{said} ({_REFUSALS[code]})")
    # An unknown code, or a refusal without one: assume it may have been done.
    return InvoicingError(ErrorCode.PROVIDER_REJECTED, said, outcome_unknown=writes)


class SzamlazzProvider:
    """:class:`providers.base.Provider` for Számlázz.hu (Számla Agent, answer format 2)."""

    name: ProviderName = "szamlazz"
    caps_resends = True

    def __init__(
        self,
        agent_url: str,
        *,
        timeout: float = 30.0,
        observer: RequestObserver = no_observer,
        requests_per_minute: float = 0,
    ) -> None:
        self._url = agent_url
        # The Agent documents no per-key limit; pacing is there for operators who need one.
        self._limiter = KeyRateLimiter(requests_per_minute)
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._observer = observer
        # One session (one cookie jar) per agent key: the Agent wants its JSESSIONID back,
        # and a cookie authenticates as its account, so accounts never share a jar.
        self._sessions: dict[str, aiohttp.ClientSession] = {}

    def defer_seconds(self, conn: TenantConnection, max_wait: float, *, due: bool = False) -> float:
        return self._limiter.defer(key_id(conn.secret.get_secret_value()), max_wait, due=due)

    async def issue(
        self, conn: TenantConnection, draft: InvoiceDraft, before_send: BeforeSend = no_hook
    ) -> IssuedInvoice:
        document = build_invoice(conn, draft)
        await before_send()
        answer = await self._call(conn, "issue", ACTION_INVOICE, document, read_answer, writes=True)
        if not answer.ok:
            raise self._error(conn, agent_error(answer, writes=True))
        number = _require_number(answer)
        return IssuedInvoice(
            document_id=number,
            invoice_number=number,
            gross_total=answer.gross_total if answer.gross_total is not None else draft.gross_total,
            currency=draft.currency,
        )

    async def find_invoice(self, conn: TenantConnection, external_key: str) -> IssuedInvoice | None:
        record = await self._query(conn, "query", external_key)
        if record is None:
            return None
        return IssuedInvoice(
            document_id=record.number,
            invoice_number=record.number,
            gross_total=record.gross_total,
            currency=record.currency,
            cancelled=record.cancelled,
        )

    async def cancel(
        self, conn: TenantConnection, invoice: IssuedInvoice, request: CancelRequest
    ) -> Cancellation:
        document = build_reverse(conn, invoice.invoice_number, request)
        answer = await self._call(
            conn, "reverse", ACTION_REVERSE, document, read_answer, writes=True
        )
        if not answer.ok:
            raise self._error(conn, agent_error(answer, writes=True))
        number = _require_number(answer)
        # "Reversing" a pro-forma or delivery note answers success with the original number
        # and positive totals while doing nothing: only a new, negative document is a reverse.
        if number == invoice.invoice_number or (
            answer.gross_total is not None and answer.gross_total >= 0
        ):
            raise InvoicingError(
                ErrorCode.PROVIDER_REJECTED,
                f"Számla Agent answered the reverse of {invoice.invoice_number} with document "
                f"{number} (gross {answer.gross_total}): not a reverse invoice; pro-formas and "
                "delivery notes cannot be reversed",
            )
        return Cancellation(kind="reverse", document_id=number, invoice_number=number)

    async def find_cancellation(
        self, conn: TenantConnection, invoice: IssuedInvoice, request: CancelRequest
    ) -> Cancellation | None:
        record = await self._query(conn, "query", request.external_key)
        if record is None:
            return None
        if record.kind != REVERSE_TYPE or (
            record.reverses is not None and record.reverses != invoice.invoice_number
        ):
            raise InvoicingError(
                ErrorCode.DOCUMENT_MISMATCH,
                f"document {record.number} (type {record.kind}, reverses {record.reverses}) "
                f"holds the cancellation key but is not the reverse of {invoice.invoice_number}",
            )
        return Cancellation(kind="reverse", document_id=record.number, invoice_number=record.number)

    async def check_connection(self, conn: TenantConnection) -> None:
        """Query an external id that cannot exist: "not found" (7) proves the key works.
        The Agent has no side-effect-free way to check the number prefix (only issuing a
        document reveals a 202), so the prefix is not verified here."""
        await self._query(conn, "check_connection", _CONNECTION_CHECK_PREFIX + uuid.uuid4().hex)

    async def close(self) -> None:
        sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            await session.close()

    # ---- transport ------------------------------------------------------------------------

    async def _query(
        self, conn: TenantConnection, operation: str, external_key: str
    ) -> InvoiceRecord | None:
        document = build_query(conn.secret.get_secret_value(), external_key=external_key)
        result = await self._call(conn, operation, ACTION_QUERY, document, read_query, writes=False)
        if isinstance(result, InvoiceRecord):
            return result
        if result.error_code == CODE_NOT_FOUND:
            return None
        raise self._error(conn, agent_error(result, writes=False))

    async def _call(
        self,
        conn: TenantConnection,
        operation: str,
        action: str,
        document: bytes,
        reader: Callable[[Mapping[str, str], bytes], T],
        *,
        writes: bool,
    ) -> T:
        """One POST; observed exactly once. Transport failures after the request may have
        reached the Agent leave a write's outcome unknown."""
        await self._limiter.acquire(key_id(conn.secret.get_secret_value()))
        started = time.perf_counter()
        # Every transport error and answer sets its own status; anything else that escapes is
        # ours, not the network's.
        status = "internal_error"
        form = aiohttp.FormData()
        form.add_field(action, document, filename="request.xml", content_type="text/xml")
        try:
            session = self._session(conn)
            try:
                async with session.post(self._url, data=form) as response:
                    body = await response.read()
                    headers: Mapping[str, str] = response.headers
                    http_status = response.status
            except aiohttp.ConnectionTimeoutError as exc:
                status = "timeout"
                raise InvoicingError(
                    ErrorCode.TIMEOUT, "connecting to the Számla Agent timed out"
                ) from exc
            except TimeoutError as exc:
                status = "timeout"
                raise InvoicingError(
                    ErrorCode.TIMEOUT,
                    f"the Számla Agent did not answer within {self._timeout.total} s",
                    outcome_unknown=writes,
                ) from exc
            except aiohttp.ClientConnectorError as exc:
                # Not connected, so nothing was sent.
                status = "network_error"
                raise InvoicingError(
                    ErrorCode.NETWORK_ERROR, f"cannot reach the Számla Agent: {exc.os_error}"
                ) from exc
            except aiohttp.ClientError as exc:
                status = "network_error"
                raise InvoicingError(
                    ErrorCode.NETWORK_ERROR,
                    f"connection to the Számla Agent failed: {type(exc).__name__}",
                    outcome_unknown=writes,
                ) from exc
            has_agent_headers = any(k.lower().startswith("szlahu_") for k in headers)
            if http_status >= 300 and not has_agent_headers:
                status = str(http_status)
                raise _http_error(http_status, headers, writes=writes)
            try:
                result = reader(headers, body)
            except UnreadableAnswer as exc:
                status = "unreadable"
                raise InvoicingError(
                    ErrorCode.PROVIDER_UNAVAILABLE,
                    f"unreadable Számla Agent answer (HTTP {http_status}): {exc}",
                    outcome_unknown=writes,
                ) from exc
            status = _status_of(result)
            return result
        finally:
            self._observer(self.name, operation, status, time.perf_counter() - started)

    def _session(self, conn: TenantConnection) -> aiohttp.ClientSession:
        key = hashlib.sha256(conn.secret.get_secret_value().encode()).hexdigest()
        session = self._sessions.get(key)
        if session is None or session.closed:
            # unsafe=True keeps cookies of IP-address hosts too (an Agent URL given as an IP).
            session = aiohttp.ClientSession(
                timeout=self._timeout,
                cookie_jar=aiohttp.CookieJar(unsafe=True),
                connector=aiohttp.TCPConnector(limit=0),  # prefetch bounds concurrency
            )
            self._sessions[key] = session
        return session

    @staticmethod
    def _error(conn: TenantConnection, error: InvoicingError) -> InvoicingError:
        """The same error with the agent key blanked out of its message, wherever it came
        from (the Agent may echo parts of the request back)."""
        secret = conn.secret.get_secret_value()
        if not secret or secret.lower() not in error.message.lower():
            return error
        message = _scrub(error.message, secret)
        return InvoicingError(
            error.code,
            message,
            retry_after=error.retry_after,
            outcome_unknown=error.outcome_unknown,
        )


def _scrub(text: str, secret: str) -> str:
    lowered, needle, out, start = text.lower(), secret.lower(), [], 0
    while (found := lowered.find(needle, start)) >= 0:
        out.append(text[start:found] + "[agent key]")
        start = found + len(needle)
    out.append(text[start:])
    return "".join(out)


def _require_number(answer: AgentAnswer) -> str:
    if not answer.invoice_number:
        raise InvoicingError(
            ErrorCode.PROVIDER_UNAVAILABLE,
            "Számla Agent reported success without a document number",
            outcome_unknown=True,
        )
    return answer.invoice_number


def _status_of(result: AgentAnswer | InvoiceRecord) -> str:
    if isinstance(result, InvoiceRecord) or result.ok:
        return "ok"
    if result.down:
        return "szlahu_down"
    return str(result.error_code) if result.error_code is not None else "error"


def _http_error(status: int, headers: Mapping[str, str], *, writes: bool) -> InvoicingError:
    """A non-2xx answer without ``szlahu_*`` headers came from a proxy, not the Agent."""
    if status == 429:
        return InvoicingError(
            ErrorCode.RATE_LIMITED,
            "HTTP 429 in front of the Számla Agent",
            retry_after=_retry_after(headers.get("Retry-After")),
            outcome_unknown=writes,
        )
    if status >= 500:
        return InvoicingError(
            ErrorCode.PROVIDER_UNAVAILABLE,
            f"HTTP {status} in front of the Számla Agent",
            outcome_unknown=writes,
        )
    return InvoicingError(
        ErrorCode.PROVIDER_REJECTED,
        f"HTTP {status} in front of the Számla Agent",
        outcome_unknown=writes,
    )


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None
