"""The SQLite ledger: one file, one worker process (or a few on one host).

Writes are committed in groups: every write asked for during one event-loop iteration, or while
the previous group was still committing (the ledger steps of all sales in flight that reached it
meanwhile), runs in one ``BEGIN IMMEDIATE`` transaction with one COMMIT, and each caller returns
only after that COMMIT. The write lock is taken up front, so two processes on the same file
queue on the lock instead of failing on a lock upgrade. A write that fails rolls its group back,
and the group is then written one transaction per write, so one failing write never fails the
others. Group commit turned three transactions per sale into a fraction of one under load
(bench/README.md).

Where statements run: with ``synchronous=FULL`` a COMMIT is an fsync of the WAL (~0.4 ms on
our disk), and on the event loop thread it would stall every sale in flight for it. So the
group's transaction runs on a dedicated executor thread with its own connection (the GIL is
released while SQLite works and syncs), and the loop goes on meanwhile: **pipelined group
commit**. One group is on the thread at a time; writes asked for meanwhile wait in
``_pending`` and become the next group when the thread's turn ends (``_thread_done``), so
groups grow with the load instead of the fsyncs. That connection waits up to 30 s for the write
lock (``busy_timeout``), so another process on the same file makes a group wait, never fail at
once. Point reads run **inline on the event loop thread**, on a second connection with
``busy_timeout = 0``: in WAL mode they see every committed group and never wait for the writer;
in the rare case a reader gets SQLITE_BUSY (another connection recovering the WAL index) the read
is retried on the thread. Scans (history, state counts, uninvoiced sales, connection states) run
on the thread, so a large table never stalls the loop. A ``:memory:`` ledger has one connection
(a second would be another, empty database) and commits inline: it never syncs.

Checkpoints run on the thread too: the loop's connection has ``wal_autocheckpoint = 0`` (it
never writes anyway), and every ``_CHECKPOINT_EVERY`` writes a checkpoint is queued on the
thread right behind the group that crossed the mark. Our writes wait for it like for a group
(they are committed on that thread, so a pass cannot race them): a PASSIVE pass then copies the
whole WAL, and the next group starts the WAL again from its beginning, so the file stays at the
size of one interval's writes. The writes wait a few ms for it, once every ~300 writes (p50
2.8-3.3 ms in bench/ledger_bench.py; the former scheme, whose first pass raced inline writes,
held them 1.6-1.8 ms for its catch-up pass). A passive checkpoint racing a writer that commits
all the time would never catch up (the WAL once grew to 3 GB that way). Should another process
have written meanwhile (the pass could not copy everything), it escalates to TRUNCATE, which
waits for that writer and resets the WAL for certain.

Durability: WAL with ``synchronous=FULL``: a caller returns only after its COMMIT reached the
disk, so a power loss or an OS crash cannot drop a recorded ``start_issue`` (with NORMAL it
could, and the redelivery would then see a fresh sale and create a second invoice). Group commit
is what makes that affordable: one fsync per group, not per write (bench/README.md). A single
host is still one failure domain; use PostgreSQL for more.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import structlog

from handlers.ledger import SaleKey, SaleRecord
from worker.ledger import schema
from worker.ledger.base import TransitionLedger, outage

T = TypeVar("T")

log = structlog.get_logger(__name__)

_BUSY_TIMEOUT_MS = 30_000
#: What an unreachable store looks like here (disk I/O error, disk full, a file that cannot be
#: opened, a lock still held after the busy timeout): reported as ledger_unavailable.
_OUTAGES: tuple[type[BaseException], ...] = (sqlite3.OperationalError, OSError, TimeoutError)
#: Writes between two checkpoints on the thread. A write dirties ~4 pages (row, audit
#: row, audit index, sqlite_sequence), fewer when a group commit shares them, so the WAL stays
#: within ~1,000 pages. Small on purpose: a checkpoint's copy is a burst of CPU and I/O on the
#: cores the broker and the worker share, and at 1,000 the slowest sales of a 350 sales/s run
#: came in a cluster at every checkpoint (every 0.95 s); at 200 the latency timeline showed no
#: such cluster (bench/README.md). The price: more checkpoints, each holding the writes a
#: few ms.
_CHECKPOINT_EVERY = 200


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    """SQLITE_BUSY or one of its extended codes ("database is locked")."""
    return exc.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY


def _transaction(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
    """``fn`` in one BEGIN IMMEDIATE transaction; returns after the COMMIT. On any error
    (including a COMMIT refused with SQLITE_BUSY, which leaves the transaction open) it rolls
    back, so nothing of a failed attempt is committed and it may be retried."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = fn(conn)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return result


_Outcome = tuple[bool, Any]  # (True, result) or (False, exception)
_Op = tuple[Callable[[sqlite3.Connection], Any], "asyncio.Future[Any]"]


def _run_each(
    conn: sqlite3.Connection, fns: list[Callable[[sqlite3.Connection], Any]]
) -> list[_Outcome]:
    outcomes: list[_Outcome] = []
    for fn in fns:
        try:
            outcomes.append((True, _transaction(conn, fn)))
        except Exception as exc:
            outcomes.append((False, exc))
    return outcomes


def _run_batch(
    conn: sqlite3.Connection, fns: list[Callable[[sqlite3.Connection], Any]]
) -> list[_Outcome]:
    """Every ``fn`` in one transaction (one COMMIT for all). If one of them fails, the batch is
    rolled back and each runs again in a transaction of its own, so a failing write fails
    alone; the writes are safe to run again (each reads the clock and its row afresh)."""
    if len(fns) == 1:
        return _run_each(conn, fns)
    try:
        values = _transaction(conn, lambda c: [fn(c) for fn in fns])
    except sqlite3.OperationalError as exc:
        if not _is_busy(exc):
            return _run_each(conn, fns)
        return [(False, exc)] * len(fns)  # rolled back: nothing written
    except Exception:
        return _run_each(conn, fns)
    return [(True, value) for value in values]


def _passive(conn: sqlite3.Connection) -> bool:
    """A PASSIVE checkpoint; True if it copied every frame of the WAL."""
    busy, frames, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    return not busy and copied >= frames


def _settle(ops: list[_Op], outcomes: list[_Outcome]) -> None:
    for (_, future), (ok, value) in zip(ops, outcomes, strict=True):
        if future.done():
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)


class SqliteLedger(TransitionLedger):
    def __init__(self, path: str) -> None:
        super().__init__()
        #: A file path, or ":memory:" (tests; gone when the ledger closes).
        self.path = path
        self._executor: ThreadPoolExecutor | None = None
        #: Point reads, on the event loop thread only; busy_timeout 0. (":memory:": the same
        #: connection as ``_thread_conn``, and it does the writes too.)
        self._conn: sqlite3.Connection | None = None
        #: Write groups, checkpoints and scans, on the executor thread only; busy_timeout 30 s.
        self._thread_conn: sqlite3.Connection | None = None
        self._writes_since_checkpoint = 0
        #: Writes waiting for the next group commit, and whether it is scheduled.
        self._pending: list[_Op] = []
        self._flush_scheduled = False
        #: Write groups and checkpoints queued on or running on the thread (writes wait while
        #: any is). Counted, not a flag: a checkpoint is queued behind the group before it.
        self._thread_turns = 0
        self._idle_waiters: list[asyncio.Future[None]] = []
        #: Group commits so far, inline (":memory:") and on the thread (a file), and
        #: checkpoints (tests, benchmarks).
        self.inline_commits = 0
        self.thread_commits = 0
        self.checkpoints = 0

    @property
    def _memory(self) -> bool:
        # A second connection to ":memory:" would be another, empty database, so one
        # connection does both jobs. Nothing else can hold its lock: no fallback ever runs.
        return self.path == ":memory:"

    # ------------------------------------------------------------------ plumbing

    def _open_conns(self) -> tuple[ThreadPoolExecutor, sqlite3.Connection, sqlite3.Connection]:
        executor, conn, thread_conn = self._executor, self._conn, self._thread_conn
        if executor is None or conn is None or thread_conn is None:
            raise RuntimeError("ledger is not open")
        return executor, conn, thread_conn

    async def _on_thread(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        executor, _, thread_conn = self._open_conns()
        with outage(_OUTAGES):
            return await asyncio.get_running_loop().run_in_executor(executor, fn, thread_conn)

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """``fn`` in a write transaction, committed together with the other writes of this
        loop iteration (group commit); returns after that COMMIT."""
        self._open_conns()
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((fn, future))
        self._schedule_flush()
        with outage(_OUTAGES):
            result: T = await future
        return result

    def _schedule_flush(self) -> None:
        if self._flush_scheduled or self._thread_busy:
            return  # already due, or due when the thread's turn ends (_thread_done)
        self._flush_scheduled = True
        # call_soon runs after every callback already due in this iteration, so the group
        # holds the writes of all sales that reached the ledger meanwhile.
        asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        """Commit the pending writes as one group: on the thread for a file, so its fsync
        never holds the loop; inline for ":memory:", which has nothing to sync."""
        self._flush_scheduled = False
        if self._thread_busy:
            return  # the group on the thread first; _thread_done calls again
        ops = [op for op in self._pending if not op[1].done()]  # a cancelled caller: skipped
        self._pending = []
        if not ops:
            return
        fns = [fn for fn, _ in ops]
        try:
            executor, conn, thread_conn = self._open_conns()
            if self._memory:
                outcomes = _run_batch(conn, fns)
                self.inline_commits += 1
                _settle(ops, outcomes)
                return
            done = self._thread_turn(executor, _run_batch, thread_conn, fns)
        except BaseException as exc:
            # Whatever went wrong here, no caller may be left waiting for its COMMIT.
            _settle(ops, [(False, exc)] * len(ops))
            if isinstance(exc, Exception):
                return
            raise
        self.thread_commits += 1

        def settle(done: asyncio.Future[list[_Outcome]]) -> None:
            exc = asyncio.CancelledError() if done.cancelled() else done.exception()
            _settle(ops, [(False, exc)] * len(ops) if exc is not None else done.result())

        done.add_done_callback(settle)
        self._writes_since_checkpoint += len(ops)
        if self._writes_since_checkpoint >= _CHECKPOINT_EVERY:
            self._writes_since_checkpoint = 0
            self.checkpoints += 1
            self._thread_turn(executor, self._checkpoint, thread_conn)

    @property
    def _thread_busy(self) -> bool:
        return self._thread_turns > 0

    def _thread_turn(
        self, executor: ThreadPoolExecutor, fn: Callable[..., T], *args: Any
    ) -> asyncio.Future[T]:
        """Run a write group (or a checkpoint) on the thread. Until it is done, new writes
        wait in ``_pending``; when the last turn ends they go to the thread as one group."""
        done = asyncio.get_running_loop().run_in_executor(executor, fn, *args)
        self._thread_turns += 1  # after the submit: a refused one leaves nothing waiting
        done.add_done_callback(self._thread_done)
        return done

    def _thread_done(self, done: asyncio.Future[Any]) -> None:
        self._thread_turns -= 1
        if not done.cancelled() and (exc := done.exception()) is not None:
            log.warning("ledger.thread_failed", exc_info=exc)
        if self._thread_busy:
            return  # another turn is queued; it ends the wait
        self._wake_idle_waiters()
        if self._pending:
            self._schedule_flush()

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """A point read: inline, or on the thread in the rare case a WAL reader gets BUSY
        (another connection recovering the WAL index)."""
        _, conn, _ = self._open_conns()
        with outage(_OUTAGES):
            try:
                return fn(conn)
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc):
                    raise
        return await self._on_thread(fn)

    def _wake_idle_waiters(self) -> None:
        for waiter in self._idle_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._idle_waiters.clear()

    @staticmethod
    def _checkpoint(thread_conn: sqlite3.Connection) -> None:
        # On the executor thread, our writes waiting; see the module docstring.
        try:
            if not _passive(thread_conn):
                thread_conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        except sqlite3.Error:  # harmless: the next one (or another process's) catches up
            log.warning("ledger.checkpoint_failed", exc_info=True)

    @staticmethod
    def _now() -> datetime:
        return datetime.now(UTC)

    def _bind(self, params: dict[str, Any]) -> dict[str, Any]:
        """Times as fixed-width ISO text (compared as strings) and ``:now`` from this clock."""
        bound = {k: schema.iso(v) if isinstance(v, datetime) else v for k, v in params.items()}
        bound["now"] = schema.iso(self._now())
        return bound

    def _restamp(self, bound: dict[str, Any]) -> dict[str, Any]:
        """``bound`` with ``:now`` read again inside the write transaction: a write that waited
        for the lock on the thread checks leases against the time it holds the lock."""
        return {**bound, "now": schema.iso(self._now())}

    async def _execute(self, sql: str, params: dict[str, Any]) -> None:
        bound = self._bind(params)
        await self._write(lambda conn: conn.execute(sql, self._restamp(bound)))

    async def _fetch_one(self, sql: str, params: dict[str, Any]) -> sqlite3.Row | None:
        bound = self._bind(params)
        row: sqlite3.Row | None = await self._read(lambda conn: conn.execute(sql, bound).fetchone())
        return row

    async def _fetch_all(self, sql: str, params: dict[str, Any]) -> list[sqlite3.Row]:
        bound = self._bind(params)

        def run(conn: sqlite3.Connection) -> list[sqlite3.Row]:
            return conn.execute(sql, bound).fetchall()

        if self._memory:
            return await self._read(run)
        return await self._on_thread(run)  # scans: never on the loop

    async def _transition_row(
        self, t: schema.Transition, params: dict[str, Any]
    ) -> sqlite3.Row | None:
        # The lease-checked UPDATE and the audit INSERT share one BEGIN IMMEDIATE transaction.
        bound = self._bind(params)
        update = schema.transition_update_sqlite(t)

        def run(conn: sqlite3.Connection) -> sqlite3.Row | None:
            # A fresh dict per attempt: a busy attempt is retried on the thread.
            audit = self._restamp(bound)
            row: sqlite3.Row | None = conn.execute(update, audit).fetchone()
            if row is None:
                return None  # not leased: the UPDATE matched nothing, so there is no audit
            if audit["a_provider"] is None:
                audit["a_provider"] = row["provider"]
            if audit["a_document_id"] is None:
                audit["a_document_id"] = row["document_id"]
            conn.execute(schema.AUDIT_INSERT, audit)
            return row

        return await self._write(run)

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        if self._conn is not None:
            return
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-sqlite")
        self._executor = executor
        loop = asyncio.get_running_loop()
        try:
            thread_conn = await loop.run_in_executor(executor, self._connect, False)
            self._thread_conn = thread_conn
            await loop.run_in_executor(executor, _transaction, thread_conn, self._migrate)
            if self._memory:
                self._conn = thread_conn
            else:
                self._conn = await loop.run_in_executor(executor, self._connect, True)
        except BaseException:
            await self.close()
            raise

    def _connect(self, inline: bool) -> sqlite3.Connection:
        # isolation_level=None: no implicit transactions; every write says BEGIN IMMEDIATE.
        # check_same_thread=False: opened here, on the executor thread; the inline one is then
        # used only on the event loop thread (and closed back here).
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA journal_mode = WAL")
        # FULL: a COMMIT is on disk before the caller goes on (see the module docstring).
        # A per-connection setting: both connections need it.
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
        if inline:
            # The loop's connection only reads: it never checkpoints (see the module
            # docstring) and never waits for a lock (SQLITE_BUSY at once, then the thread).
            conn.execute("PRAGMA wal_autocheckpoint = 0")
            conn.execute("PRAGMA busy_timeout = 0")
        return conn

    @staticmethod
    def _migrate(conn: sqlite3.Connection) -> None:
        conn.execute(schema.SCHEMA_VERSION_TABLE["sqlite"])
        applied = {row[0] for row in conn.execute("SELECT version FROM schema_version")}
        for migration in schema.MIGRATIONS:
            if migration.version in applied:
                continue
            for statement in migration.statements("sqlite"):
                conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_version (version, description, applied_at) VALUES (?, ?, ?)",
                (migration.version, migration.description, schema.iso(datetime.now(UTC))),
            )

    async def close(self) -> None:
        # Commit what was asked before the connections go.
        while self._conn is not None and (self._pending or self._thread_busy):
            if self._thread_busy:
                idle = asyncio.get_running_loop().create_future()
                self._idle_waiters.append(idle)
                await idle
            else:
                self._flush()
        executor, conn, thread_conn = self._executor, self._conn, self._thread_conn
        self._executor = self._conn = self._thread_conn = None
        if executor is None:
            return

        def close_all() -> None:
            # On the thread, after any queued checkpoint; the last connection to close
            # checkpoints the WAL (with fsyncs), which stays off the loop too.
            if conn is not None and conn is not thread_conn:
                conn.close()
            if thread_conn is not None:
                thread_conn.close()

        await asyncio.get_running_loop().run_in_executor(executor, close_all)
        executor.shutdown(wait=True)

    # ------------------------------------------------------------------ leases

    async def _acquire(
        self, key: SaleKey, owner: str, lease_seconds: float, worker: str | None
    ) -> SaleRecord | None:
        def run(conn: sqlite3.Connection) -> SaleRecord | None:
            now = self._now()  # inside the transaction (see _restamp)
            params = {
                **schema.key_params(key),
                "owner": owner,
                "worker": worker,
                "now": schema.iso(now),
                "until": schema.iso(now + timedelta(seconds=lease_seconds)),
            }
            row = conn.execute(schema.ACQUIRE, params).fetchone()
            return schema.sale_from_row(row) if row is not None else None

        return await self._write(run)

    async def heartbeat(self, worker: str, ttl_seconds: float) -> None:
        def run(conn: sqlite3.Connection) -> None:
            now = self._now()
            conn.execute(
                schema.HEARTBEAT,
                {
                    "worker": worker,
                    "now": schema.iso(now),
                    "until": schema.iso(now + timedelta(seconds=ttl_seconds)),
                },
            )
            conn.execute(
                schema.FORGET_DEAD_WORKERS, {"before": schema.iso(now - timedelta(days=1))}
            )

        await self._write(run)
