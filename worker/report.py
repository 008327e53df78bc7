"""``invoicing-worker report``: the help pages' weekly and monthly checks in one command."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from handlers.ledger import ConnectionState, SaleRecord, SaleState
from worker import dlq
from worker.connections import ConnectionRegistry
from worker.ledger import open_ledger
from worker.settings import Settings

#: Storno rate thresholds of the help pages: 1-2 % is normal, 5 % and more is a problem.
STORNO_WARN = 0.05


@dataclass
class TenantRates:
    issued: int = 0
    cancelled: int = 0

    @property
    def storno_rate(self) -> float:
        total = self.issued + self.cancelled
        return self.cancelled / total if total else 0.0


@dataclass
class Report:
    since: datetime
    connections: list[ConnectionState]
    uninvoiced: list[SaleRecord]
    rates: dict[str, TenantRates] = field(default_factory=dict)
    dead_letters: dict[str, int] = field(default_factory=dict)
    dead_letter_error: str | None = None


async def build_report(settings: Settings, days: int, stale_minutes: int) -> Report:
    now = datetime.now(UTC)
    since = now - timedelta(days=days)
    ledger = open_ledger(settings.ledger_url)
    await ledger.open()
    try:
        states = await ledger.load_connection_states()
        counts = await ledger.state_counts(since)
        stuck = await ledger.uninvoiced(now - timedelta(minutes=stale_minutes))
    finally:
        await ledger.close()
    report = Report(since, [s for s in states if s.status != "ACTIVE"], stuck)
    for tenant, state, n in counts:
        rates = report.rates.setdefault(tenant, TenantRates())
        if state in (SaleState.ISSUED, SaleState.CANCEL_PENDING):
            rates.issued += n
        elif state is SaleState.CANCELLED:
            rates.cancelled += n
    try:
        groups = await dlq.summarise(settings)
        totals: collections.Counter[str] = collections.Counter()
        for group in groups:
            totals[group.error_code] += group.count
        report.dead_letters = dict(totals)
    except Exception as exc:  # the broker may be down; the ledger part still answers
        report.dead_letter_error = f"{type(exc).__name__}: {exc}"
    return report


def render(report: Report, registry: ConnectionRegistry | None = None) -> str:
    lines = [f"Invoicing report since {report.since:%Y-%m-%d %H:%M} UTC", ""]
    lines.append("Connections not ACTIVE")
    if not report.connections:
        lines.append("  none")
    for state in report.connections:
        lines.append(
            f"  {state.tenant_id:<24} {state.provider:<9} {state.status}  "
            f"{state.error_code or ''}: {state.message}"
        )
    lines += ["", "Paid sales without an invoice (oldest first)"]
    if not report.uninvoiced:
        lines.append("  none")
    for record in report.uninvoiced:
        created = f"{record.created_at:%Y-%m-%d %H:%M}" if record.created_at else "?"
        lines.append(
            f"  {record.key.tenant_id:<24} {record.key.sale_id:<20} "
            f"gen {record.key.invoice_generation:<3} {record.state:<9} since {created}  "
            f"{record.last_error_code or ''}"
        )
    lines += ["", "Storno rate per tenant (1-2 % normal, 5 % and more a problem)"]
    if not report.rates:
        lines.append("  no invoices in the period")
    for tenant, rates in sorted(report.rates.items()):
        flag = "  ⚠ check why" if rates.storno_rate >= STORNO_WARN else ""
        lines.append(
            f"  {tenant:<24} issued {rates.issued + rates.cancelled:>6}  "
            f"cancelled {rates.cancelled:>5}  {rates.storno_rate:6.1%}{flag}"
        )
    lines += ["", "Dead-lettered messages by error code"]
    if report.dead_letter_error:
        lines.append(f"  unavailable: {report.dead_letter_error}")
    elif not report.dead_letters:
        lines.append("  none")
    for code, n in sorted(report.dead_letters.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {code:<28} {n:>6}")
    return "\n".join(lines)
