"""Pre-flight validation: bad sale data is refused before it costs an API call or a storno.

:func:`validate_sale` raises :class:`InvoicingError` with the first problem it finds, checking
in this order: currency and language, customer (its e-mail address too), tax numbers, the
fulfilment date, items, the invoice's total (the last two against the plausibility
:class:`Limits`). Every message names what is wrong and where ("line 2 'Breakfast': ..."),
so a person can fix it from the message plus the code's generic fix
(``providers.errors.FIXES``). Provider differences are the providers' own rules (currencies,
languages, VAT labels), asked for by name through :mod:`providers.rules`.

Decisions (the reference notes: shared/reference/hungarian-invoicing-and-peers.md Part 1):

- Tax numbers are taken exactly as the providers will send them: ``NNNNNNNN-N-NN``, and EU VAT
  numbers without spaces, upper case, Greece as ``EL``. A number in another spelling is refused
  with the spelling to use, so nothing downstream has to normalise.
- The buyer's Hungarian tax number sits in the main tax-number slot, where NAV wants a VAT
  group's id (VAT code 5), never a member's own number (VAT code 4).
- A person carries no tax number or EU VAT number: NAV reports a private person without tax
  data, and a person with a company-style tax number is a sole trader who must be invoiced as
  a company (a wrong buyer status can only be fixed by a storno).
- A negative unit price is a discount line (the Számla Agent's way): it needs a positive
  quantity, the VAT label of a full-price line on the same sale, and may not take more than
  those lines' total.
- Line arithmetic is checked the way the Számla Agent checks it (259–264), for both providers:
  net = net unit price × quantity within one unit of the currency (1 Ft, 0.01 otherwise; NAV's
  own tolerance) plus the rounding of a 4-decimal unit price, VAT = net × rate / 100 within
  one unit, gross = net + VAT exactly, and the amounts carry the currency's decimals (HUF whole
  forints, others two): the tolerances of the Számla Agent's documented checks 259–264.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date
from decimal import Decimal

from handlers.amounts import (
    SPECIAL_VAT_CODES,
    UNIT_PRICE_PLACES,
    VAT_PERCENTAGES,
    compute_line,
    currency_places,
)
from handlers.messages import Customer, Item, Sale
from providers.base import InvoiceLine, ProviderRules, TenantConnection
from providers.errors import ErrorCode, InvoicingError
from providers.rules import PROVIDER_RULES as PROVIDER_RULES
from providers.rules import rules_for


@dataclass(frozen=True, slots=True)
class Limits:
    """Plausibility limits (the worker fills them from INVOICING_MAX_GROSS_HUF,
    INVOICING_MAX_GROSS_OTHER and INVOICING_FULFILLMENT_WINDOW_DAYS): a sale beyond them is
    almost certainly a typo, and once issued it could only be undone by a storno."""

    max_gross_huf: Decimal = Decimal(500_000_000)
    max_gross_other: Decimal = Decimal(2_000_000)
    fulfillment_window_days: int = 400

    def max_gross(self, currency: str) -> Decimal:
        return self.max_gross_huf if currency == "HUF" else self.max_gross_other


DEFAULT_LIMITS = Limits()


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


# ---- countries --------------------------------------------------------------------------

#: ISO 3166-1 alpha-2 (all 249 assigned codes) plus XK, Kosovo's code in EU and Billingo use.
ISO_COUNTRIES: frozenset[str] = _words(
    "AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ BA BB BD BE BF BG BH BI "
    "BJ BL BM BN BO BQ BR BS BT BV BW BY BZ CA CC CD CF CG CH CI CK CL CM CN "
    "CO CR CU CV CW CX CY CZ DE DJ DK DM DO DZ EC EE EG EH ER ES ET FI FJ FK "
    "FM FO FR GA GB GD GE GF GG GH GI GL GM GN GP GQ GR GS GT GU GW GY HK HM "
    "HN HR HT HU ID IE IL IM IN IO IQ IR IS IT JE JM JO JP KE KG KH KI KM KN "
    "KP KR KW KY KZ LA LB LC LI LK LR LS LT LU LV LY MA MC MD ME MF MG MH MK "
    "ML MM MN MO MP MQ MR MS MT MU MV MW MX MY MZ NA NC NE NF NG NI NL NO NP "
    "NR NU NZ OM PA PE PF PG PH PK PL PM PN PR PS PT PW PY QA RE RO RS RU RW "
    "SA SB SC SD SE SG SH SI SJ SK SL SM SN SO SR SS ST SV SX SY SZ TC TD TF "
    "TG TH TJ TK TL TM TN TO TR TT TV TW TZ UA UG UM US UY UZ VA VC VE VG VI "
    "VN VU WF WS YE YT ZA ZM ZW XK"
)

#: Member states by address country (Greece's address code is GR, its VAT prefix EL).
EU_COUNTRIES: frozenset[str] = _words(
    "AT BE BG CY CZ DE DK EE ES FI FR GR HR HU IE IT LT LU LV MT NL PL PT RO SE SI SK"
)

#: EU VAT number formats after the prefix (VIES), with how a person would describe them.
#: XI is Northern Ireland, which keeps EU VAT numbers for goods.
EU_VAT_FORMATS: dict[str, tuple[str, str]] = {
    "AT": (r"U[0-9]{8}", "U and 8 digits (ATU12345678)"),
    "BE": (r"[01][0-9]{9}", "10 digits starting with 0 or 1 (BE0123456789)"),
    "BG": (r"[0-9]{9,10}", "9 or 10 digits (BG123456789)"),
    "CY": (r"[0-9]{8}[A-Z]", "8 digits and a letter (CY12345678X)"),
    "CZ": (r"[0-9]{8,10}", "8 to 10 digits (CZ12345678)"),
    "DE": (r"[0-9]{9}", "9 digits (DE123456789)"),
    "DK": (r"[0-9]{8}", "8 digits (DK12345678)"),
    "EE": (r"[0-9]{9}", "9 digits (EE123456789)"),
    "EL": (r"[0-9]{9}", "9 digits (EL123456789)"),
    "ES": (
        r"[0-9A-Z][0-9]{7}[0-9A-Z]",
        "9 characters, a letter or digit first and last (ESX1234567X)",
    ),
    "FI": (r"[0-9]{8}", "8 digits (FI12345678)"),
    "FR": (r"[0-9A-HJ-NP-Z]{2}[0-9]{9}", "2 characters and 9 digits (FR12345678901)"),
    "HR": (r"[0-9]{11}", "11 digits (HR12345678901)"),
    "HU": (r"[0-9]{8}", "8 digits (HU12345676)"),
    "IE": (r"[0-9]{7}[A-W][A-IW]?|[0-9][A-Z+*][0-9]{5}[A-W]", "8 or 9 characters (IE1234567WA)"),
    "IT": (r"[0-9]{11}", "11 digits (IT12345678901)"),
    "LT": (r"[0-9]{9}|[0-9]{12}", "9 or 12 digits (LT123456789)"),
    "LU": (r"[0-9]{8}", "8 digits (LU12345678)"),
    "LV": (r"[0-9]{11}", "11 digits (LV12345678901)"),
    "MT": (r"[0-9]{8}", "8 digits (MT12345678)"),
    "NL": (r"[0-9]{9}B[0-9]{2}", "9 digits, B and 2 digits (NL123456789B01)"),
    "PL": (r"[0-9]{10}", "10 digits (PL1234567890)"),
    "PT": (r"[0-9]{9}", "9 digits (PT123456789)"),
    "RO": (r"[1-9][0-9]{1,9}", "2 to 10 digits, not starting with 0 (RO1234567)"),
    "SE": (r"[0-9]{10}01", "12 digits ending in 01 (SE123456789001)"),
    "SI": (r"[1-9][0-9]{7}", "8 digits, not starting with 0 (SI12345678)"),
    "SK": (r"[1-9][0-9]{9}", "10 digits, not starting with 0 (SK1234567890)"),
    "XI": (r"[0-9]{9}|[0-9]{12}|GD[0-9]{3}|HA[0-9]{3}", "9 or 12 digits (XI123456789)"),
}

# ---- tax numbers ------------------------------------------------------------------------

_HU_TAX_NUMBER = re.compile(r"([0-9]{8})-([0-9])-([0-9]{2})")
_CHECK_WEIGHTS = (9, 7, 3, 1, 9, 7, 3)
#: NAV master data: county tax directorates 02–20 (companies), 22–44, and 51.
VALID_COUNTY_CODES: frozenset[str] = frozenset(
    [f"{n:02d}" for n in (*range(2, 21), *range(22, 45), 51)]
)
_GROUP_PREFIX = "177"


def hu_check_digit(first_seven: str) -> int:
    """The 8th digit of a Hungarian törzsszám, from its first seven digits."""
    total = sum(w * int(d) for w, d in zip(_CHECK_WEIGHTS, first_seven, strict=True))
    return (10 - total % 10) % 10


def _base_problem(base: str) -> str | None:
    expected = hu_check_digit(base[:7])
    if int(base[7]) != expected:
        return (
            f"check digit: {base} fails the check-digit test (the 8th digit should be "
            f"{expected} if the first seven are right); a digit is probably mistyped"
        )
    return None


def tax_number_problem(value: str) -> str | None:
    """What is wrong with a buyer's Hungarian tax number (adószám), or None when it is valid.

    Checks the ``NNNNNNNN-N-NN`` form, the check digit of the 8-digit base, the VAT code
    (1–5), the county code (02–20, 22–44, 51) and the VAT group rules: a group id has VAT
    code 5 and starts with 177; a VAT code 4 number is a group member's own number, which
    does not belong in the buyer's tax-number slot (the group id does).
    """
    text = value.strip()
    match = _HU_TAX_NUMBER.fullmatch(text)
    if match is None:
        digits = re.sub(r"[\s.\-/]", "", text)
        if re.fullmatch(r"[0-9]{11}", digits):
            return (
                f"tax number {text!r} must be written NNNNNNNN-N-NN: "
                f"{digits[:8]}-{digits[8]}-{digits[9:]}"
            )
        if re.fullmatch(r"[0-9]{8}", digits):
            return (
                f"tax number {text!r} is only the 8-digit base; the invoice needs the full "
                "tax number NNNNNNNN-N-NN"
            )
        if re.fullmatch(r"8[0-9]{9}", digits):
            return (
                f"{text!r} looks like a personal tax id (adóazonosító jel), not a tax number "
                "(NNNNNNNN-N-NN)"
            )
        if re.fullmatch(r"[A-Za-z]{2}[0-9A-Za-z]{2,13}", digits) and re.search(r"[0-9]{4}", digits):
            return (
                f"{text!r} looks like an EU VAT number; it belongs in the EU VAT number "
                "field, the tax number is NNNNNNNN-N-NN"
            )
        return f"tax number {text!r} is not of the form NNNNNNNN-N-NN (e.g. 12345676-2-41)"
    base, vat_code, county = match.groups()
    problem = _base_problem(base)
    if problem is not None:
        return f"tax number {text}: {problem}"
    if vat_code not in "12345":
        return f"tax number {text}: VAT code {vat_code} (the 9th digit must be 1 to 5)"
    if county not in VALID_COUNTY_CODES:
        return (
            f"tax number {text}: county code {county} (the last two digits must be "
            "02-20, 22-44 or 51)"
        )
    if vat_code == "5" and not base.startswith(_GROUP_PREFIX):
        return (
            f"tax number {text}: VAT code 5 marks a VAT group id, and group ids start "
            f"with {_GROUP_PREFIX}"
        )
    if vat_code == "4":
        if base.startswith(_GROUP_PREFIX):
            return (
                f"tax number {text}: a {_GROUP_PREFIX}… base is a VAT group id, whose VAT "
                "code is 5, not 4"
            )
        return (
            f"tax number {text}: VAT code 4 is a VAT group member's own number; the buyer's "
            "tax number must be the group's id (VAT code 5, starting with 177)"
        )
    return None


def eu_vat_number_problem(value: str) -> str | None:
    """What is wrong with an EU VAT number (közösségi adószám), or None when its form is valid.

    The form is checked per member state prefix (Greece is EL, Northern Ireland XI); for HU the
    check digit too. Whether a HU prefix is acceptable depends on the buyer (see
    :func:`validate_sale`): a buyer from another member state needs that state's prefix.
    """
    text = value.strip()
    compact = re.sub(r"[\s.\-]", "", text).upper()
    if not re.fullmatch(r"[A-Z]{2}[0-9A-Z+*]{2,13}", compact):
        return (
            f"EU VAT number {text!r} must start with a member state prefix followed by the "
            "number (e.g. DE123456789)"
        )
    if compact != text:
        return f"EU VAT number {text!r} must be written without spaces, in capitals: {compact}"
    prefix, rest = text[:2], text[2:]
    if prefix == "GR":
        return f"EU VAT number {text}: Greek VAT numbers start with EL, not GR (EL{rest})"
    if prefix not in EU_VAT_FORMATS:
        return f"EU VAT number {text}: {prefix} is not an EU member state prefix"
    pattern, description = EU_VAT_FORMATS[prefix]
    if not re.fullmatch(pattern, rest):
        return f"EU VAT number {text}: a {prefix} VAT number is {prefix} + {description}"
    if prefix == "HU":
        problem = _base_problem(rest)
        if problem is not None:
            return f"EU VAT number {text}: {problem}"
    return None


# ---- the checks -------------------------------------------------------------------------


def _fail(code: ErrorCode, message: str) -> InvoicingError:
    return InvoicingError(code, message)


def _present(value: str | None) -> str | None:
    return value.strip() if value is not None and value.strip() else None


def _check_currency_and_language(sale: Sale, conn: TenantConnection) -> None:
    rules = rules_for(conn.provider)
    name = rules.display_name
    if conn.currency not in rules.currencies:
        raise _fail(
            ErrorCode.UNSUPPORTED_CURRENCY,
            f"the {conn.provider} connection of tenant {conn.tenant_id!r} has currency "
            f"{conn.currency!r}, which {name} cannot invoice in: set an upper-case ISO 4217 "
            "code it supports (HUF, EUR, USD, …) in the connections file",
        )
    if conn.language not in rules.languages:
        raise _fail(
            ErrorCode.UNSUPPORTED_LANGUAGE,
            f"the {conn.provider} connection of tenant {conn.tenant_id!r} has language "
            f"{conn.language!r}, which {name} cannot write invoices in: set one of "
            f"{', '.join(sorted(rules.languages))} in the connections file",
        )
    if sale.currency not in rules.currencies:
        raise _fail(
            ErrorCode.UNSUPPORTED_CURRENCY,
            f"sale currency {sale.currency!r} is not one {name} can invoice in "
            "(upper-case ISO 4217 codes such as HUF, EUR, USD)",
        )
    if sale.currency != conn.currency:
        raise _fail(
            ErrorCode.CURRENCY_MISMATCH,
            f"the sale is in {sale.currency} but the {name} connection of tenant "
            f"{conn.tenant_id!r} invoices in {conn.currency}",
        )


def _customer_fail(message: str) -> InvoicingError:
    return _fail(ErrorCode.INVALID_CUSTOMER_DATA, message)


def _check_address(customer: Customer) -> None:
    address = customer.address
    who = f"customer {customer.name!r}"
    country = address.country_code
    if country not in ISO_COUNTRIES:
        hint = (
            f" (write it in capitals: {country.upper()})"
            if country.upper() in ISO_COUNTRIES
            else ""
        )
        raise _customer_fail(
            f"{who}: country code {country!r} is not an ISO 3166 alpha-2 code{hint}; "
            "correct the address on the customer profile"
        )
    post_code = address.post_code.strip()
    if country == "HU":
        if not re.fullmatch(r"[1-9][0-9]{3}", post_code):
            raise _customer_fail(
                f"{who}: Hungarian postcode {post_code!r} must be 4 digits (1000-9999); "
                "correct the address on the customer profile"
            )
    elif not re.fullmatch(r"[A-Z0-9][A-Z0-9\s\-]{1,8}[A-Z0-9]", post_code.upper()):
        raise _customer_fail(
            f"{who}: postcode {post_code!r} must be 3 to 10 letters or digits (NAV's rule; "
            "use 0000 where the country has no postcodes); correct the customer profile"
        )
    if not address.city.strip():
        raise _customer_fail(f"{who}: the address has no city; add it on the customer profile")
    if not address.street.strip():
        raise _customer_fail(f"{who}: the address has no street; add it on the customer profile")


#: What the providers accept as an address to e-mail an invoice to (an ASCII address with a
#: dotted domain; an internationalised domain in its xn-- form).
_EMAIL = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z][A-Za-z0-9-]{0,61}[A-Za-z0-9]"
)


def _check_email(customer: Customer) -> None:
    email = _present(customer.email)
    if email is None:
        return
    local = email.rpartition("@")[0]
    if len(email) > 254 or len(local) > 64 or not _EMAIL.fullmatch(email):
        raise _customer_fail(
            f"customer {customer.name!r}: e-mail address {email!r} is not a valid address "
            "(name@example.hu); correct it on the customer profile or leave it empty"
        )


def _check_customer(customer: Customer) -> None:
    if not customer.name.strip():
        raise _customer_fail("the customer has no name; add it on the customer profile")
    _check_address(customer)
    _check_email(customer)
    who = f"customer {customer.name!r}"
    tax_number = _present(customer.tax_number)
    eu_vat_number = _present(customer.eu_vat_number)
    country = customer.address.country_code
    if customer.kind == "person":
        if tax_number is not None:
            digits = re.sub(r"[^0-9]", "", tax_number)
            if re.fullmatch(r"8[0-9]{9}", digits):
                raise _customer_fail(
                    f"{who} is a person with a personal tax id (adóazonosító jel) in the tax "
                    "number field; it does not belong on an invoice: remove it from the "
                    "customer profile"
                )
            raise _customer_fail(
                f"{who} is a person but has tax number {tax_number!r}: a buyer with a tax "
                "number (e.g. a sole trader) is invoiced as a company; change the customer "
                "type to company, or remove the tax number"
            )
        if eu_vat_number is not None:
            raise _customer_fail(
                f"{who} is a person but has EU VAT number {eu_vat_number!r}: a buyer with a "
                "VAT number is invoiced as a company; change the customer type to company, "
                "or remove the EU VAT number"
            )
        return
    if country == "HU" and tax_number is None:
        raise _customer_fail(
            f"company {customer.name!r} in Hungary has no tax number: add the company's "
            "Hungarian tax number (NNNNNNNN-N-NN) on the customer profile"
            + (" (an EU VAT number does not replace it)" if eu_vat_number else "")
        )
    if country in EU_COUNTRIES and tax_number is None and eu_vat_number is None:
        raise _customer_fail(
            f"company {customer.name!r} in {country} has no EU VAT number: add it on the "
            "customer profile (e.g. DE123456789), or a Hungarian tax number if it has one"
        )


def _check_tax_numbers(customer: Customer) -> None:
    tax_number = _present(customer.tax_number)
    eu_vat_number = _present(customer.eu_vat_number)
    if tax_number is not None:
        problem = tax_number_problem(tax_number)
        if problem is not None:
            raise _fail(ErrorCode.TAX_NUMBER_INVALID, f"customer {customer.name!r}: {problem}")
    if eu_vat_number is None:
        return
    problem = eu_vat_number_problem(eu_vat_number)
    if problem is not None:
        raise _fail(ErrorCode.TAX_NUMBER_INVALID, f"customer {customer.name!r}: {problem}")
    if not eu_vat_number.startswith("HU"):
        return
    if tax_number is None:
        raise _fail(
            ErrorCode.TAX_NUMBER_INVALID,
            f"customer {customer.name!r}: EU VAT number {eu_vat_number} has the HU prefix; "
            "a buyer from another member state needs its own state's prefix, and a "
            "Hungarian buyer needs its Hungarian tax number (NNNNNNNN-N-NN)",
        )
    if eu_vat_number[2:] != tax_number[:8]:
        raise _fail(
            ErrorCode.TAX_NUMBER_INVALID,
            f"customer {customer.name!r}: EU VAT number {eu_vat_number} does not match tax "
            f"number {tax_number} (it should be HU{tax_number[:8]})",
        )


# ---- items ------------------------------------------------------------------------------

_ZERO_PERCENT = re.compile(r"0+([.,]0+)?\s*%?")
_PERCENT = re.compile(r"[0-9]+([.,][0-9]+)?\s*%")
_EU_BUYER_LABELS = frozenset({"EU", "KBAET", "EUFAD37"})
#: Tolerance of the arithmetic checks, in units of the currency (NAV: 1 Ft or 0.01).
_TOLERANCE_UNITS = 1


def _line(index: int, item: Item) -> str:
    return f"line {index} {item.name!r}"


def _item_fail(index: int, item: Item, message: str) -> InvoicingError:
    return _fail(ErrorCode.INVALID_INVOICE_DATA, f"{_line(index, item)}: {message}")


def _check_label(index: int, item: Item, rules: ProviderRules) -> None:
    label = item.vat
    codes = ", ".join(sorted(code for code in rules.vat_labels if not code.endswith("%")))
    if _ZERO_PERCENT.fullmatch(label):
        raise _item_fail(
            index,
            item,
            f"VAT {label!r} is refused: NAV requires a zero-VAT line to name why it carries "
            f"no VAT, so use the exemption code instead ({codes})",
        )
    if label not in VAT_PERCENTAGES and label not in SPECIAL_VAT_CODES:
        kind = "rate" if _PERCENT.fullmatch(label) else "label"
        raise _item_fail(
            index,
            item,
            f"VAT {kind} {label!r} is not a Hungarian VAT rate or code: use 27%, 18%, 5% "
            f"or an exemption code ({codes})",
        )
    if label not in rules.vat_labels:
        raise _item_fail(
            index,
            item,
            f"VAT code {label} has no {rules.display_name} equivalent: name the exemption "
            f"with one of {codes}",
        )


def line_arithmetic_problem(line: InvoiceLine, currency: str) -> str | None:
    """The Számla Agent's checks 259–264 on one computed line, or None when it passes."""
    unit = currency_places(currency)
    tolerance = unit * _TOLERANCE_UNITS
    amounts = {"net": line.net_amount, "VAT": line.vat_amount, "gross": line.gross_amount}
    for what, amount in amounts.items():
        if (
            amount != amount.quantize(unit)
            or amount.as_tuple().exponent != unit.as_tuple().exponent
        ):
            return f"{what} amount {amount} must have {_decimals(currency)} in {currency}"
    # The net unit price travels with 4 decimals: half of 0.0001 per piece may drift too.
    net_slack = tolerance + abs(line.quantity) * UNIT_PRICE_PLACES / 2
    if abs(line.net_unit_price * line.quantity - line.net_amount) > net_slack:
        return (
            f"net {line.net_amount} is not net unit price {line.net_unit_price} × quantity "
            f"{line.quantity} (Számla Agent check 259); give the quantity or price with "
            "fewer decimals"
        )
    if abs(line.net_amount * line.vat_rate / 100 - line.vat_amount) > tolerance:
        return (
            f"VAT {line.vat_amount} is not {line.vat_rate}% of net {line.net_amount} "
            "(Számla Agent check 260)"
        )
    if line.net_amount + line.vat_amount != line.gross_amount:
        return (
            f"gross {line.gross_amount} is not net {line.net_amount} + VAT {line.vat_amount} "
            "(Számla Agent check 261)"
        )
    return None


def _decimals(currency: str) -> str:
    return "no decimals" if currency_places(currency) == 1 else "2 decimals"


def _check_dates(sale: Sale, limits: Limits, today: date | None) -> None:
    """The fulfilment date within the window of ``paid_at``, and ``paid_at`` within the window
    of the issue date (today): the invoice is dated today, so a sale paid in 9999 with a
    fulfilment date to match is as implausible as a fulfilment date of 9999 alone."""
    window = limits.fulfillment_window_days
    paid = sale.paid_at.date()
    if today is not None and abs((paid - today).days) > window:
        raise _fail(
            ErrorCode.INVALID_INVOICE_DATA,
            f"sale.paid_at {paid.isoformat()} is {abs((paid - today).days)} days from the "
            f"invoice's date {today.isoformat()} (at most {window} days apart): correct the "
            "sale's payment date",
        )
    days = (sale.fulfillment_date - paid).days
    if abs(days) > window:
        raise _fail(
            ErrorCode.INVALID_INVOICE_DATA,
            f"sale.fulfillment_date {sale.fulfillment_date.isoformat()} is {abs(days)} days "
            f"{'after' if days > 0 else 'before'} sale.paid_at {paid.isoformat()} (at most "
            f"{window} days apart): correct the sale's fulfilment date",
        )


def _check_totals(sale: Sale, lines: list[InvoiceLine], limits: Limits) -> None:
    """The invoice as a whole: not zero, not beyond the plausible maximum. Each line is held
    to the maximum too, so a huge line cannot hide behind a discount of the same size."""
    limit = limits.max_gross(sale.currency)
    for index, (item, line) in enumerate(zip(sale.items, lines, strict=True), start=1):
        if abs(line.gross_amount) > limit or abs(item.unit_price) > limit:
            raise _item_fail(
                index,
                item,
                f"gross {line.gross_amount} {sale.currency} (unit price {item.unit_price}) is "
                f"beyond the plausible maximum of {limit} {sale.currency} per invoice; check "
                "the price and quantity",
            )
    total = sum((line.gross_amount for line in lines), Decimal(0))
    if total == 0:
        raise _fail(
            ErrorCode.INVALID_INVOICE_DATA,
            f"the invoice's gross total is 0 {sale.currency}: a sale with nothing to pay is not "
            "invoiced; correct the items' prices",
        )
    if total > limit:
        raise _fail(
            ErrorCode.INVALID_INVOICE_DATA,
            f"the invoice's gross total {total} {sale.currency} is beyond the plausible maximum "
            f"of {limit} {sale.currency} per invoice; check the prices and quantities",
        )


def _check_items(sale: Sale, rules: ProviderRules, limits: Limits) -> None:
    customer = sale.customer
    eu_vat_number = _present(customer.eu_vat_number)
    tax_number = _present(customer.tax_number)
    lines: list[InvoiceLine] = []
    for index, item in enumerate(sale.items, start=1):
        _check_label(index, item, rules)
        if item.quantity <= 0:
            raise _item_fail(
                index,
                item,
                f"quantity {item.quantity} must be above zero (a discount is a line with a "
                "negative unit price and a positive quantity)",
            )
        try:
            line = compute_line(item, sale.currency)
        except ArithmeticError:
            raise _item_fail(
                index,
                item,
                f"unit price {item.unit_price} × quantity {item.quantity} is too large to "
                "invoice; check the price and quantity",
            ) from None
        problem = line_arithmetic_problem(line, sale.currency)
        if problem is not None:
            raise _item_fail(index, item, problem)
        if item.vat in _EU_BUYER_LABELS and (
            eu_vat_number is None or eu_vat_number.startswith("HU")
        ):
            raise _item_fail(
                index,
                item,
                f"VAT code {item.vat} (intra-EU supply) needs the buyer's EU VAT number from "
                "another member state: add it on the customer profile (e.g. DE123456789), "
                "or use the VAT rate that applies",
            )
        if item.vat == "F.AFA" and (customer.kind != "company" or tax_number is None):
            raise _item_fail(
                index,
                item,
                "VAT code F.AFA (domestic reverse charge) needs a company buyer with its full "
                "Hungarian tax number (NNNNNNNN-N-NN): add it on the customer profile",
            )
        lines.append(line)
    _check_mix(sale.items)
    _check_discounts(sale.items, lines, sale.currency)
    _check_totals(sale, lines, limits)


def _check_mix(items: list[Item]) -> None:
    aam = next((i for i, item in enumerate(items, 1) if item.vat == "AAM"), None)
    taxed = next((i for i, item in enumerate(items, 1) if item.vat in VAT_PERCENTAGES), None)
    if aam is not None and taxed is not None:
        taxed_item = items[taxed - 1]
        raise _item_fail(
            aam,
            items[aam - 1],
            f"AAM (subject-exempt seller) cannot be on one invoice with VAT-charged lines "
            f"({_line(taxed, taxed_item)} is {taxed_item.vat}): a seller either charges VAT "
            "or is subject-exempt; correct the VAT codes of the products",
        )


def _check_discounts(items: list[Item], lines: list[InvoiceLine], currency: str) -> None:
    full: dict[str, Decimal] = {}
    for item, line in zip(items, lines, strict=True):
        if item.unit_price >= 0:
            full[item.vat] = full.get(item.vat, Decimal(0)) + line.gross_amount
    discounts: dict[str, Decimal] = {}
    for index, (item, line) in enumerate(zip(items, lines, strict=True), start=1):
        if item.unit_price >= 0:
            continue
        if item.vat not in full:
            raise _item_fail(
                index,
                item,
                f"a discount (negative unit price) must carry the VAT label of the lines it "
                f"reduces, and no full-price line has {item.vat}",
            )
        discounts[item.vat] = discounts.get(item.vat, Decimal(0)) - line.gross_amount
        if discounts[item.vat] > full[item.vat]:
            raise _item_fail(
                index,
                item,
                f"the discounts on {item.vat} lines ({discounts[item.vat]} {currency}) "
                f"exceed those lines' total ({full[item.vat]} {currency})",
            )


# ---- entry point ------------------------------------------------------------------------


def validate_sale(
    sale: Sale,
    conn: TenantConnection,
    limits: Limits = DEFAULT_LIMITS,
    *,
    today: date | None = None,
) -> None:
    """Raise :class:`InvoicingError` for the first problem that would make the provider refuse
    the invoice (or NAV flag it), or that is beyond the plausibility ``limits``; return None
    when the sale can be invoiced as it is. ``today``: the invoice's date, when known."""
    _check_currency_and_language(sale, conn)
    _check_customer(sale.customer)
    _check_tax_numbers(sale.customer)
    _check_dates(sale, limits, today)
    _check_items(sale, rules_for(conn.provider), limits)
