"""``invoicing-worker dlq list | show | replay``: the dead-letter queue for operators.

The logic lives in :mod:`worker.dlq`; this module parses arguments and prints.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TextIO

from worker.settings import Settings, safe_url

if TYPE_CHECKING:
    from worker.dlq import DeadMessage, GroupSummary, ReplayResult

_EPILOG = (
    "list and show only read: every message stays in the dead-letter queue, in its order. "
    "replay removes a message from the queue only after the broker confirmed its republish."
)


def register(sub: Any) -> None:
    """Add ``dlq`` and its subcommands to the top-level subparsers ``sub``."""
    p = sub.add_parser(
        "dlq",
        help="inspect and replay the dead-letter queue",
        description="Inspect and replay the dead-letter queue (INVOICING_DEAD_LETTER_QUEUE).",
        epilog=_EPILOG,
    )
    dsub = p.add_subparsers(dest="dlq_command", required=True, metavar="COMMAND")

    c = dsub.add_parser(
        "list",
        help="messages grouped by error code and tenant, with what to do (read-only)",
        description="Summarise the dead-letter queue by error code and tenant: count, oldest "
        "and newest dead-lettering time, and the fix. Read-only.",
    )
    c.set_defaults(func=_list)

    c = dsub.add_parser(
        "show",
        help="one message's headers and body (read-only)",
        description="Print one dead-lettered message: its headers and its body (pretty JSON "
        "when it is JSON). Read-only.",
    )
    c.add_argument("position", nargs="?", type=_positive, help="1-based position in the queue")
    c.add_argument("--message-id", help="find the message by its AMQP message id instead")
    c.set_defaults(func=_show)

    c = dsub.add_parser(
        "replay",
        help="republish dead-lettered messages to the exchange with their original routing key",
        description="Republish the matching messages to INVOICING_EXCHANGE with their original "
        "routing key, the retry state reset and x-replay-count incremented. Each one leaves the "
        "dead-letter queue only after the broker confirmed the republish; the others stay, in "
        "their order. Safe to interrupt: nothing is lost (a message may end up both replayed "
        "and still parked, which the worker handles as a duplicate).",
    )
    c.add_argument("--tenant", help="only this tenant's messages")
    c.add_argument(
        "--error-code",
        action="append",
        dest="error_codes",
        metavar="CODE",
        help="only messages with this error code (repeatable; delivery_limit for messages "
        "the broker dead-lettered after too many deliveries)",
    )
    c.add_argument(
        "--before",
        type=_instant,
        metavar="ISO",
        help="only messages dead-lettered before this time (ISO 8601; UTC unless it has an offset)",
    )
    c.add_argument(
        "--after",
        type=_instant,
        metavar="ISO",
        help="only messages dead-lettered at or after this time (ISO 8601; UTC unless it has "
        "an offset)",
    )
    c.add_argument("--limit", type=_positive, metavar="N", help="replay at most N messages")
    c.add_argument(
        "--dry-run", action="store_true", help="print what would be replayed; change nothing"
    )
    # Seconds to wait before each republish: a crude rate limit, and how the tests stop a
    # replay midway deterministically.
    c.add_argument("--throttle", type=float, default=0.0, help=argparse.SUPPRESS)
    c.set_defaults(func=_replay)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


def _instant(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 date or time: {text!r}") from exc
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


# --- commands ------------------------------------------------------------------------------


async def _guarded(settings: Settings, body: Callable[[], Awaitable[int]]) -> int:
    """Turn the expected operational failures into one line on stderr and exit code 2."""
    import aio_pika

    from worker import dlq

    try:
        return await body()
    except (dlq.DeadLetterQueueMissing, dlq.ExchangeMissing) as exc:
        print(f"error: {exc} (declare it with `invoicing-worker topology`)", file=sys.stderr)
    except (aio_pika.exceptions.AMQPConnectionError, OSError) as exc:
        print(
            f"error: cannot reach the broker at {safe_url(settings.amqp_url)}: {exc}",
            file=sys.stderr,
        )
    return 2


async def _list(args: argparse.Namespace, settings: Settings) -> int:
    from worker import dlq

    async def body() -> int:
        groups = await dlq.summarise(settings)
        print(format_summary(settings.dead_letter_queue, groups))
        return 0

    return await _guarded(settings, body)


async def _show(args: argparse.Namespace, settings: Settings) -> int:
    from worker import dlq

    if (args.position is None) == (args.message_id is None):
        print("error: give a position or --message-id (one of them)", file=sys.stderr)
        return 2

    async def body() -> int:
        try:
            message = await dlq.show(settings, args.position, message_id=args.message_id)
        except dlq.DeadMessageNotFound as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(format_message(settings.dead_letter_queue, message))
        return 0

    return await _guarded(settings, body)


async def _replay(args: argparse.Namespace, settings: Settings) -> int:
    from worker import dlq

    filters = dlq.ReplayFilter(
        tenant=args.tenant,
        error_codes=frozenset(args.error_codes) if args.error_codes else None,
        before=args.before,
        after=args.after,
        limit=args.limit,
    )

    async def body() -> int:
        bar = TextProgress(sys.stderr, "dry run" if args.dry_run else "replay")
        try:
            result = await dlq.replay(
                settings, filters, dry_run=args.dry_run, progress=bar, throttle=args.throttle
            )
        finally:
            bar.close()
        print(format_result(settings, result))
        return 1 if result.failed or result.unexamined else 0

    return await _guarded(settings, body)


# --- rendering -----------------------------------------------------------------------------


class TextProgress:
    """``[#####-----] 12/50`` on stderr: redrawn in place on a terminal, otherwise a line
    at every tenth of the way (so logs and CI output stay readable)."""

    WIDTH = 30

    def __init__(self, stream: TextIO, label: str) -> None:
        self.stream = stream
        self.label = label
        self.tty = stream.isatty()
        self.last_step = -1
        self.drawn = False

    def __call__(self, done: int, total: int) -> None:
        if total <= 0:
            return
        if self.tty:
            filled = self.WIDTH * done // total
            bar = "#" * filled + "-" * (self.WIDTH - filled)
            self.stream.write(f"\r{self.label} [{bar}] {done}/{total}")
            self.drawn = True
        else:
            step = 10 * done // total
            if step == self.last_step:
                return
            self.last_step = step
            self.stream.write(f"{self.label}: {done}/{total} ({100 * done // total}%)\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self.drawn:
            self.stream.write("\n")
            self.stream.flush()


def _when(at: datetime | None) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if at else "-"


def _table(headings: list[str], rows: list[list[str]], right: set[int]) -> str:
    widths = [max(len(r[i]) for r in [headings, *rows]) for i in range(len(headings))]
    lines = []
    for row in [headings, *rows]:
        cells = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def format_summary(queue: str, groups: list[GroupSummary]) -> str:
    total = sum(g.count for g in groups)
    if not total:
        return f"dead-letter queue {queue} is empty"
    rows = [
        [g.error_code, g.tenant or "-", str(g.count), _when(g.oldest), _when(g.newest)]
        for g in groups
    ]
    lines = [
        f"dead-letter queue {queue}: {total} message{'s' if total != 1 else ''} "
        "(read-only: all left in place, in order)",
        "",
        _table(["ERROR CODE", "TENANT", "COUNT", "OLDEST", "NEWEST"], rows, right={2}),
        "",
        "What to do:",
    ]
    seen: set[str] = set()
    for g in groups:
        if g.error_code in seen:
            continue
        seen.add(g.error_code)
        lines.append(f"  {g.error_code}: {g.fix or 'no known fix; see `dlq show`'}")
    return "\n".join(lines)


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def format_body(body: bytes) -> str:
    """Pretty JSON when the body is JSON, else the text, else a note about binary content."""
    try:
        text = body.decode()
    except UnicodeDecodeError:
        return f"<{len(body)} bytes of binary data>"
    try:
        return json.dumps(json.loads(text), indent=2, ensure_ascii=False)
    except json.JSONDecodeError:
        return text


def format_message(queue: str, message: DeadMessage) -> str:
    lines = [f"message {message.position} of {queue}"]
    facts = [
        ("error code", message.error_code),
        ("error message", message.error_message),
        ("tenant", message.tenant),
        ("routing key", message.routing_key),
        ("dead-lettered at", _when(message.dead_lettered_at)),
        ("attempts", message.attempts),
        ("replayed before", message.replay_count),
    ]
    lines += [f"  {name}: {value}" for name, value in facts if value is not None]
    from worker.dlq import fix_for

    fix = fix_for(message.error_code)
    if fix:
        lines.append(f"  fix: {fix}")
    lines.append("properties:")
    lines += [f"  {k}: {_plain(v)}" for k, v in message.properties.items()]
    lines.append("headers:")
    for key, value in message.headers.items():
        plain = _plain(value)
        shown = plain if isinstance(plain, str) else json.dumps(plain, ensure_ascii=False)
        lines.append(f"  {key}: {shown}")
    lines.append("body:")
    lines.append(format_body(message.body))
    return "\n".join(lines)


def format_result(settings: Settings, result: ReplayResult) -> str:
    lines: list[str] = []
    if result.dry_run:
        lines.append(
            f"dry run: would replay {result.replayed} of {result.total} message(s) to "
            f"exchange {settings.exchange}; nothing was changed"
        )
        for m in result.messages:
            lines.append(
                f"  #{m.position}  {m.routing_key}  {m.tenant or '-'}  {m.error_code}  "
                f"{_when(m.dead_lettered_at)}  {m.message_id or '-'}"
            )
    for failure in result.failures:
        lines.append(f"  failed #{failure.position} ({failure.message_id or '-'}): {failure.error}")
    verb = "would replay" if result.dry_run else "replayed"
    summary = f"{verb} {result.replayed}, skipped {result.skipped}, failed {result.failed}"
    if result.unexamined:
        summary += f", not examined {result.unexamined} (the broker channel was lost)"
    if result.duplicates:
        summary += f" ({result.duplicates} replayed but also still parked)"
    lines.append(summary)
    return "\n".join(lines)
