"""settle: copy confirmed → events confirmed → ack, and a hand-back at most once."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from worker import settle as settle_module
from worker.decide import Ack, HandBack, Park
from worker.settle import settle


class Message:
    def __init__(self, log: list[str]) -> None:
        self.log = log

    async def ack(self) -> None:
        self.log.append("ack")

    async def nack(self, requeue: bool = True) -> None:
        self.log.append(f"nack(requeue={requeue})")


class Publisher:
    def __init__(self, log: list[str], *, copy_fails: bool = False, event_fails: bool = False):
        self.log = log
        self.copy_fails = copy_fails
        self.event_fails = event_fails

    async def copy_to_queue(self, queue: str, original: Any, headers: Mapping[str, Any]) -> None:
        if self.copy_fails:
            raise ConnectionError("channel closed")
        self.log.append(f"copy:{queue}")

    async def event(self, event: Any, correlation_id: str | None) -> None:
        if self.event_fails:
            raise TimeoutError("no confirm")
        self.log.append(f"event:{event}")


@pytest.fixture(autouse=True)
def no_pause() -> Iterator[None]:
    before = settle_module.HAND_BACK_PAUSE
    settle_module.HAND_BACK_PAUSE = (0.0, 0.0)
    yield
    settle_module.HAND_BACK_PAUSE = before


PARK = Park("retry", "q.retry.5s", {"x-retry-count": 1}, ("invoice.failed",))


async def go(outcome: Any, **faults: bool) -> tuple[str, list[str]]:
    log: list[str] = []
    settled = await settle(outcome, Message(log), Publisher(log, **faults), "ev-1")  # type: ignore[arg-type]
    return settled.status, log


async def test_a_parked_message_is_acked_only_after_its_copy_and_its_event() -> None:
    assert await go(PARK) == ("acked", ["copy:q.retry.5s", "event:invoice.failed", "ack"])


async def test_a_copy_that_fails_hands_the_message_back_once_and_announces_nothing() -> None:
    assert await go(PARK, copy_fails=True) == ("handed_back", ["nack(requeue=True)"])


async def test_a_failed_event_after_a_confirmed_copy_never_requeues_the_original() -> None:
    # Requeueing here would put two copies in circulation (and two in the dead-letter queue).
    status, log = await go(PARK, event_fails=True)
    assert (status, log) == ("acked", ["copy:q.retry.5s", "ack"])


async def test_a_handled_sale_whose_event_fails_is_handed_back_for_the_ledger_to_reannounce() -> (
    None
):
    outcome = Ack("issued", ("invoice.issued",))  # type: ignore[arg-type]
    assert await go(outcome, event_fails=True) == ("handed_back", ["nack(requeue=True)"])
    assert await go(outcome) == ("acked", ["event:invoice.issued", "ack"])


async def test_a_hand_back_outcome_only_nacks() -> None:
    assert await go(HandBack("pipeline failed")) == ("handed_back", ["nack(requeue=True)"])
