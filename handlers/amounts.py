"""Line arithmetic in exact decimals, the way the Számla Agent checks it (codes 259–264).

HUF amounts are whole forints, other currencies two decimals; halves round away from zero
(so a negative discount line mirrors its positive twin).
Net-priced line: net = round(unit × qty); VAT = round(net × rate / 100); gross = net + VAT;
the net unit price is the sale's own unit price.
Gross-priced line: gross = round(unit × qty); net is the whole amount nearest to
gross × 100 / (100 + rate) for which VAT = gross − net equals round(net × rate / 100), when
such a net exists (it does for all but a few gross amounts); otherwise the nearest net, and VAT
is then within 0.635 of a unit of net × rate / 100. Either way net + VAT = gross holds exactly.
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

from handlers.messages import Item
from providers.base import InvoiceLine
from providers.money import currency_places as currency_places
from providers.money import round_money as round_money

#: Percentage labels a sale may use for Hungarian VAT; special codes carry no VAT (rate 0).
VAT_PERCENTAGES: dict[str, Decimal] = {"27%": Decimal(27), "18%": Decimal(18), "5%": Decimal(5)}

#: Exemption / out-of-scope codes (CONTRACTS §4); they are invoiced with zero VAT.
SPECIAL_VAT_CODES: frozenset[str] = frozenset(
    {
        "AAM",
        "TAM",
        "EU",
        "EUK",
        "MAA",
        "F.AFA",
        "K.AFA",
        "ÁKK",
        "ÁTHK",
        "KBAET",
        "EAM",
        "NAM",
        "ATK",
        "EUFAD37",
        "EUFADE",
        "EUE",
        "HO",
    }
)

#: Unit prices travel with at most four decimals (Számla Agent nettoEgysegar, Billingo).
UNIT_PRICE_PLACES = Decimal("0.0001")


def vat_rate(label: str) -> Decimal:
    """The percentage for arithmetic; special codes are zero-VAT. Unknown labels raise KeyError."""
    if label in VAT_PERCENTAGES:
        return VAT_PERCENTAGES[label]
    if label in SPECIAL_VAT_CODES:
        return Decimal(0)
    raise KeyError(label)


def _net_of_gross(gross: Decimal, rate: Decimal, currency: str) -> Decimal:
    # The plain formula round(gross / (1 + rate)) can leave VAT a unit away from
    # round(net × rate): 2 Ft gross at 27% gives net 2, VAT 0, while 2 × 27% rounds to 1.
    # A strict check (Számla Agent 260/263) refuses that, so prefer the nearest net whose VAT
    # is exactly the rounded one; only when no such net exists keep the nearest.
    unit = currency_places(currency)
    nearest = round_money(gross * 100 / (100 + rate), currency)
    for candidate in (nearest, nearest - unit, nearest + unit):
        if candidate + round_money(candidate * rate / 100, currency) == gross:
            return candidate
    return nearest


def compute_line(item: Item, currency: str) -> InvoiceLine:
    """Every amount of one line. Raises ValueError for a zero quantity (no unit price exists)."""
    if item.quantity == 0:
        raise ValueError(f"line {item.name!r} has quantity 0")
    rate = vat_rate(item.vat)
    raw = item.unit_price * item.quantity
    if item.price_type == "net":
        net = round_money(raw, currency)
        vat = round_money(net * rate / 100, currency)
        gross = net + vat
    else:
        gross = round_money(raw, currency)
        net = _net_of_gross(gross, rate, currency)
        vat = gross - net
    if item.price_type == "net" and item.unit_price == item.unit_price.quantize(UNIT_PRICE_PLACES):
        # The quoted price itself: round(price × qty) = net holds by construction.
        net_unit = item.unit_price.quantize(UNIT_PRICE_PLACES)
    else:
        net_unit = (net / item.quantity).quantize(UNIT_PRICE_PLACES, rounding=ROUND_HALF_UP)
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
