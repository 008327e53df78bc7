"""``invoicing-worker demo``: a small realistic batch through the real worker, end to end.

Local RabbitMQ, the built-in provider sandboxes (no internet, no real keys), a fresh ledger in
``./demo-run``; the demo's queues are its own (``demo.*``), so it never touches a real
deployment's messages on the same broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from pathlib import Path
from typing import Any

import aio_pika
from aio_pika.abc import AbstractConnection

from worker.app import App, build, serve
from worker.devtools.billingo_sandbox import BillingoSandbox
from worker.devtools.samples import (
    COMPANY,
    PERSON,
    ROOM,
    Outbox,
    paid_event,
    publish_event,
    storno_event,
)
from worker.devtools.szamlazz_sandbox import SzamlazzSandbox
from worker.settings import Settings, safe_url
from worker.topology import Names

RUN_DIR = Path("demo-run")
AURORA_KEY = "demo-aurora-billingo-key"
BELLA_KEY = "demo-bella-agent-key"

CONNECTIONS = f"""
# Written by `invoicing-worker demo`: the demo's tenants, pointed at the built-in sandboxes.
[tenants."hotel-aurora"]
provider = "billingo"
api_key = "{AURORA_KEY}"
block_id = 111
currency = "HUF"
language = "hu"
auto_invoice = true

[tenants."panzio-bella"]
provider = "szamlazz"
agent_key = "{BELLA_KEY}"
invoice_prefix = "BELLA"
currency = "HUF"
language = "hu"
e_invoice = true

[tenants."villa-revoked"]
provider = "billingo"
api_key = "demo-key-that-was-revoked"
block_id = 111
currency = "HUF"
language = "hu"
"""


def _free_port(preferred: int) -> int:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])


def _batch() -> tuple[list[dict[str, Any]], dict[str, Any]]:
    breakfast = {
        "name": "Breakfast",
        "quantity": "4",
        "unit": "pcs",
        "unit_price": "3500",
        "price_type": "gross",
        "vat": "5%",
    }
    bad_company = {**COMPANY, "name": "Nameless Ltd.", "tax_number": None}
    sales = [
        paid_event("hotel-aurora", "S-DEMO-001"),
        paid_event("hotel-aurora", "S-DEMO-002", customer=PERSON, items=[ROOM, breakfast]),
        paid_event("hotel-aurora", "S-DEMO-003", customer=PERSON, payment_method="cash"),
        paid_event("panzio-bella", "S-DEMO-101", customer=PERSON),
        paid_event("panzio-bella", "S-DEMO-102", items=[ROOM, breakfast]),
        paid_event("hotel-aurora", "S-DEMO-004", customer=bad_company),
        paid_event("villa-revoked", "S-DEMO-201"),
    ]
    return sales, storno_event("hotel-aurora", "S-DEMO-001", reason="guest cancelled the stay")


async def run_demo(base: Settings, *, keep_running: bool = False) -> int:
    RUN_DIR.mkdir(exist_ok=True)
    (RUN_DIR / "connections.toml").write_text(CONNECTIONS, encoding="utf-8")
    for stale in RUN_DIR.glob("ledger.db*"):
        stale.unlink()
    billingo, szamlazz = BillingoSandbox(), SzamlazzSandbox()
    billingo.add_account(AURORA_KEY, block_ids=(111,))
    szamlazz.add_account(BELLA_KEY, prefixes=("BELLA",))
    settings = base.model_copy(
        update={
            "exchange": "demo.bookinda",
            "queue": "demo.invoicing.sales",
            "dead_letter_queue": "demo.invoicing.dead",
            "connections_file": str(RUN_DIR / "connections.toml"),
            "ledger_url": f"sqlite:///{RUN_DIR / 'ledger.db'}",
            "billingo_url": await billingo.start(),
            "szamlazz_url": await szamlazz.start(),
            "http_port": _free_port(base.http_port),
            "retry_delays": "1s,2s,5s",
            "retry_base_seconds": 1.0,
        }
    )
    print(f"▶ Bookinda invoicing worker demo (broker {safe_url(settings.amqp_url)})")
    try:
        connection = await aio_pika.connect(settings.amqp_url, timeout=10)
    except Exception as exc:
        print(
            f"✗ cannot reach RabbitMQ at {safe_url(settings.amqp_url)}: {exc}\n"
            "  Start it with `rabbitmq-server -detached` (the README's demo command does)."
        )
        return 2
    async with connection, build(settings) as app:
        await _purge_own_queues(connection, settings)
        channel = await connection.channel()
        worker = asyncio.create_task(serve(app, install_signals=False))
        await _wait_ready(app)
        outbox = await Outbox().attach(channel, settings.exchange)
        sales, storno = _batch()
        for event in sales:
            await publish_event(channel, settings.exchange, event)
        print(f"  published {len(sales)} sale.paid events for 3 tenants")
        await outbox.wait_for(lambda o: len(o.of_type("invoice.issued", sale_id="S-DEMO-001")) > 0)
        await publish_event(channel, settings.exchange, storno)
        print("  published 1 sale.storno (S-DEMO-001)")
        await outbox.wait_for(
            lambda o: (
                len(o.of_type("invoice.issued")) >= 5
                and len(o.of_type("invoice.cancelled")) >= 1
                and len([e for e in o.of_type("invoice.failed") if e["final"]]) >= 2
            )
        )
        _summary(outbox, settings)
        if keep_running:
            print("  worker still running; Ctrl-C stops it")
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        app.consumer.stop()
        await worker
    await billingo.stop()
    await szamlazz.stop()
    return 0


async def _purge_own_queues(connection: AbstractConnection, settings: Settings) -> None:
    """Start from empty so the summary shows this run; only the demo's own queues."""
    names = Names.from_settings(settings)
    for name in (settings.queue, settings.dead_letter_queue, *(n for _, n in names.delay_queues)):
        # A passive declare of a missing queue closes its channel: one channel per queue.
        channel = await connection.channel()
        with contextlib.suppress(Exception):
            await (await channel.declare_queue(name, passive=True)).purge()
        with contextlib.suppress(Exception):
            await channel.close()


async def _wait_ready(app: App) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while not app.consumer.ready:
        if loop.time() > deadline:
            raise TimeoutError("the worker did not start consuming within 30 s")
        await asyncio.sleep(0.05)


def _summary(outbox: Outbox, settings: Settings) -> None:
    print("\n✔ issued")
    for e in outbox.of_type("invoice.issued"):
        print(
            f"  {e['sale_id']:<12} {e['tenant_id']:<14} {e['provider']:<9} "
            f"{e['invoice_number']:<22} {e['gross_total']:>9} {e['currency']}"
        )
    print("\n✔ cancelled")
    for e in outbox.of_type("invoice.cancelled"):
        c = e["cancellation"]
        print(f"  {e['sale_id']:<12} {e['invoice_number']} → {c['kind']} {c['invoice_number']}")
    print("\n✗ dead-lettered")
    for e in outbox.of_type("invoice.failed"):
        if e["final"]:
            err = e["error"]
            print(f"  {e['sale_id']:<12} {e['tenant_id']:<14} {err['code']}: {err['message']}")
            print(f"  {'':<12} fix: {err['fix']}")
    for e in outbox.of_type("connection.status"):
        print(
            f"\n⚠ connection {e['tenant_id']} ({e['provider']}) is {e['status']}: {e['error_code']}"
        )
    print(f"""
Where to look next (installed by ./dev in .venv: use .venv/bin/invoicing-worker)
  metrics          http://127.0.0.1:{settings.http_port}/metrics  (while --keep-running)
  dead letters     queue {settings.dead_letter_queue}:
                   INVOICING_DEAD_LETTER_QUEUE={settings.dead_letter_queue} \\
                   invoicing-worker dlq list
  a sale's history INVOICING_LEDGER_URL={settings.ledger_url} invoicing-worker history S-DEMO-001
""")
