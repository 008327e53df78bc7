"""Fault injection and request logging shared by the provider sandboxes.

Both sandboxes (Billingo, Számla Agent) are aiohttp apps; this middleware sits in front of
their real handlers and can, per matching request:

* ``status``           answer with a status code, doing nothing (e.g. 503, 429 + Retry-After);
* ``delay``            wait, then handle normally (a client that gives up meanwhile cancels it);
* ``commit_late``      handle it ``delay`` seconds after it arrived, whether or not the client
  still waits: a provider committing a request whose client already gave up;
* ``drop``             close the connection without an answer, doing nothing;
* ``commit_then_fail`` do the real work (the document is created), then answer with an error;
* ``commit_then_hang`` do the real work, then never answer (the client times out);
* ``hold``             wait until the test calls ``FaultPlan.release()``, then handle it even if
  the client is gone (work held in flight for as long as a test needs, without guessing a
  delay).

Faults are controlled in-process (``FaultPlan.add``) or over HTTP (``/_sandbox/faults``) so
tests can drive a sandbox that runs in another process.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from aiohttp import web

FaultAction = Literal[
    "status", "delay", "drop", "commit_then_fail", "commit_then_hang", "hold", "commit_late"
]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

CONTROL_PREFIX = "/_sandbox"


@dataclass
class Fault:
    action: FaultAction
    #: Match on the HTTP method (None: any).
    method: str | None = None
    #: Match when the request path contains this text (None: any). The Számla Agent sandbox
    #: also matches on the multipart action name, e.g. "action-xmlagentxmlfile".
    path: str | None = None
    status: int = 503
    body: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    #: How many times the fault fires before it is used up (None: forever).
    times: int | None = None
    #: Chance that a matching request is hit (1.0: every one).
    probability: float = 1.0

    def matches(self, method: str, target: str) -> bool:
        if self.method is not None and self.method.upper() != method.upper():
            return False
        return self.path is None or self.path in target


@dataclass(frozen=True)
class LoggedRequest:
    method: str
    path: str
    #: The sandbox-specific operation name (e.g. "POST /documents", "action-xmlagentxmlfile").
    operation: str
    status: int
    at: float


class FaultPlan:
    """The faults, the global latency and the request log of one sandbox."""

    def __init__(self, *, seed: int | None = None) -> None:
        self.faults: list[Fault] = []
        self.latency: float = 0.0
        self.requests: list[LoggedRequest] = []
        #: Requests a ``hold`` fault is holding right now.
        self.held = 0
        #: Requests a ``delay``, ``commit_late`` or ``hold`` fault is delaying or handling right
        #: now (a test waits for 0 before it counts what the late ones committed).
        self.delayed = 0
        self._late: set[asyncio.Task[web.StreamResponse]] = set()
        self._release = asyncio.Event()
        self._random = random.Random(seed)

    def add(self, fault: Fault) -> Fault:
        self.faults.append(fault)
        return fault

    def clear(self) -> None:
        self.faults.clear()
        self.latency = 0.0

    def release(self) -> None:
        """Let every request held so far go on; later ``hold`` matches wait for the next call."""
        self._release.set()
        self._release = asyncio.Event()

    async def hold(self) -> None:
        released = self._release
        self.held += 1
        try:
            await released.wait()
        finally:
            self.held -= 1

    def take(self, method: str, target: str) -> Fault | None:
        for fault in self.faults:
            if fault.times is not None and fault.times <= 0:
                continue
            if not fault.matches(method, target):
                continue
            if fault.probability < 1.0 and self._random.random() >= fault.probability:
                continue
            if fault.times is not None:
                fault.times -= 1
            return fault
        return None

    def log(self, method: str, path: str, operation: str, status: int) -> None:
        self.requests.append(LoggedRequest(method, path, operation, status, time.time()))

    def count(self, operation: str | None = None) -> int:
        return sum(1 for r in self.requests if operation is None or operation in r.operation)


def _abort(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.abort()


def fault_middleware(
    plan: FaultPlan,
    operation_of: Callable[[web.Request], Awaitable[str]],
) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    """Build the middleware. ``operation_of`` names a request for matching and the log."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith(CONTROL_PREFIX):
            return await handler(request)
        operation = await operation_of(request)
        target = f"{request.path} {operation}"
        if plan.latency > 0:
            await asyncio.sleep(plan.latency)
        fault = plan.take(request.method, target)
        if fault is None:
            response = await handler(request)
        elif fault.action == "delay":
            plan.delayed += 1
            try:
                await asyncio.sleep(fault.delay)
                response = await handler(request)
            finally:
                plan.delayed -= 1
        elif fault.action in ("commit_late", "hold"):
            # The request arrived: the provider does it (after the delay, or once the test
            # releases it) whether or not the client still waits. Shielded, because a client
            # that gives up cancels this middleware; the body is read first for the same reason.
            await request.read()
            label = f"late {request.path}" if fault.action == "commit_late" else operation
            wait = _sleep(fault.delay) if fault.action == "commit_late" else plan.hold()
            late = asyncio.ensure_future(_detached(wait, plan, handler, request, label))
            plan._late.add(late)
            late.add_done_callback(plan._late.discard)
            return await asyncio.shield(late)
        elif fault.action == "status":
            response = web.Response(
                status=fault.status,
                text=fault.body if fault.body is not None else '{"error":{"message":"injected"}}',
                content_type="application/json" if fault.body is None else "text/plain",
                headers=fault.headers,
            )
        elif fault.action == "drop":
            plan.log(request.method, request.path, operation, 0)
            _abort(request)
            raise asyncio.CancelledError
        else:
            # commit_then_*: the provider did the work; only the answer is lost.
            await handler(request)
            if fault.action == "commit_then_hang":
                plan.log(request.method, request.path, operation, -1)
                await asyncio.sleep(fault.delay or 3600)
                _abort(request)
                raise asyncio.CancelledError
            response = web.Response(
                status=fault.status,
                text=fault.body if fault.body is not None else "<html>502 Bad Gateway</html>",
                content_type="text/html",
                headers=fault.headers,
            )
        plan.log(request.method, request.path, operation, response.status)
        return response

    return middleware


async def _sleep(seconds: float) -> None:
    await asyncio.sleep(seconds)


async def _detached(
    wait: Awaitable[None],
    plan: FaultPlan,
    handler: Handler,
    request: web.Request,
    label: str,
) -> web.StreamResponse:
    plan.delayed += 1
    try:
        await wait
        response = await handler(request)
    finally:
        plan.delayed -= 1
    plan.log(request.method, request.path, label, response.status)
    return response


def add_control_routes(app: web.Application, plan: FaultPlan) -> None:
    """``/_sandbox/faults`` (POST a Fault as JSON, DELETE all), ``/_sandbox/latency`` (PUT
    {"seconds": x}), ``/_sandbox/release`` (POST: let held requests go on) and
    ``/_sandbox/requests`` (GET the request log)."""

    async def add_fault(request: web.Request) -> web.Response:
        body: dict[str, Any] = await request.json()
        fault = plan.add(Fault(**body))
        return web.json_response(asdict(fault), status=201)

    async def clear_faults(request: web.Request) -> web.Response:
        plan.clear()
        return web.Response(status=204)

    async def set_latency(request: web.Request) -> web.Response:
        body = await request.json()
        plan.latency = float(body["seconds"])
        return web.json_response({"seconds": plan.latency})

    async def release(request: web.Request) -> web.Response:
        plan.release()
        return web.Response(status=204)

    async def requests(request: web.Request) -> web.Response:
        return web.json_response([asdict(r) for r in plan.requests])

    app.router.add_post(f"{CONTROL_PREFIX}/faults", add_fault)
    app.router.add_delete(f"{CONTROL_PREFIX}/faults", clear_faults)
    app.router.add_put(f"{CONTROL_PREFIX}/latency", set_latency)
    app.router.add_post(f"{CONTROL_PREFIX}/release", release)
    app.router.add_get(f"{CONTROL_PREFIX}/requests", requests)
