"""Confirmed publishing with a timeout on every call.

The channel runs with publisher confirms, so each ``await`` returns only after the broker has
the message (on disk, for persistent messages on durable queues). Callers ack the incoming
message only after that: a crash in between re-delivers it, never loses it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractIncomingMessage

from handlers.messages import OutEvent

HeaderValue = Any


def copy_message(
    original: AbstractIncomingMessage, headers: Mapping[str, HeaderValue]
) -> aio_pika.Message:
    """The original body and properties with new ``headers``.

    Always persistent (a parked or replayed sale must survive a broker restart); no
    expiration (the broker strips it on dead-lettering anyway); no user_id (the broker checks
    it against the connection's user, which may be another one than the publisher's).
    """
    return aio_pika.Message(
        body=original.body,
        headers=dict(headers),
        content_type=original.content_type,
        content_encoding=original.content_encoding,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        priority=original.priority,
        correlation_id=original.correlation_id,
        reply_to=original.reply_to,
        message_id=original.message_id,
        timestamp=original.timestamp,
        type=original.type,
        app_id=original.app_id,
    )


class Publisher:
    def __init__(self, channel: AbstractChannel, exchange: AbstractExchange, timeout: float):
        self._channel = channel
        self._exchange = exchange
        self._timeout = timeout

    async def event(self, event: OutEvent, correlation_id: str | None) -> None:
        message = aio_pika.Message(
            body=event.model_dump_json().encode(),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=event.event_id,
            correlation_id=correlation_id,
            type=event.event_type,
            timestamp=event.occurred_at,
        )
        # mandatory=False: whether Bookinda has bound a queue for invoice.* is not ours to
        # require; the broker still confirms the publish.
        await self._exchange.publish(
            message, routing_key=event.event_type, mandatory=False, timeout=self._timeout
        )

    async def copy_to_queue(
        self,
        queue: str,
        original: AbstractIncomingMessage,
        headers: Mapping[str, HeaderValue],
    ) -> None:
        """Republish the original body and properties, unchanged, with ``headers``, straight
        to ``queue`` (a delay queue or the dead-letter queue)."""
        message = copy_message(original, headers)
        # mandatory=True: a delay or dead-letter queue that is missing must fail the publish
        # (and so the ack), not drop the sale.
        await self._channel.default_exchange.publish(
            message, routing_key=queue, mandatory=True, timeout=self._timeout
        )
