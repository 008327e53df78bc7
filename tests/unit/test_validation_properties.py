"""Properties: valid tax numbers pass, one-digit typos are caught, valid lines pass the Agent."""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from hypothesis import assume, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from handlers.amounts import VAT_PERCENTAGES, compute_line, currency_places
from handlers.messages import Item, Sale
from handlers.validation import (
    DEFAULT_LIMITS,
    PROVIDER_RULES,
    VALID_COUNTY_CODES,
    hu_check_digit,
    tax_number_problem,
    validate_sale,
)
from providers.base import TenantConnection

FAST = settings(max_examples=200, deadline=None)

digits = st.text(alphabet="0123456789", min_size=7, max_size=7)
counties = st.sampled_from(sorted(VALID_COUNTY_CODES))


@st.composite
def valid_tax_numbers(draw: st.DrawFn) -> str:
    if draw(st.booleans()):
        first_seven = draw(digits)
        vat_code = draw(st.sampled_from("123"))
    else:  # a VAT group id
        first_seven = "177" + draw(st.text(alphabet="0123456789", min_size=4, max_size=4))
        vat_code = "5"
    base = first_seven + str(hu_check_digit(first_seven))
    return f"{base}-{vat_code}-{draw(counties)}"


@FAST
@given(valid_tax_numbers())
def test_every_valid_tax_number_passes(number: str) -> None:
    assert tax_number_problem(number) is None


@FAST
@given(valid_tax_numbers(), st.integers(0, 7), st.integers(1, 9))
def test_any_one_digit_change_in_the_base_fails_the_check_digit(
    number: str, position: int, delta: int
) -> None:
    changed_digit = (int(number[position]) + delta) % 10
    typo = number[:position] + str(changed_digit) + number[position + 1 :]
    problem = tax_number_problem(typo)
    assert problem is not None
    assert "check digit" in problem


# ---- lines against the Számlázz.hu sandbox ----------------------------------------------------

quantities = st.decimals(min_value=Decimal("0.001"), max_value=Decimal(1000), places=3)
HUF_PRICES = st.decimals(min_value=Decimal(0), max_value=Decimal(2_000_000), places=2)
EUR_PRICES = st.decimals(min_value=Decimal(0), max_value=Decimal(20_000), places=4)


@st.composite
def item_sets(draw: st.DrawFn) -> tuple[str, str, list[Item]]:
    provider = draw(st.sampled_from(sorted(PROVIDER_RULES)))
    currency = draw(st.sampled_from(["HUF", "EUR"]))
    labels = set(PROVIDER_RULES[provider].vat_labels)
    # AAM (a subject-exempt seller) never shares an invoice with VAT-charged lines.
    labels -= {"AAM"} if draw(st.booleans()) else set(VAT_PERCENTAGES)
    prices = HUF_PRICES if currency == "HUF" else EUR_PRICES
    count = draw(st.integers(1, 6))
    items = [
        Item(
            name=f"Item {n}",
            quantity=draw(quantities),
            unit="db",
            unit_price=draw(prices),
            price_type=draw(st.sampled_from(["gross", "net"])),
            vat=draw(st.sampled_from(sorted(labels))),
        )
        for n in range(count)
    ]
    # An invoice with nothing to pay, or beyond the plausible maximum, is refused (Limits).
    total = sum(compute_line(item, currency).gross_amount for item in items)
    assume(0 < total <= DEFAULT_LIMITS.max_gross(currency))
    return provider, currency, items


def _sale(currency: str, items: list[Item]) -> Sale:
    # A buyer every label accepts: a company with a Hungarian tax number (F.AFA) and another
    # member state's EU VAT number (KBAET, EUFAD37).
    buyer: dict[str, Any] = {
        "kind": "company",
        "name": "Reise GmbH",
        "tax_number": "12345676-2-51",
        "eu_vat_number": "DE123456789",
        "address": {"country_code": "DE", "post_code": "10115", "city": "Berlin", "street": "A 1"},
    }
    return Sale.model_validate(
        {
            "id": "S-1",
            "invoice_generation": 1,
            "trigger": "auto",
            "paid_at": datetime(2026, 11, 21, tzinfo=UTC),
            "fulfillment_date": date(2026, 11, 21),
            "currency": currency,
            "payment_method": "transfer",
            "customer": buyer,
            "items": [i.model_dump() for i in items],
        }
    )


@settings(max_examples=300, deadline=None)
@given(item_sets())
def test_valid_item_sets_pass_the_szamlazz_line_checks(
    case: tuple[str, str, list[Item]],
) -> None:
    from worker.devtools.szamlazz_sandbox import line_errors

    provider, currency, items = case
    conn = TenantConnection(
        tenant_id="t", provider=provider, secret=SecretStr("k"), currency=currency
    )
    validate_sale(_sale(currency, items), conn)  # the generated sets are valid sales
    exponent = currency_places(currency).as_tuple().exponent
    for row, item in enumerate(items, start=1):
        line = compute_line(item, currency)
        assert line.net_amount + line.vat_amount == line.gross_amount
        for amount in (line.net_amount, line.vat_amount, line.gross_amount):
            assert amount.as_tuple().exponent == exponent
        errors = line_errors(
            row,
            line.quantity,
            line.net_unit_price,
            line.net_amount,
            line.vat_rate,
            line.vat_amount,
            line.gross_amount,
            currency,
        )
        assert errors == []


@settings(max_examples=200, deadline=None)
@given(item_sets())
def test_valid_item_sets_are_accepted_by_the_billingo_sandbox(
    case: tuple[str, str, list[Item]],
) -> None:
    import json

    from handlers.draft import build_draft
    from handlers.messages import SalePaid
    from providers.billingo import mapping
    from worker.devtools.billingo_sandbox import _document_errors

    provider, currency, items = case
    if provider != "billingo":
        return
    conn = TenantConnection(
        tenant_id="t", provider="billingo", secret=SecretStr("k"), currency=currency, block_id=111
    )
    sale = _sale(currency, items)
    validate_sale(sale, conn)
    event = SalePaid(
        event_id="e",
        event_type="sale.paid",
        occurred_at=datetime(2026, 11, 21, tzinfo=UTC),
        tenant_id="t",
        sale=sale,
    )
    draft = build_draft(event, conn, date(2026, 11, 21))
    mapping.validate_draft(draft)  # the client's own pre-flight agrees
    body = mapping.document_body(
        draft,
        block_id=111,
        partner_id=1,
        conversion_rate=Decimal("1" if currency == "HUF" else "400.5"),
        electronic=False,
    )
    # Through JSON, as the sandbox receives it over HTTP.
    assert _document_errors(json.loads(json.dumps(body)), [111]) == []
