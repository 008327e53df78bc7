"""The connections file and key files fail safe: gone or unreadable, no sale is lost to
``unknown_tenant``; back again, every sale is issued without a restart."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import REGISTRY

from tests.conftest import Env, free_port, spawn_worker, wait_until, worker_ready
from worker.devtools.samples import paid_event

pytestmark = pytest.mark.broker


async def _depth(env: Env, queue: str) -> int:
    return await env.queue_depth(queue)


def _issued(env: Env, sale_ids: set[str]) -> bool:
    return sale_ids <= {e["sale_id"] for e in env.outbox.of_type("invoice.issued")}


async def test_sales_wait_for_a_missing_connections_file_and_outlive_its_deletion(
    env: Env,
) -> None:
    tenant = env.add_tenant("cfg-file", "billingo")
    path = Path(env.settings.connections_file)
    path.unlink()  # the secret is not mounted yet
    app = await env.start_worker(wait_ready=False)
    first = {f"S-F-{i}" for i in range(3)}
    for sale_id in sorted(first):
        await env.publish(paid_event(tenant.tenant_id, sale_id))
    assert not app.consumer.ready  # /readyz 503: the sales wait in the queue
    assert await _depth(env, env.settings.dead_letter_queue) == 0

    env.write_connections()  # mounted
    await wait_until(lambda: app.consumer.ready, 20, "the worker to consume")
    await env.outbox.wait_for(lambda o: _issued(env, first))

    path.unlink()  # deleted while running: the last good configuration stays
    registry = app.runtime.connections
    assert registry.reload_if_changed() == []  # what the poll does, done now: no race
    assert registry.get(tenant.tenant_id) is not None
    later = {f"S-F-{i}" for i in range(3, 6)}
    for sale_id in sorted(later):
        await env.publish(paid_event(tenant.tenant_id, sale_id))
    await env.outbox.wait_for(lambda o: _issued(env, later))
    assert app.consumer.ready
    assert await _depth(env, env.settings.dead_letter_queue) == 0
    assert not env.outbox.of_type("invoice.failed")
    assert len(env.documents(tenant.tenant_id)) == 6


async def test_a_missing_key_file_is_a_connection_error_that_recovers_by_itself(
    env: Env,
) -> None:
    env.settings = env.settings.model_copy(update={"auto_replay": True})
    tenant = env.add_tenant("cfg-key", "billingo", key_file=True)
    other = env.add_tenant("cfg-other", "szamlazz")  # keeps working throughout
    key_file = tenant.key_file
    assert key_file is not None
    await env.start_worker()
    await env.publish(paid_event(tenant.tenant_id, "S-K-0"))
    await env.outbox.wait_for(lambda o: _issued(env, {"S-K-0"}))

    key_file.unlink()  # the Secret is gone (or not mounted)
    await env.outbox.wait_for(lambda o: len(o.of_type("connection.status")) == 1)
    (error,) = env.outbox.of_type("connection.status")
    assert error["status"] == "ERROR"
    assert error["error_code"] == "auth_failed"
    assert str(key_file) in error["message"]
    assert tenant.secret not in error["message"]
    up = {"tenant": tenant.tenant_id, "provider": "billingo"}
    assert REGISTRY.get_sample_value("invoicing_connection_up", up) == 0

    calls = env.billingo.plan.count()
    parked = {f"S-K-{i}" for i in range(1, 4)}
    for sale_id in sorted(parked):
        await env.publish(paid_event(tenant.tenant_id, sale_id))
    await env.publish(paid_event(other.tenant_id, "S-K-OTHER"))
    await wait_until(
        lambda: _dead_is(env, 3), 20, "the sales of the tenant without a key to be parked"
    )
    await env.outbox.wait_for(lambda o: _issued(env, {"S-K-OTHER"}))
    assert env.billingo.plan.count() == calls  # parked without a provider call
    dead = await env.dead_letters()
    assert {d.headers["x-error-code"] for d in dead} == {"auth_failed"}
    assert all(str(key_file) in str(d.headers["x-error-message"]) for d in dead)
    failed = env.outbox.of_type("invoice.failed")
    assert {f["error"]["code"] for f in failed} == {"auth_failed"}
    assert all("key file" in f["error"]["fix"] for f in failed)

    key_file.write_text(tenant.secret + "\n", encoding="utf-8")  # mounted again
    await env.outbox.wait_for(lambda o: _issued(env, parked), timeout=30)
    statuses = [e["status"] for e in env.outbox.of_type("connection.status")]
    assert statuses == ["ERROR", "ACTIVE"]  # ACTIVE is announced before the replay
    assert REGISTRY.get_sample_value("invoicing_connection_up", up) == 1
    await wait_until(lambda: _dead_is(env, 0), 20, "the dead-letter queue to empty")
    assert len(env.documents(tenant.tenant_id)) == 4


async def _dead_is(env: Env, n: int) -> bool:
    return await _depth(env, env.settings.dead_letter_queue) == n


async def _status(port: int, path: str) -> int | None:
    try:
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}{path}") as r:
            return r.status
    except aiohttp.ClientError:
        return None


def _json_lines(log: Path) -> list[dict[str, object]]:
    """Every line the worker wrote; fails on the first one that is not a JSON object."""
    lines = log.read_text("utf-8").splitlines()
    assert lines
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"not a JSON line: {line!r}") from None
    return parsed


async def test_a_worker_without_its_connections_file_is_not_ready_until_it_appears(
    env: Env, tmp_path: Path
) -> None:
    tenant = env.add_tenant("cfg-proc", "szamlazz")
    Path(env.settings.connections_file).unlink()
    port, log = free_port(), tmp_path / "worker.log"
    worker = await spawn_worker(env.settings, port, log)
    try:
        await wait_until(lambda: _is(port, "/healthz", 200), 30, "the worker to be alive")
        await env.publish(paid_event(tenant.tenant_id, "S-P-0"))
        assert await _status(port, "/readyz") == 503  # not consuming: the sale waits
        env.write_connections()
        await wait_until(lambda: worker_ready(port), 30, "the worker to be ready")
        await env.outbox.wait_for(lambda o: _issued(env, {"S-P-0"}))
    finally:
        worker.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(worker.wait(), 30) == 0
    events = [line["event"] for line in _json_lines(log)]
    assert "connections.file_missing" in events
    assert "consumer.waiting_for_connections_file" in events
    assert await _depth(env, env.settings.dead_letter_queue) == 0


async def _is(port: int, path: str, status: int) -> bool:
    return await _status(port, path) == status


async def test_a_worker_whose_ledger_is_unreachable_writes_only_json_lines(
    env: Env, tmp_path: Path
) -> None:
    closed = free_port()  # nothing listens there: PostgreSQL is down
    settings = env.settings.model_copy(
        update={"ledger_url": f"postgresql://postgres@127.0.0.1:{closed}/test"}
    )
    log = tmp_path / "worker.log"
    worker = await spawn_worker(settings, free_port(), log)  # stdout and stderr, as ops see it
    assert await asyncio.wait_for(worker.wait(), 60) != 0
    lines = _json_lines(log)
    (crash,) = [line for line in lines if line["event"] == "worker.crashed"]
    assert "Traceback" in str(crash["exception"])
