"""Queue names and their idempotent declaration (CONTRACTS §2).

Every queue or exchange the worker owns is named after ``INVOICING_QUEUE`` so that several
deployments (or test runs) share one broker without meeting. Nothing is ever deleted or purged.
"""

from __future__ import annotations

from dataclasses import dataclass

import aio_pika
import structlog
from aio_pika.abc import AbstractChannel, AbstractQueue
from aiormq.exceptions import ChannelPreconditionFailed

from handlers.classify import pick_tier
from worker.settings import Settings, format_duration

log = structlog.get_logger(__name__)

INBOUND_ROUTING_KEYS = ("sale.paid", "sale.storno")


@dataclass(frozen=True)
class Names:
    exchange: str
    queue: str
    dead_letter_queue: str
    dead_letter_exchange: str
    #: (delay in seconds, queue name), shortest first.
    delay_queues: tuple[tuple[float, str], ...]

    @classmethod
    def from_settings(cls, settings: Settings) -> Names:
        return cls(
            exchange=settings.exchange,
            queue=settings.queue,
            dead_letter_queue=settings.dead_letter_queue,
            dead_letter_exchange=f"{settings.queue}.dead-letter",
            delay_queues=tuple(
                (delay, f"{settings.queue}.retry.{format_duration(delay)}")
                for delay in settings.retry_ladder
            ),
        )

    def delay_queue_within(self, seconds: float) -> tuple[float, str]:
        """The longest tier that does not overshoot ``seconds`` (the shortest one if all do):
        for waits that must end on time, with ``x-not-before`` carrying the rest."""
        fitting = [tier for tier in self.delay_queues if tier[0] <= seconds]
        return fitting[-1] if fitting else self.delay_queues[0]

    def delay_queue_for(self, seconds: float) -> tuple[float, str]:
        """The shortest tier that waits at least ``seconds`` (the longest one as the cap)."""
        tier = pick_tier(seconds, tuple(delay for delay, _ in self.delay_queues))
        return next(pair for pair in self.delay_queues if pair[0] == tier)


class _Declarer:
    """Declares on one channel, replacing it when a declaration fails (which closes it)."""

    def __init__(self, connection: aio_pika.abc.AbstractConnection) -> None:
        self._connection = connection
        self.channel: AbstractChannel | None = None

    async def open(self) -> AbstractChannel:
        self.channel = await self._connection.channel()
        return self.channel

    async def queue(self, name: str, arguments: dict[str, object]) -> AbstractQueue:
        assert self.channel is not None
        try:
            return await self.channel.declare_queue(name, durable=True, arguments=arguments)  # type: ignore[arg-type]
        except ChannelPreconditionFailed as exc:
            # The queue exists with other arguments (an older version, or ops' own policy).
            # Never delete it: use it as it is, and say so.
            log.warning("topology.queue_arguments_differ", queue=name, error=str(exc))
            channel = await self.open()
            return await channel.declare_queue(name, passive=True)


async def declare(connection: aio_pika.abc.AbstractConnection, settings: Settings) -> None:
    """Declare everything; safe to run any number of times, from any number of workers."""
    names = Names.from_settings(settings)
    declarer = _Declarer(connection)
    channel = await declarer.open()
    try:
        exchange = await channel.declare_exchange(
            names.exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        # The dead-letter exchange and queue exist before anything can be dead-lettered:
        # RabbitMQ silently drops dead letters whose exchange is missing.
        dlx = await channel.declare_exchange(
            names.dead_letter_exchange, aio_pika.ExchangeType.FANOUT, durable=True
        )
        dlq = await declarer.queue(names.dead_letter_queue, {})
        await dlq.bind(dlx, routing_key="")
        work = await declarer.queue(
            names.queue,
            {
                "x-queue-type": "quorum",
                # A message that crashes workers again and again ends up in the dead-letter
                # queue (with x-death saying delivery_limit) instead of looping forever.
                "x-delivery-limit": 20,
                "x-dead-letter-exchange": names.dead_letter_exchange,
            },
        )
        for key in INBOUND_ROUTING_KEYS:
            await work.bind(exchange, routing_key=key)
        for delay, name in names.delay_queues:
            await declarer.queue(
                name,
                {
                    "x-queue-type": "quorum",
                    "x-message-ttl": int(delay * 1000),
                    "x-dead-letter-exchange": "",
                    "x-dead-letter-routing-key": names.queue,
                    # Quorum queues can confirm the move back to the work queue, so a broker
                    # crash during expiry cannot lose a retried sale.
                    "x-dead-letter-strategy": "at-least-once",
                    "x-overflow": "reject-publish",
                },
            )
        log.info(
            "topology.declared",
            queue=names.queue,
            exchange=names.exchange,
            delay_queues=[n for _, n in names.delay_queues],
        )
    finally:
        if declarer.channel is not None:
            await declarer.channel.close()
