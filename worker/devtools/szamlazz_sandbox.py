"""A Számla Agent look-alike for tests and the demo: the real wire protocol, in memory.

What it copies from the Agent: one multipart POST to ``/szamla/`` whose file part name picks
the action; every request validated against the official XSD (57 with the validator's text);
agent key (3), number prefix (202) and line arithmetic (262–264) checks; numbers
``PREFIX-YYYY-NNN``; reverse invoices that negate the original, a repeated reverse echoing the
existing one; lookups by number, order number or external id (7 when none); ``szlahu_*``
headers (URL-encoded), answer formats 1 (PDF / text) and 2 (``xmlszamlavalasz``); errors with
HTTP 200; a ``JSESSIONID`` cookie. Faults, latency and the request log come from
:mod:`worker.devtools.faults`, matched on the action name (e.g. "action-xmlagentxmlfile").
"""

from __future__ import annotations

import base64
import itertools
import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal, InvalidOperation
from typing import Any, Literal, cast
from urllib.parse import quote_plus

from aiohttp import web
from aiohttp.typedefs import Middleware
from lxml import etree

from providers.szamlazz.xml import (
    ACTION_INVOICE,
    ACTION_QUERY,
    ACTION_REVERSE,
    NS_ANSWER,
    NS_INVOICE,
    NS_INVOICE_DATA,
    NS_QUERY,
    NS_REVERSE,
    SCHEMA_OF_ACTION,
    VAT_CODES,
    new_root,
    parse,
    validate,
)
from worker.devtools.faults import FaultPlan, add_control_routes, fault_middleware

AGENT_PATH = "/szamla/"
CONTROL = "/_sandbox"
SESSION_COOKIE = "JSESSIONID"

#: Percentages on the Agent's VAT page; codes of the current page and the older ones.
VAT_PERCENTAGES: frozenset[Decimal] = frozenset(
    Decimal(v)
    for v in (
        "0", "1", "2", "2.1", "3", "4", "4.8", "5", "5.5", "6", "7", "7.7", "8", "8.1", "9",
        "9.5", "10", "11", "12", "13", "13.5", "14", "15", "16", "17", "18", "19", "20", "21",
        "22", "23", "24", "25", "25.5", "26", "27",
    )
)  # fmt: skip
_VAT_CODES_ACCEPTED = VAT_CODES | {"EU", "EUK", "MAA", "ÁKK", "TEHK"}
_PAYMENT_UNIFIED = {
    "készpénz": "készpénz",
    "bankkártya": "bankkártya",
    "online bankkártya": "bankkártya",
    "átutalás": "átutalás",
    "szép kártya": "SZÉP kártya",
}
_NOT_FOUND = "Hiányzó adat: számla xml (ismeretlen számlaszám, rendelésszám vagy külső azonosító)"
_LOGIN_FAILED = (
    "Bejelentkezési hiba - a megadott login név és jelszó pároshoz nem létezik felhasználó"
)
_FAKE_PDF = b"%PDF-1.4\n% Szamla Agent sandbox\n%%EOF\n"


def line_errors(
    row: int,
    quantity: Decimal,
    net_unit_price: Decimal,
    net: Decimal,
    vat_rate: Decimal,
    vat: Decimal,
    gross: Decimal,
    currency: str,
) -> list[tuple[int, str]]:
    """The Agent's line checks (262 net, 263 VAT, 264 gross, by row) for one line.

    ``vat_rate`` is the percentage (0 for exemption codes). The "unit" is a whole forint for
    HUF (amounts must be integers) and a cent otherwise (at most two decimals). Net may differ
    from unit price × quantity by one unit plus the rounding of a unit price carried with 4
    decimals (half of 0.0001 per piece); VAT from net × rate / 100 by one unit (gross-priced
    lines round net first, so VAT drifts by up to rate/200 of a unit); gross must be net + VAT
    exactly.
    """
    huf = currency.upper() in {"HUF", "FT"}
    unit = Decimal(1) if huf else Decimal("0.01")
    errors: list[tuple[int, str]] = []
    where = f"a(z) {row}. tételben (row {row})"

    def whole(value: Decimal) -> bool:
        # HUF lines carry whole forints (documented); other currencies cents at most.
        units = value / unit
        return units == units.to_integral_value()

    expected_net = net_unit_price * quantity
    net_slack = unit + abs(quantity) * Decimal("0.00005")
    if not whole(net) or abs(expected_net - net) > net_slack:
        errors.append(
            (
                262,
                f"Hibás nettó érték {where}: nettoEgysegar × mennyiseg = "
                f"{_plain(expected_net)}, nettoErtek = {_plain(net)}",
            )
        )
    expected_vat = net * vat_rate / 100
    if not whole(vat) or abs(expected_vat - vat) > unit:
        errors.append(
            (
                263,
                f"Hibás áfa érték {where}: nettoErtek × {_plain(vat_rate)}% = "
                f"{_plain(expected_vat)}, afaErtek = {_plain(vat)}",
            )
        )
    if not whole(gross) or gross != net + vat:
        errors.append(
            (
                264,
                f"Hibás bruttó érték {where}: nettoErtek + afaErtek = "
                f"{_plain(net + vat)}, bruttoErtek = {_plain(gross)}",
            )
        )
    return errors


def _plain(value: Decimal) -> str:
    return format(value.normalize(), "f") if value == value.to_integral() else format(value, "f")


class _Refusal(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class _Line:
    name: str
    quantity: Decimal
    unit: str
    net_unit_price: Decimal
    vat: str
    vat_rate: Decimal
    net: Decimal
    vat_amount: Decimal
    gross: Decimal

    def negated(self) -> _Line:
        return _Line(
            self.name, -self.quantity, self.unit, self.net_unit_price, self.vat, self.vat_rate,
            -self.net, -self.vat_amount, -self.gross,
        )  # fmt: skip


@dataclass
class _Invoice:
    id: int
    agent_key: str
    prefix: str
    number: str
    kind: Literal["invoice", "reverse"]
    external_id: str | None
    order_number: str | None
    currency: str
    language: str
    payment_method: str
    issue_date: date
    fulfillment_date: date
    due_date: date
    e_invoice: bool
    paid: bool
    buyer: dict[str, str]
    lines: list[_Line]
    comment: str | None = None
    reverses: str | None = None
    reversed_by: str | None = None

    @property
    def net(self) -> Decimal:
        return sum((line.net for line in self.lines), Decimal(0))

    @property
    def vat(self) -> Decimal:
        return sum((line.vat_amount for line in self.lines), Decimal(0))

    @property
    def gross(self) -> Decimal:
        return sum((line.gross for line in self.lines), Decimal(0))

    @property
    def outstanding(self) -> Decimal:
        return self.gross if self.kind == "reverse" or not self.paid else Decimal(0)

    def as_dict(self) -> dict[str, Any]:
        return {
            "number": self.number,
            "prefix": self.prefix,
            "external_id": self.external_id,
            "order_number": self.order_number,
            "kind": self.kind,
            "reverses": self.reverses,
            "reversed_by": self.reversed_by,
            "currency": self.currency,
            "net": self.net,
            "vat": self.vat,
            "gross": self.gross,
            "issue_date": self.issue_date,
            "fulfillment_date": self.fulfillment_date,
            "due_date": self.due_date,
            "payment_method": self.payment_method,
            "language": self.language,
            "e_invoice": self.e_invoice,
            "paid": self.paid,
            "buyer": dict(self.buyer),
            "comment": self.comment,
            "lines": [
                {
                    "name": line.name,
                    "quantity": line.quantity,
                    "unit": line.unit,
                    "net_unit_price": line.net_unit_price,
                    "vat": line.vat,
                    "net": line.net,
                    "vat_amount": line.vat_amount,
                    "gross": line.gross,
                }
                for line in self.lines
            ],
        }


@dataclass
class _Account:
    prefixes: list[str]
    revoked: bool = False
    counters: dict[tuple[str, int], int] = field(default_factory=dict)


class SzamlazzSandbox:
    """An in-memory Számla Agent. ``start()`` serves it and returns the agent URL."""

    def __init__(self, *, seed: int | None = None) -> None:
        self.plan = FaultPlan(seed=seed)
        #: JSESSIONID values handed out, so tests can see the client keep its session.
        self.sessions: set[str] = set()
        self._accounts: dict[str, _Account] = {}
        self._invoices: list[_Invoice] = []
        self._ids = itertools.count(1000)
        self._runner: web.AppRunner | None = None
        # cast: fault_middleware's Callable annotation is narrower than aiohttp's protocol.
        middleware = cast(Middleware, fault_middleware(self.plan, _operation_of))
        self.app = web.Application(middlewares=[middleware])
        self.app.router.add_post(AGENT_PATH, self._agent)
        self.app.router.add_post(AGENT_PATH.rstrip("/"), self._agent)
        add_control_routes(self.app, self.plan)
        self.app.router.add_post(f"{CONTROL}/accounts", self._http_add_account)
        self.app.router.add_delete(f"{CONTROL}/accounts/{{agent_key}}", self._http_revoke)
        self.app.router.add_get(f"{CONTROL}/invoices", self._http_invoices)
        self.app.router.add_post(f"{CONTROL}/reset", self._http_reset)

    # ---- in-process control ---------------------------------------------------------------

    def add_account(self, agent_key: str, *, prefixes: Iterable[str] = ("BELLA",)) -> None:
        """Open (or reopen, with new prefixes) the account behind ``agent_key``."""
        account = self._accounts.get(agent_key)
        if account is None:
            self._accounts[agent_key] = _Account(prefixes=list(prefixes))
        else:
            account.prefixes, account.revoked = list(prefixes), False

    def revoke(self, agent_key: str) -> None:
        """The key stops working (code 3); its invoices stay."""
        if agent_key in self._accounts:
            self._accounts[agent_key].revoked = True

    def invoices(self, agent_key: str | None = None) -> list[dict[str, Any]]:
        return [
            invoice.as_dict()
            for invoice in self._invoices
            if agent_key is None or invoice.agent_key == agent_key
        ]

    def reset(self) -> None:
        """Forget accounts, invoices, sessions, faults and the request log."""
        self._accounts.clear()
        self._invoices.clear()
        self.sessions.clear()
        self.plan.clear()
        self.plan.requests.clear()

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        # A short shutdown: a commit_then_hang handler must not hold up stop() for a minute.
        self._runner = web.AppRunner(self.app, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound = self._runner.addresses[0][1]
        return f"http://{host}:{bound}{AGENT_PATH}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ---- HTTP control ---------------------------------------------------------------------

    async def _http_add_account(self, request: web.Request) -> web.Response:
        body: dict[str, Any] = await request.json()
        self.add_account(str(body["agent_key"]), prefixes=body.get("prefixes") or ("BELLA",))
        return web.json_response(
            {"prefixes": self._accounts[body["agent_key"]].prefixes}, status=201
        )

    async def _http_revoke(self, request: web.Request) -> web.Response:
        self.revoke(request.match_info["agent_key"])
        return web.Response(status=204)

    async def _http_invoices(self, request: web.Request) -> web.Response:
        found = self.invoices(request.query.get("agent_key"))
        return web.Response(
            text=json.dumps(found, default=_json_default, ensure_ascii=False),
            content_type="application/json",
        )

    async def _http_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return web.Response(status=204)

    # ---- the Agent --------------------------------------------------------------------------

    async def _agent(self, request: web.Request) -> web.StreamResponse:
        action, version = None, 1
        try:
            action, content = await _read_part(request)
            action, document = _xml_part(action, content)
            root = _parsed(document)
            version = _answer_version(root)
            _validate(action, root)
            key = self._authenticate(action, root)
            if action == ACTION_INVOICE:
                invoice = self._create(key, root)
                response = _issued(invoice, version, _download(root))
            elif action == ACTION_REVERSE:
                invoice = self._reverse(key, root)
                response = _issued(invoice, version, _download(root))
            else:
                response = self._query(key, root)
        except _Refusal as refusal:
            response = _refused(action, version, refusal)
        self._keep_session(request, response)
        return response

    def _keep_session(self, request: web.Request, response: web.Response) -> None:
        if request.cookies.get(SESSION_COOKIE) in self.sessions:
            return
        session = uuid.uuid4().hex.upper()
        self.sessions.add(session)
        response.set_cookie(SESSION_COOKIE, session, path="/szamla", httponly=True)

    def _authenticate(self, action: str, root: etree._Element) -> str:
        ns = etree.QName(root).namespace or ""
        holder = root if action == ACTION_QUERY else _child(root, ns, "beallitasok")
        key = _text(holder, ns, "szamlaagentkulcs")
        if key is None:
            # The legacy way: the key as both user name and password.
            user, password = _text(holder, ns, "felhasznalo"), _text(holder, ns, "jelszo")
            key = user if user is not None and user == password else None
        account = self._accounts.get(key) if key is not None else None
        if key is None or account is None or account.revoked:
            raise _Refusal(3, _LOGIN_FAILED)
        return key

    def _create(self, key: str, root: etree._Element) -> _Invoice:
        ns = NS_INVOICE
        account = self._accounts[key]
        settings, header = _child(root, ns, "beallitasok"), _child(root, ns, "fejlec")
        buyer = _child(root, ns, "vevo")
        prefix = _text(header, ns, "szamlaszamElotag") or account.prefixes[0]
        if prefix not in account.prefixes:
            raise _Refusal(202, f"A számlaszám előtag ({prefix}) nem létezik a fiókban.")
        currency = _text(header, ns, "penznem") or "HUF"
        currency = "HUF" if currency.upper() == "FT" else currency
        lines = [
            _line(row, item, currency)
            for row, item in enumerate(root.iterfind(f"{{{ns}}}tetelek/{{{ns}}}tetel"), start=1)
        ]
        today = date.today()
        issue_date = _date(_text(header, ns, "keltDatum")) or today
        invoice = _Invoice(
            id=next(self._ids),
            agent_key=key,
            prefix=prefix,
            number=self._next_number(account, prefix, issue_date.year),
            kind="invoice",
            external_id=_text(settings, ns, "szamlaKulsoAzon"),
            order_number=_text(header, ns, "rendelesSzam"),
            currency=currency,
            language=_text(header, ns, "szamlaNyelve") or "hu",
            payment_method=_text(header, ns, "fizmod") or "",
            issue_date=issue_date,
            fulfillment_date=_date(_text(header, ns, "teljesitesDatum")) or today,
            due_date=_date(_text(header, ns, "fizetesiHataridoDatum")) or today,
            e_invoice=_text(settings, ns, "eszamla") == "true",
            paid=_text(header, ns, "fizetve") == "true",
            buyer={
                child.tag.split("}")[1]: (child.text or "").strip()
                for child in buyer
                if len(child) == 0
            },
            lines=lines,
            comment=_text(header, ns, "megjegyzes"),
        )
        self._invoices.append(invoice)
        return invoice

    def _reverse(self, key: str, root: etree._Element) -> _Invoice:
        ns = NS_REVERSE
        settings, header = _child(root, ns, "beallitasok"), _child(root, ns, "fejlec")
        number = _text(header, ns, "szamlaszam") or ""
        original = self._find(key, number=number)
        if original is None:
            raise _Refusal(7, f"Hiányzó adat: ismeretlen számlaszám ({number})")
        if original.kind == "reverse":
            raise _Refusal(14, "Sztornó számla nem sztornózható.")
        today = date.today()
        issue_date = _date(_text(header, ns, "keltDatum"))
        if issue_date is not None and issue_date != today:
            raise _Refusal(352, "A számla kelte csak a mai nap lehet.")
        if original.reversed_by is not None:
            # The Agent answers a repeated reverse with the reverse invoice it already made.
            existing = self._find(key, number=original.reversed_by)
            assert existing is not None
            return existing
        account = self._accounts[key]
        reverse = _Invoice(
            id=next(self._ids),
            agent_key=key,
            prefix=original.prefix,
            number=self._next_number(account, original.prefix, today.year),
            kind="reverse",
            external_id=_text(settings, ns, "szamlaKulsoAzon"),
            order_number=original.order_number,
            currency=original.currency,
            language=original.language,
            payment_method=original.payment_method,
            issue_date=today,
            fulfillment_date=_date(_text(header, ns, "teljesitesDatum"))
            or original.fulfillment_date,
            due_date=today,
            e_invoice=_text(settings, ns, "eszamla") == "true",
            paid=False,
            buyer=dict(original.buyer),
            lines=[line.negated() for line in original.lines],
            comment=_text(header, ns, "megjegyzes"),
            reverses=original.number,
        )
        original.reversed_by = reverse.number
        self._invoices.append(reverse)
        return reverse

    def _query(self, key: str, root: etree._Element) -> web.Response:
        ns = NS_QUERY
        invoice = self._find(
            key,
            number=_text(root, ns, "szamlaszam"),
            order_number=_text(root, ns, "rendelesSzam"),
            external_id=_text(root, ns, "szamlaKulsoAzon"),
        )
        if invoice is None:
            raise _Refusal(7, _NOT_FOUND)
        return web.Response(
            body=invoice_data(invoice, pdf=_text(root, ns, "pdf") == "true"),
            content_type="application/xml",
            charset="utf-8",
        )

    def _find(
        self,
        key: str,
        *,
        number: str | None = None,
        order_number: str | None = None,
        external_id: str | None = None,
    ) -> _Invoice | None:
        """The newest invoice of the account matching the first selector given."""
        mine = [invoice for invoice in self._invoices if invoice.agent_key == key]
        if number is not None:
            found = [i for i in mine if i.number == number]
        elif order_number is not None:
            found = [i for i in mine if i.order_number == order_number]
        elif external_id is not None:
            found = [i for i in mine if i.external_id == external_id]
        else:
            found = []
        return found[-1] if found else None

    @staticmethod
    def _next_number(account: _Account, prefix: str, year: int) -> str:
        sequence = account.counters.get((prefix, year), 0) + 1
        account.counters[(prefix, year)] = sequence
        return f"{prefix}-{year}-{sequence:03d}"


# ---- request reading ----------------------------------------------------------------------


async def _operation_of(request: web.Request) -> str:
    """The multipart action name, so faults can target creates, reverses or queries."""
    if request.method != "POST" or not request.content_type.startswith("multipart/"):
        return f"{request.method} {request.path}"
    try:
        action, _ = await _read_part(request)
    except _Refusal:
        return "unreadable"
    return action or "no-action"


#: (action field name, file content); content None: the field was a plain form value.
_Part = tuple[str | None, bytes | None]
_PART = web.RequestKey[_Part]("szamlazz.part")


async def _read_part(request: web.Request) -> _Part:
    """The action field and its content (bytes for a file part), read once per request and
    kept on it: the fault middleware reads it first, and a dropped request never reaches the
    handler, so the upload's temporary file is closed here rather than by the handler."""
    if _PART in request:
        return request[_PART]
    try:
        form = await request.post()
    except ValueError as exc:
        raise _Refusal(53, f"A kérés nem olvasható: {exc}") from exc
    part: _Part = (None, None)
    for name, value in form.items():
        if isinstance(value, web.FileField):
            with value.file:
                content = value.file.read()
            if part[0] is None and name.startswith("action-"):
                part = (name, content)
        elif part[0] is None and name.startswith("action-"):
            part = (name, None)
    request[_PART] = part
    return part


def _xml_part(name: str | None, content: bytes | None) -> tuple[str, bytes]:
    if name is None or content is None:
        raise _Refusal(53, "Az XML valószínűleg nem fájlként lett elküldve.")
    if name not in SCHEMA_OF_ACTION:
        raise _Refusal(57, f"A homokozó nem ismeri ezt a műveletet: {name}")
    return name, content


def _parsed(document: bytes) -> etree._Element:
    try:
        return parse(document)
    except etree.XMLSyntaxError as exc:
        raise _Refusal(57, f"XML feldolgozási hiba: {exc}") from exc


def _validate(action: str, root: etree._Element) -> None:
    errors = validate(root, SCHEMA_OF_ACTION[action])
    if errors:
        raise _Refusal(57, f"XML feldolgozási hiba: {errors[0]}")


def _answer_version(root: etree._Element) -> int:
    value = root.findtext("{*}beallitasok/{*}valaszVerzio")
    return 2 if value is not None and value.strip() == "2" else 1


def _download(root: etree._Element) -> bool:
    return root.findtext("{*}beallitasok/{*}szamlaLetoltes") == "true"


def _line(row: int, item: etree._Element, currency: str) -> _Line:
    ns = NS_INVOICE
    vat = _text(item, ns, "afakulcs") or ""
    rate = _rate(row, vat)
    values = [
        _amount(row, tag, _text(item, ns, tag))
        for tag in ("mennyiseg", "nettoEgysegar", "nettoErtek", "afaErtek", "bruttoErtek")
    ]
    quantity, unit_price, net, vat_amount, gross = values
    errors = line_errors(row, quantity, unit_price, net, rate, vat_amount, gross, currency)
    if errors:
        raise _Refusal(*errors[0])
    return _Line(
        name=_text(item, ns, "megnevezes") or "",
        quantity=quantity,
        unit=_text(item, ns, "mennyisegiEgyseg") or "",
        net_unit_price=unit_price,
        vat=vat,
        vat_rate=rate,
        net=net,
        vat_amount=vat_amount,
        gross=gross,
    )


def _rate(row: int, vat: str) -> Decimal:
    if vat.upper() in _VAT_CODES_ACCEPTED:
        return Decimal(0)
    try:
        rate = Decimal(vat)
    except InvalidOperation:
        rate = Decimal(-1)
    if rate not in VAT_PERCENTAGES:
        raise _Refusal(57, f"Ismeretlen áfakulcs a(z) {row}. tételben (row {row}): {vat}")
    return rate


def _amount(row: int, tag: str, text: str | None) -> Decimal:
    try:
        value = Decimal(text or "")
    except InvalidOperation:
        value = Decimal("NaN")
    if not value.is_finite():
        raise _Refusal(57, f"Érvénytelen szám a(z) {row}. tételben (row {row}): {tag}={text}")
    return value


def _child(parent: etree._Element, ns: str, tag: str) -> etree._Element:
    element = parent.find(f"{{{ns}}}{tag}")
    assert element is not None, tag  # the schema requires it
    return element


def _text(parent: etree._Element, ns: str, tag: str) -> str | None:
    value = parent.findtext(f"{{{ns}}}{tag}")
    return value.strip() if value is not None and value.strip() else None


def _date(text: str | None) -> date | None:
    return date.fromisoformat(text) if text else None


# ---- answers ------------------------------------------------------------------------------


def _issued(invoice: _Invoice, version: int, download: bool) -> web.Response:
    headers = {
        "szlahu_id": str(invoice.id),
        "szlahu_szamlaszam": quote_plus(invoice.number),
        "szlahu_nettovegosszeg": _plain(invoice.net),
        "szlahu_bruttovegosszeg": _plain(invoice.gross),
        "szlahu_kintlevoseg": _plain(invoice.outstanding),
    }
    if version == 2:
        root = new_root(NS_ANSWER, "xmlszamlavalasz")
        _add(root, NS_ANSWER, "sikeres", "true")
        _add(root, NS_ANSWER, "szamlaszam", invoice.number)
        _add(root, NS_ANSWER, "szamlanetto", _plain(invoice.net))
        _add(root, NS_ANSWER, "szamlabrutto", _plain(invoice.gross))
        _add(root, NS_ANSWER, "kintlevoseg", _plain(invoice.outstanding))
        if download:
            _add(root, NS_ANSWER, "pdf", base64.b64encode(_FAKE_PDF).decode())
        return _xml_response(root, headers)
    if download:
        return web.Response(body=_FAKE_PDF, content_type="application/pdf", headers=headers)
    return web.Response(text=f"xmlagentresponse=DONE;{invoice.number}", headers=headers)


def _refused(action: str | None, version: int, refusal: _Refusal) -> web.Response:
    if action == ACTION_QUERY or version == 2:
        root = new_root(NS_ANSWER, "xmlszamlavalasz")
        _add(root, NS_ANSWER, "sikeres", "false")
        _add(root, NS_ANSWER, "hibakod", str(refusal.code))
        _add(root, NS_ANSWER, "hibauzenet", etree.CDATA(refusal.message))
        # Queries report their errors in the body only; the others in headers too.
        return _xml_response(root, {} if action == ACTION_QUERY else _error_headers(refusal))
    trace = "----------\njava.lang.Exception: sandbox\n\tat hu.szamlazz.Agent.handle(Agent.java:1)"
    return web.Response(text=f"[ERR] {refusal.message}\n{trace}\n", headers=_error_headers(refusal))


def _error_headers(refusal: _Refusal) -> dict[str, str]:
    return {"szlahu_error": quote_plus(refusal.message), "szlahu_error_code": str(refusal.code)}


def _xml_response(root: etree._Element, headers: dict[str, str]) -> web.Response:
    body = etree.tostring(root, xml_declaration=True, encoding="UTF-8")
    return web.Response(body=body, content_type="application/xml", charset="utf-8", headers=headers)


def _add(
    parent: etree._Element, ns: str, tag: str, text: str | etree.CDATA | None = None
) -> etree._Element:
    element = etree.SubElement(parent, f"{{{ns}}}{tag}")
    if text is not None:
        element.text = text
    return element


def invoice_data(invoice: _Invoice, *, pdf: bool = False) -> bytes:
    """The ``<szamla>`` document an invoice-data query returns (valid against szamla.xsd)."""
    ns = NS_INVOICE_DATA
    root = new_root(ns, "szamla")

    def add(parent: etree._Element, tag: str, text: str | None = None) -> etree._Element:
        return _add(parent, ns, tag, text)

    seller = add(root, "szallito")
    add(seller, "id", "1")
    add(seller, "nev", "Számla Agent Sandbox Kft.")
    _address(add(seller, "cim"), add, "HU", "1051", "Budapest", "Nádor utca 7.")
    add(seller, "adoszam", "12345676-2-41")

    base = add(root, "alap")
    add(base, "id", str(invoice.id))
    add(base, "szamlaszam", invoice.number)
    add(base, "gazdEsemAzon", str(invoice.id))
    add(base, "tipus", "SS" if invoice.kind == "reverse" else "SZ")
    add(base, "eszamla", "1" if invoice.e_invoice else "0")
    if invoice.reverses:
        add(base, "hivszamlaszam", invoice.reverses)
    add(base, "kelt", invoice.issue_date.isoformat())
    add(base, "telj", invoice.fulfillment_date.isoformat())
    add(base, "fizh", invoice.due_date.isoformat())
    add(base, "fizmod", invoice.payment_method)
    unified = _PAYMENT_UNIFIED.get(invoice.payment_method.lower(), "egyéb")
    add(base, "fizmodunified", unified)
    add(base, "keszpenz", "true" if unified == "készpénz" else "false")
    if invoice.order_number:
        add(base, "rendelesszam", invoice.order_number)
    add(base, "nyelv", invoice.language)
    add(base, "devizanem", invoice.currency)
    if invoice.currency != "HUF":
        add(base, "devizabank", "MNB")
    if invoice.comment:
        add(base, "megjegyzes", invoice.comment)
    for flag in ("penzforg", "kata", "katafokonyv"):
        add(base, flag, "false")
    add(base, "teszt", "true")
    if invoice.reversed_by:
        add(base, "sztornozott", "true")

    buyer = invoice.buyer
    customer = add(root, "vevo")
    add(customer, "nev", buyer.get("nev", ""))
    _address(
        add(customer, "cim"), add, buyer.get("orszag"), buyer.get("irsz", ""),
        buyer.get("telepules", ""), buyer.get("cim", ""),
    )  # fmt: skip
    if buyer.get("email"):
        add(customer, "email", buyer["email"])
    add(customer, "adoszam", buyer.get("adoszam", ""))
    if buyer.get("adoszamEU"):
        add(customer, "adoszameu", buyer["adoszamEU"])
    kind = buyer.get("adoalany", "0")
    add(customer, "lokacio", {"6": "2", "7": "3"}.get(kind, "1"))
    add(customer, "privatePersonIndicator", "true" if kind == "-1" else "false")

    items = add(root, "tetelek")
    for row, line in enumerate(invoice.lines, start=1):
        item = add(items, "tetel")
        add(item, "nev", line.name)
        add(item, "mennyiseg", _plain(line.quantity))
        add(item, "mennyisegiegyseg", line.unit)
        add(item, "nettoegysegar", _plain(line.net_unit_price))
        _vat(item, add, line.vat, line.vat_rate)
        add(item, "netto", _plain(line.net))
        add(item, "afa", _plain(line.vat_amount))
        add(item, "brutto", _plain(line.gross))
        add(item, "sztetordering", str(row))

    totals = add(root, "osszegek")
    for vat in dict.fromkeys(line.vat for line in invoice.lines):
        same = [line for line in invoice.lines if line.vat == vat]
        per_rate = add(totals, "afakulcsossz")
        _vat(per_rate, add, vat, same[0].vat_rate)
        add(per_rate, "netto", _plain(sum((x.net for x in same), Decimal(0))))
        add(per_rate, "afa", _plain(sum((x.vat_amount for x in same), Decimal(0))))
        add(per_rate, "brutto", _plain(sum((x.gross for x in same), Decimal(0))))
    total = add(totals, "totalossz")
    add(total, "netto", _plain(invoice.net))
    add(total, "afa", _plain(invoice.vat))
    add(total, "brutto", _plain(invoice.gross))
    if pdf:
        add(root, "pdf", base64.b64encode(_FAKE_PDF).decode())
    return etree.tostring(root, xml_declaration=True, encoding="UTF-8")


def _address(
    parent: etree._Element, add: Any, country: str | None, post_code: str, city: str, street: str
) -> None:
    if country:
        add(parent, "orszag", country)
    add(parent, "irsz", post_code)
    add(parent, "telepules", city)
    add(parent, "cim", street)


def _vat(parent: etree._Element, add: Any, vat: str, rate: Decimal) -> None:
    if vat.upper() in _VAT_CODES_ACCEPTED:
        add(parent, "afatipus", vat.upper())
    add(parent, "afakulcs", _plain(rate))


def _json_default(value: object) -> str:
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, date):
        return value.isoformat()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
