"""The external key names exactly one (tenant, sale, generation), within the providers' limits,
and documents made under the old ``bookinda:{tenant}:{sale}:{gen}`` key are still found where
that key was unambiguous, and never where it was not."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import SecretStr

from handlers.context import Context
from handlers.draft import (
    MAX_KEY_BYTES,
    STORNO_SUFFIX,
    external_key,
    legacy_key,
    lookup_keys,
    parse_external_key,
)
from handlers.messages import SaleStorno
from handlers.parse import event_from
from handlers.sale import handle_storno
from providers.base import (
    BeforeSend,
    Cancellation,
    CancelRequest,
    InvoiceDraft,
    IssuedInvoice,
    TenantConnection,
    no_hook,
)
from providers.errors import InvoicingError
from tests.unit.fakes import QuietProvider
from worker.devtools.samples import storno_event
from worker.ledger.sqlite import SqliteLedger

TRICKY = [
    "h",
    "x:1",
    "h:x",
    "1",
    "",
    ":",
    "::",
    "%",
    "%3A",
    "%25",
    "a%3Ab",
    "a:b:c",
    "bookinda",
    "bookinda-q",
    "storno",
    "1:storno",
    "szálloda-Árvíztűrő",
    "ホテル:東京",
    "emoji-🏨:1",
    "S-2026-000123",
    "x" * 120,
    "ő" * 60,
]
IDS = st.text(alphabet=st.sampled_from("ab:%3A25-ő🏨"), max_size=12) | st.sampled_from(TRICKY)
GENERATIONS = st.integers(min_value=1, max_value=10**6)


def test_todays_keys_are_unchanged_for_ids_without_colon_or_percent() -> None:
    assert (
        external_key("hotel-aurora", "S-2026-000123", 1) == "bookinda:hotel-aurora:S-2026-000123:1"
    )
    assert external_key("szálloda", "S/1", 2) == "bookinda:szálloda:S/1:2"
    assert legacy_key("hotel-aurora", "S-2026-000123", 1) is None
    assert lookup_keys("hotel-aurora", "S-1", 1) == ("bookinda:hotel-aurora:S-1:1",)


def test_the_reported_collision_is_gone() -> None:
    assert external_key("h", "x:1", 1) == "bookinda-q:h:x%3A1:1"
    assert external_key("h:x", "1", 1) == "bookinda-q:h%3Ax:1:1"
    # Neither of them looks up the old, ambiguous bookinda:h:x:1:1.
    assert lookup_keys("h", "x:1", 1) == ("bookinda-q:h:x%3A1:1",)
    assert lookup_keys("h:x", "1", 1) == ("bookinda-q:h%3Ax:1:1",)


def test_tricky_ids_round_trip_or_hash() -> None:
    for tenant in TRICKY:
        for sale in TRICKY:
            key = external_key(tenant, sale, 7)
            assert len(key.encode()) <= MAX_KEY_BYTES
            if key.startswith("bookinda-h:"):
                assert parse_external_key(key) is None
            else:
                assert parse_external_key(key) == (tenant, sale, 7)
                assert parse_external_key(key + STORNO_SUFFIX) == (tenant, sale, 7)


def test_no_two_tricky_sale_generations_share_any_key() -> None:
    owners: dict[str, tuple[str, str, int, str]] = {}
    for tenant in TRICKY:
        for sale in TRICKY:
            for generation in (1, 11):
                invoice = external_key(tenant, sale, generation)
                old = legacy_key(tenant, sale, generation)
                for kind, key in (
                    ("key", invoice),
                    ("storno", invoice + STORNO_SUFFIX),
                    # A legacy key is only ever looked up, by this sale generation alone.
                    *((("legacy", old), ("legacy-storno", old + STORNO_SUFFIX)) if old else ()),
                ):
                    owner = (tenant, sale, generation, kind)
                    assert owners.setdefault(key, owner) == owner, key


@given(IDS, IDS, GENERATIONS, IDS, IDS, GENERATIONS)
def test_keys_differ_whenever_sale_generations_differ(
    t1: str, s1: str, g1: int, t2: str, s2: str, g2: int
) -> None:
    if (t1, s1, g1) != (t2, s2, g2):
        first, second = lookup_keys(t1, s1, g1), lookup_keys(t2, s2, g2)
        assert not set(first) & set(second)
        assert external_key(t1, s1, g1) + STORNO_SUFFIX not in second


@given(IDS, IDS, GENERATIONS)
def test_round_trip(tenant: str, sale: str, generation: int) -> None:
    key = external_key(tenant, sale, generation)
    assert len(key.encode()) <= MAX_KEY_BYTES
    if not key.startswith("bookinda-h:"):
        assert parse_external_key(key) == (tenant, sale, generation)


def test_long_ids_get_a_deterministic_hashed_key_within_the_limit() -> None:
    tenant, sale = "t" * 60, "s" * 60
    key = external_key(tenant, sale, 1)
    assert key == external_key(tenant, sale, 1)
    assert key.startswith("bookinda-h:")
    assert len(key + STORNO_SUFFIX) <= 110  # the length seen to work at Számlázz.hu
    assert key != external_key(tenant, sale, 2)
    assert key != external_key(tenant + "t", sale[1:], 1)
    # A long id without ':' was sent under the old key: it is still looked up by it.
    assert lookup_keys(tenant, sale, 1) == (key, f"bookinda:{tenant}:{sale}:1")
    assert lookup_keys("t:" + tenant, sale, 1) == (external_key("t:" + tenant, sale, 1),)


def test_legacy_key_only_where_the_old_format_named_this_sale_alone() -> None:
    # '%' (no ':'): the new key quotes it, the old one was unambiguous.
    assert lookup_keys("h", "50%", 1) == ("bookinda-q:h:50%25:1", "bookinda:h:50%:1")
    # ':' anywhere: the old key may be another tenant's or sale's.
    assert legacy_key("h", "x:1%", 1) is None
    assert legacy_key("h:x", "1", 1) is None


# ---- the flows use these keys ---------------------------------------------------------------


@dataclass
class KeyedProvider(QuietProvider):
    """Finds documents by exact external key, as Billingo and the Agent do."""

    by_key: dict[str, IssuedInvoice] = field(default_factory=dict)
    looked_up: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    name: Any = "billingo"
    caps_resends: bool = False

    async def issue(
        self, conn: TenantConnection, draft: InvoiceDraft, before_send: BeforeSend = no_hook
    ) -> IssuedInvoice:
        await before_send()
        raise AssertionError("a storno never issues")

    async def find_invoice(self, conn: TenantConnection, external_key: str) -> IssuedInvoice | None:
        self.looked_up.append(external_key)
        return self.by_key.get(external_key)

    async def cancel(
        self, conn: TenantConnection, invoice: IssuedInvoice, request: CancelRequest
    ) -> Cancellation:
        self.cancelled.append(invoice.document_id)
        return Cancellation("cancel", "C-" + invoice.document_id, "STORNO-1")

    async def find_cancellation(
        self, conn: TenantConnection, invoice: IssuedInvoice, request: CancelRequest
    ) -> Cancellation | None:
        return None


class OneAccount:
    """Every tenant connects with the same Billingo key."""

    def get(self, tenant_id: str) -> TenantConnection | None:
        return TenantConnection(
            tenant_id=tenant_id, provider="billingo", secret=SecretStr("k"), block_id=1
        )

    def breaker_error(self, conn: TenantConnection) -> InvoicingError | None:
        return None


@pytest.fixture
async def ledger() -> AsyncIterator[SqliteLedger]:
    ledger = SqliteLedger(":memory:")
    await ledger.open()
    yield ledger
    await ledger.close()


def ctx(ledger: SqliteLedger, provider: KeyedProvider) -> Context:
    return Context(
        ledger=ledger,
        providers={"billingo": provider},
        connections=OneAccount(),
        lease_seconds=30,
        max_provider_attempts=5,
        owner="w1:1",
        today=lambda: date(2026, 12, 2),
        now=lambda: datetime.now(UTC),
    )


def storno(tenant: str, sale: str) -> SaleStorno:
    event = event_from(storno_event(tenant, sale), "sale.storno")
    assert isinstance(event, SaleStorno)
    return event


def doc(document_id: str) -> IssuedInvoice:
    return IssuedInvoice(document_id, "INV-" + document_id, Decimal(100), "HUF")


async def test_storno_never_looks_up_the_ambiguous_old_key(ledger: SqliteLedger) -> None:
    # Tenant h's invoice for sale x:1, made under the old format.
    provider = KeyedProvider({"bookinda:h:x:1:1": doc("H-1")})
    handled = await handle_storno(storno("h:x", "1"), ctx(ledger, provider))
    assert [e.event_type for e in handled.events] == ["invoice.voided"]
    assert provider.looked_up == ["bookinda-q:h%3Ax:1:1"]
    assert provider.cancelled == []


async def test_storno_finds_an_invoice_made_under_the_unambiguous_old_key(
    ledger: SqliteLedger,
) -> None:
    provider = KeyedProvider({"bookinda:h:50%:1": doc("D-1")})
    handled = await handle_storno(storno("h", "50%"), ctx(ledger, provider))
    assert handled.outcome == "cancelled"
    assert provider.looked_up == ["bookinda-q:h:50%25:1", "bookinda:h:50%:1"]
    assert provider.cancelled == ["D-1"]


async def test_storno_finds_an_invoice_by_its_new_key_first(ledger: SqliteLedger) -> None:
    provider = KeyedProvider({"bookinda-q:h:50%25:1": doc("D-2"), "bookinda:h:50%:1": doc("X")})
    await handle_storno(storno("h", "50%"), ctx(ledger, provider))
    assert provider.looked_up == ["bookinda-q:h:50%25:1"]
    assert provider.cancelled == ["D-2"]
