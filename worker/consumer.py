"""The consume loop: connect, declare, consume, and come back after any broker trouble.

We run our own reconnect loop on a plain connection instead of aio-pika's robust one: its
known pitfalls (consumers not restored, a server-side cancel swallowed silently) would leave a
worker that looks alive and consumes nothing. Here any lost connection, channel or consumer
ends the session, and the loop opens a fresh one after a jittered backoff. Deliveries of the
old channel cannot be acked any more; the broker re-delivers them, and the ledger makes the
second run announce the same invoice rather than create another.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable

import aio_pika
import structlog
from aio_pika.abc import AbstractIncomingMessage

from handlers.messages import OutEvent
from worker import metrics
from worker.process import Runtime, process
from worker.publisher import Publisher
from worker.topology import declare

log = structlog.get_logger(__name__)

WATCHDOG_SECONDS = 5.0


def _amqp_url(url: str, heartbeat: int) -> str:
    if "heartbeat=" in url:
        return url
    return f"{url}{'&' if '?' in url else '?'}heartbeat={heartbeat}"


class Consumer:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.ready = False
        self._stop = asyncio.Event()
        self._in_flight: set[asyncio.Task[None]] = set()
        self._sessions = 0
        self._publisher: Publisher | None = None

    def stop(self) -> None:
        """Stop taking messages; :meth:`run` then finishes in-flight work and returns."""
        self._stop.set()

    @property
    def sessions(self) -> int:
        """Broker sessions opened so far (more than one means the worker reconnected)."""
        return self._sessions

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def publish(self, event: OutEvent) -> None:
        """Publish an event that no delivery caused (e.g. a connection re-test)."""
        if self._publisher is None:
            raise ConnectionError(f"no broker connection to publish {event.event_type}")
        await self._publisher.event(event, correlation_id=None)

    async def run(self) -> None:
        await self._until_configured()
        backoff = 0.5
        while not self._stop.is_set():
            try:
                await self._session()
                backoff = 0.5
            except Exception as exc:
                log.warning("broker.session_failed", error=f"{type(exc).__name__}: {exc}")
            finally:
                self.ready = False
                metrics.broker_connected.set(0)
            if self._stop.is_set():
                break
            # Jittered, so a fleet does not reconnect in lockstep after a broker restart.
            delay = backoff * (0.5 + random.random())
            backoff = min(backoff * 2, 15.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=delay)
        if self._in_flight:
            # Tasks of a lost session: their acks cannot land any more, but their ledger and
            # provider calls must finish before the ledger and sessions are closed.
            await asyncio.wait(
                set(self._in_flight), timeout=self.rt.settings.shutdown_grace_seconds
            )
        log.info("consumer.stopped")

    async def _until_configured(self) -> None:
        """No connections file yet (a secret not mounted): every sale would be dead-lettered
        as unknown_tenant, so stay unready and leave the sales queued until it appears (the
        connections watcher reads it)."""
        registry = self.rt.connections
        if not registry.configured:
            log.error("consumer.waiting_for_connections_file", path=str(registry.path))
        while not registry.configured and not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._stop.wait(), timeout=self.rt.settings.connections_poll_seconds
                )

    async def _session(self) -> None:
        settings = self.rt.settings
        connection = await aio_pika.connect(
            _amqp_url(settings.amqp_url, settings.heartbeat_seconds),
            timeout=10,
            client_properties={"connection_name": f"invoicing-worker {self.rt.instance_id}"},
        )
        lost = asyncio.Event()
        try:
            connection.close_callbacks.add(lambda *_: lost.set())
            await declare(connection, settings)
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            channel.close_callbacks.add(lambda *_: lost.set())
            await channel.set_qos(prefetch_count=settings.prefetch)
            exchange = await channel.get_exchange(settings.exchange)
            publisher = Publisher(channel, exchange, settings.publish_timeout_seconds)
            self._publisher = publisher
            queue = await channel.get_queue(settings.queue)
            if self._stop.is_set():
                return
            tag = await queue.consume(self._handler(publisher))
            self._sessions += 1
            self.ready = True
            metrics.broker_connected.set(1)
            log.info(
                "consumer.started",
                queue=settings.queue,
                prefetch=settings.prefetch,
                session=self._sessions,
            )
            underlay = await channel.get_underlay_channel()
            consumers: dict[str, object] = getattr(underlay, "consumers", {tag: None})
            await self._watch(lost, lambda: tag in consumers)
            self.ready = False
            if self._stop.is_set():
                await self._drain(queue, tag)
        finally:
            self.ready = False
            self._publisher = None
            if not connection.is_closed:
                await connection.close()
            if not self._stop.is_set():
                log.warning("broker.connection_lost")

    def _handler(
        self, publisher: Publisher
    ) -> Callable[[AbstractIncomingMessage], Awaitable[None]]:
        async def on_message(message: AbstractIncomingMessage) -> None:
            if self._stop.is_set():
                # Delivered after the stop began: hand it back untouched.
                with contextlib.suppress(Exception):
                    await message.nack(requeue=True)
                return
            task = asyncio.current_task()
            assert task is not None
            self._in_flight.add(task)
            try:
                await process(message, self.rt, publisher)
            finally:
                self._in_flight.discard(task)

        return on_message

    async def _watch(self, lost: asyncio.Event, consuming: Callable[[], bool]) -> None:
        """Until stop, connection loss, or the broker cancelling our consumer (queue deleted,
        consumer timeout): aiormq drops that cancel silently, so we look for it."""
        while not (self._stop.is_set() or lost.is_set()):
            waiters = [asyncio.ensure_future(self._stop.wait()), asyncio.ensure_future(lost.wait())]
            _, pending = await asyncio.wait(
                waiters, timeout=WATCHDOG_SECONDS, return_when=asyncio.FIRST_COMPLETED
            )
            for waiter in pending:
                waiter.cancel()
            if not consuming() and not lost.is_set():
                log.warning("consumer.cancelled_by_broker")
                return

    async def _drain(self, queue: aio_pika.abc.AbstractQueue, tag: str) -> None:
        """Graceful stop: no new deliveries, in-flight work gets the grace period, whatever is
        still running after it is handed back unacked (the broker re-delivers it)."""
        grace = self.rt.settings.shutdown_grace_seconds
        try:
            await queue.cancel(tag, timeout=5)
        except Exception:
            log.warning("consumer.cancel_failed", exc_info=True)
        log.info("consumer.draining", in_flight=len(self._in_flight), grace_seconds=grace)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        # Looped: a delivery already on its way when the cancel went out may still start.
        while self._in_flight and loop.time() < deadline:
            await asyncio.wait(set(self._in_flight), timeout=deadline - loop.time())
        still = set(self._in_flight)
        for task in still:
            task.cancel()
        if still:
            await asyncio.wait(still, timeout=5)
            log.warning("consumer.handed_back", count=len(still))
