"""The SQLite ledger alone: CPU per sale and commits for the writes of an issued sale.

Each simulated sale does what ``handle_paid`` does to the ledger (acquire the lease,
start_issue, a provider call of 0-6 ms, record_issued releasing the lease, release), with
``--concurrency`` sales in flight like the worker's prefetch. Prints CPU ms per sale, wall
time, group commits inline / on the thread, checkpoints and the largest WAL seen.

    .venv/bin/python bench/ledger_bench.py --sales 5000 --concurrency 64
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from decimal import Decimal
from pathlib import Path

from handlers.ledger import SaleKey
from providers.base import IssuedInvoice
from worker.ledger.sqlite import SqliteLedger

INVOICE = IssuedInvoice("doc-1", "INV-1", Decimal("49980.00"), "HUF")


async def run(sales: int, concurrency: int, path: Path) -> None:
    ledger = SqliteLedger(str(path))
    await ledger.open()
    slots = asyncio.Semaphore(concurrency)
    wal = path.with_name(path.name + "-wal")
    largest_wal = 0

    async def sale(n: int) -> None:
        async with slots:
            key = SaleKey("tenant", f"S-{n}", 1)
            assert await ledger.acquire(key, "w", 30) is not None
            await ledger.start_issue(key, "w", "billingo", "ev")
            await asyncio.sleep(0.001 * (n % 7))  # the provider call
            await ledger.record_issued(
                key, "w", "ev", "billingo", INVOICE, found=False, release=True
            )
            await ledger.release(key, "w")
            if n % 100 == 0:
                nonlocal largest_wal
                largest_wal = max(largest_wal, wal.stat().st_size if wal.exists() else 0)

    cpu, wall = time.process_time(), time.monotonic()
    try:
        await asyncio.gather(*(sale(n) for n in range(sales)))
    finally:
        await ledger.close()
    cpu, wall = time.process_time() - cpu, time.monotonic() - wall
    print(f"sales                 {sales} at concurrency {concurrency}")
    print(f"CPU ms / sale         {1000 * cpu / sales:.3f}")
    print(f"wall                  {wall:.2f} s ({sales / wall:,.0f} sales/s)")
    print(f"commits inline/thread {ledger.inline_commits} / {ledger.thread_commits}")
    print(f"checkpoints           {ledger.checkpoints}")
    print(f"largest WAL           {largest_wal / 1e6:.1f} MB (every 100th sale)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sales", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--asyncio", action="store_true", help="plain asyncio, not uvloop")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        coro = run(args.sales, args.concurrency, Path(tmp) / "ledger.db")
        if args.asyncio:
            asyncio.run(coro)
        else:
            import uvloop

            uvloop.run(coro)


if __name__ == "__main__":
    main()
