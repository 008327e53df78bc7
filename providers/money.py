"""Rounding money the way invoices carry it: whole forints, cents otherwise."""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal


def currency_places(currency: str) -> Decimal:
    """The smallest amount an invoice line carries: whole forints, cents otherwise."""
    return Decimal(1) if currency.upper() == "HUF" else Decimal("0.01")


def round_money(value: Decimal, currency: str) -> Decimal:
    rounded = value.quantize(currency_places(currency), rounding=ROUND_HALF_UP)
    # A small negative amount rounds to -0, which would print as "-0" on the invoice.
    return rounded.copy_abs() if rounded == 0 else rounded
