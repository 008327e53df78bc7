"""How fast a restarted worker takes over after SIGKILL with creates in flight.

Starts the Billingo sandbox, runs ``worker.devtools.takeover.sigkill_takeover`` against the
local RabbitMQ (a worker process takes ``--sales`` sales, the sandbox holds every create, the
worker is killed, the creates commit, a new worker starts) and prints the seconds from the new
worker's /readyz to the last invoice.issued, with the invoice count.

    .venv/bin/python bench/takeover.py --sales 64 --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import uuid
from pathlib import Path

import aio_pika

from worker.devtools.billingo_sandbox import BillingoSandbox
from worker.devtools.procs import delete_topology
from worker.devtools.samples import Outbox
from worker.devtools.takeover import TakeoverResult, sigkill_takeover
from worker.settings import Settings
from worker.topology import Names, declare


async def once(amqp_url: str, sales: int, tmp: Path) -> TakeoverResult:
    run = uuid.uuid4().hex[:8]
    sandbox = BillingoSandbox(seed=1, rate_limit_per_minute=0)
    secret = f"key-{run}"
    sandbox.add_account(secret, block_ids=(111,))
    connections = tmp / f"connections-{run}.toml"
    connections.write_text(
        f'[tenants."takeover"]\nprovider = "billingo"\napi_key = "{secret}"\nblock_id = 111\n',
        encoding="utf-8",
    )
    settings = Settings(
        amqp_url=amqp_url,
        exchange=f"takeover.{run}.bookinda",
        queue=f"takeover.{run}.sales",
        dead_letter_queue=f"takeover.{run}.dead",
        connections_file=str(connections),
        ledger_url=f"sqlite:///{tmp / f'ledger-{run}.db'}",
        billingo_url=await sandbox.start(),
        billingo_requests_per_minute=0,
        provider_timeout_seconds=3.0,
        in_doubt_grace_seconds=3.0,
        log_level="warning",
    )
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        await declare(connection, settings)
        outbox = await Outbox().attach(channel, settings.exchange)
        return await sigkill_takeover(
            settings,
            sandbox,
            secret,
            "takeover",
            channel,
            outbox,
            tmp / f"workers-{run}.log",
            sales=sales,
        )
    finally:
        await delete_topology(connection, Names.from_settings(settings))
        await connection.close()
        await sandbox.stop()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sales", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="invoicing-takeover-") as tmp:
        for n in range(1, args.runs + 1):
            r = await once(args.amqp_url, args.sales, Path(tmp))
            print(
                f"run {n}: {r.in_flight_at_kill}/{r.sales} creates in flight at SIGKILL; "
                f"restarted worker ready -> all issued in {r.seconds_to_all_issued:.2f} s; "
                f"{r.creates} creates sent, {r.invoices} invoices, {r.duplicates} duplicated"
            )


if __name__ == "__main__":
    asyncio.run(main())
