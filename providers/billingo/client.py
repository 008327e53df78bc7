"""Billingo API v3 client: the :class:`~providers.base.Provider` for tenants on Billingo.

Every request has a timeout and is reported to the observer once. Nothing is retried here
except the one documented case (a stale partner id answered with 403); a create or cancel
whose answer was lost is reported with ``outcome_unknown`` so the caller looks it up first.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import aiohttp
import orjson

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
from providers.billingo import mapping
from providers.errors import ErrorCode, InvoicingError
from providers.ratelimit import KeyRateLimiter, key_id
from providers.values import ProviderName

K = TypeVar("K")
V = TypeVar("V")
T = TypeVar("T")

_BLOCK_PAGE_SIZE = 100
_MAX_BLOCK_PAGES = 50


class _Lru(Generic[K, V]):
    """A bounded mapping that forgets the least recently used entry first."""

    def __init__(self, maxsize: int) -> None:
        self._maxsize = maxsize
        self._data: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        if key not in self._data:
            return None
        self._data.move_to_end(key)
        return self._data[key]

    def put(self, key: K, value: V) -> None:
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self._maxsize:
            self._data.popitem(last=False)

    def drop(self, key: K) -> None:
        self._data.pop(key, None)


@dataclass(frozen=True, slots=True)
class _Reply:
    status: int
    #: The body with the API key blanked out, so no error message can carry it.
    text: str
    retry_after: str | None


def _redact(text: str, secret: str) -> str:
    return text.replace(secret, "***") if secret else text


def _block_id(conn: TenantConnection) -> int:
    if conn.block_id is None:
        raise InvoicingError(
            ErrorCode.DOCUMENT_BLOCK_NOT_FOUND,
            f"tenant {conn.tenant_id} has no Billingo block_id in the connections file",
        )
    return conn.block_id


def _as_dict(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ValueError("expected a JSON object")
    return body


def _json_text(body: Any) -> str:
    # orjson: about 5x json.dumps on a document body; same JSON (no NaN, UTF-8 text).
    return orjson.dumps(body).decode()


class BillingoProvider:
    """Issues, finds and cancels Billingo invoices for any number of tenants (one session)."""

    name: ProviderName = "billingo"
    caps_resends = False

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 15.0,
        observer: RequestObserver = no_observer,
        partner_cache_size: int = 50_000,
        requests_per_minute: float = 300,
    ) -> None:
        self._base_url = base_url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._observer = observer
        self._session: aiohttp.ClientSession | None = None
        self._partners: _Lru[str, int] = _Lru(partner_cache_size)
        self._partners_pending: dict[str, asyncio.Future[int]] = {}
        self._rates: _Lru[tuple[str, date], Decimal] = _Lru(1_000)
        # Billingo's limit is 300 requests a minute per key; pacing avoids 429s altogether.
        self._limiter = KeyRateLimiter(requests_per_minute)

    def defer_seconds(self, conn: TenantConnection, max_wait: float, *, due: bool = False) -> float:
        return self._limiter.defer(key_id(conn.secret.get_secret_value()), max_wait, due=due)

    # ---- Provider -----------------------------------------------------------------------

    async def issue(
        self, conn: TenantConnection, draft: InvoiceDraft, before_send: BeforeSend = no_hook
    ) -> IssuedInvoice:
        block_id = _block_id(conn)
        # Data errors are found here, so a bad sale costs no API call.
        mapping.validate_draft(draft)
        rate = await self._conversion_rate(conn, draft)
        partner = mapping.partner_body(draft.customer)
        key = self._partner_key(conn, partner)
        cached = self._partners.get(key) is not None
        partner_id = await self._partner_id(conn, key, partner)
        body = mapping.document_body(
            draft,
            block_id=block_id,
            partner_id=partner_id,
            conversion_rate=rate,
            electronic=conn.e_invoice,
        )
        await before_send()
        reply = await self._send(conn, "POST", "/documents", "create_document", json=body)
        if reply.status == 403 and cached:
            # A partner id cached under another key or account is refused with 403
            # (billingo-api.md §2.1): make the partner afresh once and retry the document.
            self._partners.drop(key)
            body["partner_id"] = await self._partner_id(conn, key, partner)
            await before_send()
            reply = await self._send(conn, "POST", "/documents", "create_document", json=body)
        return self._result(reply, "create_document", mapping.issued_invoice)

    async def find_invoice(self, conn: TenantConnection, external_key: str) -> IssuedInvoice | None:
        path = f"/documents/vendor/{quote(external_key, safe='')}"
        reply = await self._send(conn, "GET", path, "find_document")
        if reply.status == 404:
            return None
        doc = self._result(reply, "find_document", _as_dict)
        if doc.get("type") == "cancellation":
            # Should the storno carry the vendor_id too, the invoice is the one it cancels.
            return await self._cancelled_original(conn, doc)
        if doc.get("type") != "invoice":
            raise InvoicingError(
                ErrorCode.PROVIDER_REJECTED,
                f"Billingo document {doc.get('id')} with vendor_id {external_key} is a "
                f"{doc.get('type')!r}, not an invoice",
            )
        return self._build(doc, "find_document", mapping.issued_invoice)

    async def cancel(
        self, conn: TenantConnection, invoice: IssuedInvoice, request: CancelRequest
    ) -> Cancellation:
        # Never retried: a second cancel makes a second storno at Billingo.
        body = {"cancellation_reason": request.reason} if request.reason else None
        path = f"/documents/{quote(invoice.document_id, safe='')}/cancel"
        reply = await self._send(conn, "POST", path, "cancel_document", json=body)
        return self._result(reply, "cancel_document", mapping.cancellation)

    async def find_cancellation(
        self, conn: TenantConnection, invoice: IssuedInvoice, request: CancelRequest
    ) -> Cancellation | None:
        doc = await self._get_document(conn, invoice.document_id)
        if not doc.get("cancelled"):
            return None
        for related_id in mapping.related_ids(doc):
            related = await self._get_document(conn, str(related_id))
            if related.get("type") == "cancellation":
                return self._build(related, "get_document", mapping.cancellation)
        # Answering None here would invite a second storno of a cancelled invoice.
        raise InvoicingError(
            ErrorCode.PROVIDER_REJECTED,
            f"Billingo document {invoice.document_id} is cancelled but no cancellation "
            "document is linked to it; check it in Billingo",
        )

    async def check_connection(self, conn: TenantConnection) -> None:
        block_id = _block_id(conn)
        reply = await self._send(conn, "GET", "/organization", "check_connection")
        self._result(reply, "check_connection", _as_dict)
        if block_id not in await self._invoice_block_ids(conn):
            raise InvoicingError(
                ErrorCode.DOCUMENT_BLOCK_NOT_FOUND,
                f"Billingo has no invoice block {block_id} for tenant {conn.tenant_id}",
            )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ---- steps --------------------------------------------------------------------------

    async def _conversion_rate(self, conn: TenantConnection, draft: InvoiceDraft) -> Decimal:
        code = mapping.currency(draft.currency)
        if code == "HUF":
            return Decimal(1)
        key = (code, draft.fulfillment_date)
        cached = self._rates.get(key)
        if cached is not None:
            return cached
        params = {"from": code, "to": "HUF", "date": draft.fulfillment_date.isoformat()}
        reply = await self._send(conn, "GET", "/currencies", "get_currency", params=params)
        rate = self._result(reply, "get_currency", mapping.conversion_rate)
        self._rates.put(key, rate)
        return rate

    @staticmethod
    def _partner_key(conn: TenantConnection, partner: Mapping[str, Any]) -> str:
        # Keyed by the API key too: partner ids belong to one Billingo account.
        raw = conn.secret.get_secret_value().encode() + b"\0" + mapping.canonical(partner)
        return hashlib.sha256(raw).hexdigest()

    async def _partner_id(self, conn: TenantConnection, key: str, partner: dict[str, Any]) -> int:
        cached = self._partners.get(key)
        if cached is not None:
            return cached
        # Concurrent sales of one new customer share a single POST /partners (no duplicates).
        pending = self._partners_pending.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._create_partner(conn, partner))
            self._partners_pending[key] = pending
            pending.add_done_callback(lambda _: self._partners_pending.pop(key, None))
        partner_id = await asyncio.shield(pending)
        self._partners.put(key, partner_id)
        return partner_id

    async def _create_partner(self, conn: TenantConnection, partner: dict[str, Any]) -> int:
        reply = await self._send(conn, "POST", "/partners", "create_partner", json=partner)
        return self._result(reply, "create_partner", lambda body: int(body["id"]))

    async def _get_document(self, conn: TenantConnection, document_id: str) -> dict[str, Any]:
        path = f"/documents/{quote(document_id, safe='')}"
        reply = await self._send(conn, "GET", path, "get_document")
        return self._result(reply, "get_document", _as_dict)

    async def _cancelled_original(
        self, conn: TenantConnection, storno: Mapping[str, Any]
    ) -> IssuedInvoice:
        for related_id in mapping.related_ids(storno):
            doc = await self._get_document(conn, str(related_id))
            if doc.get("type") == "invoice":
                return self._build(doc, "get_document", mapping.issued_invoice)
        raise InvoicingError(
            ErrorCode.PROVIDER_REJECTED,
            f"Billingo cancellation {storno.get('id')} names no invoice it cancels",
        )

    async def _invoice_block_ids(self, conn: TenantConnection) -> set[int]:
        ids: set[int] = set()
        for page in range(1, _MAX_BLOCK_PAGES + 1):
            params = {"type": "invoice", "page": str(page), "per_page": str(_BLOCK_PAGE_SIZE)}
            reply = await self._send(
                conn, "GET", "/document-blocks", "check_connection", params=params
            )
            body = self._result(reply, "check_connection", _as_dict)
            ids.update(int(b["id"]) for b in body.get("data") or [] if isinstance(b, dict))
            if page >= int(body.get("last_page") or 1):
                break
        return ids

    # ---- HTTP ---------------------------------------------------------------------------

    def _session_now(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # No pool cap: concurrency is already bounded by the worker's prefetch, and
            # aiohttp's default of 100 connections would cap 200 ms calls at 500 sales/s.
            self._session = aiohttp.ClientSession(
                headers={"Accept": "application/json"},
                raise_for_status=False,
                connector=aiohttp.TCPConnector(limit=0),
                json_serialize=_json_text,
            )
        return self._session

    async def _send(
        self,
        conn: TenantConnection,
        method: str,
        path: str,
        operation: str,
        *,
        json: Any = None,
        params: Mapping[str, str] | None = None,
    ) -> _Reply:
        secret = conn.secret.get_secret_value()
        await self._limiter.acquire(key_id(secret))
        started = time.perf_counter()
        # Transport errors and answers set their own status; anything else that escapes (a
        # body the JSON encoder refuses, a bug) is ours, not the network's.
        status = "internal_error"
        try:
            async with self._session_now().request(
                method,
                self._base_url + path,
                json=json,
                params=params,
                headers={"X-API-KEY": secret},
                timeout=self._timeout,
            ) as response:
                text = await response.text(errors="replace")
                status = str(response.status)
                retry_after = response.headers.get("Retry-After")
                return _Reply(response.status, _redact(text, secret), retry_after)
        except (TimeoutError, aiohttp.ClientError) as exc:
            error = self._transport_error(exc, operation, secret)
            status = error.code.value
            raise error from None
        finally:
            self._observer(self.name, operation, status, time.perf_counter() - started)

    def _transport_error(self, exc: BaseException, operation: str, secret: str) -> InvoicingError:
        # Only a failed connect proves the request never reached Billingo.
        never_sent = isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError)
        unknown = operation in mapping.MUTATING_OPERATIONS and not never_sent
        if isinstance(exc, TimeoutError):
            seconds = self._timeout.total
            return InvoicingError(
                ErrorCode.TIMEOUT,
                f"Billingo {operation} got no answer within {seconds}s",
                outcome_unknown=unknown,
            )
        detail = _redact(str(exc), secret) or type(exc).__name__
        return InvoicingError(
            ErrorCode.NETWORK_ERROR,
            f"Billingo {operation} failed: {type(exc).__name__}: {detail}",
            outcome_unknown=unknown,
        )

    def _result(self, reply: _Reply, operation: str, build: Callable[[Any], T]) -> T:
        """The built value of a 2xx answer, or the mapped error of any other."""
        if not 200 <= reply.status < 300:
            raise mapping.error_from_response(
                reply.status, reply.text, operation=operation, retry_after=reply.retry_after
            )
        try:
            body = mapping.parse_json(reply.text)
        except ValueError:
            raise self._unreadable(operation, reply.status) from None
        return self._build(body, operation, build, reply.status)

    def _build(self, body: Any, operation: str, build: Callable[[Any], T], status: int = 200) -> T:
        try:
            return build(body)
        except (KeyError, TypeError, ValueError, ArithmeticError):
            raise self._unreadable(operation, status) from None

    @staticmethod
    def _unreadable(operation: str, status: int) -> InvoicingError:
        # A 2xx we cannot read may still mean the document exists.
        return InvoicingError(
            ErrorCode.PROVIDER_UNAVAILABLE,
            f"Billingo {operation} answered {status} with a body that is not the expected JSON",
            outcome_unknown=operation in mapping.MUTATING_OPERATIONS,
        )
