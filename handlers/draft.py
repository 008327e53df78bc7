"""Pure: a paid sale and its tenant's connection → the provider-neutral invoice draft."""

from __future__ import annotations

from datetime import date

from handlers.amounts import compute_lines
from handlers.messages import SalePaid
from providers.base import InvoiceDraft, TenantConnection


def external_key(tenant_id: str, sale_id: str, invoice_generation: int) -> str:
    """The deterministic key the provider stores with the invoice (Billingo vendor_id,
    Számlázz.hu szamlaKulsoAzon), so a lost answer can be looked up instead of re-created."""
    return f"bookinda:{tenant_id}:{sale_id}:{invoice_generation}"


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
