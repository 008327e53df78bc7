"""Line arithmetic in exact decimals, the way the Számla Agent checks it (codes 259–264).

HUF amounts are whole forints, other currencies two decimals; halves round up.
Net-priced line: net = round(unit × qty); VAT = round(net × rate / 100); gross = net + VAT.
Gross-priced line: gross = round(unit × qty); net = round(gross × 100 / (100 + rate));
VAT = gross − net. Either way net + VAT = gross holds exactly and VAT is within half a unit of
net × rate / 100, so the provider's own checks pass.
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

from handlers.messages import Item
from providers.base import InvoiceLine

#: Percentage labels a sale may use for Hungarian VAT; special codes carry no VAT (rate 0).
VAT_PERCENTAGES: dict[str, Decimal] = {"27%": Decimal(27), "18%": Decimal(18), "5%": Decimal(5)}

#: Exemption / out-of-scope codes (CONTRACTS §4); they are invoiced with zero VAT.
SPECIAL_VAT_CODES: frozenset[str] = frozenset(
    {"AAM", "TAM", "EU", "EUK", "MAA", "F.AFA", "K.AFA", "ÁKK", "ÁTHK", "KBAET", "EAM", "NAM",
     "ATK", "EUFAD37", "EUFADE", "EUE", "HO"}
)

_UNIT_PRICE_PLACES = Decimal("0.0001")


def currency_places(currency: str) -> Decimal:
    """The smallest amount an invoice line carries: whole forints, cents otherwise."""
    return Decimal(1) if currency.upper() == "HUF" else Decimal("0.01")


def round_money(value: Decimal, currency: str) -> Decimal:
    return value.quantize(currency_places(currency), rounding=ROUND_HALF_UP)


def vat_rate(label: str) -> Decimal:
    """The percentage for arithmetic; special codes are zero-VAT. Unknown labels raise KeyError."""
    if label in VAT_PERCENTAGES:
        return VAT_PERCENTAGES[label]
    if label in SPECIAL_VAT_CODES:
        return Decimal(0)
    raise KeyError(label)


def compute_line(item: Item, currency: str) -> InvoiceLine:
    rate = vat_rate(item.vat)
    raw = item.unit_price * item.quantity
    if item.price_type == "net":
        net = round_money(raw, currency)
        vat = round_money(net * rate / 100, currency)
        gross = net + vat
    else:
        gross = round_money(raw, currency)
        net = round_money(gross * 100 / (100 + rate), currency)
        vat = gross - net
    net_unit = (net / item.quantity).quantize(_UNIT_PRICE_PLACES, rounding=ROUND_HALF_UP)
    return InvoiceLine(
        name=item.name,
        quantity=item.quantity,
        unit=item.unit,
        vat=item.vat,
        vat_rate=rate,
        price_type=item.price_type,
        unit_price=item.unit_price,
        net_unit_price=net_unit,
        net_amount=net,
        vat_amount=vat,
        gross_amount=gross,
    )


def compute_lines(items: list[Item], currency: str) -> tuple[InvoiceLine, ...]:
    return tuple(compute_line(item, currency) for item in items)
