"""Pre-flight validation: every rule, with the error code and the message a person acts on."""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import pytest
from pydantic import SecretStr

from handlers.messages import Sale
from handlers.validation import (
    ISO_COUNTRIES,
    PROVIDER_RULES,
    Limits,
    eu_vat_number_problem,
    line_arithmetic_problem,
    tax_number_problem,
    validate_sale,
)
from providers.base import InvoiceLine, TenantConnection
from providers.errors import FIXES, ErrorCode, InvoicingError
from worker.devtools.samples import COMPANY

HU_COMPANY: dict[str, Any] = COMPANY  # the contract's example buyer
DE_COMPANY: dict[str, Any] = {
    "kind": "company",
    "name": "Reise GmbH",
    "tax_number": None,
    "eu_vat_number": "DE123456789",
    "address": {"country_code": "DE", "post_code": "10115", "city": "Berlin", "street": "A 1"},
}
PERSON: dict[str, Any] = {
    "kind": "person",
    "name": "Kiss Anna",
    "address": {"country_code": "HU", "post_code": "6720", "city": "Szeged", "street": "Fő u. 2"},
}
ROOM: dict[str, Any] = {
    "name": "Double room",
    "quantity": "2",
    "unit": "night",
    "unit_price": "24990",
    "price_type": "gross",
    "vat": "27%",
}


def item(**changes: Any) -> dict[str, Any]:
    return {**ROOM, **changes}


def customer(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    address = {**base["address"], **changes.pop("address", {})}
    return {**base, **changes, "address": address}


def sale(
    customer: dict[str, Any] = HU_COMPANY,
    items: list[dict[str, Any]] | None = None,
    currency: str = "HUF",
) -> Sale:
    return Sale.model_validate(
        {
            "id": "S-1",
            "invoice_generation": 1,
            "trigger": "auto",
            "paid_at": datetime(2026, 11, 21, tzinfo=UTC),
            "fulfillment_date": date(2026, 11, 21),
            "currency": currency,
            "payment_method": "bankcard",
            "customer": customer,
            "items": items if items is not None else [ROOM],
        }
    )


def conn(
    provider: str = "szamlazz", currency: str = "HUF", language: str = "hu"
) -> TenantConnection:
    return TenantConnection.model_validate(
        {
            "tenant_id": "hotel-aurora",
            "provider": provider,
            "secret": SecretStr("k"),
            "currency": currency,
            "language": language,
        }
    )


def rejection(s: Sale, c: TenantConnection) -> InvoicingError:
    with pytest.raises(InvoicingError) as caught:
        validate_sale(s, c)
    return caught.value


# ---- Hungarian tax numbers ----------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "12345676-2-41",
        "25978221-1-02",
        "12892312-3-20",
        "12345676-2-22",
        "12345676-2-44",
        "12345676-1-51",
        "17700001-5-44",  # a VAT group id
        " 12345676-2-41 ",
    ],
)
def test_valid_hungarian_tax_numbers(value: str) -> None:
    assert tax_number_problem(value) is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("12345677-2-41", "check digit"),
        ("12892313-2-41", "the 8th digit should be 2"),
        ("12345676-7-41", "VAT code 7"),
        ("12345676-0-41", "VAT code 0"),
        ("12345676-2-99", "county code 99"),
        ("12345676-2-01", "county code 01"),
        ("12345676-2-21", "county code 21"),
        ("12345676-2-45", "county code 45"),
        ("12345676-2-00", "county code 00"),
        ("12345676-5-41", "VAT code 5 marks a VAT group id, and group ids start with 177"),
        ("12345676-4-41", "VAT code 4 is a VAT group member's own number"),
        ("17700001-4-44", "VAT group id, whose VAT code is 5, not 4"),
        ("12345676241", "must be written NNNNNNNN-N-NN: 12345676-2-41"),
        ("12345676 2 41", "must be written NNNNNNNN-N-NN: 12345676-2-41"),
        ("12345676", "only the 8-digit base"),
        ("8123456789", "personal tax id (adóazonosító jel)"),
        ("HU12345676", "belongs in the EU VAT number field"),
        ("1234-5676-241x", "not of the form NNNNNNNN-N-NN"),
        ("abc", "not of the form NNNNNNNN-N-NN"),
        ("", "not of the form NNNNNNNN-N-NN"),
    ],
)
def test_invalid_hungarian_tax_numbers(value: str, expected: str) -> None:
    problem = tax_number_problem(value)
    assert problem is not None
    assert expected in problem


# ---- EU VAT numbers -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "DE123456789",
        "ATU12345678",
        "EL123456789",
        "NL123456789B01",
        "FR12345678901",
        "FRXX345678901",
        "ESX1234567X",
        "IE1234567WA",
        "SE123456789001",
        "XI123456789",
        "HU12345676",
        "CY12345678X",
    ],
)
def test_valid_eu_vat_numbers(value: str) -> None:
    assert eu_vat_number_problem(value) is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("GR123456789", "Greek VAT numbers start with EL, not GR (EL123456789)"),
        ("US123456789", "US is not an EU member state prefix"),
        ("GB123456789", "GB is not an EU member state prefix"),
        ("DE12345678", "a DE VAT number is DE + 9 digits"),
        ("AT12345678", "a AT VAT number is AT + U and 8 digits"),
        ("NL123456789", "9 digits, B and 2 digits"),
        ("de123456789", "without spaces, in capitals: DE123456789"),
        ("DE 123 456 789", "without spaces, in capitals: DE123456789"),
        ("HU12345677", "check digit"),
        ("123456789", "must start with a member state prefix"),
        ("D", "must start with a member state prefix"),
    ],
)
def test_invalid_eu_vat_numbers(value: str, expected: str) -> None:
    problem = eu_vat_number_problem(value)
    assert problem is not None
    assert expected in problem


# ---- the happy paths ----------------------------------------------------------------------


@pytest.mark.parametrize("provider", ["billingo", "szamlazz"])
@pytest.mark.parametrize(
    ("buyer", "items", "currency"),
    [
        (HU_COMPANY, [ROOM], "HUF"),
        (
            PERSON,
            [ROOM, item(name="Breakfast", vat="5%", price_type="net", unit_price="3500")],
            "HUF",
        ),
        (DE_COMPANY, [item(vat="KBAET", price_type="net", unit_price="99.90")], "EUR"),
        (
            customer(
                DE_COMPANY, address={"country_code": "US", "post_code": "10001"}, eu_vat_number=None
            ),
            [ROOM],
            "EUR",
        ),
        (HU_COMPANY, [item(vat="F.AFA")], "HUF"),
        (HU_COMPANY, [item(vat="AAM"), item(name="Tax", vat="TAM")], "HUF"),
        (HU_COMPANY, [ROOM, item(name="Coupon", unit_price="-5000", quantity="1")], "HUF"),
        (
            customer(HU_COMPANY, tax_number="17700001-5-44", eu_vat_number="HU17700001"),
            [ROOM],
            "HUF",
        ),
        (customer(PERSON, address={"country_code": "GB", "post_code": "SW1A 1AA"}), [ROOM], "EUR"),
        (customer(PERSON, address={"country_code": "AE", "post_code": "0000"}), [ROOM], "EUR"),
        (HU_COMPANY, [ROOM, item(name="Welcome drink", unit_price="0")], "HUF"),
    ],
)
def test_valid_sales_pass(
    provider: str, buyer: dict[str, Any], items: list[dict[str, Any]], currency: str
) -> None:
    validate_sale(sale(buyer, items, currency), conn(provider, currency))


# ---- currency and language ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("provider", "sale_currency", "conn_currency", "language", "code", "expected"),
    [
        (
            "szamlazz",
            "EUR",
            "HUF",
            "hu",
            ErrorCode.CURRENCY_MISMATCH,
            "the sale is in EUR but the Számlázz.hu connection of tenant 'hotel-aurora' "
            "invoices in HUF",
        ),
        ("billingo", "HUF", "EUR", "hu", ErrorCode.CURRENCY_MISMATCH, "the sale is in HUF"),
        (
            "billingo",
            "KWD",
            "HUF",
            "hu",
            ErrorCode.UNSUPPORTED_CURRENCY,
            "sale currency 'KWD' is not one Billingo can invoice in",
        ),
        (
            "szamlazz",
            "XAU",
            "HUF",
            "hu",
            ErrorCode.UNSUPPORTED_CURRENCY,
            "sale currency 'XAU' is not one Számlázz.hu can invoice in",
        ),
        ("szamlazz", "huf", "HUF", "hu", ErrorCode.UNSUPPORTED_CURRENCY, "upper-case ISO 4217"),
        (
            "billingo",
            "HUF",
            "KWD",
            "hu",
            ErrorCode.UNSUPPORTED_CURRENCY,
            "connection of tenant 'hotel-aurora' has currency 'KWD'",
        ),
        (
            "billingo",
            "HUF",
            "HUF",
            "es",
            ErrorCode.UNSUPPORTED_LANGUAGE,
            "has language 'es', which Billingo cannot write invoices in: set one of de, en",
        ),
        (
            "szamlazz",
            "HUF",
            "HUF",
            "us",
            ErrorCode.UNSUPPORTED_LANGUAGE,
            "has language 'us', which Számlázz.hu cannot write",
        ),
        ("szamlazz", "HUF", "HUF", "cs", ErrorCode.UNSUPPORTED_LANGUAGE, "cz"),
    ],
)
def test_currency_and_language_rules(
    provider: str,
    sale_currency: str,
    conn_currency: str,
    language: str,
    code: ErrorCode,
    expected: str,
) -> None:
    error = rejection(sale(currency=sale_currency), conn(provider, conn_currency, language))
    assert error.code is code
    assert expected in error.message


@pytest.mark.parametrize(
    ("currency", "provider", "supported"),
    [
        ("KWD", "szamlazz", True),
        ("KWD", "billingo", False),
        ("VND", "szamlazz", True),
        ("UAH", "billingo", True),
    ],
)
def test_provider_tables_differ(currency: str, provider: str, supported: bool) -> None:
    assert (currency in PROVIDER_RULES[provider].currencies) is supported


# ---- customer -----------------------------------------------------------------------------

BAD_CUSTOMERS: list[tuple[dict[str, Any], str]] = [
    (
        customer(HU_COMPANY, tax_number=None),
        "company 'Aurora Travel Kft.' in Hungary has no tax number: add the company's Hungarian "
        "tax number",
    ),
    (
        customer(HU_COMPANY, tax_number="", eu_vat_number="HU12345676"),
        "(an EU VAT number does not replace it)",
    ),
    (customer(DE_COMPANY, eu_vat_number=None), "company 'Reise GmbH' in DE has no EU VAT number"),
    (
        customer(PERSON, tax_number="12345676-2-41"),
        "is a person but has tax number '12345676-2-41': a buyer with a tax number (e.g. a sole "
        "trader) is invoiced as a company",
    ),
    (customer(PERSON, tax_number="8123456789"), "personal tax id (adóazonosító jel)"),
    (customer(PERSON, eu_vat_number="DE123456789"), "is a person but has EU VAT number"),
    (customer(PERSON, address={"country_code": "XX"}), "country code 'XX' is not an ISO 3166"),
    (customer(PERSON, address={"country_code": "hu"}), "(write it in capitals: HU)"),
    (customer(PERSON, address={"country_code": "UK"}), "country code 'UK'"),
    (customer(PERSON, address={"post_code": "123"}), "Hungarian postcode '123' must be 4 digits"),
    (customer(PERSON, address={"post_code": "0999"}), "Hungarian postcode '0999'"),
    (customer(PERSON, address={"post_code": "H-1051"}), "Hungarian postcode 'H-1051'"),
    (customer(PERSON, address={"post_code": "10000"}), "Hungarian postcode '10000'"),
    (
        customer(PERSON, address={"country_code": "DE", "post_code": "1"}),
        "postcode '1' must be 3 to 10 letters or digits",
    ),
    (
        customer(PERSON, address={"country_code": "DE", "post_code": "12345678901"}),
        "postcode '12345678901'",
    ),
]


@pytest.mark.parametrize(("buyer", "expected"), BAD_CUSTOMERS)
def test_customer_rules(buyer: dict[str, Any], expected: str) -> None:
    error = rejection(sale(buyer), conn())
    assert error.code is ErrorCode.INVALID_CUSTOMER_DATA
    assert expected in error.message


@pytest.mark.parametrize("field", ["name", "city", "street"])
def test_blank_names_and_addresses_are_refused(field: str) -> None:
    # The message model refuses these already; validation holds even for a hand-built Sale.
    good = sale(PERSON)
    bad_customer = good.customer.model_copy(
        update={"name": " "}
        if field == "name"
        else {"address": good.customer.address.model_copy(update={field: " "})}
    )
    error = rejection(good.model_copy(update={"customer": bad_customer}), conn())
    assert error.code is ErrorCode.INVALID_CUSTOMER_DATA
    assert ("no name" if field == "name" else f"no {field}") in error.message


def test_iso_country_list_is_complete() -> None:
    assert len(ISO_COUNTRIES) == 250  # 249 ISO 3166-1 codes + XK
    assert {"HU", "AT", "GR", "GB", "US", "SS", "AX", "BQ", "XK"} <= ISO_COUNTRIES
    assert not {"UK", "EL", "EU", "XX"} & ISO_COUNTRIES


# ---- tax numbers on the customer ------------------------------------------------------------


@pytest.mark.parametrize(
    ("buyer", "expected"),
    [
        (
            customer(HU_COMPANY, tax_number="12345677-2-41"),
            "customer 'Aurora Travel Kft.': tax number 12345677-2-41: check digit",
        ),
        (customer(HU_COMPANY, tax_number="12345676-2-99"), "county code 99"),
        (customer(HU_COMPANY, tax_number="12345676-7-41"), "VAT code 7"),
        (customer(DE_COMPANY, eu_vat_number="GR123456789"), "start with EL, not GR"),
        (customer(DE_COMPANY, eu_vat_number="DE1234"), "DE + 9 digits"),
        (
            customer(DE_COMPANY, eu_vat_number="HU12345676"),
            "has the HU prefix; a buyer from another member state needs its own state's prefix",
        ),
        (
            customer(HU_COMPANY, eu_vat_number="HU25978221"),
            "EU VAT number HU25978221 does not match tax number 12345676-2-41 (it should be "
            "HU12345676)",
        ),
    ],
)
def test_tax_number_rules(buyer: dict[str, Any], expected: str) -> None:
    error = rejection(sale(buyer), conn())
    assert error.code is ErrorCode.TAX_NUMBER_INVALID
    assert expected in error.message


# ---- items ----------------------------------------------------------------------------------

BREAKFAST = item(name="Breakfast", unit_price="3500", quantity="2")


@pytest.mark.parametrize(
    ("provider", "buyer", "items", "expected"),
    [
        (
            "szamlazz",
            HU_COMPANY,
            [ROOM, item(name="Breakfast", vat="0%")],
            "line 2 'Breakfast': VAT '0%' is refused: NAV requires a zero-VAT line to name why",
        ),
        ("billingo", HU_COMPANY, [item(vat="0")], "line 1 'Double room': VAT '0' is refused"),
        (
            "szamlazz",
            HU_COMPANY,
            [item(vat="10%")],
            "VAT rate '10%' is not a Hungarian VAT rate or code: use 27%, 18%, 5%",
        ),
        ("szamlazz", HU_COMPANY, [item(vat="XYZ")], "VAT label 'XYZ' is not a Hungarian"),
        ("szamlazz", HU_COMPANY, [item(vat="aam")], "VAT label 'aam'"),
        (
            "szamlazz",
            HU_COMPANY,
            [item(vat="MAA")],
            "VAT code MAA has no Számlázz.hu equivalent: name the exemption",
        ),
        (
            "szamlazz",
            HU_COMPANY,
            [BREAKFAST, item(quantity="0")],
            "line 2 'Double room': quantity 0 must be above zero",
        ),
        ("billingo", HU_COMPANY, [item(quantity="-1")], "quantity -1 must be above zero"),
        (
            "szamlazz",
            HU_COMPANY,
            [item(vat="KBAET")],
            "line 1 'Double room': VAT code KBAET (intra-EU supply) needs the buyer's EU VAT "
            "number",
        ),
        ("billingo", HU_COMPANY, [item(vat="EU")], "VAT code EU (intra-EU supply)"),
        ("szamlazz", PERSON, [item(vat="EUFAD37")], "VAT code EUFAD37"),
        (
            "szamlazz",
            DE_COMPANY,
            [item(vat="F.AFA")],
            "VAT code F.AFA (domestic reverse charge) needs a company buyer with its full "
            "Hungarian tax number",
        ),
        ("szamlazz", PERSON, [item(vat="F.AFA")], "F.AFA"),
        (
            "szamlazz",
            HU_COMPANY,
            [ROOM, item(name="Souvenir", vat="AAM")],
            "line 2 'Souvenir': AAM (subject-exempt seller) cannot be on one invoice with "
            "VAT-charged lines (line 1 'Double room' is 27%)",
        ),
        (
            "szamlazz",
            HU_COMPANY,
            [ROOM, item(name="Coupon", unit_price="-1", vat="5%")],
            "line 2 'Coupon': a discount (negative unit price) must carry the VAT label of the "
            "lines it reduces, and no full-price line has 5%",
        ),
        (
            "szamlazz",
            HU_COMPANY,
            [ROOM, item(name="Coupon", unit_price="-50000", quantity="1")],
            "line 2 'Coupon': the discounts on 27% lines (50000 HUF) exceed those lines' total "
            "(49980 HUF)",
        ),
        (
            "szamlazz",
            HU_COMPANY,
            [item(quantity="1000", unit_price="1E+14")],
            "line 1 'Double room': gross 100000000000000000 HUF (unit price 1E+14) is beyond "
            "the plausible maximum of 500000000 HUF per invoice",
        ),
    ],
)
def test_item_rules(
    provider: str, buyer: dict[str, Any], items: list[dict[str, Any]], expected: str
) -> None:
    error = rejection(sale(buyer, items), conn(provider))
    assert error.code is ErrorCode.INVALID_INVOICE_DATA
    assert expected in error.message


# ---- order and fixes ------------------------------------------------------------------------


def test_first_problem_wins_in_the_documented_order() -> None:
    everything_wrong = sale(
        customer(HU_COMPANY, tax_number="12345677-2-41", address={"post_code": "1"}),
        [item(vat="0%")],
        currency="EUR",
    )
    assert rejection(everything_wrong, conn()).code is ErrorCode.CURRENCY_MISMATCH
    assert rejection(everything_wrong, conn(currency="EUR")).code is (
        ErrorCode.INVALID_CUSTOMER_DATA
    )
    fixed_address = sale(
        customer(HU_COMPANY, tax_number="12345677-2-41"), [item(vat="0%")], currency="EUR"
    )
    assert rejection(fixed_address, conn(currency="EUR")).code is ErrorCode.TAX_NUMBER_INVALID
    fixed_tax = sale(HU_COMPANY, [item(vat="0%")], currency="EUR")
    assert rejection(fixed_tax, conn(currency="EUR")).code is ErrorCode.INVALID_INVOICE_DATA


@pytest.mark.parametrize(
    "code",
    [
        ErrorCode.CURRENCY_MISMATCH,
        ErrorCode.UNSUPPORTED_CURRENCY,
        ErrorCode.UNSUPPORTED_LANGUAGE,
        ErrorCode.INVALID_CUSTOMER_DATA,
        ErrorCode.TAX_NUMBER_INVALID,
        ErrorCode.INVALID_INVOICE_DATA,
    ],
)
def test_every_rejection_code_has_a_fix(code: ErrorCode) -> None:
    assert InvoicingError(code, "x").fix == FIXES[code]
    assert "replay" in FIXES[code]


@pytest.mark.parametrize("provider", ["billingo", "szamlazz"])
def test_provider_vat_tables_cover_the_rates(provider: str) -> None:
    labels = PROVIDER_RULES[provider].vat_labels
    assert {"27%", "18%", "5%", "AAM", "TAM", "KBAET", "F.AFA"} <= labels.keys()
    assert "0%" not in labels


@pytest.mark.parametrize(
    ("provider", "label", "mapped"),
    [
        ("billingo", "27%", "27%"),
        ("billingo", "KBAET", "EU"),
        ("billingo", "EUFAD37", "ÁTHK"),
        ("szamlazz", "27%", "27"),
        ("szamlazz", "EU", "EUT"),
        ("szamlazz", "ÁTHK", "ATK"),
    ],
)
def test_vat_labels_are_mapped_per_provider(provider: str, label: str, mapped: str) -> None:
    assert PROVIDER_RULES[provider].vat_labels[label] == mapped


def test_amounts_are_decimal_not_float() -> None:
    validate_sale(sale(items=[item(unit_price="100.1", quantity="3", price_type="net")]), conn())
    assert Decimal("0.1") * 3 == Decimal("0.3")


def line(net_unit: str, quantity: str, net: str, rate: str, vat: str, gross: str) -> InvoiceLine:
    return InvoiceLine(
        name="Room",
        quantity=Decimal(quantity),
        unit="night",
        vat="27%",
        vat_rate=Decimal(rate),
        price_type="net",
        unit_price=Decimal(net_unit),
        net_unit_price=Decimal(net_unit),
        net_amount=Decimal(net),
        vat_amount=Decimal(vat),
        gross_amount=Decimal(gross),
    )


@pytest.mark.parametrize(
    ("bad", "currency", "expected"),
    [
        (
            line("1000", "3", "2998", "27", "809", "3807"),
            "HUF",
            "net 2998 is not net unit price 1000 × quantity 3 (Számla Agent check 259)",
        ),
        (
            line("1000", "1", "1000", "27", "272", "1272"),
            "HUF",
            "VAT 272 is not 27% of net 1000 (Számla Agent check 260)",
        ),
        (
            line("1000", "1", "1000", "27", "270", "1271"),
            "HUF",
            "gross 1271 is not net 1000 + VAT 270 (Számla Agent check 261)",
        ),
        (
            line("10.5", "1", "10.5", "0", "0", "10.5"),
            "HUF",
            "net amount 10.5 must have no decimals",
        ),
        (line("10.5", "1", "10.50", "0", "0.00", "10.5"), "EUR", "gross amount 10.5 must have 2"),
    ],
)
def test_line_arithmetic_checks(bad: InvoiceLine, currency: str, expected: str) -> None:
    problem = line_arithmetic_problem(bad, currency)
    assert problem is not None
    assert expected in problem


@pytest.mark.parametrize(
    ("good", "currency"),
    [
        (line("1000", "3", "3000", "27", "810", "3810"), "HUF"),
        (line("1000", "1", "1000", "27", "271", "1271"), "HUF"),  # within one forint
        (line("14.2857", "7", "100.00", "5", "5.00", "105.00"), "EUR"),
        (line("0.0000", "100000", "1", "0", "0", "1"), "HUF"),  # 4-decimal unit price drift
    ],
)
def test_line_arithmetic_tolerances(good: InvoiceLine, currency: str) -> None:
    assert line_arithmetic_problem(good, currency) is None


# ---- plausibility (issue 13): implausible sales are refused before any provider call ------


def with_dates(s: Sale, *, paid_at: datetime, fulfillment: date) -> Sale:
    return s.model_copy(update={"paid_at": paid_at, "fulfillment_date": fulfillment})


@pytest.mark.parametrize(
    ("items", "currency", "expected"),
    [
        # 2 × 10^15 HUF arrives as a plausible-looking string on a line of its own.
        (
            [item(unit_price="999999999999999", quantity="2")],
            "HUF",
            "beyond the plausible maximum of 500000000 HUF",
        ),
        (
            [
                item(unit_price="250000001", quantity="1"),
                item(name="Spa", unit_price="250000001", quantity="1"),
            ],
            "HUF",
            "gross total 500000002 HUF",
        ),
        ([item(unit_price="2000000.01", quantity="1", vat="KBAET")], "EUR", "2000000 EUR"),
        # A huge line hidden behind a discount of the same size.
        (
            [
                item(unit_price="900000000"),
                item(name="Coupon", unit_price="-899999000", quantity="1"),
            ],
            "HUF",
            "line 1 'Double room': gross 1800000000 HUF",
        ),
        ([item(unit_price="0")], "HUF", "gross total is 0 HUF"),
        ([ROOM, item(name="Coupon", unit_price="-49980", quantity="1")], "HUF", "is 0 HUF"),
        ([item(unit_price="0.001", quantity="1", vat="KBAET")], "EUR", "is 0 EUR"),
    ],
)
def test_implausible_totals_are_invalid_invoice_data(
    items: list[dict[str, Any]], currency: str, expected: str
) -> None:
    buyer = DE_COMPANY if currency == "EUR" else HU_COMPANY
    error = rejection(sale(buyer, items, currency), conn(currency=currency))
    assert error.code is ErrorCode.INVALID_INVOICE_DATA
    assert expected in error.message


def test_the_limits_are_settings() -> None:
    limits = Limits(max_gross_huf=Decimal(100_000), fulfillment_window_days=0)
    validate_sale(sale(items=[item(unit_price="50000", quantity="2")]), conn(), limits)
    with pytest.raises(InvoicingError) as caught:
        validate_sale(sale(items=[item(unit_price="50001", quantity="2")]), conn(), limits)
    assert "plausible maximum of 100000 HUF" in caught.value.message
    late = with_dates(
        sale(), paid_at=datetime(2026, 11, 21, tzinfo=UTC), fulfillment=date(2026, 11, 22)
    )
    with pytest.raises(InvoicingError) as caught:
        validate_sale(late, conn(), limits)
    assert "at most 0 days apart" in caught.value.message


@pytest.mark.parametrize(
    ("fulfillment", "expected"),
    [
        (date(9999, 12, 31), "sale.fulfillment_date 9999-12-31 is 2912118 days after"),
        (date(1900, 1, 1), "sale.fulfillment_date 1900-01-01 is 46345 days before"),
        (date(2027, 12, 27), "401 days after"),
        (date(2025, 10, 16), "401 days before"),
    ],
)
def test_fulfillment_dates_far_from_payment_are_refused(fulfillment: date, expected: str) -> None:
    s = with_dates(sale(), paid_at=datetime(2026, 11, 21, 9, tzinfo=UTC), fulfillment=fulfillment)
    error = rejection(s, conn())
    assert error.code is ErrorCode.INVALID_INVOICE_DATA
    assert expected in error.message


@pytest.mark.parametrize("fulfillment", [date(2027, 12, 26), date(2025, 10, 17)])
def test_fulfillment_dates_within_the_window_pass(fulfillment: date) -> None:
    s = with_dates(sale(), paid_at=datetime(2026, 11, 21, 9, tzinfo=UTC), fulfillment=fulfillment)
    validate_sale(s, conn())


@pytest.mark.parametrize(
    "email",
    [
        "anna",
        "anna@",
        "@example.hu",
        "anna@example",
        "anna@@example.hu",
        "anna @example.hu",
        "anna@exa_mple.hu",
        "anna..kiss@example.hu",
        "anna@example.hu.",
        "árvíztűrő@example.hu",
        "a" * 65 + "@example.hu",
    ],
)
def test_malformed_email_addresses_are_refused_before_any_call(email: str) -> None:
    error = rejection(sale(customer(PERSON, email=email)), conn())
    assert error.code is ErrorCode.INVALID_CUSTOMER_DATA
    assert "e-mail address" in error.message


@pytest.mark.parametrize(
    "email",
    [
        None,
        "",
        "anna@example.hu",
        "anna.kiss+booking@mail.example.co.uk",
        "o'brien@xn--bcher-kva.de",
    ],
)
def test_well_formed_email_addresses_pass(email: str | None) -> None:
    validate_sale(sale(customer(PERSON, email=email)), conn())


@pytest.mark.parametrize(
    "paid", [datetime(9999, 12, 31, tzinfo=UTC), datetime(1900, 1, 1, tzinfo=UTC)]
)
def test_a_payment_date_far_from_the_invoice_date_is_refused(paid: datetime) -> None:
    # Paid in 9999 with a fulfilment date to match: within each other's window, but the
    # invoice is dated today.
    s = with_dates(sale(), paid_at=paid, fulfillment=paid.date())
    validate_sale(s, conn())  # without the invoice's date there is nothing to compare with
    with pytest.raises(InvoicingError) as caught:
        validate_sale(s, conn(), today=date(2026, 11, 21))
    assert caught.value.code is ErrorCode.INVALID_INVOICE_DATA
    assert f"sale.paid_at {paid.date().isoformat()}" in caught.value.message
