"""Számla Agent XML: every request shape validates against the official XSDs, line amounts pass
the Agent's arithmetic checks, and the official sample answers read back correctly."""

from __future__ import annotations

from dataclasses import replace
from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from multidict import CIMultiDict
from pydantic import SecretStr

from handlers.amounts import compute_line
from handlers.messages import Customer, Item
from providers.base import CancelRequest, InvoiceDraft, InvoiceLine, TenantConnection
from providers.errors import ErrorCode, InvoicingError
from providers.szamlazz.xml import (
    NS_INVOICE,
    AgentAnswer,
    InvoiceRecord,
    UnreadableAnswer,
    build_invoice,
    build_query,
    build_reverse,
    parse,
    read_answer,
    read_query,
    schema_errors,
)
from worker.devtools.szamlazz_sandbox import line_errors

SAMPLES = Path("/work/shared/reference/szamlazz-samples")
KEY = "abcdefghijklmnopqrstuvwxyz0123456789abcdef"
N = f"{{{NS_INVOICE}}}"


def conn(**changes: Any) -> TenantConnection:
    base: dict[str, Any] = {
        "tenant_id": "panzio-bella",
        "provider": "szamlazz",
        "secret": SecretStr(KEY),
        "invoice_prefix": "BELLA",
        "e_invoice": True,
    }
    return TenantConnection(**(base | changes))


def customer(kind: str = "company", country: str = "HU", **fields: Any) -> Customer:
    data: dict[str, Any] = {
        "kind": kind,
        "name": "Aurora Travel Kft.",
        "email": "billing@aurora.example",
        "address": {
            "country_code": country,
            "post_code": "1051",
            "city": "Budapest",
            "street": "Nádor utca 7.",
        },
    }
    if kind == "company" and country == "HU":
        data["tax_number"] = "12345676-2-41"
    return Customer.model_validate(data | fields)


def line(price: str, price_type: str, vat: str, currency: str, quantity: str = "2") -> InvoiceLine:
    item = Item(
        name="Double room, 2 nights",
        quantity=Decimal(quantity),
        unit="night",
        unit_price=Decimal(price),
        price_type=price_type,
        vat=vat,
    )
    return compute_line(item, currency)


def draft(
    lines: tuple[InvoiceLine, ...] | None = None,
    currency: str = "HUF",
    buyer: Customer | None = None,
) -> InvoiceDraft:
    lines = lines or (line("24990", "gross", "27%", currency),)
    return InvoiceDraft(
        tenant_id="panzio-bella",
        sale_id="S-2026-000123",
        invoice_generation=1,
        external_key="bookinda:panzio-bella:S-2026-000123:1",
        currency=currency,
        language="hu",
        payment_method="bankcard",
        fulfillment_date=date(2026, 11, 21),
        issue_date=date(2026, 11, 21),
        due_date=date(2026, 11, 21),
        paid=True,
        customer=buyer or customer(),
        lines=lines,
        net_total=sum((x.net_amount for x in lines), Decimal(0)),
        vat_total=sum((x.vat_amount for x in lines), Decimal(0)),
        gross_total=sum((x.gross_amount for x in lines), Decimal(0)),
        comment="Bookinda sale S-2026-000123",
    )


def find(document: bytes, path: str) -> str | None:
    """Text at a slash path of xmlszamla element names (namespace added)."""
    return parse(document).findtext("/".join(N + part for part in path.split("/")))


def accepted(invoice_line: InvoiceLine, currency: str, row: int = 1) -> list[tuple[int, str]]:
    return line_errors(
        row,
        invoice_line.quantity,
        invoice_line.net_unit_price,
        invoice_line.net_amount,
        invoice_line.vat_rate,
        invoice_line.vat_amount,
        invoice_line.gross_amount,
        currency,
    )


# ---- invoices --------------------------------------------------------------------------


def test_gross_priced_huf_room_validates_and_passes_the_line_checks() -> None:
    room = line("24990", "gross", "27%", "HUF")
    document = build_invoice(conn(), draft((room,)))

    assert schema_errors(document, "xmlszamla.xsd") == []
    assert accepted(room, "HUF") == []
    assert find(document, "tetelek/tetel/afakulcs") == "27"
    assert find(document, "tetelek/tetel/bruttoErtek") == "49980"
    assert find(document, "tetelek/tetel/nettoErtek") == "39354"
    assert find(document, "tetelek/tetel/afaErtek") == "10626"
    assert find(document, "beallitasok/szamlaagentkulcs") == KEY
    assert find(document, "beallitasok/szamlaKulsoAzon") == "bookinda:panzio-bella:S-2026-000123:1"
    assert find(document, "beallitasok/valaszVerzio") == "2"
    assert find(document, "beallitasok/eszamla") == "true"
    assert find(document, "fejlec/keltDatum") == "2026-11-21"
    assert find(document, "fejlec/fizmod") == "Bankkártya"
    assert find(document, "fejlec/penznem") == "HUF"
    assert find(document, "fejlec/rendelesSzam") == "S-2026-000123"
    assert find(document, "fejlec/szamlaszamElotag") == "BELLA"
    assert find(document, "fejlec/fizetve") == "true"
    assert find(document, "fejlec/arfolyamBank") is None


def test_net_priced_eur_item_validates_with_the_mnb_rate_left_to_the_agent() -> None:
    item = line("99.99", "net", "27%", "EUR", quantity="3")
    document = build_invoice(conn(currency="EUR"), draft((item,), currency="EUR"))

    assert schema_errors(document, "xmlszamla.xsd") == []
    assert accepted(item, "EUR") == []
    assert find(document, "fejlec/penznem") == "EUR"
    assert find(document, "fejlec/arfolyamBank") == "MNB"
    # No arfolyam: with arfolyamBank=MNB the Agent takes the current MNB rate itself.
    assert find(document, "fejlec/arfolyam") is None
    assert find(document, "tetelek/tetel/nettoErtek") == "299.97"
    assert find(document, "tetelek/tetel/afaErtek") == "80.99"


@pytest.mark.parametrize(
    ("buyer", "kind", "tax_number", "eu_vat"),
    [
        (customer(), "1", "12345676-2-41", None),
        (customer("company", "HU", tax_number="12345676241"), "1", "12345676-2-41", None),
        (customer("person", email=None), "-1", None, None),
        (customer("company", "DE", eu_vat_number="DE123456789"), "6", None, "DE123456789"),
        (customer("company", "US"), "7", None, None),
    ],
)
def test_buyer_kinds(
    buyer: Customer, kind: str, tax_number: str | None, eu_vat: str | None
) -> None:
    document = build_invoice(conn(), draft(buyer=buyer))

    assert schema_errors(document, "xmlszamla.xsd") == []
    assert find(document, "vevo/adoalany") == kind
    assert find(document, "vevo/adoszam") == tax_number
    assert find(document, "vevo/adoszamEU") == eu_vat
    assert find(document, "vevo/orszag") == (
        None if buyer.address.country_code == "HU" else buyer.address.country_code
    )


@pytest.mark.parametrize(
    ("buyer", "code"),
    [
        (customer("company", "HU", tax_number=None), ErrorCode.INVALID_CUSTOMER_DATA),
        (customer("company", "HU", tax_number="1234-5"), ErrorCode.TAX_NUMBER_INVALID),
        (customer("company", "AT"), ErrorCode.INVALID_CUSTOMER_DATA),
    ],
)
def test_buyer_data_the_agent_would_refuse_costs_no_call(buyer: Customer, code: ErrorCode) -> None:
    with pytest.raises(InvoicingError) as caught:
        build_invoice(conn(), draft(buyer=buyer))
    assert caught.value.code == code


@pytest.mark.parametrize(
    ("label", "sent"),
    [
        ("AAM", "AAM"),
        ("TAM", "TAM"),
        ("F.AFA", "F.AFA"),
        ("K.AFA", "K.AFA"),
        ("KBAET", "KBAET"),
        ("EAM", "EAM"),
        ("NAM", "NAM"),
        ("EUFAD37", "EUFAD37"),
        ("HO", "HO"),
        ("EU", "EUT"),
        ("EUK", "EUKT"),
        ("ÁKK", "ATK"),
        ("MAA", "MAA"),
    ],
)
def test_special_vat_codes(label: str, sent: str) -> None:
    item = line("10000", "gross", label, "HUF", quantity="1")
    document = build_invoice(conn(), draft((item,)))

    assert schema_errors(document, "xmlszamla.xsd") == []
    assert accepted(item, "HUF") == []
    assert find(document, "tetelek/tetel/afakulcs") == sent
    assert find(document, "tetelek/tetel/afaErtek") == "0"


def test_reduced_rates_and_several_lines() -> None:
    lines = (
        line("24990", "gross", "27%", "HUF"),
        line("1500", "gross", "5%", "HUF", quantity="3"),
        line("800", "net", "18%", "HUF", quantity="1.5"),
        line("-2000", "gross", "27%", "HUF", quantity="1"),
    )
    document = build_invoice(conn(e_invoice=False, invoice_prefix=None), draft(lines))

    assert schema_errors(document, "xmlszamla.xsd") == []
    assert [accepted(x, "HUF", row) for row, x in enumerate(lines, 1)] == [[], [], [], []]
    root = parse(document)
    assert [e.text for e in root.iter(f"{N}afakulcs")] == ["27", "5", "18", "27"]
    assert find(document, "fejlec/szamlaszamElotag") is None
    assert find(document, "beallitasok/eszamla") == "false"


def test_bare_zero_percent_and_unknown_codes_are_refused_before_the_call() -> None:
    zero = replace(line("100", "gross", "AAM", "HUF"), vat="0%")
    unknown = replace(line("100", "gross", "AAM", "HUF"), vat="XYZ")
    for bad in (zero, unknown):
        with pytest.raises(InvoicingError) as caught:
            build_invoice(conn(), draft((bad,)))
        assert caught.value.code == ErrorCode.INVALID_INVOICE_DATA


def test_language_and_currency_are_checked_before_the_call() -> None:
    with pytest.raises(InvoicingError) as caught:
        build_invoice(conn(language="fi"), draft())
    assert caught.value.code == ErrorCode.UNSUPPORTED_LANGUAGE
    document = build_invoice(conn(language="cs"), draft())
    assert find(document, "fejlec/szamlaNyelve") == "cz"

    item = line("10", "net", "27%", "XXX")
    with pytest.raises(InvoicingError) as caught:
        build_invoice(conn(), draft((item,), currency="XXX"))
    assert caught.value.code == ErrorCode.UNSUPPORTED_CURRENCY


def test_control_characters_are_dropped_rather_than_breaking_the_xml() -> None:
    buyer = customer(name="Aurora\x07 Travel Kft.")
    document = build_invoice(conn(), draft(buyer=buyer))
    assert find(document, "vevo/nev") == "Aurora Travel Kft."


# ---- reverse and query -------------------------------------------------------------------


def storno(**changes: Any) -> CancelRequest:
    base: dict[str, Any] = {
        "tenant_id": "panzio-bella",
        "sale_id": "S-2026-000123",
        "invoice_generation": 1,
        "external_key": "bookinda:panzio-bella:S-2026-000123:1:storno",
        "reason": "customer dispute",
    }
    return CancelRequest(**(base | changes))


def test_reverse_names_the_original_and_never_sends_an_issue_date() -> None:
    ns = "{http://www.szamlazz.hu/xmlszamlast}"
    for request in (storno(), storno(fulfillment_date=date(2026, 11, 20), reason=None)):
        document = build_reverse(conn(), "BELLA-2026-001", request)
        root = parse(document)

        assert schema_errors(document, "xmlszamlast.xsd") == []
        assert root.findtext(f"{ns}fejlec/{ns}szamlaszam") == "BELLA-2026-001"
        assert root.find(f"{ns}fejlec/{ns}keltDatum") is None
        assert root.findtext(f"{ns}fejlec/{ns}tipus") == "SS"
        assert root.findtext(f"{ns}beallitasok/{ns}szamlaKulsoAzon") == request.external_key
        assert root.findtext(f"{ns}fejlec/{ns}megjegyzes") == request.reason
        expected = request.fulfillment_date.isoformat() if request.fulfillment_date else None
        assert root.findtext(f"{ns}fejlec/{ns}teljesitesDatum") == expected


@pytest.mark.parametrize(
    "selector",
    [{"external_key": "bookinda:x:1"}, {"number": "BELLA-2026-001"}, {"order_number": "S-1"}],
)
def test_queries_validate_with_the_key_under_the_root(selector: dict[str, str]) -> None:
    document = build_query(KEY, **selector)
    assert schema_errors(document, "xmlszamlaxml.xsd") == []
    assert parse(document).findtext("{http://www.szamlazz.hu/xmlszamlaxml}szamlaagentkulcs") == KEY


def test_a_query_needs_a_selector() -> None:
    with pytest.raises(ValueError, match="query needs"):
        build_query(KEY)


# ---- line checks ---------------------------------------------------------------------------


def codes(qty: str, unit: str, net: str, rate: str, vat: str, gross: str, cur: str) -> list[int]:
    q, u, n, r, v, g = (Decimal(x) for x in (qty, unit, net, rate, vat, gross))
    found = line_errors(4, q, u, n, r, v, g, cur)
    assert all("row 4" in message for _, message in found)
    return [code for code, _ in found]


@pytest.mark.parametrize(
    ("amounts", "expected"),
    [
        (("2", "100", "200", "27", "54", "254", "HUF"), []),
        (("2", "100", "150", "27", "41", "191", "HUF"), [262]),  # net ≠ unit × quantity
        (("1", "100", "100", "27", "30", "130", "HUF"), [263]),  # VAT ≠ net × 27%
        (("1", "100", "100", "27", "27", "128", "HUF"), [264]),  # gross ≠ net + VAT
        (("1", "10.5", "10.5", "0", "0", "10.5", "HUF"), [262, 264]),  # HUF is whole forints
        (("1", "10.5", "10.5", "0", "0", "10.5", "EUR"), []),
        (("1", "10.555", "10.555", "0", "0", "10.555", "EUR"), [262, 264]),  # cents at most
        (("3", "33.3333", "100", "27", "27", "127", "HUF"), []),  # 4-decimal unit price
    ],
)
def test_line_errors_name_the_row(amounts: tuple[str, ...], expected: list[int]) -> None:
    assert codes(*amounts) == expected


# ---- answers -------------------------------------------------------------------------------


def sample(name: str) -> bytes:
    return (SAMPLES / name).read_bytes()


def test_official_success_sample() -> None:
    answer = read_answer({}, sample("xmlszamlavalasz.xml"))
    assert answer == AgentAnswer(
        ok=True, invoice_number="XXX-2012-3", net_total=Decimal(30000), gross_total=Decimal(38100)
    )


def test_official_error_sample() -> None:
    answer = read_answer({}, sample("xmlszamlavalasz_error.xml"))
    assert not answer.ok
    assert answer.error_code == 3
    assert answer.error_message is not None
    assert answer.error_message.startswith("Bejelentkezési hiba")


def test_official_query_sample() -> None:
    record = read_query({}, sample("szamla_query.xml"))
    assert record == InvoiceRecord(
        number="D-LOLO-66",
        kind="D",
        order_number=None,
        reverses=None,
        currency="HUF",
        net_total=Decimal(464),
        gross_total=Decimal(557),
        cancelled=False,
    )


def test_query_not_found_is_reported_in_the_body_only() -> None:
    body = sample("xmlszamlavalasz_error.xml").replace(b">3<", b">7<")
    result = read_query({}, body)
    assert isinstance(result, AgentAnswer)
    assert result.error_code == 7


def test_headers_are_url_decoded_and_win_over_a_missing_body() -> None:
    headers = CIMultiDict(
        {
            "szlahu_error": "Hib%C3%A1s+sz%C3%A1mlasz%C3%A1m+el%C5%91tag",
            "szlahu_error_code": "202",
        }
    )
    answer = read_answer(headers, b"")
    assert answer == AgentAnswer(ok=False, error_code=202, error_message="Hibás számlaszám előtag")


def test_version_1_answers() -> None:
    headers = {"szlahu_szamlaszam": "BELLA-2026-001", "szlahu_bruttovegosszeg": "49980"}
    done = read_answer(headers, b"xmlagentresponse=DONE;BELLA-2026-001")
    assert done.ok
    assert done.invoice_number == "BELLA-2026-001"
    assert done.gross_total == Decimal(49980)
    assert read_answer(headers, b"%PDF-1.4 ...").invoice_number == "BELLA-2026-001"
    error = read_answer({}, b"[ERR] Hibas adat\n----------\njava.lang.Exception\n\tat x")
    assert error == AgentAnswer(ok=False, error_message="Hibas adat")


def test_down_header_wins() -> None:
    answer = read_answer({"szlahu_down": "true"}, sample("xmlszamlavalasz.xml"))
    assert answer.down
    assert not answer.ok


def test_code_56_with_a_number_is_a_success() -> None:
    body = (
        b'<?xml version="1.0" encoding="UTF-8"?><xmlszamlavalasz '
        b'xmlns="http://www.szamlazz.hu/xmlszamlavalasz"><sikeres>false</sikeres>'
        b"<hibakod><![CDATA[56]]></hibakod><hibauzenet>e-mail</hibauzenet>"
        b"<szamlaszam>BELLA-2026-004</szamlaszam><szamlabrutto>1270</szamlabrutto>"
        b"</xmlszamlavalasz>"
    )
    answer = read_answer({}, body)
    assert answer.ok
    assert answer.invoice_number == "BELLA-2026-004"


@pytest.mark.parametrize(
    "body", [b"<html>502 Bad Gateway</html>", b"Service Unavailable", b"<xmlszamlavalasz"]
)
def test_bodies_that_are_not_agent_answers_are_unreadable(body: bytes) -> None:
    with pytest.raises(UnreadableAnswer):
        read_answer({}, body)
