"""Carrying out an :data:`~worker.decide.Outcome`: the only place that acks.

The guarantee, in one place: **a delivery is acked only after what it caused is durable.**
The order is always

1. the copy (a :class:`Park`'s delay or dead-letter queue), confirmed by the broker;
2. the outcome's events, confirmed by the broker;
3. the ack.

Any failure before the copy is confirmed hands the message back once (nack with requeue), so
the broker delivers it again and nothing is lost. Once the copy is confirmed, the copy carries
the work: the original is acked even if an event cannot be published, because handing it back
too would leave two copies in circulation (and possibly two in the dead-letter queue). The
missed event is counted and logged as ``message.announce_failed``; the copy's next attempt
announces again. An :class:`Ack` whose events fail is handed back: the ledger turns the
redelivery into the same announcement, never a second invoice.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from typing import Literal

import structlog
from aio_pika.abc import AbstractIncomingMessage

from handlers.messages import OutEvent
from worker import metrics
from worker.decide import Ack, HandBack, Outcome, Park
from worker.publisher import Publisher

log = structlog.get_logger(__name__)

#: The pause before a hand-back: at least the first, plus up to the second, seconds (jitter).
HAND_BACK_PAUSE = (0.5, 1.0)


@dataclass(frozen=True, slots=True)
class Settled:
    outcome: Outcome
    #: acked: everything the outcome asked for is done; handed_back: the broker redelivers.
    status: Literal["acked", "handed_back"]
    #: The outcome's events were confirmed (a health change may take effect).
    announced: bool


async def settle(
    outcome: Outcome,
    message: AbstractIncomingMessage,
    publisher: Publisher,
    correlation_id: str | None,
) -> Settled:
    if isinstance(outcome, HandBack):
        await hand_back(message)
        return Settled(outcome, "handed_back", False)
    if isinstance(outcome, Park):
        try:
            await publisher.copy_to_queue(outcome.queue, message, outcome.headers)
        except Exception:
            log.warning("message.park_failed", queue=outcome.queue, exc_info=True)
            await hand_back(message)
            return Settled(outcome, "handed_back", False)
    announced = await _announce(publisher, outcome.events, correlation_id)
    if not announced:
        if isinstance(outcome, Ack):
            await hand_back(message)
            return Settled(outcome, "handed_back", False)
        # The copy is confirmed: it carries the work (see the module docstring).
        metrics.announce_failures_total.inc()
        log.error("message.announce_failed", queue=outcome.queue, events=len(outcome.events))
    await _ack(message)
    return Settled(outcome, "acked", announced)


async def _announce(
    publisher: Publisher, events: tuple[OutEvent, ...], correlation_id: str | None
) -> bool:
    if not events:
        return True
    try:
        await asyncio.gather(*(publisher.event(e, correlation_id) for e in events))
    except Exception:
        log.warning("message.publish_failed", exc_info=True)
        return False
    return True


async def _ack(message: AbstractIncomingMessage) -> None:
    try:
        await message.ack()
    except Exception:
        # The channel that delivered the message is gone; the broker re-delivers it and the
        # ledger makes the second run a duplicate, not a second invoice.
        metrics.ack_failures_total.inc()
        log.warning("message.ack_failed", exc_info=True)


async def hand_back(message: AbstractIncomingMessage) -> None:
    """Nack with requeue, once. A pause first: whatever failed (a broker alarm, a missing
    queue) is not fixed by an immediate redelivery, and a hot loop would burn the quorum
    queue's delivery limit."""
    await asyncio.sleep(HAND_BACK_PAUSE[0] + HAND_BACK_PAUSE[1] * random.random())
    try:
        await message.nack(requeue=True)
    except Exception:
        log.warning("message.requeue_failed", exc_info=True)
