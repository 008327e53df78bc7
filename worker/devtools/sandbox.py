"""``invoicing-worker sandbox``: both provider sandboxes as one long-running process."""

from __future__ import annotations

import asyncio

from worker.devtools.billingo_sandbox import BillingoSandbox
from worker.devtools.szamlazz_sandbox import SzamlazzSandbox


def _split(spec: str, default: str) -> tuple[str, str]:
    key, _, extra = spec.partition(":")
    return key, extra or default


async def serve_sandboxes(
    *,
    host: str,
    billingo_port: int,
    szamlazz_port: int,
    billingo_keys: list[str],
    szamlazz_keys: list[str],
    latency: float = 0.0,
) -> None:
    billingo = BillingoSandbox()
    szamlazz = SzamlazzSandbox()
    for spec in billingo_keys:
        key, block = _split(spec, "111")
        billingo.add_account(key, block_ids=(int(block),))
    for spec in szamlazz_keys:
        key, prefix = _split(spec, "BELLA")
        szamlazz.add_account(key, prefixes=(prefix,))
    billingo.plan.latency = szamlazz.plan.latency = latency
    billingo_url = await billingo.start(host, billingo_port)
    szamlazz_url = await szamlazz.start(host, szamlazz_port)
    print(f"Billingo sandbox:     INVOICING_BILLINGO_URL={billingo_url}")
    print(f"Számla Agent sandbox: INVOICING_SZAMLAZZ_URL={szamlazz_url}")
    print(
        "Control: POST /_sandbox/accounts, /_sandbox/faults; GET /_sandbox/requests. Ctrl-C stops."
    )
    try:
        await asyncio.Event().wait()
    finally:
        await billingo.stop()
        await szamlazz.stop()
