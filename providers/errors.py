"""The contract's error vocabulary (CONTRACTS §6): one code per kind of failure, with a fix.

Providers and handlers raise :class:`InvoicingError` with one of these codes; the pure
classifier in :mod:`handlers.classify` decides whether it is retried or dead-lettered.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    AUTH_FAILED = "auth_failed"
    SUBSCRIPTION_REQUIRED = "subscription_required"
    DOCUMENT_BLOCK_NOT_FOUND = "document_block_not_found"
    CURRENCY_MISMATCH = "currency_mismatch"
    UNSUPPORTED_CURRENCY = "unsupported_currency"
    UNSUPPORTED_LANGUAGE = "unsupported_language"
    INVALID_CUSTOMER_DATA = "invalid_customer_data"
    TAX_NUMBER_INVALID = "tax_number_invalid"
    INVALID_INVOICE_DATA = "invalid_invoice_data"
    INVALID_MESSAGE = "invalid_message"
    UNKNOWN_TENANT = "unknown_tenant"
    NOT_INVOICED = "not_invoiced"
    DOCUMENT_MISMATCH = "document_mismatch"
    NETWORK_ERROR = "network_error"
    TIMEOUT = "timeout"
    RATE_LIMITED = "rate_limited"
    PROVIDER_UNAVAILABLE = "provider_unavailable"
    RETRIES_EXHAUSTED = "retries_exhausted"
    PREVIOUS_INVOICE_VALID = "previous_invoice_valid"
    LEDGER_UNAVAILABLE = "ledger_unavailable"
    INTERNAL_ERROR = "internal_error"
    PROVIDER_REJECTED = "provider_rejected"


#: Errors that are retried through the delay queues; everything else is dead-lettered.
TRANSIENT: frozenset[ErrorCode] = frozenset(
    {
        ErrorCode.NETWORK_ERROR,
        ErrorCode.TIMEOUT,
        ErrorCode.RATE_LIMITED,
        ErrorCode.PROVIDER_UNAVAILABLE,
        # The storno of the generation whose invoice still stands may be on its way.
        ErrorCode.PREVIOUS_INVOICE_VALID,
        ErrorCode.LEDGER_UNAVAILABLE,
    }
)

#: Errors that say the tenant's connection itself is broken (CONTRACTS §6: "connection ERROR").
CONNECTION_ERRORS: frozenset[ErrorCode] = frozenset(
    {
        ErrorCode.AUTH_FAILED,
        ErrorCode.SUBSCRIPTION_REQUIRED,
        ErrorCode.DOCUMENT_BLOCK_NOT_FOUND,
    }
)

_REPLAY = "then replay the message with `invoicing-worker dlq replay`."

#: What a person does about each error, in the words of the providers' help pages.
FIXES: dict[ErrorCode, str] = {
    ErrorCode.AUTH_FAILED: (
        "Generate a new API key in the provider (Billingo: Settings → API keys, read and write "
        "scope; Számlázz.hu: Settings → Számla Agent key), then Connect → Disconnect → paste the "
        "new key → Test → Save (write it into the connections file, or into the key file it "
        "names; if the message says that key file is missing or unusable, restoring the file "
        "is enough), " + _REPLAY
    ),
    ErrorCode.SUBSCRIPTION_REQUIRED: (
        "The provider plan has no API access: upgrade the subscription (Billingo: a plan with "
        "the API add-on), then Test → Save the connection and " + _REPLAY
    ),
    ErrorCode.DOCUMENT_BLOCK_NOT_FOUND: (
        "The document block (invoice pad / number prefix) does not exist in the provider "
        "account: pick an existing one in the connection settings, Test → Save, " + _REPLAY
    ),
    ErrorCode.CURRENCY_MISMATCH: (
        "The sale's currency differs from the connection's: fix the sale's currency in Bookinda "
        "or use a connection for that currency, " + _REPLAY
    ),
    ErrorCode.UNSUPPORTED_CURRENCY: (
        "The provider cannot invoice in this currency: invoice the sale in a supported "
        "currency (e.g. HUF or EUR), " + _REPLAY
    ),
    ErrorCode.UNSUPPORTED_LANGUAGE: (
        "The provider cannot write invoices in this language: set a supported language "
        "(hu, en, de, …) on the connection, " + _REPLAY
    ),
    ErrorCode.INVALID_CUSTOMER_DATA: (
        "Complete the customer profile in Bookinda (a company needs its name, full address and "
        "tax number; a person needs name and address), " + _REPLAY
    ),
    ErrorCode.TAX_NUMBER_INVALID: (
        "Correct the customer's tax number on the customer profile (Hungarian format "
        "12345678-1-23, or an EU VAT number such as DE123456789), " + _REPLAY
    ),
    ErrorCode.INVALID_INVOICE_DATA: (
        "Correct the sale's items (quantity above zero, a VAT rate of 27%, 18%, 5% or an "
        "exemption code instead of 0%, consistent prices), " + _REPLAY
    ),
    ErrorCode.INVALID_MESSAGE: (
        "The event is not a valid Bookinda sale event: fix the publisher (see the error "
        "message for the field), then republish or replay it."
    ),
    ErrorCode.UNKNOWN_TENANT: (
        "Add the tenant's provider connection to the connections file, " + _REPLAY
    ),
    ErrorCode.NOT_INVOICED: (
        "No invoice exists for this sale generation, so there is nothing to storno: check the "
        "sale's history (`invoicing-worker history SALE_ID`); drop the message if nothing is due."
    ),
    ErrorCode.DOCUMENT_MISMATCH: (
        "The storno names a different document than the one issued for this sale generation: "
        "check the sale's history and the document in the provider before replaying."
    ),
    ErrorCode.NETWORK_ERROR: "Nothing to do: the worker waits and retries automatically.",
    ErrorCode.TIMEOUT: "Nothing to do: the worker waits and retries automatically.",
    ErrorCode.RATE_LIMITED: "Nothing to do: the worker slows down and retries automatically.",
    ErrorCode.PROVIDER_UNAVAILABLE: (
        "Nothing to do: the provider is down or in maintenance; the worker retries automatically."
    ),
    ErrorCode.RETRIES_EXHAUSTED: (
        "The provider (or the worker's own ledger) was unreachable for the whole retry budget "
        "(the message names the last error): check the provider's status page, the network "
        "and the ledger database, then " + _REPLAY
    ),
    ErrorCode.LEDGER_UNAVAILABLE: (
        "Nothing to do while it retries: the worker's own ledger database cannot be reached; "
        "if it lasts, check the database (PostgreSQL up and reachable, or the SQLite file's "
        "disk and permissions); nothing is issued until it is back."
    ),
    ErrorCode.INTERNAL_ERROR: (
        "An unexpected error inside the worker failed the same way on every attempt: report it "
        "to the worker's maintainers with the message's x-error-message and the log lines of "
        "its event_id; once a fixed worker is running, " + _REPLAY
    ),
    ErrorCode.PREVIOUS_INVOICE_VALID: (
        "Another invoice of this sale is still valid, so a new one is not issued: storno it "
        "first from Bookinda (a `sale.storno` for that generation; `invoicing-worker history "
        "SALE_ID` shows which), then " + _REPLAY
    ),
    ErrorCode.PROVIDER_REJECTED: (
        "The provider refused the invoice (see the message; NAV errors are handled in the "
        "provider's UI): correct the data, then " + _REPLAY
    ),
}


class InvoicingError(Exception):
    """A failure with a contract error code.

    ``outcome_unknown`` is set when a request that changes state (create, cancel) was sent but
    its answer was lost: the provider may have done it. The next attempt must look the
    document up before asking again, or the customer gets a second invoice.
    ``retry_after`` carries the provider's ``Retry-After`` in seconds when it gave one.
    The message must never contain a secret.
    """

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        retry_after: float | None = None,
        outcome_unknown: bool = False,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retry_after = retry_after
        self.outcome_unknown = outcome_unknown

    @property
    def fix(self) -> str:
        return FIXES[self.code]

    @property
    def transient(self) -> bool:
        return self.code in TRANSIENT
