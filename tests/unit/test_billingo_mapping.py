"""Pure Billingo mapping: sale → partner/document JSON, answers → values, errors → codes."""

from __future__ import annotations

import json
from datetime import date
from decimal import Decimal
from typing import Any

import pytest

from handlers.amounts import compute_lines
from handlers.messages import Customer, Item, PaymentMethod
from providers.base import InvoiceDraft
from providers.billingo import mapping
from providers.errors import ErrorCode, InvoicingError

HU_COMPANY: dict[str, Any] = {
    "kind": "company",
    "name": "Aurora Travel Kft.",
    "email": "billing@aurora.example",
    "tax_number": "12345676-2-41",
    "address": {
        "country_code": "HU",
        "post_code": "1051",
        "city": "Budapest",
        "street": "Nádor utca 7.",
    },
}


def make_customer(**changes: Any) -> Customer:
    return Customer.model_validate({**HU_COMPANY, **changes})


def make_draft(
    *,
    key: str = "bookinda:hotel-aurora:S-1:1",
    currency: str = "HUF",
    vat: str = "27%",
    customer: Customer | None = None,
    payment_method: PaymentMethod = "bankcard",
    language: str = "hu",
    unit_price: str = "24990",
) -> InvoiceDraft:
    items = [
        Item.model_validate(
            {
                "name": "Double room, 2 nights",
                "quantity": "2",
                "unit": "night",
                "unit_price": unit_price,
                "price_type": "gross",
                "vat": vat,
            }
        )
    ]
    lines = compute_lines(items, currency)
    return InvoiceDraft(
        tenant_id="hotel-aurora",
        sale_id="S-1",
        invoice_generation=1,
        external_key=key,
        currency=currency,
        language=language,
        payment_method=payment_method,
        fulfillment_date=date(2026, 11, 21),
        issue_date=date(2026, 11, 21),
        due_date=date(2026, 11, 21),
        paid=True,
        customer=customer or make_customer(),
        lines=lines,
        net_total=sum((ln.net_amount for ln in lines), start=Decimal(0)),
        vat_total=sum((ln.vat_amount for ln in lines), start=Decimal(0)),
        gross_total=sum((ln.gross_amount for ln in lines), start=Decimal(0)),
        comment="Bookinda sale S-1",
    )


# ---- partner ---------------------------------------------------------------------------


def test_hungarian_company_has_tax_number_type() -> None:
    body = mapping.partner_body(make_customer())
    assert body == {
        "name": "Aurora Travel Kft.",
        "address": {
            "country_code": "HU",
            "post_code": "1051",
            "city": "Budapest",
            "address": "Nádor utca 7.",
        },
        "emails": ["billing@aurora.example"],
        "taxcode": "12345676-2-41",
        "tax_type": "HAS_TAX_NUMBER",
    }


def test_hungarian_person_without_tax_number() -> None:
    body = mapping.partner_body(make_customer(kind="person", tax_number=None, email=None))
    assert body["tax_type"] == "NO_TAX_NUMBER"
    assert body["taxcode"] == ""
    assert body["emails"] == []


def test_foreign_customer_uses_eu_vat_number() -> None:
    address = {**HU_COMPANY["address"], "country_code": "de"}
    customer = make_customer(tax_number=None, eu_vat_number="DE123456789", address=address)
    body = mapping.partner_body(customer)
    assert body["tax_type"] == "FOREIGN"
    assert body["taxcode"] == "DE123456789"
    assert body["address"]["country_code"] == "DE"


def test_canonical_ignores_key_order() -> None:
    assert mapping.canonical({"a": 1, "b": "é"}) == mapping.canonical({"b": "é", "a": 1})


# ---- document --------------------------------------------------------------------------


def test_document_body_for_huf_invoice() -> None:
    body = mapping.document_body(
        make_draft(), block_id=111, partner_id=7, conversion_rate=Decimal(1), electronic=True
    )
    assert body == {
        "vendor_id": "bookinda:hotel-aurora:S-1:1",
        "partner_id": 7,
        "block_id": 111,
        "type": "invoice",
        "fulfillment_date": "2026-11-21",
        "due_date": "2026-11-21",
        "payment_method": "bankcard",
        "language": "hu",
        "currency": "HUF",
        "conversion_rate": 1,
        "electronic": True,
        "paid": True,
        "items": [
            {
                "name": "Double room, 2 nights",
                "unit_price": 24990,
                "unit_price_type": "gross",
                "quantity": 2,
                "unit": "night",
                "vat": "27%",
            }
        ],
        "comment": "Bookinda sale S-1",
    }
    json.dumps(body)  # must be sendable as is


def test_document_body_keeps_fractional_prices_and_rates() -> None:
    draft = make_draft(currency="EUR", unit_price="62.45")
    body = mapping.document_body(
        draft, block_id=1, partner_id=2, conversion_rate=Decimal("400.5"), electronic=False
    )
    assert body["conversion_rate"] == 400.5
    assert body["items"][0]["unit_price"] == 62.45


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ("cash", "cash"),
        ("bankcard", "bankcard"),
        ("transfer", "wire_transfer"),
        ("szep_card", "szep_card"),
        ("online", "online_bankcard"),
    ],
)
def test_payment_methods(method: PaymentMethod, expected: str) -> None:
    body = mapping.document_body(
        make_draft(payment_method=method),
        block_id=1,
        partner_id=2,
        conversion_rate=Decimal(1),
        electronic=False,
    )
    assert body["payment_method"] == expected


@pytest.mark.parametrize(
    ("label", "vat", "entitlement"),
    [
        ("27%", "27%", None),
        ("18%", "18%", None),
        ("5%", "5%", None),
        ("AAM", "AAM", "AAM"),
        ("TAM", "TAM", "TAM"),
        ("EU", "EU", "KBAET"),
        ("EUK", "EUK", "EAM"),
        ("MAA", "MAA", None),
        ("F.AFA", "F.AFA", None),
        ("K.AFA", "K.AFA", "TRAVEL_AGENCY"),
        ("ÁTHK", "ÁTHK", "ATK"),
        ("KBAET", "EU", "KBAET"),
        ("EUFAD37", "ÁTHK", "EUFAD37"),
    ],
)
def test_vat_labels(label: str, vat: str, entitlement: str | None) -> None:
    assert mapping.vat(label) == (vat, entitlement)
    item = mapping.item_body(make_draft(vat=label).lines[0])
    assert item["vat"] == vat
    assert item.get("entitlement") == entitlement


def test_every_special_code_maps_into_billingo_enums() -> None:
    for vat, entitlement in mapping.SPECIAL_VAT.values():
        assert vat in mapping.VAT_VALUES
        assert entitlement is None or entitlement in mapping.ENTITLEMENTS


@pytest.mark.parametrize("label", ["0%", "12%", "bogus"])
def test_unknown_vat_is_invalid_invoice_data(label: str) -> None:
    with pytest.raises(InvoicingError) as caught:
        mapping.vat(label)
    assert caught.value.code is ErrorCode.INVALID_INVOICE_DATA


@pytest.mark.parametrize(
    ("label", "code"), [("hu", "hu"), ("EN", "en"), ("en-US", "us"), ("de_AT", "de")]
)
def test_languages(label: str, code: str) -> None:
    assert mapping.language(label) == code


def test_unsupported_language_and_currency() -> None:
    with pytest.raises(InvoicingError) as lang:
        mapping.validate_draft(make_draft(language="pt"))
    assert lang.value.code is ErrorCode.UNSUPPORTED_LANGUAGE
    with pytest.raises(InvoicingError) as cur:
        mapping.validate_draft(make_draft(currency="XAU"))
    assert cur.value.code is ErrorCode.UNSUPPORTED_CURRENCY


# ---- answers ---------------------------------------------------------------------------


def test_issued_invoice_rounds_money_to_the_currency() -> None:
    doc = {
        "id": 5001,
        "invoice_number": "B111-2026-000001",
        "gross_total": 49980.0,
        "currency": "HUF",
        "cancelled": False,
        "type": "invoice",
    }
    issued = mapping.issued_invoice(doc)
    assert issued.document_id == "5001"
    assert str(issued.gross_total) == "49980"
    assert not issued.cancelled
    eur = mapping.issued_invoice({**doc, "gross_total": 124.9, "currency": "EUR"})
    assert str(eur.gross_total) == "124.90"


def test_cancellation_and_related_ids() -> None:
    storno = {"id": 9, "invoice_number": "B111-2026-000002", "related_documents": [{"id": 5}]}
    assert mapping.cancellation(storno).document_id == "9"
    assert mapping.cancellation(storno).kind == "cancel"
    assert mapping.related_ids(storno) == [5]
    assert mapping.related_ids({}) == []


def test_conversion_rate_reads_the_misspelt_field() -> None:
    assert mapping.conversion_rate({"conversation_rate": 400.5}) == Decimal("400.5")
    with pytest.raises(ValueError, match="conversion rate"):
        mapping.conversion_rate({"conversation_rate": 0})


# ---- errors ----------------------------------------------------------------------------

ERROR = '{"error":{"message":"%s"}}'


def _error(status: int, text: str, operation: str = "create_document", **kw: Any) -> InvoicingError:
    return mapping.error_from_response(status, text, operation=operation, **kw)


@pytest.mark.parametrize(
    ("status", "text", "code"),
    [
        (401, ERROR % "Authorization information is missing or invalid.", ErrorCode.AUTH_FAILED),
        (402, ERROR % "You do not have subscription", ErrorCode.SUBSCRIPTION_REQUIRED),
        (403, ERROR % "Forbidden", ErrorCode.AUTH_FAILED),
        (404, ERROR % "Not found", ErrorCode.PROVIDER_REJECTED),
        (400, ERROR % "The request is malformed.", ErrorCode.PROVIDER_REJECTED),
        (400, ERROR % "Daily API quota exceeded", ErrorCode.RATE_LIMITED),
        (400, ERROR % "API limit reached", ErrorCode.RATE_LIMITED),
        (429, ERROR % "Too many requests", ErrorCode.RATE_LIMITED),
        (500, '{"error":{"message":"Internal","trace_id":"abc"}}', ErrorCode.PROVIDER_UNAVAILABLE),
        (502, "<html><body><h1>502 Bad Gateway</h1></body></html>", ErrorCode.PROVIDER_UNAVAILABLE),
        (503, "", ErrorCode.PROVIDER_UNAVAILABLE),
        (504, "upstream timed out", ErrorCode.PROVIDER_UNAVAILABLE),
        (418, "I'm a teapot", ErrorCode.PROVIDER_REJECTED),
        (401, '{"message":"Unauthenticated."}', ErrorCode.AUTH_FAILED),
    ],
)
def test_status_codes(status: int, text: str, code: ErrorCode) -> None:
    assert _error(status, text).code is code


def test_403_message_names_scope_and_account() -> None:
    message = _error(403, ERROR % "Forbidden").message
    assert "write scope" in message
    assert "another Billingo account" in message


def test_server_error_keeps_trace_id_and_marks_outcome_unknown_for_writes() -> None:
    text = '{"error":{"message":"Internal Server Error.","trace_id":"664b218f"}}'
    create = _error(500, text, operation="create_document")
    assert "664b218f" in create.message
    assert create.outcome_unknown
    assert _error(500, text, operation="cancel_document").outcome_unknown
    assert not _error(500, text, operation="find_document").outcome_unknown
    assert not _error(422, '{"message":"x","errors":[]}').outcome_unknown


def test_html_body_is_shortened_and_stripped() -> None:
    error = _error(502, "<html><head><title>502</title></head><body>" + "x" * 1000 + "</body>")
    assert "<" not in error.message
    assert len(error.message) < 300


def test_retry_after() -> None:
    assert _error(429, ERROR % "Too many", retry_after="17").retry_after == 17.0
    assert _error(429, ERROR % "Too many").retry_after is None
    assert _error(429, ERROR % "Too many", retry_after="soon").retry_after is None


def _validation(*fields: str) -> str:
    errors = [{"field": f, "message": f"The {f} is invalid."} for f in fields]
    return json.dumps({"message": "Validation Failed", "errors": errors})


@pytest.mark.parametrize(
    ("fields", "operation", "code"),
    [
        (["block_id"], "create_document", ErrorCode.DOCUMENT_BLOCK_NOT_FOUND),
        (["items.0.vat", "block_id"], "create_document", ErrorCode.DOCUMENT_BLOCK_NOT_FOUND),
        (["currency"], "create_document", ErrorCode.UNSUPPORTED_CURRENCY),
        (["conversion_rate"], "create_document", ErrorCode.UNSUPPORTED_CURRENCY),
        (["language"], "create_document", ErrorCode.UNSUPPORTED_LANGUAGE),
        (["partner_id"], "create_document", ErrorCode.INVALID_CUSTOMER_DATA),
        (["address.post_code"], "create_partner", ErrorCode.INVALID_CUSTOMER_DATA),
        (["name"], "create_partner", ErrorCode.INVALID_CUSTOMER_DATA),
        (["taxcode"], "create_partner", ErrorCode.TAX_NUMBER_INVALID),
        (["items.0.vat"], "create_document", ErrorCode.INVALID_INVOICE_DATA),
        ([], "create_document", ErrorCode.INVALID_INVOICE_DATA),
    ],
)
def test_validation_errors(fields: list[str], operation: str, code: ErrorCode) -> None:
    error = _error(422, _validation(*fields), operation=operation)
    assert error.code is code
    for field in fields:
        assert field in error.message


def test_validation_error_in_the_wrapped_shape() -> None:
    error = _error(422, ERROR % "The given data was invalid.")
    assert error.code is ErrorCode.INVALID_INVOICE_DATA
    assert "The given data was invalid." in error.message
