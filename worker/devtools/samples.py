"""Realistic Bookinda events and a bus listener, shared by the demo, the tests and the bench."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

COMPANY: dict[str, Any] = {
    "kind": "company",
    "name": "Aurora Travel Kft.",
    "email": "billing@aurora.example",
    "tax_number": "12345676-2-41",
    "eu_vat_number": None,
    "address": {
        "country_code": "HU",
        "post_code": "1051",
        "city": "Budapest",
        "street": "Nádor utca 7.",
    },
}
PERSON: dict[str, Any] = {
    "kind": "person",
    "name": "Kiss Anna",
    "email": "anna@example.hu",
    "tax_number": None,
    "eu_vat_number": None,
    "address": {
        "country_code": "HU",
        "post_code": "8230",
        "city": "Balatonfüred",
        "street": "Tagore sétány 1.",
    },
}
ROOM: dict[str, Any] = {
    "name": "Double room, 2 nights",
    "quantity": "2",
    "unit": "night",
    "unit_price": "24990",
    "price_type": "gross",
    "vat": "27%",
}


def now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def paid_event(
    tenant_id: str,
    sale_id: str,
    *,
    generation: int = 1,
    currency: str = "HUF",
    customer: dict[str, Any] | None = None,
    items: list[dict[str, Any]] | None = None,
    trigger: str = "auto",
    payment_method: str = "bankcard",
) -> dict[str, Any]:
    return {
        "event_id": str(uuid.uuid4()),
        "event_type": "sale.paid",
        "occurred_at": now_iso(),
        "tenant_id": tenant_id,
        "sale": {
            "id": sale_id,
            "invoice_generation": generation,
            "trigger": trigger,
            "paid_at": now_iso(),
            "fulfillment_date": datetime.now(UTC).date().isoformat(),
            "currency": currency,
            "payment_method": payment_method,
            # Copies: a test that mutates its event must not change every later one.
            "customer": copy.deepcopy(customer if customer is not None else COMPANY),
            "items": copy.deepcopy(items if items is not None else [ROOM]),
        },
    }


def storno_event(
    tenant_id: str,
    sale_id: str,
    *,
    generation: int = 1,
    document_id: str | None = None,
    reason: str = "customer cancelled",
) -> dict[str, Any]:
    event: dict[str, Any] = {
        "event_id": str(uuid.uuid4()),
        "event_type": "sale.storno",
        "occurred_at": now_iso(),
        "tenant_id": tenant_id,
        "sale_id": sale_id,
        "invoice_generation": generation,
        "reason": reason,
    }
    if document_id is not None:
        event["document_id"] = document_id
    return event


async def publish_raw(
    channel: AbstractChannel,
    exchange: str,
    routing_key: str,
    body: bytes,
    message_id: str | None = None,
) -> None:
    ex = await channel.get_exchange(exchange)
    await ex.publish(
        aio_pika.Message(
            body=body,
            content_type="application/json",
            message_id=message_id,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        ),
        routing_key=routing_key,
    )


async def publish_event(channel: AbstractChannel, exchange: str, event: dict[str, Any]) -> None:
    """As Bookinda publishes: persistent, routing key = event type, message_id = event_id."""
    await publish_raw(
        channel,
        exchange,
        event["event_type"],
        json.dumps(event).encode(),
        message_id=event["event_id"],
    )


class Outbox:
    """Listens on the exchange for everything the worker announces (invoice.*, connection.*)."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.messages: list[AbstractIncomingMessage] = []
        self._queue: AbstractQueue | None = None
        self._changed = asyncio.Event()

    async def attach(self, channel: AbstractChannel, exchange: str) -> Outbox:
        self._queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        for key in ("invoice.*", "connection.*"):
            await self._queue.bind(exchange, routing_key=key)
        await self._queue.consume(self._on_message, no_ack=True)
        return self

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self.messages.append(message)
        self.events.append(json.loads(message.body))
        self._changed.set()

    def of_type(self, event_type: str, **match: Any) -> list[dict[str, Any]]:
        return [
            e
            for e in self.events
            if e.get("event_type") == event_type and all(e.get(k) == v for k, v in match.items())
        ]

    async def wait_for(self, predicate: Callable[[Outbox], bool], timeout: float = 30.0) -> None:
        """Poll on every new event until ``predicate`` holds, or fail after ``timeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate(self):
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(
                    f"outbox condition not met within {timeout}s; {len(self.events)} events seen"
                )
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=min(remaining, 0.5))
