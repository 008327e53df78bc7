"""Pure: a paid sale and its tenant's connection → the provider-neutral invoice draft."""

from __future__ import annotations

import hashlib
from datetime import date

from handlers.amounts import compute_lines
from handlers.messages import SalePaid
from providers.base import InvoiceDraft, TenantConnection

#: Longest external key sent, in UTF-8 bytes. Neither provider documents a limit; 110
#: characters are known to work at Számlázz.hu (szamlazz-agent.md §8), and the cancellation
#: key adds STORNO_SUFFIX to this.
MAX_KEY_BYTES = 100
STORNO_SUFFIX = ":storno"
_PLAIN, _QUOTED, _HASHED = "bookinda:", "bookinda-q:", "bookinda-h:"


def _quote(part: str) -> str:
    return part.replace("%", "%25").replace(":", "%3A")


def _unquote(part: str) -> str:
    return part.replace("%3A", ":").replace("%25", "%")


def _is_plain(part: str) -> bool:
    return "%" not in part and ":" not in part


def external_key(tenant_id: str, sale_id: str, invoice_generation: int) -> str:
    """The deterministic key the provider stores with the invoice (Billingo vendor_id,
    Számlázz.hu szamlaKulsoAzon), so a lost answer can be looked up instead of re-created.

    It must name exactly one (tenant, sale, generation): tenants may share one provider
    account, and a lookup that finds another sale's invoice would adopt and cancel it.

    - ``bookinda:{tenant}:{sale}:{gen}`` when neither id contains ``%`` or ``:`` (the only
      format before, so the invoices of such ids keep their key);
    - ``bookinda-q:{tenant}:{sale}:{gen}`` otherwise, with ``%`` → ``%25`` and ``:`` → ``%3A``
      in both ids, so the three parts split apart again at the ``:``;
    - ``bookinda-h:{sha256 of the quoted parts}`` when either form would exceed
      MAX_KEY_BYTES (one-way: such keys cannot be read back, only recomputed).

    The three prefixes never meet, so no two sale generations share a key.
    """
    if _is_plain(tenant_id) and _is_plain(sale_id):
        key = f"{_PLAIN}{tenant_id}:{sale_id}:{invoice_generation}"
    else:
        key = f"{_QUOTED}{_quote(tenant_id)}:{_quote(sale_id)}:{invoice_generation}"
    if len(key.encode()) <= MAX_KEY_BYTES:
        return key
    quoted = f"{_quote(tenant_id)}:{_quote(sale_id)}:{invoice_generation}"
    return _HASHED + hashlib.sha256(quoted.encode()).hexdigest()


def legacy_key(tenant_id: str, sale_id: str, invoice_generation: int) -> str | None:
    """The key a document of this sale generation got before keys were quoted, when it
    still names only this sale generation and differs from :func:`external_key`; else None.

    The old ``bookinda:{tenant}:{sale}:{gen}`` was ambiguous only when an id held ``:``
    (tenant ``h`` sale ``x:1`` and tenant ``h:x`` sale ``1`` both gave ``bookinda:h:x:1:1``).
    Without ``:`` it has exactly three separators, so it splits one way only, and no new key
    equals it (new keys with ``%`` or of that length use the other prefixes). With ``:`` it
    is never looked up: a document found by it might be another tenant's or sale's.
    """
    if ":" in tenant_id or ":" in sale_id:
        return None
    old = f"{_PLAIN}{tenant_id}:{sale_id}:{invoice_generation}"
    return None if old == external_key(tenant_id, sale_id, invoice_generation) else old


def lookup_keys(tenant_id: str, sale_id: str, invoice_generation: int) -> tuple[str, ...]:
    """The keys to look this sale generation's invoice up by, in order: its own key, then
    the key documents made before keys were quoted carry, where that is unambiguous."""
    key = external_key(tenant_id, sale_id, invoice_generation)
    old = legacy_key(tenant_id, sale_id, invoice_generation)
    return (key,) if old is None else (key, old)


def parse_external_key(key: str) -> tuple[str, str, int] | None:
    """(tenant, sale, generation) of a plain or quoted key (a cancellation key too: its
    STORNO_SUFFIX is ignored); None for a hashed key or anything else."""
    key = key.removesuffix(STORNO_SUFFIX)
    for prefix, read in ((_PLAIN, str), (_QUOTED, _unquote)):
        if key.startswith(prefix):
            parts = key.removeprefix(prefix).split(":")
            if len(parts) == 3 and parts[2].isascii() and parts[2].isdigit():
                return read(parts[0]), read(parts[1]), int(parts[2])
    return None


def build_draft(event: SalePaid, conn: TenantConnection, today: date) -> InvoiceDraft:
    sale = event.sale
    lines = compute_lines(sale.items, sale.currency)
    return InvoiceDraft(
        tenant_id=event.tenant_id,
        sale_id=sale.id,
        invoice_generation=sale.invoice_generation,
        external_key=external_key(event.tenant_id, sale.id, sale.invoice_generation),
        currency=sale.currency,
        language=conn.language,
        payment_method=sale.payment_method,
        fulfillment_date=sale.fulfillment_date,
        issue_date=today,
        # The sale is paid, so the invoice is due on the day it is issued.
        due_date=today,
        paid=True,
        customer=sale.customer,
        lines=lines,
        net_total=sum((line.net_amount for line in lines), start=lines[0].net_amount * 0),
        vat_total=sum((line.vat_amount for line in lines), start=lines[0].vat_amount * 0),
        gross_total=sum((line.gross_amount for line in lines), start=lines[0].gross_amount * 0),
        comment=f"Bookinda sale {sale.id}",
    )
