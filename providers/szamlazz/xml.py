"""Számla Agent XML: requests built in the schemas' element order, answers read back. Pure.

Every document is built with lxml element by element, in the ``<sequence>`` order of the
official XSDs shipped in ``xsd/`` (a wrong order is refused with code 57). Provider words
(szamlaszamElotag, afakulcs, adoalany, …) stay inside this package.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date
from decimal import Decimal, InvalidOperation
from importlib import resources
from types import MappingProxyType
from typing import Any
from urllib.parse import unquote_plus

from lxml import etree

from providers.base import (
    CancelRequest,
    InvoiceDraft,
    InvoiceLine,
    ProviderRules,
    TenantConnection,
)
from providers.errors import ErrorCode, InvoicingError
from providers.values import Customer, PaymentMethod

NS_INVOICE = "http://www.szamlazz.hu/xmlszamla"
NS_REVERSE = "http://www.szamlazz.hu/xmlszamlast"
NS_QUERY = "http://www.szamlazz.hu/xmlszamlaxml"
NS_ANSWER = "http://www.szamlazz.hu/xmlszamlavalasz"
NS_INVOICE_DATA = "http://www.szamlazz.hu/szamla"

#: The multipart field name of the XML file part selects the Agent operation.
ACTION_INVOICE = "action-xmlagentxmlfile"
ACTION_REVERSE = "action-szamla_agent_st"
ACTION_QUERY = "action-szamla_agent_xml"

#: The request schema of each action (package data in ``xsd/``).
SCHEMA_OF_ACTION: dict[str, str] = {
    ACTION_INVOICE: "xmlszamla.xsd",
    ACTION_REVERSE: "xmlszamlast.xsd",
    ACTION_QUERY: "xmlszamlaxml.xsd",
}
#: Schema of the ``<szamla>`` document an invoice-data query answers with.
INVOICE_DATA_SCHEMA = "szamla.xsd"

#: Answer format 2: always an ``xmlszamlavalasz`` XML, whatever happened.
ANSWER_VERSION = 2
#: Storno document type code (what the official SDK sends as ``tipus``).
REVERSE_TYPE = "SS"

PAYMENT_METHODS: dict[PaymentMethod, str] = {
    "cash": "Készpénz",
    "bankcard": "Bankkártya",
    "transfer": "Átutalás",
    "szep_card": "SZÉP kártya",
    "online": "Online bankkártya",
}

#: ``szamlaNyelve`` enumeration; the vendor writes Czech and Slovenian as cz and si.
LANGUAGES: frozenset[str] = frozenset(
    {"hu", "en", "de", "it", "ro", "sk", "hr", "fr", "es", "cz", "pl", "bg", "nl", "ru", "si"}
)
_LANGUAGE_ALIASES = {"cs": "cz", "sl": "si"}

#: The official ``penznem`` list ("Ft" is the vendor's alias of HUF).
CURRENCIES: frozenset[str] = frozenset(
    {
        "HUF", "Ft", "EUR", "CHF", "USD", "AED", "ALL", "AUD", "BAM", "BGN", "BRL", "CAD",
        "CNY", "CZK", "DKK", "EEK", "GBP", "HKD", "HRK", "IDR", "ILS", "INR", "ISK", "JPY",
        "KRW", "KWD", "KSH", "KZT", "LTL", "LVL", "MXN", "MYR", "NOK", "NZD", "PHP", "PLN",
        "RON", "RSD", "RUB", "SEK", "SGD", "THB", "TRY", "TWD", "UAH", "VND", "ZAR",
    }
)  # fmt: skip

#: ``afakulcs`` codes on the current invoice VAT page (zero-VAT lines name one of these).
VAT_CODES: frozenset[str] = frozenset(
    {
        "TAHK", "TAM", "AAM", "EUT", "EUKT", "F.AFA", "K.AFA", "HO", "EUE", "EUFADE", "EUFAD37",
        "ATK", "NAM", "EAM", "KBAUK", "KBAET",
    }
)  # fmt: skip
#: Older labels a sale may still carry, renamed to the current code of the same meaning:
#: EU / EUK were "EU-n belüli" / "EU-n kívüli" (now EUT / EUKT), ÁKK and Billingo's ÁTHK are
#: "áfakörön / tárgyi hatályon kívüli" (outside the VAT Act's scope, now ATK). MAA has no
#: current equivalent and is sent as is (the query schema still knows it).
_VAT_ALIASES: dict[str, str] = {"EU": "EUT", "EUK": "EUKT", "ÁKK": "ATK", "ÁTHK": "ATK"}
_LEGACY_VAT_CODES: frozenset[str] = frozenset({"MAA"})

#: What pre-flight validation checks a sale against before anything is sent to the Agent:
#: ``penznem`` without the "Ft" alias, ``szamlaNyelve``, and each contract VAT label with the
#: ``afakulcs`` :func:`vat_key` sends for it. MAA ("exempt", no NAV case) is not on the
#: current VAT page, so it is refused before sending rather than risked at the Agent: the
#: sale must name the exemption.
RULES = ProviderRules(
    display_name="Számlázz.hu",
    currencies=CURRENCIES - {"Ft"},
    languages=LANGUAGES,
    vat_labels=MappingProxyType(
        {"27%": "27", "18%": "18", "5%": "5"}
        | {
            label: _VAT_ALIASES.get(label, label)
            for label in (
                "AAM", "TAM", "EU", "EUK", "F.AFA", "K.AFA", "ÁKK", "ÁTHK", "KBAET", "EAM",
                "NAM", "ATK", "EUFAD37", "EUFADE", "EUE", "HO",
            )
        }
    ),
)  # fmt: skip

EU_COUNTRIES: frozenset[str] = frozenset(
    {
        "AT", "BE", "BG", "HR", "CY", "CZ", "DK", "EE", "FI", "FR", "DE", "GR", "EL", "HU",
        "IE", "IT", "LV", "LT", "LU", "MT", "NL", "PL", "PT", "RO", "SK", "SI", "ES", "SE",
    }
)  # fmt: skip
_HU_TAX_NUMBER = re.compile(r"^(\d{8})-?(\d)-?(\d{2})$")
# XML 1.0 refuses most control characters; lxml raises on them, the Agent would answer 57.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")

#: ``vevo/adoalany``: 1 Hungarian tax number, 6 EU business, 7 non-EU business, -1 private.
BUYER_HU_COMPANY = 1
BUYER_EU_COMPANY = 6
BUYER_NON_EU_COMPANY = 7
BUYER_PRIVATE = -1


# ---- schemas ----------------------------------------------------------------------------


@functools.cache
def schema(name: str) -> etree.XMLSchema:
    """One of the official XSDs shipped as package data (e.g. ``"xmlszamla.xsd"``)."""
    path = resources.files("providers.szamlazz").joinpath("xsd", name)
    return etree.XMLSchema(etree.fromstring(path.read_bytes()))


def schema_errors(document: bytes, name: str) -> list[str]:
    """The validator's messages for ``document`` against schema ``name`` (empty: valid)."""
    try:
        return validate(parse(document), name)
    except etree.XMLSyntaxError as exc:
        return [str(exc)]


def validate(root: etree._Element, name: str) -> list[str]:
    """The validator's messages for a parsed document (empty: valid)."""
    checker = schema(name)
    if checker.validate(root):
        return []
    log: Any = checker.error_log  # the stubs leave _ErrorLog empty
    return [f"line {entry.line}: {entry.message}" for entry in log]


def new_root(namespace: str, tag: str) -> etree._Element:
    """A root element with ``namespace`` as the default namespace, as the Agent writes it."""
    nsmap: Any = {None: namespace}  # the stubs do not allow the default (None) prefix
    return etree.Element(f"{{{namespace}}}{tag}", nsmap=nsmap)


def parse(document: bytes) -> etree._Element:
    """Parse without entities or network access: answers come from outside."""
    parser = etree.XMLParser(resolve_entities=False, no_network=True, remove_blank_text=True)
    return etree.fromstring(document, parser)


# ---- value mapping ----------------------------------------------------------------------


def invoice_language(language: str) -> str:
    code = _LANGUAGE_ALIASES.get(language.lower(), language.lower())
    if code not in LANGUAGES:
        raise InvoicingError(
            ErrorCode.UNSUPPORTED_LANGUAGE,
            f"Számlázz.hu cannot write invoices in {language!r} "
            f"(supported: {', '.join(sorted(LANGUAGES))})",
        )
    return code


def invoice_currency(currency: str) -> str:
    if currency.upper() not in {c.upper() for c in CURRENCIES}:
        raise InvoicingError(
            ErrorCode.UNSUPPORTED_CURRENCY, f"Számlázz.hu cannot invoice in {currency!r}"
        )
    return "HUF" if currency.upper() in {"HUF", "FT"} else currency.upper()


def vat_key(line: InvoiceLine) -> str:
    """``afakulcs`` for a line: the percentage as a number, or the exemption code."""
    label = line.vat.strip()
    if label.endswith("%"):
        if line.vat_rate <= 0:
            # NAV accepts no 0% rate: a zero-VAT line names its exemption code.
            raise InvoicingError(
                ErrorCode.INVALID_INVOICE_DATA,
                f"line {line.name!r}: a 0% VAT line must name its exemption code (AAM, TAM, …)",
            )
        return _number(line.vat_rate)
    code = _VAT_ALIASES.get(label.upper(), label.upper())
    if code not in VAT_CODES and code not in _LEGACY_VAT_CODES:
        raise InvoicingError(
            ErrorCode.INVALID_INVOICE_DATA,
            f"line {line.name!r}: VAT code {label!r} is not one Számlázz.hu knows",
        )
    return code


def buyer_kind(customer: Customer) -> int:
    """``adoalany`` for the buyer; raises when a company lacks the number its kind needs."""
    if customer.kind == "person":
        return BUYER_PRIVATE
    country = customer.address.country_code.upper()
    if hu_tax_number(customer) is not None:
        return BUYER_HU_COMPANY
    if country == "HU":
        raise InvoicingError(
            ErrorCode.INVALID_CUSTOMER_DATA,
            f"company {customer.name!r} in Hungary needs a Hungarian tax number",
        )
    if country in EU_COUNTRIES:
        if not customer.eu_vat_number:
            raise InvoicingError(
                ErrorCode.INVALID_CUSTOMER_DATA,
                f"company {customer.name!r} in the EU ({country}) needs an EU VAT number",
            )
        return BUYER_EU_COMPANY
    return BUYER_NON_EU_COMPANY


def hu_tax_number(customer: Customer) -> str | None:
    """The Hungarian tax number as 12345678-1-23, or None when the buyer has none."""
    if not customer.tax_number:
        return None
    match = _HU_TAX_NUMBER.match(customer.tax_number.strip())
    if match is None:
        if customer.address.country_code.upper() == "HU":
            raise InvoicingError(
                ErrorCode.TAX_NUMBER_INVALID,
                f"tax number {customer.tax_number!r} is not in the Hungarian 12345678-1-23 form",
            )
        return None
    return "-".join(match.groups())


# ---- requests ---------------------------------------------------------------------------


def _write_settings(
    root: etree._Element, add: _Add, conn: TenantConnection, external_key: str
) -> None:
    """``beallitasok`` of an invoice or a reverse invoice (same elements, same XSD order)."""
    settings = add(root, "beallitasok")
    add(settings, "szamlaagentkulcs", conn.secret.get_secret_value())
    add(settings, "eszamla", _bool(conn.e_invoice))
    add(settings, "szamlaLetoltes", "false")
    add(settings, "valaszVerzio", str(ANSWER_VERSION))
    # The external key is what the caller looks the document up by when an answer is lost.
    add(settings, "szamlaKulsoAzon", external_key)


def build_invoice(conn: TenantConnection, draft: InvoiceDraft) -> bytes:
    """``xmlszamla`` for a new invoice. Raises InvoicingError for data Számlázz.hu refuses."""
    currency = invoice_currency(draft.currency)
    language = invoice_language(conn.language)
    vat_keys = [vat_key(line) for line in draft.lines]
    kind = buyer_kind(draft.customer)

    root = new_root(NS_INVOICE, "xmlszamla")
    add = _Add(NS_INVOICE)

    _write_settings(root, add, conn, draft.external_key)

    header = add(root, "fejlec")
    add(header, "keltDatum", _date(draft.issue_date))
    add(header, "teljesitesDatum", _date(draft.fulfillment_date))
    add(header, "fizetesiHataridoDatum", _date(draft.due_date))
    add(header, "fizmod", PAYMENT_METHODS[draft.payment_method])
    add(header, "penznem", currency)
    add(header, "szamlaNyelve", language)
    if draft.comment:
        add(header, "megjegyzes", draft.comment)
    if currency != "HUF":
        # arfolyamBank=MNB without arfolyam: the Agent takes the current MNB rate itself.
        add(header, "arfolyamBank", "MNB")
    add(header, "rendelesSzam", draft.sale_id)
    if conn.invoice_prefix:
        add(header, "szamlaszamElotag", conn.invoice_prefix)
    add(header, "fizetve", _bool(draft.paid))

    add(root, "elado")
    _buyer(add(root, "vevo"), draft.customer, kind, add)

    items = add(root, "tetelek")
    for line, key in zip(draft.lines, vat_keys, strict=True):
        item = add(items, "tetel")
        add(item, "megnevezes", line.name)
        add(item, "mennyiseg", _number(line.quantity))
        add(item, "mennyisegiEgyseg", line.unit)
        add(item, "nettoEgysegar", _number(line.net_unit_price))
        add(item, "afakulcs", key)
        add(item, "nettoErtek", _number(line.net_amount))
        add(item, "afaErtek", _number(line.vat_amount))
        add(item, "bruttoErtek", _number(line.gross_amount))
    return _serialize(root)


def _buyer(vevo: etree._Element, customer: Customer, kind: int, add: _Add) -> None:
    address = customer.address
    add(vevo, "nev", customer.name)
    if address.country_code.upper() != "HU":
        add(vevo, "orszag", address.country_code.upper())
    add(vevo, "irsz", address.post_code)
    add(vevo, "telepules", address.city)
    add(vevo, "cim", address.street)
    if customer.email:
        add(vevo, "email", customer.email)
    add(vevo, "adoalany", str(kind))
    if kind != BUYER_PRIVATE:
        tax_number = hu_tax_number(customer)
        if tax_number is not None:
            add(vevo, "adoszam", tax_number)
        if customer.eu_vat_number:
            add(vevo, "adoszamEU", customer.eu_vat_number.replace(" ", "").upper())


def build_reverse(conn: TenantConnection, invoice_number: str, request: CancelRequest) -> bytes:
    """``xmlszamlast`` reversing ``invoice_number``. No keltDatum: the Agent refuses any issue
    date but today (352). Without teljesitesDatum it repeats the original's, as NAV wants."""
    root = new_root(NS_REVERSE, "xmlszamlast")
    add = _Add(NS_REVERSE)
    _write_settings(root, add, conn, request.external_key)
    header = add(root, "fejlec")
    add(header, "szamlaszam", invoice_number)
    if request.fulfillment_date is not None:
        add(header, "teljesitesDatum", _date(request.fulfillment_date))
    if request.reason:
        add(header, "megjegyzes", request.reason)
    add(header, "tipus", REVERSE_TYPE)
    return _serialize(root)


def build_query(
    agent_key: str,
    *,
    number: str | None = None,
    order_number: str | None = None,
    external_key: str | None = None,
) -> bytes:
    """``xmlszamlaxml``: the invoice data by number, order number or external key."""
    if (number, order_number, external_key) == (None, None, None):
        raise ValueError("a query needs a number, an order number or an external key")
    root = new_root(NS_QUERY, "xmlszamlaxml")
    add = _Add(NS_QUERY)
    # Unlike the other schemas, the key sits directly under the root here.
    add(root, "szamlaagentkulcs", agent_key)
    if number is not None:
        add(root, "szamlaszam", number)
    if order_number is not None:
        add(root, "rendelesSzam", order_number)
    if external_key is not None:
        add(root, "szamlaKulsoAzon", external_key)
    return _serialize(root)


class _Add:
    def __init__(self, namespace: str) -> None:
        self._namespace = namespace

    def __call__(self, parent: etree._Element, tag: str, text: str | None = None) -> etree._Element:
        element = etree.SubElement(parent, f"{{{self._namespace}}}{tag}")
        if text is not None:
            element.text = _NOT_XML.sub("", text)
        return element


def _serialize(root: etree._Element) -> bytes:
    return etree.tostring(root, xml_declaration=True, encoding="UTF-8")


def _bool(value: bool) -> str:
    return "true" if value else "false"


def _date(value: date) -> str:
    return value.isoformat()


def _number(value: Decimal) -> str:
    # Plain notation: xs:double would take 1E+1, the Agent's arithmetic check might not.
    return format(value, "f")


# ---- answers ----------------------------------------------------------------------------


class UnreadableAnswer(ValueError):
    """The body is neither an Agent answer nor invoice data (a proxy page, a cut-off body)."""


@dataclass(frozen=True, slots=True)
class AgentAnswer:
    """What a create / reverse call (or a failed query) said, from headers and body together."""

    ok: bool
    error_code: int | None = None
    error_message: str | None = None
    invoice_number: str | None = None
    net_total: Decimal | None = None
    gross_total: Decimal | None = None
    #: ``szlahu_down``: the Agent is temporarily unavailable.
    down: bool = False


@dataclass(frozen=True, slots=True)
class InvoiceRecord:
    """The parts of a queried ``<szamla>`` the worker needs."""

    number: str
    #: ``alap/tipus``: SZ invoice, SS reverse (storno), D pro-forma, …
    kind: str
    order_number: str | None
    #: ``alap/hivszamlaszam``: the invoice a reverse invoice reverses.
    reverses: str | None
    currency: str
    net_total: Decimal
    gross_total: Decimal
    cancelled: bool


#: Code 56: issued, only the notification e-mail failed; a success when a number came back.
CODE_EMAIL_FAILED = 56


def read_answer(headers: Mapping[str, str], body: bytes) -> AgentAnswer:
    """Read a create / reverse answer. Errors arrive with HTTP 200, in the ``szlahu_*``
    headers, in the body or both, so both are read; raises UnreadableAnswer otherwise."""
    h = {k.lower(): v for k, v in headers.items()}
    if h.get("szlahu_down", "").strip():
        return AgentAnswer(ok=False, down=True, error_message="Számla Agent is down")
    code = _int(h.get("szlahu_error_code"))
    message = unquote_plus(h["szlahu_error"]) if h.get("szlahu_error") else None
    number = unquote_plus(h["szlahu_szamlaszam"]) if h.get("szlahu_szamlaszam") else None
    net = _decimal(h.get("szlahu_nettovegosszeg"))
    gross = _decimal(h.get("szlahu_bruttovegosszeg"))

    body_ok: bool | None = None
    text = body.lstrip()
    if text.startswith(b"<"):
        try:
            root = parse(body)
        except etree.XMLSyntaxError as exc:
            raise UnreadableAnswer(f"malformed XML answer: {exc}") from exc
        if root.tag != f"{{{NS_ANSWER}}}xmlszamlavalasz":
            raise UnreadableAnswer(f"unexpected answer document {root.tag}")
        body_ok = _text(root, NS_ANSWER, "sikeres") == "true"
        code = code if code is not None else _int(_text(root, NS_ANSWER, "hibakod"))
        message = message or _text(root, NS_ANSWER, "hibauzenet")
        number = _text(root, NS_ANSWER, "szamlaszam") or number
        body_net = _decimal(_text(root, NS_ANSWER, "szamlanetto"))
        body_gross = _decimal(_text(root, NS_ANSWER, "szamlabrutto"))
        net = net if body_net is None else body_net
        gross = gross if body_gross is None else body_gross
    elif text.startswith(b"[ERR]"):
        body_ok = False
        message = message or _v1_error(text.decode("utf-8", "replace"))
    elif text.startswith(b"xmlagentresponse=DONE;"):
        body_ok = True
        number = number or text.decode("utf-8", "replace").split(";", 1)[1].strip()
    elif text.startswith(b"%PDF"):
        body_ok = True
    elif code is None and number is None:
        raise UnreadableAnswer("the answer carries neither szlahu_* headers nor an Agent body")

    if code == CODE_EMAIL_FAILED and number:
        return AgentAnswer(ok=True, invoice_number=number, net_total=net, gross_total=gross)
    if code is not None or body_ok is False:
        return AgentAnswer(ok=False, error_code=code, error_message=message or "")
    if number is None:
        raise UnreadableAnswer("the answer reports success but names no document")
    return AgentAnswer(ok=True, invoice_number=number, net_total=net, gross_total=gross)


def read_query(headers: Mapping[str, str], body: bytes) -> InvoiceRecord | AgentAnswer:
    """Read an invoice-data query answer: the ``<szamla>`` document, or the Agent's refusal
    (code 7 when nothing matches, reported in the body only)."""
    try:
        root = parse(body) if body.lstrip().startswith(b"<") else None
    except etree.XMLSyntaxError as exc:
        raise UnreadableAnswer(f"malformed XML answer: {exc}") from exc
    if root is None or root.tag != f"{{{NS_INVOICE_DATA}}}szamla":
        return read_answer(headers, body)
    ns = NS_INVOICE_DATA
    alap = root.find(f"{{{ns}}}alap")
    if alap is None:
        raise UnreadableAnswer("invoice data without <alap>")
    number = _text(alap, ns, "szamlaszam")
    if not number:
        raise UnreadableAnswer("invoice data without a number")
    total = root.find(f"{{{ns}}}osszegek/{{{ns}}}totalossz")
    if total is not None:
        net = _first(_decimal(_text(total, ns, "netto")), Decimal(0))
        gross = _first(_decimal(_text(total, ns, "brutto")), Decimal(0))
    else:
        items = root.findall(f"{{{ns}}}tetelek/{{{ns}}}tetel")
        net = sum((_first(_decimal(_text(i, ns, "netto")), Decimal(0)) for i in items), Decimal(0))
        gross = sum(
            (_first(_decimal(_text(i, ns, "brutto")), Decimal(0)) for i in items), Decimal(0)
        )
    return InvoiceRecord(
        number=number,
        kind=_text(alap, ns, "tipus") or "",
        order_number=_text(alap, ns, "rendelesszam") or None,
        reverses=_text(alap, ns, "hivszamlaszam") or None,
        currency=_text(alap, ns, "devizanem") or "",
        net_total=net,
        gross_total=gross,
        cancelled=_text(alap, ns, "sztornozott") == "true",
    )


def _v1_error(text: str) -> str:
    # "[ERR] message" then a Java stack trace after a dashed line: keep the message only.
    return text.removeprefix("[ERR]").split("----------", 1)[0].strip()


def _text(parent: etree._Element, namespace: str, tag: str) -> str | None:
    element = parent.find(f"{{{namespace}}}{tag}")
    if element is None or element.text is None:
        return None
    return element.text.strip()


def _first(value: Decimal | None, fallback: Decimal) -> Decimal:
    return fallback if value is None else value


def _int(value: str | None) -> int | None:
    if value is None or not value.strip():
        return None
    try:
        return int(value.strip())
    except ValueError:
        return None


def _decimal(value: str | None) -> Decimal | None:
    if value is None or not value.strip():
        return None
    try:
        return Decimal(value.strip())
    except InvalidOperation:
        return None
