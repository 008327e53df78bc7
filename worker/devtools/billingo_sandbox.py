"""A local Billingo API v3 that speaks the wire protocol of billingo-api.md, for tests and demos.

Served under ``/v3`` (base_url ``http://HOST:PORT/v3``); control routes live under
``/_sandbox``. Where Billingo's behaviour is unconfirmed the sandbox picks the worst case
(duplicate vendor_ids are accepted, a second cancel makes a second storno), so the worker's
own guarantees are what the tests exercise.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal, InvalidOperation
from typing import Any, cast

from aiohttp import web
from aiohttp.typedefs import Middleware

from providers.billingo.mapping import (
    CURRENCIES,
    ENTITLEMENTS,
    LANGUAGES,
    VAT_VALUES,
    enum_of,
    json_number,
)
from providers.money import round_money
from worker.devtools.faults import (
    CONTROL_PREFIX,
    FaultPlan,
    Handler,
    add_control_routes,
    fault_middleware,
)

JsonDict = dict[str, Any]
API_PREFIX = "/v3"

PAYMENT_METHODS = enum_of(
    "aruhitel bankcard barion barter cash cash_on_delivery coupon elore_utalas ep_kartya "
    "kompenzacio levonas online_bankcard other paylike payoneer paypal paypal_utolag payu "
    "pick_pack_pont postai_csekk postautalvany skrill szep_card transferwise upwork utalvany "
    "valto wire_transfer"
)
INSERT_TYPES = frozenset({"advance", "draft", "invoice", "proforma"})
TAX_TYPES = frozenset({"", "FOREIGN", "HAS_TAX_NUMBER", "NO_TAX_NUMBER"})
REQUIRED_DOCUMENT_FIELDS = (
    "partner_id",
    "block_id",
    "type",
    "fulfillment_date",
    "due_date",
    "payment_method",
    "language",
    "currency",
)
REQUIRED_ITEM_FIELDS = ("name", "unit_price", "unit_price_type", "quantity", "unit", "vat")
#: Forints per unit; a cross rate is the quotient of two of these.
HUF_RATES: dict[str, Decimal] = {
    "HUF": Decimal(1),
    "EUR": Decimal("400.5"),
    "USD": Decimal("365.25"),
    "GBP": Decimal("470.1"),
    "CHF": Decimal("415.8"),
    "CZK": Decimal("15.95"),
    "PLN": Decimal("93.4"),
    "RON": Decimal("80.45"),
}
ORGANIZATION: JsonDict = {
    "name": "Sandbox Szálló Kft.",
    "tax_number": "12345676-2-41",
    "address": {
        "country_code": "HU",
        "post_code": "1051",
        "city": "Budapest",
        "address": "Nádor utca 7.",
    },
    "small_taxpayer": False,
    "cash_settled": False,
}


def _client_error(status: int, message: str, **headers: str) -> web.Response:
    return web.json_response({"error": {"message": message}}, status=status, headers=headers)


def _validation_failed(errors: list[tuple[str, str]]) -> web.Response:
    body = {
        "message": "Validation Failed",
        "errors": [{"field": f, "message": m} for f, m in errors],
    }
    return web.json_response(body, status=422)


def _not_found() -> web.Response:
    return _client_error(404, "Non-existent resource is requested.")


def _decimal(value: Any) -> Decimal | None:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        number = Decimal(str(value))
    except InvalidOperation:
        return None
    return number if number.is_finite() else None


def _is_date(value: Any) -> bool:
    try:
        date.fromisoformat(str(value))
    except ValueError:
        return False
    return True


def _vat_rate(label: str) -> Decimal:
    return Decimal(label[:-1].replace(",", ".")) if label.endswith("%") else Decimal(0)


def _priced_item(item: JsonDict, currency: str) -> JsonDict:
    """A DocumentItem computed the way Billingo does: gross- or net-priced, per line."""
    unit, quantity = Decimal(str(item["unit_price"])), Decimal(str(item["quantity"]))
    rate = _vat_rate(item["vat"])
    if item["unit_price_type"] == "gross":
        gross = round_money(unit * quantity, currency)
        net = round_money(gross * 100 / (100 + rate), currency)
        net_unit = unit * 100 / (100 + rate)
    else:
        net = round_money(unit * quantity, currency)
        gross = net + round_money(net * rate / 100, currency)
        net_unit = unit
    return {
        "product_id": None,
        "name": item["name"],
        "net_unit_amount": json_number(net_unit.quantize(Decimal("0.0001"))),
        "quantity": json_number(quantity),
        "unit": item["unit"],
        "net_amount": json_number(net),
        "gross_amount": json_number(gross),
        "vat": item["vat"],
        "vat_amount": json_number(gross - net),
        "entitlement": item.get("entitlement"),
        "comment": item.get("comment", ""),
    }


def _summary(items: list[JsonDict], rate: Decimal) -> JsonDict:
    def total(key: str) -> Decimal:
        return sum((Decimal(str(i[key])) for i in items), start=Decimal(0))

    net, vat, gross = total("net_amount"), total("vat_amount"), total("gross_amount")
    return {
        "net_amount": json_number(net),
        "net_amount_local": json_number(round_money(net * rate, "HUF")),
        "gross_amount_local": json_number(round_money(gross * rate, "HUF")),
        "vat_amount": json_number(vat),
        "vat_amount_local": json_number(round_money(vat * rate, "HUF")),
        "vat_rate_summary": [],
    }


def _negated(items: list[JsonDict]) -> list[JsonDict]:
    keys = ("quantity", "net_amount", "gross_amount", "vat_amount")
    return [{**i, **{k: -i[k] for k in keys}} for i in items]


def _item_errors(index: int, item: Any) -> list[tuple[str, str]]:
    where = f"items.{index}"
    if not isinstance(item, dict):
        return [(where, "The item must be an object.")]
    errors = [
        (f"{where}.{name}", f"The {where}.{name} field is required.")
        for name in REQUIRED_ITEM_FIELDS
        if item.get(name) in (None, "")
    ]
    if errors:
        return errors
    if item["vat"] not in VAT_VALUES:
        errors.append((f"{where}.vat", "The selected vat is invalid."))
    if item["unit_price_type"] not in ("gross", "net"):
        errors.append((f"{where}.unit_price_type", "The selected unit price type is invalid."))
    if _decimal(item["unit_price"]) is None:
        errors.append((f"{where}.unit_price", "The unit price must be a number."))
    quantity = _decimal(item["quantity"])
    if quantity is None or quantity == 0:
        errors.append((f"{where}.quantity", "The quantity must be a non-zero number."))
    if item.get("entitlement") not in (None, "", *ENTITLEMENTS):
        errors.append((f"{where}.entitlement", "The selected entitlement is invalid."))
    return errors


def _enum_errors(body: JsonDict) -> list[tuple[str, str]]:
    checks = (
        ("type", INSERT_TYPES),
        ("payment_method", PAYMENT_METHODS),
        ("language", LANGUAGES),
        ("currency", CURRENCIES),
    )
    return [(f, f"The selected {f} is invalid.") for f, allowed in checks if body[f] not in allowed]


def _document_errors(body: JsonDict, blocks: Iterable[int]) -> list[tuple[str, str]]:
    errors = [
        (f, f"The {f} field is required.")
        for f in REQUIRED_DOCUMENT_FIELDS
        if body.get(f) in (None, "")
    ]
    if errors:
        return errors
    errors += _enum_errors(body)
    errors += [
        (f, f"The {f} is not a valid date.")
        for f in ("fulfillment_date", "due_date")
        if not _is_date(body[f])
    ]
    if body["block_id"] not in set(blocks):
        errors.append(("block_id", "The selected block id is invalid."))
    if body["currency"] != "HUF" and _decimal(body.get("conversion_rate")) is None:
        errors.append(("conversion_rate", "The conversion rate field is required."))
    items = body.get("items") or []
    if not isinstance(items, list):
        return [*errors, ("items", "The items must be an array.")]
    for index, item in enumerate(items):
        errors += _item_errors(index, item)
    return errors


def _partner_errors(body: JsonDict) -> list[tuple[str, str]]:
    errors: list[tuple[str, str]] = []
    if not body.get("name"):
        errors.append(("name", "The name field is required."))
    address = body.get("address")
    address = address if isinstance(address, dict) else {}
    for name in ("country_code", "post_code", "city", "address"):
        if not address.get(name):
            errors.append((f"address.{name}", f"The address.{name} field is required."))
    if body.get("tax_type", "") not in TAX_TYPES:
        errors.append(("tax_type", "The selected tax type is invalid."))
    return errors


@dataclass
class _Account:
    api_key: str
    block_ids: list[int]
    subscription: bool
    revoked: bool = False


ACCOUNT = web.RequestKey("billingo_account", _Account)


@dataclass
class _Window:
    minute: int
    used: int = 0


@dataclass
class _Stored:
    api_key: str
    vendor_id: str | None
    doc: JsonDict


@dataclass
class _State:
    partners: dict[int, tuple[str, JsonDict]] = field(default_factory=dict)
    documents: dict[int, _Stored] = field(default_factory=dict)
    numbers: dict[tuple[str, int, int], int] = field(default_factory=dict)
    windows: dict[str, _Window] = field(default_factory=dict)
    next_id: int = 1000


class BillingoSandbox:
    """Billingo v3 in one process: accounts, partners, documents, storno, rate limit, faults."""

    def __init__(self, *, rate_limit_per_minute: int = 300, seed: int | None = None) -> None:
        self.plan = FaultPlan(seed=seed)
        self.rate_limit_per_minute = rate_limit_per_minute
        #: Seconds since the epoch; tests may replace it to move the rate-limit window.
        self.clock: Callable[[], float] = time.time
        self._accounts: dict[str, _Account] = {}
        self._state = _State()
        self._runner: web.AppRunner | None = None
        self.app = self._build_app()

    # ---- in-process control -------------------------------------------------------------

    def add_account(
        self, api_key: str, *, block_ids: Iterable[int] = (111,), subscription: bool = True
    ) -> None:
        self._accounts[api_key] = _Account(api_key, list(block_ids), subscription)

    def revoke(self, api_key: str) -> None:
        self._accounts[api_key].revoked = True

    def documents(self, api_key: str | None = None) -> list[JsonDict]:
        """Every stored document (cancellations too), each with the ``vendor_id`` it was
        created with, which Billingo's own Document JSON does not show."""
        return [
            {**copy.deepcopy(s.doc), "vendor_id": s.vendor_id}
            for s in self._state.documents.values()
            if api_key is None or s.api_key == api_key
        ]

    def partners(self, api_key: str) -> list[JsonDict]:
        return [copy.deepcopy(p) for key, p in self._state.partners.values() if key == api_key]

    def reset(self) -> None:
        """Forget documents, partners, faults and the request log; accounts stay."""
        self._state = _State()
        self.plan.clear()
        self.plan.requests.clear()

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        # A short shutdown timeout: a commit_then_hang handler must not hold up stop().
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=0.25)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
        bound_host, bound_port = self._runner.addresses[0][:2]
        return f"http://{bound_host}:{bound_port}{API_PREFIX}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ---- app ----------------------------------------------------------------------------

    def _build_app(self) -> web.Application:
        # sandbox_faults types its middleware as a plain callable; aiohttp wants its protocol.
        faults = cast(Middleware, fault_middleware(self.plan, _operation_of))
        app = web.Application(middlewares=[faults, self._gate])
        add = app.router
        add.add_post(f"{API_PREFIX}/partners", self._create_partner)
        add.add_get(f"{API_PREFIX}/partners/{{id}}", self._get_partner)
        add.add_post(f"{API_PREFIX}/documents", self._create_document)
        add.add_get(f"{API_PREFIX}/documents/vendor/{{vendor_id}}", self._get_by_vendor)
        add.add_get(f"{API_PREFIX}/documents/{{id}}", self._get_document)
        add.add_post(f"{API_PREFIX}/documents/{{id}}/cancel", self._cancel_document)
        add.add_get(f"{API_PREFIX}/currencies", self._currencies)
        add.add_get(f"{API_PREFIX}/organization", self._organization)
        add.add_get(f"{API_PREFIX}/document-blocks", self._document_blocks)
        add_control_routes(app, self.plan)
        self._add_sandbox_routes(app)
        return app

    def _add_sandbox_routes(self, app: web.Application) -> None:
        add = app.router
        add.add_post(f"{CONTROL_PREFIX}/accounts", self._ctl_add_account)
        add.add_delete(f"{CONTROL_PREFIX}/accounts/{{api_key}}", self._ctl_revoke)
        add.add_get(f"{CONTROL_PREFIX}/documents", self._ctl_documents)
        add.add_post(f"{CONTROL_PREFIX}/reset", self._ctl_reset)
        add.add_put(f"{CONTROL_PREFIX}/rate-limit", self._ctl_rate_limit)

    @web.middleware
    async def _gate(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Authentication, subscription and the per-key rate limit, as Billingo applies them."""
        if not request.path.startswith(API_PREFIX):
            return await handler(request)
        account = self._accounts.get(request.headers.get("X-API-KEY", ""))
        if account is None or account.revoked:
            return _client_error(
                401, "Authorization information (Header: X-API-KEY) is missing or invalid."
            )
        if not account.subscription:
            return _client_error(402, "You do not have subscription for this operation")
        limit_headers, allowed = self._count_request(account.api_key)
        if not allowed:
            return _client_error(429, "Too many requests", **limit_headers)
        request[ACCOUNT] = account
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            response = _client_error(exc.status, exc.reason)
        response.headers.update(limit_headers)
        return response

    def _count_request(self, api_key: str) -> tuple[dict[str, str], bool]:
        limit = self.rate_limit_per_minute
        if limit <= 0:
            return {}, True
        now = self.clock()
        minute = int(now // 60)
        window = self._state.windows.get(api_key)
        if window is None or window.minute != minute:
            window = self._state.windows[api_key] = _Window(minute)
        window.used += 1
        reset = (minute + 1) * 60
        headers = {
            "X-RateLimit-Limit": str(limit),
            "X-RateLimit-Remaining": str(max(limit - window.used, 0)),
            "X-RateLimit-Reset": str(reset),
        }
        if window.used <= limit:
            return headers, True
        headers["Retry-After"] = str(max(math.ceil(reset - now), 1))
        return headers, False

    # ---- helpers ------------------------------------------------------------------------

    def _new_id(self) -> int:
        self._state.next_id += 1
        return self._state.next_id

    def _owned(self, request: web.Request) -> _Stored | None:
        account = request[ACCOUNT]
        try:
            stored = self._state.documents.get(int(request.match_info["id"]))
        except ValueError:
            return None
        return stored if stored is not None and stored.api_key == account.api_key else None

    def _invoice_number(self, api_key: str, block_id: int, issued: date) -> str:
        key = (api_key, block_id, issued.year)
        self._state.numbers[key] = self._state.numbers.get(key, 0) + 1
        return f"B{block_id}-{issued.year}-{self._state.numbers[key]:06d}"

    def _store(self, api_key: str, vendor_id: str | None, doc: JsonDict) -> JsonDict:
        self._state.documents[doc["id"]] = _Stored(api_key, vendor_id, doc)
        return doc

    # ---- partners -----------------------------------------------------------------------

    async def _create_partner(self, request: web.Request) -> web.Response:
        body = await _json_object(request)
        if body is None:
            return _client_error(400, "The request is malformed.")
        errors = _partner_errors(body)
        if errors:
            return _validation_failed(errors)
        account = request[ACCOUNT]
        partner = {**body, "id": self._new_id()}
        self._state.partners[partner["id"]] = (account.api_key, partner)
        return web.json_response(partner, status=201)

    async def _get_partner(self, request: web.Request) -> web.Response:
        account = request[ACCOUNT]
        try:
            owner, partner = self._state.partners[int(request.match_info["id"])]
        except (KeyError, ValueError):
            return _not_found()
        return web.json_response(partner) if owner == account.api_key else _not_found()

    # ---- documents ----------------------------------------------------------------------

    async def _create_document(self, request: web.Request) -> web.Response:
        account = request[ACCOUNT]
        body = await _json_object(request)
        if body is None:
            return _client_error(400, "The request is malformed.")
        errors = _document_errors(body, account.block_ids)
        if errors:
            return _validation_failed(errors)
        owned = self._state.partners.get(_int_or(body["partner_id"], -1))
        if owned is None or owned[0] != account.api_key:
            return _client_error(403, "Authenticated user doesn't have access to the resource.")
        doc = self._new_document(account.api_key, body, owned[1])
        self._store(account.api_key, body.get("vendor_id"), doc)
        return web.json_response(doc, status=201)

    def _new_document(self, api_key: str, body: JsonDict, partner: JsonDict) -> JsonDict:
        currency = body["currency"]
        rate = Decimal(str(body.get("conversion_rate", 1)))
        items = [_priced_item(i, currency) for i in body.get("items") or []]
        gross = sum((Decimal(str(i["gross_amount"])) for i in items), start=Decimal(0))
        today = date.fromtimestamp(self.clock())
        is_draft = body["type"] == "draft"
        number = "" if is_draft else self._invoice_number(api_key, body["block_id"], today)
        return {
            "id": self._new_id(),
            "invoice_number": number,
            "type": body["type"],
            "correction_type": body["type"],
            "cancelled": False,
            "block_id": body["block_id"],
            "payment_status": "paid" if body.get("paid") else "outstanding",
            "payment_method": body["payment_method"],
            "gross_total": json_number(gross),
            "currency": currency,
            "conversion_rate": json_number(rate),
            "invoice_date": today.isoformat(),
            "fulfillment_date": body["fulfillment_date"],
            "due_date": body["due_date"],
            "paid_date": today.isoformat() if body.get("paid") else None,
            "organization": ORGANIZATION,
            "partner": partner,
            "document_partner": partner,
            "electronic": bool(body.get("electronic", False)),
            "comment": body.get("comment", ""),
            "tags": [],
            "notification_status": "none",
            "language": body["language"],
            "items": items,
            "summary": _summary(items, rate),
            "settings": body.get("settings") or {},
            "online_szamla_status": "received" if not is_draft else "not_checked",
            "related_documents": [],
            "discount": body.get("discount"),
        }

    async def _get_document(self, request: web.Request) -> web.Response:
        stored = self._owned(request)
        return web.json_response(stored.doc) if stored is not None else _not_found()

    async def _get_by_vendor(self, request: web.Request) -> web.Response:
        account = request[ACCOUNT]
        vendor_id = request.match_info["vendor_id"]
        for stored in self._state.documents.values():
            if stored.api_key == account.api_key and stored.vendor_id == vendor_id:
                return web.json_response(stored.doc)
        return _client_error(404, "Document not found.")

    async def _cancel_document(self, request: web.Request) -> web.Response:
        stored = self._owned(request)
        if stored is None:
            return _not_found()
        original = stored.doc
        if original["type"] not in ("invoice", "advance"):
            return _client_error(400, "This document cannot be cancelled.")
        body = await _json_object(request, allow_empty=True) or {}
        # No "already cancelled" check on purpose: a repeated cancel makes another storno.
        storno = self._storno_of(stored.api_key, original, body.get("cancellation_reason"))
        original["cancelled"] = True
        original["related_documents"].append(
            {"id": storno["id"], "invoice_number": storno["invoice_number"]}
        )
        self._store(stored.api_key, None, storno)
        return web.json_response(storno)

    def _storno_of(self, api_key: str, original: JsonDict, reason: Any) -> JsonDict:
        storno = copy.deepcopy(original)
        today = date.fromtimestamp(self.clock())
        items = _negated(storno["items"])
        storno.update(
            id=self._new_id(),
            invoice_number=self._invoice_number(api_key, original["block_id"], today),
            type="cancellation",
            correction_type="cancellation",
            cancelled=False,
            gross_total=-original["gross_total"],
            invoice_date=today.isoformat(),
            items=items,
            summary=_summary(items, Decimal(str(original["conversion_rate"]))),
            comment=str(reason) if reason else "",
            related_documents=[
                {"id": original["id"], "invoice_number": original["invoice_number"]}
            ],
        )
        return storno

    # ---- reference data -----------------------------------------------------------------

    async def _currencies(self, request: web.Request) -> web.Response:
        source, target = request.query.get("from", ""), request.query.get("to", "")
        errors = [
            (f, f"The selected {f} is invalid.")
            for f, code in (("from", source), ("to", target))
            if code not in CURRENCIES
        ]
        if errors:
            return _validation_failed(errors)
        rate = HUF_RATES.get(source, Decimal(100)) / HUF_RATES.get(target, Decimal(100))
        return web.json_response(
            {
                "from_currency": source,
                "to_currency": target,
                "conversation_rate": json_number(rate.quantize(Decimal("0.0001"))),
                "date": request.query.get("date") or date.fromtimestamp(self.clock()).isoformat(),
            }
        )

    async def _organization(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "tax_code": ORGANIZATION["tax_number"],
                "subscription": {"expiration_date": "2099-12-31", "features": ["api_limit_pro"]},
                "has_nav_connection": True,
            }
        )

    async def _document_blocks(self, request: web.Request) -> web.Response:
        account = request[ACCOUNT]
        wanted = request.query.get("type")
        blocks = [
            {
                "id": b,
                "name": f"Sandbox block {b}",
                "prefix": f"B{b}",
                "type": "invoice",
                "custom_field1": "",
                "custom_field2": "",
            }
            for b in account.block_ids
            if wanted in (None, "invoice")
        ]
        return web.json_response(_page(blocks, request))

    # ---- control routes -----------------------------------------------------------------

    async def _ctl_add_account(self, request: web.Request) -> web.Response:
        body = await _json_object(request)
        if body is None or not isinstance(body.get("api_key"), str):
            return _client_error(400, "api_key is required")
        block_ids = [int(b) for b in body.get("block_ids", [111])]
        self.add_account(
            body["api_key"], block_ids=block_ids, subscription=bool(body.get("subscription", True))
        )
        return web.json_response(
            {"block_ids": block_ids, "subscription": bool(body.get("subscription", True))},
            status=201,
        )

    async def _ctl_revoke(self, request: web.Request) -> web.Response:
        api_key = request.match_info["api_key"]
        if api_key not in self._accounts:
            return _not_found()
        self.revoke(api_key)
        return web.Response(status=204)

    async def _ctl_documents(self, request: web.Request) -> web.Response:
        return web.json_response(self.documents(request.query.get("api_key")))

    async def _ctl_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return web.Response(status=204)

    async def _ctl_rate_limit(self, request: web.Request) -> web.Response:
        body = await _json_object(request)
        if body is None or _int_or(body.get("per_minute"), -1) < 0:
            return _client_error(400, "per_minute must be an integer >= 0")
        self.rate_limit_per_minute = int(body["per_minute"])
        self._state.windows.clear()
        return web.json_response({"per_minute": self.rate_limit_per_minute})


async def _operation_of(request: web.Request) -> str:
    resource = request.match_info.route.resource
    template = resource.canonical if resource is not None else request.path
    return f"{request.method} {template.removeprefix(API_PREFIX)}"


async def _json_object(request: web.Request, *, allow_empty: bool = False) -> JsonDict | None:
    if allow_empty and not await request.read():
        return {}
    try:
        body = await request.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def _int_or(value: Any, default: int) -> int:
    if isinstance(value, bool):
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _page(rows: list[JsonDict], request: web.Request) -> JsonDict:
    """Billingo's Laravel-style list envelope."""
    per_page = min(max(_int_or(request.query.get("per_page"), 25), 1), 100)
    page = max(_int_or(request.query.get("page"), 1), 1)
    last_page = max(math.ceil(len(rows) / per_page), 1)
    return {
        "data": rows[(page - 1) * per_page : page * per_page],
        "total": len(rows),
        "per_page": per_page,
        "current_page": page,
        "last_page": last_page,
        "prev_page_url": None,
        "next_page_url": None,
    }
