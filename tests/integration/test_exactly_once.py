"""Exactly one invoice per sale generation, whatever the broker, the network or SIGKILL do.

Real RabbitMQ, real PostgreSQL, the sandboxes with latency and commit-then-fail faults, and
worker processes killed at random moments.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
import signal
import uuid
from asyncio.subprocess import Process
from typing import Any

import pytest

from handlers.draft import parse_external_key
from tests.conftest import POSTGRES_URL, Env, free_port, spawn_worker, wait_until, worker_ready
from worker.devtools.faults import Fault
from worker.devtools.samples import PERSON, paid_event, storno_event

pytestmark = pytest.mark.broker

CREATES = {"billingo": "/documents", "szamlazz": "action-xmlagentxmlfile"}
CANCELS = {"billingo": "/cancel", "szamlazz": "action-szamla_agent_st"}


def external_id(doc: dict[str, Any]) -> str:
    return str(doc.get("vendor_id") or doc.get("external_id"))


def original_of(cancellation: dict[str, Any]) -> str:
    """The invoice a Billingo cancellation or a Számlázz.hu reverse invoice undoes."""
    if "reverses" in cancellation:
        return str(cancellation["reverses"])
    return str(cancellation["related_documents"][0]["id"])


def assert_one_invoice_each(env: Env, tenants: list[str], sale_ids: set[str]) -> None:
    seen: collections.Counter[str] = collections.Counter()
    for tenant in tenants:
        for doc in env.documents(tenant):
            seen[external_id(doc)] += 1
    duplicates = {k: n for k, n in seen.items() if n > 1}
    assert not duplicates, f"duplicate invoices: {duplicates}"
    assert {_sale_of(k) for k in seen} == sale_ids


def _sale_of(key: str) -> str:
    parsed = parse_external_key(key)
    return parsed[1] if parsed else key  # an unreadable key shows up as a mismatch


def add_faults(env: Env, tenant: str, provider: str, probability: float) -> None:
    plan = env.sandbox(tenant).plan
    for path in (CREATES[provider], CANCELS[provider]):
        plan.add(
            Fault("commit_then_fail", method="POST", path=path, status=502, probability=probability)
        )
        plan.add(
            Fault("commit_then_hang", method="POST", path=path, delay=3.0, probability=probability)
        )


async def _kill_storm(env: Env, kills: int, log: Any) -> int:
    """Run worker processes, SIGKILL each after a random moment, ``kills`` times."""
    rng = random.Random(7)
    done = 0
    while done < kills:
        port = free_port()
        worker = await spawn_worker(env.settings, port, log)
        try:
            await wait_until(lambda p=port: worker_ready(p), 20, "the worker to be ready")
            await asyncio.sleep(rng.uniform(0.2, 1.2))  # a random moment, by design
        finally:
            worker.send_signal(signal.SIGKILL)
            await worker.wait()
        done += 1
    return done


async def _run_until(env: Env, condition: Any, log: Any, timeout: float = 120) -> None:
    port = free_port()
    worker = await spawn_worker(env.settings, port, log)
    try:
        await env.outbox.wait_for(condition, timeout=timeout)
    finally:
        worker.send_signal(signal.SIGTERM)
        await asyncio.wait_for(worker.wait(), 30)


@pytest.mark.timeout(420)
@pytest.mark.parametrize("faults", [False, True], ids=["sigkill", "sigkill+commit-then-fail"])
async def test_500_sales_survive_sigkill_storms_with_one_invoice_each(
    env: Env, faults: bool
) -> None:
    tenants = {"billingo": ["k-b1", "k-b2"], "szamlazz": ["k-s1", "k-s2"]}
    for provider, names in tenants.items():
        for name in names:
            env.add_tenant(name, provider)
            env.sandbox(name).plan.latency = 0.01
            if faults:
                add_faults(env, name, provider, 0.05)  # two faults at 5 %: 10 % of requests
    all_tenants = [t for names in tenants.values() for t in names]
    sales = [
        paid_event(all_tenants[i % 4], f"S-K-{i:03d}", customer=PERSON if i % 3 else None)
        for i in range(500)
    ]
    stornoed = {s["sale"]["id"] for s in sales[::10]}
    for sale in sales:
        await env.publish(sale)
    log = env.tmp / "workers.log"
    sale_ids = {s["sale"]["id"] for s in sales}

    kills = await _kill_storm(env, 8, log)  # creates in flight at random kills
    await _run_until(
        env, lambda o: {e["sale_id"] for e in o.of_type("invoice.issued")} >= sale_ids, log
    )
    # Bookinda stornos a sale once it holds its document: every tenth one, under more kills.
    for sale in sales[::10]:
        await env.publish(storno_event(sale["tenant_id"], sale["sale"]["id"]))
    kills += await _kill_storm(env, 4, log)  # cancels in flight at random kills
    await _run_until(
        env, lambda o: {e["sale_id"] for e in o.of_type("invoice.cancelled")} >= stornoed, log
    )

    assert kills >= 10
    if faults:  # the faults really fired: answers were lost after the provider committed
        lost = [
            r
            for sb in (env.billingo, env.szamlazz)
            for r in sb.plan.requests
            if r.status in (502, -1)
        ]
        assert len(lost) >= 10
    assert_one_invoice_each(env, all_tenants, sale_ids)
    cancelled: collections.Counter[str] = collections.Counter()
    for tenant in all_tenants:
        for doc in env.cancellations(tenant):
            cancelled[original_of(doc)] += 1
    assert sum(cancelled.values()) == len(stornoed), cancelled
    assert all(n == 1 for n in cancelled.values())
    assert await env.queue_depth(env.settings.queue) == 0  # every message acked
    assert await env.queue_depth(env.settings.dead_letter_queue) == 0
    document_ids = collections.defaultdict(set)
    for event in env.outbox.of_type("invoice.issued"):
        document_ids[event["sale_id"]].add(event["document_id"])
    assert all(len(ids) == 1 for ids in document_ids.values())


@pytest.mark.postgres
@pytest.mark.timeout(300)
async def test_three_workers_on_postgres_with_every_event_published_twice(env: Env) -> None:
    schema_free_url = POSTGRES_URL  # each run uses its own tenants, so rows never collide
    env.settings = env.settings.model_copy(update={"ledger_url": schema_free_url})
    run = uuid.uuid4().hex[:6]
    tenants = [
        env.add_tenant(f"pg-{run}-b", "billingo").tenant_id,
        env.add_tenant(f"pg-{run}-s", "szamlazz").tenant_id,
    ]
    for tenant in tenants:
        env.sandbox(tenant).plan.latency = 0.02
    sales = [paid_event(tenants[i % 2], f"S-PG-{i:03d}") for i in range(150)]
    log = env.tmp / "workers.log"
    workers: list[Process] = []
    ports = [free_port() for _ in range(3)]
    for port in ports:
        workers.append(await spawn_worker(env.settings, port, log))
    try:
        for port in ports:
            await wait_until(lambda p=port: worker_ready(p), 20, "the workers to be ready")
        for sale in sales:
            await env.publish(sale)
            await env.publish(sale)  # the same event twice: duplicate publish
        await env.outbox.wait_for(lambda o: len(o.of_type("invoice.issued")) >= 300, timeout=120)
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        for worker in workers:
            await asyncio.wait_for(worker.wait(), 30)

    assert_one_invoice_each(env, tenants, {s["sale"]["id"] for s in sales})
    per_sale = collections.defaultdict(list)
    for event in env.outbox.of_type("invoice.issued"):
        per_sale[event["sale_id"]].append(event["document_id"])
    assert all(len(ids) == 2 for ids in per_sale.values())  # one per delivery
    assert all(len(set(ids)) == 1 for ids in per_sale.values())  # never two documents


@pytest.fixture(params=["billingo", "szamlazz"])
def provider(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_storno_racing_a_pending_issue_leaves_no_invoice(env: Env, provider: str) -> None:
    tenant = env.add_tenant(f"race-{provider}", provider).tenant_id
    # The create fails (nothing created) until the storno has been handled.
    fault = env.sandbox(tenant).plan.add(
        Fault("status", method="POST", path=CREATES[provider], status=503)
    )
    await env.start_worker()
    await env.publish(paid_event(tenant, "S-RACE"))
    await env.outbox.wait_for(lambda o: len(o.of_type("invoice.failed", sale_id="S-RACE")) >= 1)

    await env.publish(storno_event(tenant, "S-RACE"))
    await wait_until(lambda: _history_has(env, "S-RACE", "voided"), what="the storno")
    fault.times = 0  # the provider recovers while the paid event waits in a delay queue

    await wait_until(lambda: _history_has(env, "S-RACE", "ignored"), what="the late paid")
    assert env.documents(tenant) == []
    assert env.outbox.of_type("invoice.issued") == []


async def _history_has(env: Env, sale_id: str, outcome_or_op: str) -> bool:
    assert env.app is not None
    entries = await env.app.runtime.ledger.history(sale_id)
    return any(outcome_or_op in (e.operation, e.outcome) for e in entries)


async def test_paid_storno_paid_across_generations(env: Env, provider: str) -> None:
    tenant = env.add_tenant(f"gen-{provider}", provider).tenant_id
    await env.start_worker()
    await env.publish(paid_event(tenant, "S-GEN"))
    await env.outbox.wait_for(lambda o: len(o.of_type("invoice.issued")) == 1)
    await env.publish(storno_event(tenant, "S-GEN", generation=1))
    await env.outbox.wait_for(lambda o: len(o.of_type("invoice.cancelled")) == 1)
    await env.publish(paid_event(tenant, "S-GEN", generation=2))
    await env.outbox.wait_for(lambda o: len(o.of_type("invoice.issued")) == 2)
    # A late duplicate of generation 1 issues nothing.
    await env.publish(paid_event(tenant, "S-GEN", generation=1))
    await wait_until(lambda: _history_has(env, "S-GEN", "ignored"), what="the late duplicate")

    docs = env.documents(tenant)
    assert len(docs) == 2
    assert len(env.cancellations(tenant)) == 1
    issued = env.outbox.of_type("invoice.issued")
    assert [e["invoice_generation"] for e in issued] == [1, 2]
    assert issued[0]["document_id"] != issued[1]["document_id"]
    with contextlib.suppress(KeyError):
        cancelled_ids = {str(d.get("cancels")) for d in env.cancellations(tenant)}
        assert issued[1]["document_id"] not in cancelled_ids
