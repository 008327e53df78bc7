"""``invoicing-worker``: run the worker and the tools around it."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from worker.logging import configure
from worker.settings import Settings

Command = Callable[[argparse.Namespace, Settings], Coroutine[Any, Any, int]]


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    from worker.app import run

    await run(settings)
    return 0


async def _topology(args: argparse.Namespace, settings: Settings) -> int:
    import aio_pika

    from worker.topology import Names, declare

    connection = await aio_pika.connect(settings.amqp_url, timeout=10)
    async with connection:
        await declare(connection, settings)
    names = Names.from_settings(settings)
    print(f"exchange {names.exchange} (topic) → queue {names.queue} (sale.paid, sale.storno)")
    print("delay queues: " + ", ".join(name for _, name in names.delay_queues))
    print(f"dead-letter queue {names.dead_letter_queue} (via {names.dead_letter_exchange})")
    return 0


async def _demo(args: argparse.Namespace, settings: Settings) -> int:
    import os

    from worker.demo import run_demo

    if "INVOICING_LOG_LEVEL" not in os.environ:
        configure("error")  # the summary is the demo's output; JSON lines only for real trouble

    return await run_demo(settings, keep_running=args.keep_running)


async def _sandbox(args: argparse.Namespace, settings: Settings) -> int:
    from worker.sandbox import serve_sandboxes

    await serve_sandboxes(
        host=args.host,
        billingo_port=args.billingo_port,
        szamlazz_port=args.szamlazz_port,
        billingo_keys=args.billingo_key,
        szamlazz_keys=args.szamlazz_key,
        latency=args.latency,
    )
    return 0


async def _history(args: argparse.Namespace, settings: Settings) -> int:
    from worker.ledger import open_ledger
    from worker.ledger.history import format_history

    ledger = open_ledger(settings.ledger_url)
    await ledger.open()
    try:
        entries = await ledger.history(args.sale_id, args.tenant)
    finally:
        await ledger.close()
    if not entries:
        print(f"no history for sale {args.sale_id}")
        return 1
    print(format_history(entries))
    return 0


async def _connections_check(args: argparse.Namespace, settings: Settings) -> int:
    from worker.tools import connections_check

    return await connections_check(settings, args.tenant)


async def _report(args: argparse.Namespace, settings: Settings) -> int:
    from worker.report import build_report, render

    report = await build_report(settings, args.days, args.stale_minutes)
    print(render(report))
    return 1 if report.connections or report.uninvoiced else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="invoicing-worker",
        description="Bookinda invoicing worker: sale events on RabbitMQ become Billingo or "
        "Számlázz.hu invoices. Settings come from INVOICING_* environment variables.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="consume sale events until SIGTERM / SIGINT")
    p.set_defaults(func=_run)

    p = sub.add_parser(
        "demo", help="a newcomer's first run: local RabbitMQ, built-in provider sandboxes"
    )
    p.add_argument(
        "--keep-running",
        action="store_true",
        help="keep the worker and sandboxes up after the summary (Ctrl-C stops)",
    )
    p.set_defaults(func=_demo)

    p = sub.add_parser("topology", help="declare the exchange and queues (idempotent)")
    p.set_defaults(func=_topology)

    p = sub.add_parser("sandbox", help="run the Billingo and Számla Agent sandboxes")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--billingo-port", type=int, default=8081)
    p.add_argument("--szamlazz-port", type=int, default=8082)
    p.add_argument(
        "--billingo-key",
        action="append",
        default=[],
        metavar="KEY[:BLOCK]",
        help="an API key the Billingo sandbox accepts (repeatable)",
    )
    p.add_argument(
        "--szamlazz-key",
        action="append",
        default=[],
        metavar="KEY[:PREFIX]",
        help="an agent key the Számla Agent sandbox accepts (repeatable)",
    )
    p.add_argument("--latency", type=float, default=0.0, help="seconds added to every request")
    p.set_defaults(func=_sandbox)

    p = sub.add_parser("history", help="the audit trail of one sale, as a table")
    p.add_argument("sale_id")
    p.add_argument("--tenant", default=None)
    p.set_defaults(func=_history)

    p = sub.add_parser("connections", help="provider connection tools")
    csub = p.add_subparsers(dest="connections_command", required=True, metavar="COMMAND")
    c = csub.add_parser("check", help="test each connection (Test → Save): ACTIVE or ERROR")
    c.add_argument("tenant", nargs="?", default=None)
    c.set_defaults(func=_connections_check)

    p = sub.add_parser(
        "report", help="weekly / monthly checks: connections, uninvoiced sales, storno rate, DLQ"
    )
    p.add_argument("--days", type=int, default=7, help="the period for the storno rate")
    p.add_argument(
        "--stale-minutes",
        type=int,
        default=30,
        help="a paid sale without an invoice for this long is listed",
    )
    p.set_defaults(func=_report)

    from worker import bench, dlq_cli

    dlq_cli.register(sub)
    bench.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = Settings()
    configure(settings.log_level)
    func: Command = args.func
    try:
        code = _run_loop(func(args, settings), settings.uvloop)
    except KeyboardInterrupt:
        code = 130
    return code


def _run_loop(main: Coroutine[Any, Any, int], use_uvloop: bool) -> int:
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run(main)
    return asyncio.run(main)


if __name__ == "__main__":
    sys.exit(main())
