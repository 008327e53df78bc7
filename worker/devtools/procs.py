"""Worker processes, polling and clean-up, for the tests and the scenario scripts."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
from asyncio.subprocess import Process
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
from aio_pika.abc import AbstractConnection

from worker.settings import Settings
from worker.topology import Names


async def wait_until(
    predicate: Callable[[], bool | Awaitable[bool]], timeout: float = 20.0, what: str = ""
) -> None:
    """Poll a condition with a deadline (never a guessed sleep)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        await asyncio.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def worker_environ(settings: Settings, http_port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INVOICING_")}
    for name, value in settings.model_dump().items():
        env[f"INVOICING_{name.upper()}"] = str(value)
    env["INVOICING_HTTP_PORT"] = str(http_port)
    return env


async def spawn_worker(settings: Settings, http_port: int, log: Path) -> Process:
    """``invoicing-worker run`` as ops run it: a separate process, logs appended to ``log``."""
    with log.open("ab") as out:  # the child keeps its own copy of the descriptor
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "worker",
            "run",
            env=worker_environ(settings, http_port),
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
        )


async def worker_ready(port: int) -> bool:
    try:
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/readyz") as r:
            return r.status == 200
    except aiohttp.ClientError:
        return False


async def delete_topology(connection: AbstractConnection, names: Names) -> None:
    """Delete what a test or a script declared (never anything else)."""
    channel = await connection.channel()
    for name in (names.queue, names.dead_letter_queue, *(n for _, n in names.delay_queues)):
        with contextlib.suppress(Exception):
            await channel.queue_delete(name)
    for name in (names.exchange, names.dead_letter_exchange):
        with contextlib.suppress(Exception):
            await channel.exchange_delete(name)
    with contextlib.suppress(Exception):
        await channel.close()
