"""``invoicing-worker``: run the worker and the tools around it."""

from __future__ import annotations

import argparse
import asyncio
import math
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

    from worker.devtools.demo import run_demo

    if "INVOICING_LOG_LEVEL" not in os.environ:
        configure("error")  # the summary is the demo's output; JSON lines only for real trouble

    return await run_demo(settings, keep_running=args.keep_running)


async def _sandbox(args: argparse.Namespace, settings: Settings) -> int:
    from worker.devtools.sandbox import serve_sandboxes

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


async def _bench(args: argparse.Namespace, settings: Settings) -> int:
    from worker.devtools.bench import bench_command

    return await bench_command(args, settings)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError("must be between 0 and 1")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if value < 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def _register_bench(sub: Any) -> None:
    """Add ``bench`` to the top-level subparsers ``sub`` without importing the benchmark."""
    p = sub.add_parser(
        "bench",
        help="throughput, latency, RSS and provider calls of the real worker, vs a bare loop",
        description="Run the real worker (python -m worker run subprocesses) against the local "
        "RabbitMQ (INVOICING_AMQP_URL) and the built-in sandboxes, on queues of its own "
        "(bench.<id>.*, deleted afterwards), and compare it with a bare aio-pika loop doing "
        "consume → the same HTTP calls → confirmed publish → ack in the same run.",
        epilog="By default the sales are pre-loaded into the work queue before the workers "
        "start, and throughput is timed from the first invoice.issued to the last; latency then "
        "includes the wait in the queue. With --rate the workers start first and the sales are "
        "published at that rate, so latency is the per-sale end-to-end time.",
    )
    p.add_argument(
        "--sales",
        type=_positive_int,
        default=None,
        help="sale.paid events (5000; with --fairness: tenant A's burst, 10000)",
    )
    p.add_argument("--tenants", type=_positive_int, default=4, help="tenants (4)")
    p.add_argument(
        "--provider",
        choices=("billingo", "szamlazz", "both"),
        default="billingo",
        help="the tenants' provider; both: alternate (billingo)",
    )
    p.add_argument(
        "--latency",
        type=_non_negative,
        default=0.0,
        help="seconds added to every provider request (sandbox plan.latency; 0)",
    )
    p.add_argument("--prefetch", type=_positive_int, default=64, help="INVOICING_PREFETCH (64)")
    p.add_argument("--processes", type=_positive_int, default=1, help="worker processes (1)")
    p.add_argument(
        "--new-customers",
        type=_fraction,
        default=0.0,
        help="fraction of sales with a customer never seen before (0: customers repeat, so "
        "Billingo partner ids come from the worker's cache)",
    )
    p.add_argument(
        "--ledger-url",
        default=None,
        help="ledger for the workers (default: a fresh SQLite file in a temporary directory; "
        "e.g. postgresql://postgres@127.0.0.1:5432/test)",
    )
    p.add_argument(
        "--rate",
        type=_non_negative,
        default=0.0,
        help="publish at this many sales/s while the workers run (0: pre-load the queue)",
    )
    p.add_argument(
        "--log-level", default="info", help="the workers' INVOICING_LOG_LEVEL (info, as deployed)"
    )
    p.add_argument(
        "--uvloop",
        action="store_true",
        help="run the workers (and the bare loop) on uvloop, without changing the worker code",
    )
    p.add_argument(
        "--no-ceiling", dest="ceiling", action="store_false", help="skip the bare-loop ceiling"
    )
    p.add_argument(
        "--py-spy",
        metavar="FILE",
        default=None,
        help="record the first worker with py-spy (raw collapsed stacks) into FILE",
    )
    p.add_argument(
        "--stall-seconds",
        type=_non_negative,
        default=60.0,
        help="give up when no invoice arrives for this long (60)",
    )
    p.add_argument(
        "--keep", action="store_true", help="keep the temporary directory (logs, ledger)"
    )
    p.add_argument(
        "--zero-latency-reference",
        action="store_true",
        help="with --latency: first run the same settings at zero latency (no ceiling) and "
        "also compare with the lower of the concurrency bound and that throughput",
    )
    p.add_argument(
        "--ledger-floor",
        action="store_true",
        help="pre-loaded runs: also run the bare loop with the three ledger writes of an issued "
        "sale (SQLite), the cost of the exactly-once record against the ceiling",
    )
    fair = p.add_argument_group(
        "fairness",
        "--fairness: one worker process, the Billingo sandbox enforcing --sandbox-rate-limit "
        "requests/min per key and the worker pacing at INVOICING_BILLINGO_REQUESTS_PER_MINUTE "
        "(300); a burst of --sales sales for tenant A, then one sale for tenant B. Reports B's "
        "publish → invoice.issued delay, 429 answers, A's drain rate over --window seconds "
        "after B was issued, and the deferrals (message.deferred). Does not wait for A's "
        "burst to drain; the queues are deleted afterwards.",
    )
    fair.add_argument("--fairness", action="store_true", help="run the fairness scenario")
    fair.add_argument(
        "--window",
        type=_non_negative,
        default=60.0,
        help="seconds to keep measuring A after B was issued (60)",
    )
    fair.add_argument(
        "--sandbox-rate-limit",
        type=int,
        default=300,
        help="requests/min per key the Billingo sandbox allows in --fairness (300; 0: off)",
    )
    p.set_defaults(func=_bench)


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

    from worker import dlq_cli

    dlq_cli.register(sub)
    _register_bench(sub)
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
