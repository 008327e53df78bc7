"""Shared fixtures: the real local RabbitMQ, the provider sandboxes, a worker in-process.

Every test gets its own exchange and queue names (CONTRACTS §2 names everything after
INVOICING_QUEUE), its own ledger and its own sandbox accounts, so tests never meet on the
shared broker, and they delete what they declared.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractConnection

from worker.app import App, build, serve
from worker.devtools.billingo_sandbox import BillingoSandbox
from worker.devtools.procs import (
    delete_topology,
    free_port,
    spawn_worker,
    wait_until,
    worker_environ,
    worker_ready,
)
from worker.devtools.samples import Outbox, publish_event, publish_raw
from worker.devtools.szamlazz_sandbox import SzamlazzSandbox
from worker.settings import Settings
from worker.topology import Names, declare

__all__ = ["free_port", "spawn_worker", "wait_until", "worker_environ", "worker_ready"]

AMQP_URL = os.environ.get("INVOICING_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
POSTGRES_URL = os.environ.get(
    "INVOICING_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)


@dataclass
class Tenant:
    tenant_id: str
    provider: str
    secret: str
    extra: dict[str, Any] = field(default_factory=dict)
    #: Set: the key lives in this file (``api_key_file`` / ``agent_key_file``), not inline.
    key_file: Path | None = None

    def toml(self) -> str:
        key = "api_key" if self.provider == "billingo" else "agent_key"
        lines = [
            f'[tenants."{self.tenant_id}"]',
            f'provider = "{self.provider}"',
            f'{key} = "{self.secret}"'
            if self.key_file is None
            else f'{key}_file = "{self.key_file}"',
        ]
        defaults: dict[str, Any] = (
            {"block_id": 111} if self.provider == "billingo" else {"invoice_prefix": "BELLA"}
        )
        for name, value in {**defaults, **self.extra}.items():
            rendered = (
                str(value).lower()
                if isinstance(value, bool)
                else (f'"{value}"' if isinstance(value, str) else str(value))
            )
            lines.append(f"{name} = {rendered}")
        return "\n".join(lines) + "\n"


@dataclass
class Env:
    """One test's world: settings, sandboxes, broker channel, outbox, and the worker."""

    settings: Settings
    billingo: BillingoSandbox
    szamlazz: SzamlazzSandbox
    connection: AbstractConnection
    channel: AbstractChannel
    outbox: Outbox
    tmp: Path
    tenants: dict[str, Tenant] = field(default_factory=dict)
    app: App | None = None
    _task: asyncio.Task[None] | None = None
    _stack: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)

    @property
    def names(self) -> Names:
        return Names.from_settings(self.settings)

    def add_tenant(
        self, tenant_id: str, provider: str, *, key_file: bool = False, **extra: Any
    ) -> Tenant:
        secret = f"key-{tenant_id}-{uuid.uuid4().hex[:8]}"
        tenant = Tenant(tenant_id, provider, secret, extra)
        if key_file:
            tenant.key_file = self.tmp / f"{tenant_id}.key"
            tenant.key_file.write_text(secret + "\n", encoding="utf-8")
        self.tenants[tenant_id] = tenant
        if provider == "billingo":
            self.billingo.add_account(secret, block_ids=(111,))
        else:
            self.szamlazz.add_account(secret, prefixes=("BELLA",))
        self.write_connections()
        return tenant

    def write_connections(self) -> None:
        path = Path(self.settings.connections_file)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(t.toml() for t in self.tenants.values()), encoding="utf-8")
        tmp.replace(path)  # atomic: the worker never reads half a file

    def documents(self, tenant_id: str) -> list[dict[str, Any]]:
        tenant = self.tenants[tenant_id]
        if tenant.provider == "billingo":
            return [d for d in self.billingo.documents(tenant.secret) if d["type"] == "invoice"]
        return [i for i in self.szamlazz.invoices(tenant.secret) if i["kind"] == "invoice"]

    def cancellations(self, tenant_id: str) -> list[dict[str, Any]]:
        tenant = self.tenants[tenant_id]
        if tenant.provider == "billingo":
            return [
                d for d in self.billingo.documents(tenant.secret) if d["type"] == "cancellation"
            ]
        return [i for i in self.szamlazz.invoices(tenant.secret) if i["kind"] == "reverse"]

    def sandbox(self, tenant_id: str) -> BillingoSandbox | SzamlazzSandbox:
        return self.billingo if self.tenants[tenant_id].provider == "billingo" else self.szamlazz

    async def start_worker(self, *, wait_ready: bool = True) -> App:
        self.app = await self._stack.enter_async_context(build(self.settings))
        self._task = asyncio.create_task(serve(self.app, install_signals=False))
        app = self.app
        if wait_ready:
            await wait_until(lambda: app.consumer.ready, 20, "the worker to consume")
        return app

    async def stop_worker(self) -> None:
        if self.app is not None and self._task is not None:
            self.app.consumer.stop()
            await asyncio.wait_for(self._task, 30)
            self._task = None
        await self._stack.aclose()
        self._stack = contextlib.AsyncExitStack()
        self.app = None

    async def publish(self, event: dict[str, Any]) -> None:
        await publish_event(self.channel, self.settings.exchange, event)

    async def publish_raw(self, routing_key: str, body: bytes) -> None:
        await publish_raw(self.channel, self.settings.exchange, routing_key, body)

    async def queue_depth(self, name: str) -> int:
        queue = await self.channel.declare_queue(name, passive=True)
        count = queue.declaration_result.message_count
        return int(count or 0)

    async def dead_letters(self) -> list[aio_pika.abc.AbstractIncomingMessage]:
        """Every message in the dead-letter queue, left in place (read, then requeued)."""
        channel = await self.connection.channel()
        queue = await channel.declare_queue(self.settings.dead_letter_queue, passive=True)
        messages = []
        while (message := await queue.get(no_ack=False, fail=False)) is not None:
            messages.append(message)
        await channel.close()  # unacked: all go back, in order
        return messages


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    run = uuid.uuid4().hex[:10]
    # No per-key rate limit (sandbox) or pacing (worker) unless a test asks for them: the
    # batches here would otherwise take minutes at Billingo's 300 requests a minute.
    billingo, szamlazz = BillingoSandbox(seed=1, rate_limit_per_minute=0), SzamlazzSandbox(seed=1)
    settings = Settings(
        amqp_url=AMQP_URL,
        exchange=f"test.{run}.bookinda",
        queue=f"test.{run}.sales",
        dead_letter_queue=f"test.{run}.dead",
        connections_file=str(tmp_path / "connections.toml"),
        ledger_url=f"sqlite:///{tmp_path / 'ledger.db'}",
        http_port=0,
        http_host="127.0.0.1",
        billingo_url=await billingo.start(),
        szamlazz_url=await szamlazz.start(),
        retry_delays="200ms,500ms,1s",
        retry_base_seconds=0.2,
        provider_timeout_seconds=2.0,
        connections_poll_seconds=0.1,
        lease_seconds=10.0,
        # The sandboxes commit a request when it arrives, so a lost answer's invoice exists
        # at once; tests that need a late commit set their own grace.
        in_doubt_grace_seconds=1.0,
        liveness_seconds=3.0,
        shutdown_grace_seconds=5.0,
        prefetch=32,
        billingo_requests_per_minute=0,
    )
    (tmp_path / "connections.toml").write_text("", encoding="utf-8")
    connection = await aio_pika.connect(AMQP_URL)
    channel = await connection.channel()
    # As ops do before the first deploy (`invoicing-worker topology`): sales published before
    # any worker runs must have a queue to land in.
    await declare(connection, settings)
    outbox = await Outbox().attach(channel, settings.exchange)
    environment = Env(settings, billingo, szamlazz, connection, channel, outbox, tmp_path)
    try:
        yield environment
    finally:
        await environment.stop_worker()
        try:
            await (await connection.channel()).close()
        except Exception:  # a test restarted the broker: this connection is gone
            with contextlib.suppress(Exception):
                await connection.close()
            connection = await aio_pika.connect(AMQP_URL)
        await delete_topology(connection, Names.from_settings(settings))
        await connection.close()
        await billingo.stop()
        await szamlazz.stop()
