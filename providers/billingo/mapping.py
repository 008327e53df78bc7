"""Pure translations between the worker's vocabulary and Billingo API v3 JSON.

No I/O here: sale → partner body, draft → document body, Billingo answers → provider values,
Billingo error answers → :class:`InvoicingError` with a contract code.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from types import MappingProxyType
from typing import Any

import orjson

from providers.base import (
    Cancellation,
    InvoiceDraft,
    InvoiceLine,
    IssuedInvoice,
    ProviderRules,
)
from providers.errors import ErrorCode, InvoicingError
from providers.money import round_money
from providers.values import Customer, PaymentMethod

JsonDict = dict[str, Any]


def enum_of(values: str) -> frozenset[str]:
    """An API enum written as space-separated words, as the spec lists them."""
    return frozenset(values.split())


#: Currency enum of the 3.0.14 spec (the version Billingo's SwaggerHub still serves).
CURRENCIES: frozenset[str] = enum_of(
    "AED AUD BGN BRL CAD CHF CNY CZK DKK EUR GBP HKD HRK HUF IDR ILS INR ISK JPY KRW MXN MYR "
    "NOK NZD PHP PLN RON RSD RUB SEK SGD THB TRY UAH USD ZAR"
)
LANGUAGES: frozenset[str] = frozenset({"de", "en", "fr", "hr", "hu", "it", "ro", "sk", "us"})
VAT_VALUES: frozenset[str] = frozenset(
    [f"{n}%" for n in range(28)]
    + ["5,5%", "7,7%", "9,5%"]
    + ["AAM", "AM", "EU", "EUK", "F.AFA", "FAD", "K.AFA", "MAA", "TAM", "ÁKK", "ÁTHK"]
)
ENTITLEMENTS: frozenset[str] = enum_of(
    "AAM ANTIQUES ARTWORK ATK EAM EUE EUFAD37 EUFADE HO KBAET NAM_1 NAM_2 SECOND_HAND TAM "
    "TRAVEL_AGENCY"
)

PAYMENT_METHODS: dict[PaymentMethod, str] = {
    "cash": "cash",
    "bankcard": "bankcard",
    "transfer": "wire_transfer",
    "szep_card": "szep_card",
    "online": "online_bankcard",
}

#: Contract VAT label → (Billingo Vat, Entitlement). NAV wants the legal basis of every
#: zero-VAT line, so exemption codes always travel with an entitlement where one exists.
#: Labels that are NAV exemption reasons rather than Billingo Vat values (KBAET, EAM, ...)
#: ride on the Vat value of their category: EU supply, export, generic exempt, out of scope.
SPECIAL_VAT: dict[str, tuple[str, str | None]] = {
    "AAM": ("AAM", "AAM"),
    "TAM": ("TAM", "TAM"),
    "EU": ("EU", "KBAET"),
    "EUK": ("EUK", "EAM"),
    "MAA": ("MAA", None),
    "F.AFA": ("F.AFA", None),
    "K.AFA": ("K.AFA", "TRAVEL_AGENCY"),
    "ÁKK": ("ÁKK", None),
    "ÁTHK": ("ÁTHK", "ATK"),
    "KBAET": ("EU", "KBAET"),
    "EAM": ("EUK", "EAM"),
    "NAM": ("AM", "NAM_1"),
    "ATK": ("ÁTHK", "ATK"),
    "EUFAD37": ("ÁTHK", "EUFAD37"),
    "EUFADE": ("ÁTHK", "EUFADE"),
    "EUE": ("ÁTHK", "EUE"),
    "HO": ("ÁTHK", "HO"),
}
PERCENT_VAT: frozenset[str] = frozenset({"27%", "18%", "5%"})

#: What pre-flight validation checks a sale against before anything is sent to Billingo.
#: NAV exemption reasons that are not Billingo Vat values ride on the Vat value of their
#: category (the entitlement names the reason), as :func:`vat` sends them.
RULES = ProviderRules(
    display_name="Billingo",
    currencies=CURRENCIES,
    languages=LANGUAGES,
    vat_labels=MappingProxyType(
        {label: label for label in ("27%", "18%", "5%")}
        | {label: value for label, (value, _) in SPECIAL_VAT.items()}
    ),
)

#: Calls that change state at Billingo: a lost answer may hide a created document.
MUTATING_OPERATIONS: frozenset[str] = frozenset({"create_document", "cancel_document"})

_CUSTOMER_FIELDS = ("partner", "name", "address", "post_code", "city", "country", "email")
_CURRENCY_FIELDS = ("currency", "conversion_rate")
_QUOTA_WORDS = ("quota", "limit", "kvóta", "korlát")


# ---- requests ---------------------------------------------------------------------------


def partner_body(customer: Customer) -> JsonDict:
    """The Partner to create; tax_type follows the official plugin's rule."""
    address = customer.address
    country = address.country_code.upper()
    if country == "HU":
        taxcode = customer.tax_number or ""
        tax_type = "HAS_TAX_NUMBER" if taxcode else "NO_TAX_NUMBER"
    else:
        taxcode = customer.eu_vat_number or customer.tax_number or ""
        tax_type = "FOREIGN"
    return {
        "name": customer.name,
        "address": {
            "country_code": country,
            "post_code": address.post_code,
            "city": address.city,
            "address": address.street,
        },
        "emails": [customer.email] if customer.email else [],
        "taxcode": taxcode,
        "tax_type": tax_type,
    }


def canonical(body: Mapping[str, Any]) -> bytes:
    """A stable encoding of a JSON body, so equal customers give equal cache keys."""
    return orjson.dumps(body, option=orjson.OPT_SORT_KEYS)


def language(label: str) -> str:
    normalized = label.strip().lower().replace("_", "-")
    code = "us" if normalized == "en-us" else normalized.split("-")[0]
    if code not in LANGUAGES:
        raise InvoicingError(
            ErrorCode.UNSUPPORTED_LANGUAGE,
            f"Billingo cannot write invoices in language {label!r} "
            f"(supported: {', '.join(sorted(LANGUAGES))})",
        )
    return code


def currency(code: str) -> str:
    upper = code.upper()
    if upper not in CURRENCIES:
        raise InvoicingError(
            ErrorCode.UNSUPPORTED_CURRENCY, f"Billingo cannot invoice in currency {code!r}"
        )
    return upper


def vat(label: str) -> tuple[str, str | None]:
    """(Billingo Vat, Entitlement or None) for a contract VAT label."""
    if label in PERCENT_VAT:
        return label, None
    if label in SPECIAL_VAT:
        return SPECIAL_VAT[label]
    raise InvoicingError(
        ErrorCode.INVALID_INVOICE_DATA, f"VAT label {label!r} has no Billingo equivalent"
    )


def json_number(value: Decimal) -> float | int:
    """Billingo's schema types amounts as JSON numbers; whole values stay integers."""
    return int(value) if value == value.to_integral_value() else float(value)


def item_body(line: InvoiceLine) -> JsonDict:
    vat_value, entitlement = vat(line.vat)
    item: JsonDict = {
        "name": line.name,
        "unit_price": json_number(line.unit_price),
        "unit_price_type": line.price_type,
        "quantity": json_number(line.quantity),
        "unit": line.unit,
        "vat": vat_value,
    }
    if entitlement is not None:
        item["entitlement"] = entitlement
    return item


def document_body(
    draft: InvoiceDraft,
    *,
    block_id: int,
    partner_id: int,
    conversion_rate: Decimal,
    electronic: bool,
) -> JsonDict:
    """DocumentInsert for an issued (non-draft) invoice. ``vendor_id`` carries the external
    key because GET /documents/vendor/{vendor_id} is Billingo's only external-key lookup."""
    body: JsonDict = {
        "vendor_id": draft.external_key,
        "partner_id": partner_id,
        "block_id": block_id,
        "type": "invoice",
        "fulfillment_date": draft.fulfillment_date.isoformat(),
        "due_date": draft.due_date.isoformat(),
        "payment_method": PAYMENT_METHODS[draft.payment_method],
        "language": language(draft.language),
        "currency": currency(draft.currency),
        "conversion_rate": json_number(conversion_rate),
        "electronic": electronic,
        "paid": draft.paid,
        "items": [item_body(line) for line in draft.lines],
    }
    if draft.comment:
        body["comment"] = draft.comment
    return body


def validate_draft(draft: InvoiceDraft) -> None:
    """Raise the data errors Billingo would raise, before any request is made."""
    language(draft.language)
    currency(draft.currency)
    for line in draft.lines:
        vat(line.vat)


# ---- answers ----------------------------------------------------------------------------


def money(value: Any, currency_code: str) -> Decimal:
    try:
        return round_money(Decimal(str(value)), currency_code)
    except (InvalidOperation, ValueError) as exc:
        raise ValueError(f"not an amount: {value!r}") from exc


def issued_invoice(doc: Mapping[str, Any]) -> IssuedInvoice:
    code = str(doc["currency"])
    return IssuedInvoice(
        document_id=str(doc["id"]),
        invoice_number=str(doc["invoice_number"]),
        gross_total=money(doc["gross_total"], code),
        currency=code,
        cancelled=bool(doc.get("cancelled", False)),
    )


def cancellation(doc: Mapping[str, Any]) -> Cancellation:
    return Cancellation(
        kind="cancel", document_id=str(doc["id"]), invoice_number=str(doc["invoice_number"])
    )


def related_ids(doc: Mapping[str, Any]) -> list[int]:
    related = doc.get("related_documents") or []
    return [int(r["id"]) for r in related if isinstance(r, dict) and "id" in r]


def conversion_rate(body: Mapping[str, Any]) -> Decimal:
    # The spec really spells it "conversation_rate"; accept the sane spelling too.
    raw = body.get("conversation_rate", body.get("conversion_rate"))
    rate = Decimal(str(raw))
    if not rate.is_finite() or rate <= 0:
        raise ValueError(f"not a conversion rate: {raw!r}")
    return rate


# ---- errors -----------------------------------------------------------------------------


def parse_json(text: str) -> Any:
    """The JSON of a body; raises ValueError for anything else (HTML pages, truncation)."""
    return orjson.loads(text)  # JSONDecodeError is a ValueError


def _parse(text: str) -> Any:
    try:
        return parse_json(text)
    except ValueError:
        return None


def _plain(text: str) -> str:
    """A short readable excerpt of a non-JSON body (HTML error pages included)."""
    stripped = re.sub(r"<[^>]+>", " ", text)
    collapsed = " ".join(stripped.split())
    return collapsed[:200] or "(empty body)"


def _field_errors(body: Any) -> list[tuple[str, str]]:
    if not isinstance(body, dict) or not isinstance(body.get("errors"), list):
        return []
    return [
        (str(e.get("field", "")), str(e.get("message", "")))
        for e in body["errors"]
        if isinstance(e, dict)
    ]


def _detail(body: Any, text: str) -> tuple[str, str | None]:
    """(message, trace_id) from any of Billingo's three error shapes or a non-JSON body."""
    if not isinstance(body, dict):
        return _plain(text), None
    error = body.get("error")
    if isinstance(error, dict):
        trace = error.get("trace_id")
        return str(error.get("message", "")), str(trace) if trace else None
    if isinstance(body.get("message"), str):
        return body["message"], None
    return _plain(text), None


def retry_after_seconds(header: str | None) -> float | None:
    if header is None:
        return None
    try:
        seconds = float(header.strip())
    except ValueError:
        return None
    return max(seconds, 0.0)


def _validation_code(fields: list[str], operation: str) -> ErrorCode:
    lowered = [f.lower() for f in fields]
    if any("block_id" in f for f in lowered):
        return ErrorCode.DOCUMENT_BLOCK_NOT_FOUND
    if any(f.startswith(_CURRENCY_FIELDS) for f in lowered):
        return ErrorCode.UNSUPPORTED_CURRENCY
    if any(f.startswith("language") for f in lowered):
        return ErrorCode.UNSUPPORTED_LANGUAGE
    if any("taxcode" in f or "tax_number" in f for f in lowered):
        return ErrorCode.TAX_NUMBER_INVALID
    if operation == "create_partner" or any(f.startswith(_CUSTOMER_FIELDS) for f in lowered):
        return ErrorCode.INVALID_CUSTOMER_DATA
    return ErrorCode.INVALID_INVOICE_DATA


def _validation_error(body: Any, text: str, operation: str) -> InvoicingError:
    pairs = _field_errors(body)
    summary = "; ".join(f"{f}: {m}" for f, m in pairs) or _detail(body, text)[0]
    code = _validation_code([f for f, _ in pairs], operation)
    return InvoicingError(code, f"Billingo {operation} rejected the data (422): {summary}")


def _status_code(status: int, message: str) -> ErrorCode:
    if status == 401:
        return ErrorCode.AUTH_FAILED
    if status == 402:
        return ErrorCode.SUBSCRIPTION_REQUIRED
    if status == 403:
        return ErrorCode.AUTH_FAILED
    if status == 429:
        return ErrorCode.RATE_LIMITED
    if status == 400 and any(w in message.lower() for w in _QUOTA_WORDS):
        # Billingo reports an exhausted daily write quota as a plain 400.
        return ErrorCode.RATE_LIMITED
    if status >= 500:
        return ErrorCode.PROVIDER_UNAVAILABLE
    return ErrorCode.PROVIDER_REJECTED


_HINTS: dict[int, str] = {
    401: "the API key is missing, invalid or revoked",
    402: "the Billingo subscription has no API access",
    403: (
        "the API key lacks write scope (Olvasás, írás) or the resource belongs to "
        "another Billingo account"
    ),
}


def error_from_response(
    status: int, text: str, *, operation: str, retry_after: str | None = None
) -> InvoicingError:
    """Map a non-2xx Billingo answer to a contract error. ``text`` must already be redacted."""
    body = _parse(text)
    if status == 422:
        return _validation_error(body, text, operation)
    message, trace_id = _detail(body, text)
    code = _status_code(status, message)
    parts = [f"Billingo {operation} answered {status}"]
    if status in _HINTS:
        parts.append(_HINTS[status])
    parts.append(message)
    if trace_id:
        parts.append(f"trace_id {trace_id}")
    return InvoicingError(
        code,
        ": ".join(p for p in parts if p),
        retry_after=retry_after_seconds(retry_after),
        outcome_unknown=status >= 500 and operation in MUTATING_OPERATIONS,
    )
