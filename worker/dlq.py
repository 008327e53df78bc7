"""The dead-letter queue as an operator sees it: list, show, replay (CONTRACTS §7).

Nothing here prints; :mod:`worker.dlq_cli` renders what these functions return, and the worker
calls :func:`replay` itself to auto-replay a tenant whose connection works again.

How messages are read without being lost or reordered
-----------------------------------------------------
The dead-letter queue is a classic durable queue that nothing else consumes. Every operation
passive-declares it, takes its message count ``N`` and reads exactly ``N`` messages with
``basic.get`` and manual acknowledgement, so messages dead-lettered while we work (including
our own replays failing again) are never looked at twice. Messages we keep are simply never
acked: when our channel closes, RabbitMQ puts every unacked delivery of a classic queue back at
its *original position*, so the messages we leave behind keep their order and their place in
front of anything dead-lettered meanwhile. ``list`` and ``show`` ack nothing at all.

The same property makes replay crash-safe. A message is acked on the dead-letter queue only
after the broker confirmed its republish (publisher confirms, ``mandatory=True`` so an
unroutable replay fails instead of vanishing). If the process dies at any moment (Ctrl-C,
SIGKILL, lost connection), the broker requeues whatever was not acked: every message is then in
the dead-letter queue, or republished, or, when the crash fell between the confirm and the ack,
both. The worker's ledger makes that duplicate harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
)

from handlers.parse import peek_tenant
from providers.errors import FIXES, ErrorCode
from worker.decide import (
    H_ATTEMPTS,
    H_DEAD_LETTERED_AT,
    H_ERROR_CODE,
    H_ERROR_MESSAGE,
    H_ORIGINAL_RK,
    H_TENANT,
    RETRY_STATE_HEADERS,
)
from worker.publisher import copy_message
from worker.settings import Settings

H_REPLAY_COUNT = "x-replay-count"
H_REPLAYED_AT = "x-replayed-at"


#: The code shown for a message the broker dead-lettered after too many deliveries.
DELIVERY_LIMIT = "delivery_limit"
UNKNOWN = "unknown"
_EXTRA_FIXES = {
    DELIVERY_LIMIT: (
        "The message was delivered too often without being handled (workers crashed or were "
        "killed while holding it): find its event_id in the worker logs, fix the cause, then "
        "replay it with `invoicing-worker dlq replay`."
    ),
}

#: Replays in flight at once. Confirms are awaited per message, but pipelined.
REPLAY_WINDOW = 32
_GET_TIMEOUT = 10.0


def fix_for(code: str) -> str:
    """What a person does about ``code`` (CONTRACTS §6), or "" for a code we do not know."""
    try:
        return FIXES[ErrorCode(code)]
    except ValueError:
        return _EXTRA_FIXES.get(code, "")


@dataclass(frozen=True)
class DeadMessage:
    """One message of the dead-letter queue, as read (body and headers unchanged)."""

    #: 1-based place in the queue when it was read.
    position: int
    message_id: str | None
    #: Where a replay publishes it: ``x-original-routing-key``, else the ``x-death`` one.
    routing_key: str | None
    error_code: str
    error_message: str | None
    tenant: str | None
    dead_lettered_at: datetime | None
    attempts: int | None
    replay_count: int
    body: bytes
    headers: Mapping[str, Any]
    #: The AMQP basic properties that are set (content_type, message_id, timestamp, …).
    properties: Mapping[str, Any]


@dataclass(frozen=True)
class GroupSummary:
    error_code: str
    tenant: str | None
    count: int
    oldest: datetime | None
    newest: datetime | None
    fix: str


@dataclass(frozen=True)
class ReplayFilter:
    """Which messages to replay; every given criterion must hold. Empty means all."""

    tenant: str | None = None
    #: Replay only these codes (``delivery_limit`` included); ``None`` means any code.
    error_codes: frozenset[str] | None = None
    #: Dead-lettered strictly before / at or after these instants (``x-dead-lettered-at``).
    before: datetime | None = None
    after: datetime | None = None
    #: Replay at most this many messages.
    limit: int | None = None

    def matches(self, message: DeadMessage) -> bool:
        if self.tenant is not None and message.tenant != self.tenant:
            return False
        if self.error_codes is not None and message.error_code not in self.error_codes:
            return False
        if self.before is not None or self.after is not None:
            at = message.dead_lettered_at
            if at is None:
                return False
            if self.before is not None and not at < _aware(self.before):
                return False
            if self.after is not None and not at >= _aware(self.after):
                return False
        return True


@dataclass(frozen=True)
class ReplayFailure:
    position: int
    message_id: str | None
    error: str


@dataclass
class ReplayResult:
    #: Messages in the dead-letter queue when the replay started (the ones it looked at).
    total: int = 0
    #: Republished, confirmed, and removed from the dead-letter queue (dry run: would be).
    replayed: int = 0
    #: Left in place: not matching the filters, or past ``limit``.
    skipped: int = 0
    #: Matching, but the republish failed; still in the dead-letter queue.
    failed: int = 0
    #: Not looked at because the run stopped early (broker channel lost); still in place.
    unexamined: int = 0
    dry_run: bool = False
    #: The messages replayed (or, in a dry run, that would be), in queue order.
    messages: list[DeadMessage] = field(default_factory=list)
    failures: list[ReplayFailure] = field(default_factory=list)
    #: Republished and confirmed, but the dead-letter copy could not be removed (ack failed);
    #: it stays in the queue as well and a later replay would deliver it again.
    duplicates: int = 0


class DeadMessageNotFound(LookupError):
    pass


class DeadLetterQueueMissing(LookupError):
    pass


class ExchangeMissing(LookupError):
    pass


# --- reading -------------------------------------------------------------------------------


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value if isinstance(value, str) else None


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    text = _text(value)
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _aware(at: datetime) -> datetime:
    """Naive datetimes (AMQP timestamps, operator input) are UTC."""
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def _instant(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return _aware(value)
    text = _text(value)
    if not text:
        return None
    try:
        return _aware(datetime.fromisoformat(text))
    except ValueError:
        return None


def _last_death(headers: Mapping[str, Any]) -> Mapping[str, Any] | None:
    deaths = headers.get("x-death")
    if isinstance(deaths, list | tuple) and deaths and isinstance(deaths[0], Mapping):
        return deaths[0]  # most recent first
    return None


_PROPERTIES = (
    "content_type",
    "content_encoding",
    "delivery_mode",
    "priority",
    "correlation_id",
    "reply_to",
    "expiration",
    "message_id",
    "timestamp",
    "type",
    "user_id",
    "app_id",
)


def describe(position: int, message: AbstractIncomingMessage) -> DeadMessage:
    """Read one delivery's diagnostic headers, with ``x-death`` as the fallback for messages
    the broker itself dead-lettered (the work queue's delivery limit)."""
    headers: dict[str, Any] = dict(message.headers or {})
    death = _last_death(headers)
    code = _text(headers.get(H_ERROR_CODE))
    routing_key = _text(headers.get(H_ORIGINAL_RK))
    dead_at = _instant(headers.get(H_DEAD_LETTERED_AT))
    tenant = _text(headers.get(H_TENANT)) or None
    if death is not None:
        if not code:
            code = _text(death.get("reason"))
        if not routing_key:
            keys = death.get("routing-keys")
            if isinstance(keys, list | tuple) and keys:
                routing_key = _text(keys[0])
        if dead_at is None:
            dead_at = _instant(death.get("time"))
    if tenant is None:
        tenant = peek_tenant(message.body, 1_000_000)
    properties = {
        name: getattr(message, name)
        for name in _PROPERTIES
        if getattr(message, name, None) is not None
    }
    return DeadMessage(
        position=position,
        message_id=message.message_id,
        routing_key=routing_key,
        error_code=code or UNKNOWN,
        error_message=_text(headers.get(H_ERROR_MESSAGE)),
        tenant=tenant,
        dead_lettered_at=dead_at,
        attempts=_int(headers.get(H_ATTEMPTS)),
        replay_count=_int(headers.get(H_REPLAY_COUNT)) or 0,
        body=message.body,
        headers=headers,
        properties=properties,
    )


class _Reader:
    """A connection holding up to ``total`` deliveries of the dead-letter queue, unacked.

    Leaving the ``async with`` closes the connection, which hands every unacked delivery back
    to its original place in the queue.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.connection: AbstractConnection | None = None
        self.channel: AbstractChannel | None = None
        self.queue: AbstractQueue | None = None
        self.total = 0
        self.read = 0

    async def __aenter__(self) -> _Reader:
        self.connection = await aio_pika.connect(self.settings.amqp_url, timeout=10)
        try:
            self.channel = await self.connection.channel(publisher_confirms=False)
            try:
                self.queue = await self.channel.declare_queue(
                    self.settings.dead_letter_queue, passive=True
                )
            except aio_pika.exceptions.ChannelClosed as exc:
                raise DeadLetterQueueMissing(
                    f"dead-letter queue {self.settings.dead_letter_queue!r} does not exist"
                ) from exc
            result = self.queue.declaration_result
            self.total = result.message_count or 0
        except BaseException:
            await self.connection.close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.connection is not None:
            # Shielded so that a Ctrl-C during the close still hands the messages back
            # promptly; if even this fails, the broker requeues them when the socket dies.
            with contextlib.suppress(Exception):
                await asyncio.shield(self.connection.close())

    async def next(self) -> AbstractIncomingMessage | None:
        """The next delivery, or None after ``total`` (or when the queue ran dry)."""
        assert self.queue is not None
        if self.read >= self.total:
            return None
        message = await self.queue.get(no_ack=False, fail=False, timeout=_GET_TIMEOUT)
        if message is None:
            # Someone else took messages since we counted: nothing more to read.
            self.total = self.read
            return None
        self.read += 1
        return message


async def peek(settings: Settings) -> list[DeadMessage]:
    """Every message of the dead-letter queue, in order; all of them stay where they are."""
    messages: list[DeadMessage] = []
    async with _Reader(settings) as reader:
        while (message := await reader.next()) is not None:
            messages.append(describe(reader.read, message))
    return messages


def group(messages: Iterable[DeadMessage]) -> list[GroupSummary]:
    """Group by error code and tenant: largest groups first, then by code and tenant."""
    groups: dict[tuple[str, str | None], list[DeadMessage]] = {}
    for message in messages:
        groups.setdefault((message.error_code, message.tenant), []).append(message)
    summaries = []
    for (code, tenant), members in groups.items():
        times = [m.dead_lettered_at for m in members if m.dead_lettered_at is not None]
        summaries.append(
            GroupSummary(
                error_code=code,
                tenant=tenant,
                count=len(members),
                oldest=min(times) if times else None,
                newest=max(times) if times else None,
                fix=fix_for(code),
            )
        )
    summaries.sort(key=lambda s: (-s.count, s.error_code, s.tenant or ""))
    return summaries


async def summarise(settings: Settings) -> list[GroupSummary]:
    """The dead-letter queue grouped by error code and tenant. Read-only."""
    return group(await peek(settings))


async def show(
    settings: Settings, position: int | None = None, *, message_id: str | None = None
) -> DeadMessage:
    """One message, by 1-based position or by AMQP message id. Read-only."""
    if (position is None) == (message_id is None):
        raise ValueError("give exactly one of position and message_id")
    if position is not None and position < 1:
        raise ValueError("positions start at 1")
    async with _Reader(settings) as reader:
        while (message := await reader.next()) is not None:
            if reader.read == position or (
                message_id is not None and message.message_id == message_id
            ):
                return describe(reader.read, message)
        size = reader.total
    wanted = f"position {position}" if position is not None else f"message id {message_id!r}"
    raise DeadMessageNotFound(f"no message at {wanted} (the queue holds {size})")


# --- replay --------------------------------------------------------------------------------


def replay_headers(headers: Mapping[str, Any], now: datetime) -> dict[str, Any]:
    """The headers a replayed message carries: the retry state reset (a fresh retry budget),
    the replay counted and stamped. The dead-letter diagnostics stay, so a replay that fails
    again is recognisable (they are overwritten if it is dead-lettered again)."""
    result = {k: v for k, v in headers.items() if k not in RETRY_STATE_HEADERS}
    result[H_REPLAY_COUNT] = (_int(headers.get(H_REPLAY_COUNT)) or 0) + 1
    result[H_REPLAYED_AT] = now.isoformat()
    return result


def _republished(message: AbstractIncomingMessage, now: datetime) -> aio_pika.Message:
    """The original body and properties, with :func:`replay_headers`."""
    return copy_message(message, replay_headers(message.headers or {}, now))


class _Replayer:
    """Publishes matching messages with confirms, a bounded number at a time, and acks each
    dead-letter copy only after its own confirm."""

    def __init__(
        self,
        channel: AbstractChannel,
        exchange: AbstractExchange,
        timeout: float,
        result: ReplayResult,
    ) -> None:
        self.channel = channel
        self.exchange = exchange
        self.timeout = timeout
        self.result = result
        self.window = asyncio.Semaphore(REPLAY_WINDOW)
        self.in_flight: dict[str, asyncio.Task[None]] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.broken = False

    async def submit(self, dead: DeadMessage, message: AbstractIncomingMessage) -> None:
        # aiormq matches a basic.return to its publish by message_id: two publishes in flight
        # with the same id (a message replayed twice after a crash) could swap their outcomes,
        # so a duplicate id waits for the earlier one.
        earlier = self.in_flight.get(dead.message_id) if dead.message_id else None
        if earlier is not None:
            await asyncio.wait({earlier})
        await self.window.acquire()
        task = asyncio.create_task(self._one(dead, message))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        if dead.message_id:
            self.in_flight[dead.message_id] = task
        # Let the task write its publish now, so publishes leave in queue order.
        await asyncio.sleep(0)

    async def _one(self, dead: DeadMessage, message: AbstractIncomingMessage) -> None:
        try:
            assert dead.routing_key is not None
            try:
                await self.exchange.publish(
                    _republished(message, datetime.now(UTC)),
                    routing_key=dead.routing_key,
                    mandatory=True,
                    timeout=self.timeout,
                )
            except Exception as exc:
                # Not acked: the dead-letter copy goes back to its place when we close.
                self.result.failed += 1
                self.result.failures.append(_failure(dead, exc))
                if self.channel.is_closed:
                    self.broken = True
                return
            try:
                await message.ack()
            except Exception as exc:
                self.result.duplicates += 1
                self.result.failures.append(
                    _failure(dead, exc, "republished, but still in the dead-letter queue: ")
                )
            self.result.replayed += 1
            self.result.messages.append(dead)
        finally:
            self.window.release()
            if dead.message_id and self.in_flight.get(dead.message_id) is asyncio.current_task():
                del self.in_flight[dead.message_id]

    async def drain(self) -> None:
        if self.tasks:
            await asyncio.wait(set(self.tasks))


def _failure(dead: DeadMessage, exc: BaseException, prefix: str = "") -> ReplayFailure:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, aio_pika.exceptions.PublishError):
        text = f"unroutable: no queue is bound to {dead.routing_key!r}"
    elif isinstance(exc, TimeoutError):
        text = "no confirm from the broker in time"
    return ReplayFailure(dead.position, dead.message_id, prefix + text)


async def replay(
    settings: Settings,
    filters: ReplayFilter,
    *,
    dry_run: bool = False,
    progress: Callable[[int, int], None] | None = None,
    throttle: float = 0.0,
) -> ReplayResult:
    """Republish the matching dead-lettered messages to ``INVOICING_EXCHANGE`` with their
    original routing keys; everything else stays in the dead-letter queue, in order.

    ``progress(done, total)`` is called after each message looked at. ``throttle`` waits that
    many seconds before each replay (a rate limit, and the tests' way to interrupt midway).
    Ordering and crash safety: see the module docstring.
    """
    result = ReplayResult(dry_run=dry_run)
    async with _Reader(settings) as reader:
        result.total = reader.total
        assert reader.connection is not None
        replayer: _Replayer | None = None
        if not dry_run and reader.total:
            # A channel of its own: a broker error on a publish closes that channel only, and
            # the deliveries we hold on the reading channel stay ours to ack or hand back.
            publish_channel = await reader.connection.channel(
                publisher_confirms=True, on_return_raises=True
            )
            try:
                exchange = await publish_channel.get_exchange(settings.exchange, ensure=True)
            except aio_pika.exceptions.ChannelClosed as exc:
                raise ExchangeMissing(f"exchange {settings.exchange!r} does not exist") from exc
            replayer = _Replayer(
                publish_channel, exchange, settings.publish_timeout_seconds, result
            )
        if progress is not None:
            progress(0, reader.total)
        planned = 0
        while filters.limit is None or planned < filters.limit:
            if replayer is not None and replayer.broken:
                break
            message = await reader.next()
            if message is None:
                break
            dead = describe(reader.read, message)
            if filters.matches(dead):
                if dead.routing_key is None:
                    result.failed += 1
                    result.failures.append(
                        ReplayFailure(dead.position, dead.message_id, "no original routing key")
                    )
                elif replayer is None:
                    planned += 1
                    result.replayed += 1
                    result.messages.append(dead)
                else:
                    planned += 1
                    if throttle > 0:
                        await asyncio.sleep(throttle)
                    await replayer.submit(dead, message)
            if progress is not None:
                progress(reader.read, reader.total)
        if replayer is not None:
            await replayer.drain()
            result.messages.sort(key=lambda m: m.position)
            result.failures.sort(key=lambda f: f.position)
            if replayer.broken:
                result.unexamined = reader.total - reader.read
        result.skipped = result.total - result.replayed - result.failed - result.unexamined
        if progress is not None:
            progress(reader.total, reader.total)
    return result
