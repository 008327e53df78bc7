"""The audit trail as a readable fixed-width table: the ops "History" tab of a sale."""

from __future__ import annotations

from datetime import UTC

from handlers.ledger import AuditEntry

_HEADERS = ("time (UTC)", "gen", "operation", "outcome", "error", "provider", "document", "detail")
_MAX_DETAIL = 120


def _cell(value: object | None) -> str:
    text = "" if value is None else str(value)
    # One entry, one line: provider messages may carry newlines or tabs.
    return " ".join(text.split())


def format_history(entries: list[AuditEntry]) -> str:
    """Oldest first, as given. Adds a tenant column when the entries span several tenants."""
    if not entries:
        return "(no history)"
    several_tenants = len({e.tenant_id for e in entries}) > 1
    headers = ("tenant", *_HEADERS) if several_tenants else _HEADERS
    rows: list[tuple[str, ...]] = []
    for e in entries:
        detail = _cell(e.detail)
        if len(detail) > _MAX_DETAIL:
            detail = detail[: _MAX_DETAIL - 1] + "…"
        row = (
            e.at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3],
            str(e.invoice_generation),
            _cell(e.operation),
            _cell(e.outcome),
            _cell(e.error_code),
            _cell(e.provider),
            _cell(e.document_id),
            detail,
        )
        rows.append((_cell(e.tenant_id), *row) if several_tenants else row)
    widths = [max(len(r[i]) for r in (headers, *rows)) for i in range(len(headers))]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    title = f"History of sale {entries[0].sale_id}"
    if not several_tenants:
        title += f" (tenant {entries[0].tenant_id})"
    out = [title, line(headers), line(tuple("-" * w for w in widths))]
    out.extend(line(r) for r in rows)
    return "\n".join(out)
