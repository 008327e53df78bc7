"""Line arithmetic: exact decimals, whole forints, the Számla Agent's 259–264 relations."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from handlers.amounts import (
    SPECIAL_VAT_CODES,
    VAT_PERCENTAGES,
    compute_line,
    compute_lines,
    currency_places,
    round_money,
    vat_rate,
)
from handlers.messages import Item


def item(**changes: Any) -> Item:
    base: dict[str, Any] = {
        "name": "Room",
        "quantity": "1",
        "unit": "night",
        "unit_price": "1000",
        "price_type": "net",
        "vat": "27%",
    }
    return Item.model_validate({**base, **changes})


D = Decimal


@pytest.mark.parametrize(
    ("changes", "currency", "net", "vat", "gross", "net_unit"),
    [
        ({"quantity": "3"}, "HUF", "3000", "810", "3810", "1000.0000"),
        (
            {"unit_price": "24990", "quantity": "2", "price_type": "gross"},
            "HUF",
            "39354",
            "10626",
            "49980",
            "19677.0000",
        ),
        ({"unit_price": "3", "price_type": "gross"}, "HUF", "2", "1", "3", "2.0000"),
        # 2 Ft gross at 27% has no net whose rounded VAT adds up: the nearest net is kept.
        ({"unit_price": "2", "price_type": "gross"}, "HUF", "2", "0", "2", "2.0000"),
        (
            {"unit_price": "10", "price_type": "gross", "vat": "18%"},
            "EUR",
            "8.47",
            "1.53",
            "10.00",
            "8.4700",
        ),
        ({"unit_price": "99.90", "vat": "KBAET"}, "EUR", "99.90", "0.00", "99.90", "99.9000"),
        (
            {"unit_price": "99.90", "vat": "AAM", "price_type": "gross"},
            "EUR",
            "99.90",
            "0.00",
            "99.90",
            "99.9000",
        ),
        ({"unit_price": "0.5"}, "HUF", "1", "0", "1", "0.5000"),
        ({"unit_price": "0.005"}, "EUR", "0.01", "0.00", "0.01", "0.0050"),
        ({"unit_price": "-1000"}, "HUF", "-1000", "-270", "-1270", "-1000.0000"),
        ({"unit_price": "-0.5"}, "HUF", "-1", "0", "-1", "-0.5000"),
        ({"unit_price": "0.333", "quantity": "3"}, "EUR", "1.00", "0.27", "1.27", "0.3330"),
        ({"unit_price": "0.123456", "quantity": "3"}, "EUR", "0.37", "0.10", "0.47", "0.1233"),
        (
            {"unit_price": "100", "quantity": "7", "price_type": "gross", "vat": "5%"},
            "HUF",
            "667",
            "33",
            "700",
            "95.2857",
        ),
        (
            {"unit_price": "12.5", "quantity": "1.5", "vat": "5%"},
            "EUR",
            "18.75",
            "0.94",
            "19.69",
            "12.5000",
        ),
    ],
)
def test_compute_line(
    changes: dict[str, Any], currency: str, net: str, vat: str, gross: str, net_unit: str
) -> None:
    line = compute_line(item(**changes), currency)
    assert (line.net_amount, line.vat_amount, line.gross_amount) == (D(net), D(vat), D(gross))
    assert str(line.net_unit_price) == net_unit
    assert line.net_amount + line.vat_amount == line.gross_amount
    places = currency_places(currency).as_tuple().exponent
    for amount in (line.net_amount, line.vat_amount, line.gross_amount):
        assert amount.as_tuple().exponent == places
        assert not amount.is_signed() or amount != 0  # never "-0"


def test_line_keeps_the_sale_values() -> None:
    line = compute_line(item(name="Spa", quantity="2", unit="db", vat="18%"), "HUF")
    assert (line.name, line.quantity, line.unit, line.vat, line.vat_rate) == (
        "Spa",
        D(2),
        "db",
        "18%",
        D(18),
    )
    assert (line.price_type, line.unit_price) == ("net", D(1000))


def test_zero_quantity_is_refused_with_a_clear_error() -> None:
    with pytest.raises(ValueError, match="quantity 0"):
        compute_line(item(quantity="0"), "HUF")


def test_compute_lines_keeps_order() -> None:
    lines = compute_lines([item(name="A"), item(name="B", vat="5%")], "HUF")
    assert [(line.name, line.vat_amount) for line in lines] == [("A", D(270)), ("B", D(50))]


@pytest.mark.parametrize(
    ("value", "currency", "expected"),
    [
        ("2.5", "HUF", "3"),
        ("-2.5", "HUF", "-3"),
        ("-0.3", "HUF", "0"),
        ("1.005", "EUR", "1.01"),
        ("1.004", "eur", "1.00"),
        ("7", "huf", "7"),
    ],
)
def test_round_money(value: str, currency: str, expected: str) -> None:
    assert str(round_money(D(value), currency)) == expected


@pytest.mark.parametrize(
    ("label", "rate"),
    [("27%", D(27)), ("18%", D(18)), ("5%", D(5)), ("AAM", D(0)), ("F.AFA", D(0))],
)
def test_vat_rate(label: str, rate: Decimal) -> None:
    assert vat_rate(label) == rate


@pytest.mark.parametrize("label", ["0%", "10%", "27", "aam", ""])
def test_vat_rate_of_unknown_label(label: str) -> None:
    with pytest.raises(KeyError):
        vat_rate(label)


def test_label_tables() -> None:
    assert set(VAT_PERCENTAGES) == {"27%", "18%", "5%"}
    assert {"AAM", "TAM", "EU", "EUK", "MAA", "F.AFA", "K.AFA"} <= SPECIAL_VAT_CODES
    assert not set(VAT_PERCENTAGES) & SPECIAL_VAT_CODES
