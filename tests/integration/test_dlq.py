"""The dead-letter tooling against the real broker: list / show leave everything in place and
in order; replay moves exactly the matching messages, confirmed, and survives a SIGKILL."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractConnection

from worker import dlq
from worker.cli import build_parser
from worker.settings import Settings

pytestmark = pytest.mark.broker

AMQP_URL = os.environ.get("INVOICING_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
ROOT = Path(__file__).resolve().parents[2]
T0 = datetime(2026, 11, 21, 9, 0, tzinfo=UTC)


async def poll(check: Callable[[], Awaitable[bool]], timeout: float = 8.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.02)


@pytest.fixture
async def connection() -> AsyncIterator[AbstractConnection]:
    try:
        conn = await aio_pika.connect(AMQP_URL, timeout=5)
    except (aio_pika.exceptions.AMQPConnectionError, OSError) as exc:
        pytest.skip(f"no RabbitMQ at {AMQP_URL}: {exc}")
    async with conn:
        yield conn


class Broker:
    """One test's private exchange, dead-letter queue and a ``sale.*`` sink; deleted after."""

    def __init__(self, channel: AbstractChannel) -> None:
        run = uuid.uuid4().hex[:10]
        self.settings = Settings(
            amqp_url=AMQP_URL,
            exchange=f"t-{run}",
            queue=f"t-{run}.sales",
            dead_letter_queue=f"t-{run}.dead",
            publish_timeout_seconds=5.0,
        )
        self.sink = f"t-{run}.sink"
        self.channel = channel
        self.queues = [self.settings.dead_letter_queue, self.sink]

    async def declare(self, *, bind_sink: bool = True) -> None:
        exchange = await self.channel.declare_exchange(
            self.settings.exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        await self.channel.declare_queue(self.settings.dead_letter_queue, durable=True)
        sink = await self.channel.declare_queue(self.sink, durable=True)
        if bind_sink:
            await sink.bind(exchange, routing_key="sale.*")

    async def cleanup(self) -> None:
        for name in [*self.queues, self.settings.queue]:
            await self.channel.queue_delete(name)
        await self.channel.exchange_delete(self.settings.exchange)

    async def park(
        self,
        tenant: str,
        code: str,
        *,
        minutes: int = 0,
        routing_key: str = "sale.paid",
        extra: dict[str, Any] | None = None,
    ) -> str:
        """Put a message into the dead-letter queue the way worker/process.py does."""
        event_id = str(uuid.uuid4())
        at = T0 + timedelta(minutes=minutes)
        headers: dict[str, Any] = {
            "x-error-code": code,
            "x-error-message": f"{code} happened",
            "x-original-routing-key": routing_key,
            "x-tenant-id": tenant,
            "x-attempts": 3,
            "x-first-failed-at": (at - timedelta(minutes=5)).isoformat(),
            "x-dead-lettered-at": at.isoformat(),
            "x-retry-count": 2,
            "x-last-error-code": "timeout",
            **(extra or {}),
        }
        body = json.dumps(
            {"event_id": event_id, "event_type": routing_key, "tenant_id": tenant, "ünnep": 1},
            ensure_ascii=False,
        ).encode()
        await self.channel.default_exchange.publish(
            aio_pika.Message(
                body=body,
                headers=headers,
                message_id=event_id,
                content_type="application/json",
                correlation_id=f"corr-{event_id}",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=self.settings.dead_letter_queue,
        )
        return event_id

    async def count(self, queue: str) -> int:
        declared = await self.channel.declare_queue(queue, passive=True)
        return declared.declaration_result.message_count or 0

    async def drain(self, queue: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
        """Take everything out of ``queue`` (independently of the code under test)."""
        q = await self.channel.declare_queue(queue, passive=True)
        taken = []
        while (message := await q.get(no_ack=True, fail=False)) is not None:
            taken.append(message)
        return taken

    async def ids(self, queue: str) -> list[str | None]:
        return [m.message_id for m in await self.drain(queue)]


@pytest.fixture
async def broker(connection: AbstractConnection) -> AsyncIterator[Broker]:
    channel = await connection.channel()
    b = Broker(channel)
    await b.declare()
    try:
        yield b
    finally:
        await b.cleanup()


async def test_list_groups_and_leaves_everything_in_order(broker: Broker) -> None:
    ids = [
        await broker.park("aurora", "auth_failed", minutes=1),
        await broker.park("bella", "tax_number_invalid", minutes=2),
        await broker.park("aurora", "auth_failed", minutes=3),
        await broker.park("aurora", "tax_number_invalid", minutes=4),
        await broker.park("aurora", "auth_failed", minutes=5),
    ]
    groups = await dlq.summarise(broker.settings)
    again = await dlq.summarise(broker.settings)

    assert groups == again
    assert [(g.error_code, g.tenant, g.count) for g in groups] == [
        ("auth_failed", "aurora", 3),
        ("tax_number_invalid", "aurora", 1),
        ("tax_number_invalid", "bella", 1),
    ]
    assert groups[0].oldest == T0 + timedelta(minutes=1)
    assert groups[0].newest == T0 + timedelta(minutes=5)
    assert groups[0].fix.startswith("Generate a new API key")
    assert await broker.ids(broker.settings.dead_letter_queue) == ids


async def test_list_cli_prints_table(broker: Broker, capsys: pytest.CaptureFixture[str]) -> None:
    await broker.park("aurora", "auth_failed")
    await broker.park("aurora", "auth_failed", minutes=7)
    args = build_parser().parse_args(["dlq", "list"])
    assert await args.func(args, broker.settings) == 0
    out = capsys.readouterr().out
    assert "auth_failed  aurora      2  2026-11-21 09:00:00 UTC  2026-11-21 09:07:00 UTC" in out
    assert "What to do:" in out
    assert await broker.count(broker.settings.dead_letter_queue) == 2


async def test_show_by_position_and_message_id(
    broker: Broker, capsys: pytest.CaptureFixture[str]
) -> None:
    await broker.park("aurora", "auth_failed")
    second = await broker.park("bella", "currency_mismatch", routing_key="sale.storno")

    by_position = await dlq.show(broker.settings, 2)
    by_id = await dlq.show(broker.settings, message_id=second)
    assert by_position == by_id
    assert by_position.message_id == second
    assert by_position.routing_key == "sale.storno"
    assert by_position.tenant == "bella"
    with pytest.raises(dlq.DeadMessageNotFound):
        await dlq.show(broker.settings, 3)

    args = build_parser().parse_args(["dlq", "show", "2"])
    assert await args.func(args, broker.settings) == 0
    out = capsys.readouterr().out
    assert '  "tenant_id": "bella",' in out  # pretty JSON, not escaped
    assert '"ünnep": 1' in out
    assert "x-error-code: currency_mismatch" in out
    assert await broker.count(broker.settings.dead_letter_queue) == 2


async def test_replay_tenant_moves_exactly_its_messages(broker: Broker) -> None:
    a1 = await broker.park("aurora", "auth_failed", minutes=1)
    b1 = await broker.park("bella", "auth_failed", minutes=2)
    a2 = await broker.park("aurora", "tax_number_invalid", minutes=3, routing_key="sale.storno")
    b2 = await broker.park("bella", "unknown_tenant", minutes=4)
    a3 = await broker.park("aurora", "auth_failed", minutes=5, extra={"x-replay-count": 2})
    seen: list[tuple[int, int]] = []

    result = await dlq.replay(
        broker.settings,
        dlq.ReplayFilter(tenant="aurora"),
        progress=lambda done, total: seen.append((done, total)),
    )

    assert (result.total, result.replayed, result.skipped, result.failed) == (5, 3, 2, 0)
    assert [m.message_id for m in result.messages] == [a1, a2, a3]
    assert seen[0] == (0, 5)
    assert seen[-1] == (5, 5)
    await poll(lambda: _has(broker, broker.sink, 3))
    replayed = await broker.drain(broker.sink)
    assert [m.message_id for m in replayed] == [a1, a2, a3]
    assert [m.routing_key for m in replayed] == ["sale.paid", "sale.storno", "sale.paid"]
    for message in replayed:
        headers = message.headers
        assert json.loads(message.body)["event_id"] == message.message_id
        assert message.content_type == "application/json"
        assert message.correlation_id == f"corr-{message.message_id}"
        assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        for reset in ("x-retry-count", "x-first-failed-at", "x-last-error-code"):
            assert reset not in headers
        assert datetime.fromisoformat(str(headers["x-replayed-at"])) > T0
        assert headers["x-original-routing-key"] == message.routing_key
    assert [m.headers["x-replay-count"] for m in replayed] == [1, 1, 3]
    assert await broker.ids(broker.settings.dead_letter_queue) == [b1, b2]


async def test_replay_error_code_keeps_the_rest_in_order(broker: Broker) -> None:
    ids = [
        await broker.park("aurora", code, minutes=i)
        for i, code in enumerate(
            ["auth_failed", "invalid_message", "unknown_tenant", "auth_failed", "invalid_message"]
        )
    ]
    result = await dlq.replay(
        broker.settings, dlq.ReplayFilter(error_codes=frozenset({"auth_failed", "unknown_tenant"}))
    )
    assert (result.replayed, result.skipped, result.failed) == (3, 2, 0)
    await poll(lambda: _has(broker, broker.sink, 3))
    assert await broker.ids(broker.sink) == [ids[0], ids[2], ids[3]]
    assert await broker.ids(broker.settings.dead_letter_queue) == [ids[1], ids[4]]


async def test_replay_time_window_and_limit(broker: Broker) -> None:
    ids = [await broker.park("aurora", "auth_failed", minutes=10 * i) for i in range(6)]
    filters = dlq.ReplayFilter(
        after=T0 + timedelta(minutes=10), before=T0 + timedelta(minutes=50), limit=2
    )
    result = await dlq.replay(broker.settings, filters)
    assert (result.replayed, result.skipped, result.failed) == (2, 4, 0)
    await poll(lambda: _has(broker, broker.sink, 2))
    assert await broker.ids(broker.sink) == ids[1:3]
    assert await broker.ids(broker.settings.dead_letter_queue) == [ids[0], *ids[3:]]


async def test_dry_run_changes_nothing(broker: Broker, capsys: pytest.CaptureFixture[str]) -> None:
    ids = [
        await broker.park("aurora", "auth_failed"),
        await broker.park("bella", "auth_failed"),
        await broker.park("aurora", "invalid_message"),
    ]
    args = build_parser().parse_args(["dlq", "replay", "--tenant", "aurora", "--dry-run"])
    assert await args.func(args, broker.settings) == 0
    captured = capsys.readouterr()
    assert "would replay 2, skipped 1, failed 0" in captured.out
    assert ids[0] in captured.out
    assert ids[2] in captured.out
    assert ids[1] not in captured.out
    assert "dry run: 3/3 (100%)" in captured.err  # not a TTY: plain progress lines
    assert await broker.count(broker.sink) == 0
    assert await broker.ids(broker.settings.dead_letter_queue) == ids


async def test_unroutable_replay_fails_and_stays(broker: Broker) -> None:
    ok = await broker.park("aurora", "auth_failed")
    lost = await broker.park("aurora", "auth_failed", routing_key="nobody.listens")
    after = await broker.park("aurora", "auth_failed")
    result = await dlq.replay(broker.settings, dlq.ReplayFilter())
    assert (result.replayed, result.skipped, result.failed) == (2, 0, 1)
    assert result.failures[0].message_id == lost
    assert "unroutable" in result.failures[0].error
    await poll(lambda: _has(broker, broker.sink, 2))
    assert await broker.ids(broker.sink) == [ok, after]
    assert await broker.ids(broker.settings.dead_letter_queue) == [lost]


async def test_delivery_limit_dead_letters_use_x_death(
    broker: Broker, connection: AbstractConnection
) -> None:
    """A message the work queue itself dead-lettered (x-delivery-limit): no x-error-code, the
    routing key comes from x-death."""
    channel = broker.channel
    exchange = await channel.get_exchange(broker.settings.exchange)
    work = await channel.declare_queue(
        broker.settings.queue,
        durable=True,
        arguments={
            "x-queue-type": "quorum",
            "x-delivery-limit": 0,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": broker.settings.dead_letter_queue,
        },
    )
    await work.bind(exchange, routing_key="sale.storno")
    body = json.dumps({"event_id": "e-1", "tenant_id": "aurora"}).encode()
    await exchange.publish(
        aio_pika.Message(body=body, message_id="e-1", delivery_mode=2), routing_key="sale.storno"
    )
    await poll(lambda: _has(broker, broker.settings.queue, 1))
    message = await work.get(no_ack=False)
    await message.nack(requeue=True)  # one delivery too many: dead-lettered
    await poll(lambda: _has(broker, broker.settings.dead_letter_queue, 1))

    groups = await dlq.summarise(broker.settings)
    assert [(g.error_code, g.tenant, g.count) for g in groups] == [("delivery_limit", "aurora", 1)]
    assert groups[0].oldest is not None
    # From here on only the sink receives sale.*, and it holds nothing yet.
    await work.unbind(exchange, routing_key="sale.storno")
    await broker.drain(broker.sink)

    result = await dlq.replay(
        broker.settings, dlq.ReplayFilter(error_codes=frozenset({"delivery_limit"}))
    )
    assert result.replayed == 1
    await poll(lambda: _has(broker, broker.sink, 1))
    [replayed] = await broker.drain(broker.sink)
    assert replayed.routing_key == "sale.storno"
    assert replayed.body == body
    assert replayed.headers["x-replay-count"] == 1


async def test_replay_killed_midway_loses_nothing(broker: Broker) -> None:
    ids = [await broker.park(f"tenant-{i % 3}", "auth_failed", minutes=i) for i in range(40)]
    env = {
        **os.environ,
        "INVOICING_AMQP_URL": AMQP_URL,
        "INVOICING_EXCHANGE": broker.settings.exchange,
        "INVOICING_QUEUE": broker.settings.queue,
        "INVOICING_DEAD_LETTER_QUEUE": broker.settings.dead_letter_queue,
        "INVOICING_LOG_LEVEL": "warning",
    }
    process = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "worker", "dlq", "replay", "--throttle", "0.05"],
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        # Wait for the first few confirmed replays, then kill without warning.
        await poll(lambda: _has(broker, broker.sink, 4), timeout=15)
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
    assert process.returncode == -signal.SIGKILL  # killed midway, not finished

    async def everything_accounted() -> bool:
        parked = await broker.count(broker.settings.dead_letter_queue)
        return parked + await broker.count(broker.sink) >= len(ids)

    await poll(everything_accounted)
    replayed = await broker.ids(broker.sink)
    parked = await broker.ids(broker.settings.dead_letter_queue)
    assert 4 <= len(replayed) < len(ids)
    assert set(replayed) | set(parked) == set(ids)
    assert replayed == ids[: len(replayed)]
    # What is left is still in order (a message may be both replayed and parked).
    assert parked == [i for i in ids if i in set(parked)]
    assert parked[-1] == ids[-1]


async def _has(broker: Broker, queue: str, n: int) -> bool:
    return await broker.count(queue) >= n
