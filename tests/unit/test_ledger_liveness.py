"""Leases and their holders' liveness, the send times, and the ledger's durability setting, on
both backends (SQLite file and a PostgreSQL schema of its own)."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta

from handlers.ledger import Ledger, SaleKey, SaleState
from tests.conftest import wait_until
from tests.unit.test_ledger import LedgerFactory, ledger, make_ledger
from worker.ledger.sqlite import SqliteLedger

__all__ = ["ledger", "make_ledger"]  # fixtures shared with test_ledger.py

KEY = SaleKey("hotel-liveness", "S-1", 1)


async def test_a_dead_workers_lease_is_taken_over_before_it_expires(
    make_ledger: LedgerFactory,
) -> None:
    a, b = await make_ledger(), await make_ledger()
    await a.heartbeat("worker-a", ttl_seconds=0.3)
    await b.heartbeat("worker-b", ttl_seconds=30)
    assert await a.acquire(KEY, "worker-a:1", 90, worker="worker-a") is not None
    assert await b.acquire(KEY, "worker-b:1", 90, worker="worker-b") is None  # a is alive
    free_in = await b.lease_free_in(KEY)
    assert free_in is not None
    assert free_in < 1  # its liveness ends long before the 90 s lease
    # worker-a stops renewing (SIGKILL): its 90 s lease is free once its liveness ran out.
    await wait_until(lambda: b.acquire(KEY, "worker-b:2", 90, worker="worker-b"), 5, "the takeover")


async def test_a_live_worker_keeps_its_lease_and_a_retired_one_frees_it_at_once(
    make_ledger: LedgerFactory,
) -> None:
    a, b = await make_ledger(), await make_ledger()
    await a.heartbeat("worker-a", ttl_seconds=30)
    await b.heartbeat("worker-b", ttl_seconds=30)
    assert await a.acquire(KEY, "worker-a:1", 90, worker="worker-a") is not None
    assert await b.acquire(KEY, "worker-b:1", 90, worker="worker-b") is None
    await a.retire("worker-a")  # a graceful stop
    assert await b.acquire(KEY, "worker-b:2", 90, worker="worker-b") is not None


async def test_a_lease_without_a_worker_waits_for_its_expiry(make_ledger: LedgerFactory) -> None:
    a, b = await make_ledger(), await make_ledger()
    assert await a.acquire(KEY, "old-version:1", 90) is not None  # written before migration 2
    await b.heartbeat("worker-b", ttl_seconds=30)
    assert await b.acquire(KEY, "worker-b:1", 90, worker="worker-b") is None


async def test_start_issue_records_when_the_create_was_sent(ledger: Ledger) -> None:
    before = datetime.now(UTC) - timedelta(seconds=5)  # PostgreSQL's clock may differ a little
    assert await ledger.acquire(KEY, "w:1", 30, worker=None) is not None
    record = await ledger.start_issue(KEY, "w:1", "billingo", "ev-1")
    assert record.state is SaleState.PENDING
    assert record.issue_sent_at is not None
    assert before < record.issue_sent_at < datetime.now(UTC) + timedelta(seconds=5)
    await ledger.issue_failed(KEY, "w:1", "ev-1", "timeout", "lost", True)
    await ledger.start_issue(KEY, "w:1", "billingo", "ev-2")
    await ledger.issue_failed(KEY, "w:1", "ev-2", "provider_unavailable", "503", False)
    kept = await ledger.get(KEY)
    assert kept is not None
    assert not kept.issue_in_doubt  # the caller did not say an earlier send was in doubt
    await ledger.start_issue(KEY, "w:1", "billingo", "ev-3")
    await ledger.issue_failed(
        KEY, "w:1", "ev-3", "provider_unavailable", "503", False, was_in_doubt=True
    )
    kept = await ledger.get(KEY)
    assert kept is not None
    assert kept.issue_in_doubt


async def test_sqlite_commits_are_on_disk_before_the_caller_goes_on(tmp_path: object) -> None:
    ledger = SqliteLedger(f"{tmp_path}/ledger.db")
    await ledger.open()
    try:
        for conn in (ledger._conn, ledger._thread_conn):
            assert isinstance(conn, sqlite3.Connection)
            # 2 = FULL: NORMAL (1) could lose a committed start_issue on power loss.
            assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2
    finally:
        await ledger.close()
