"""``invoicing-worker bench``: the real worker against the local broker and the sandboxes.

One run:

1. starts the Billingo and Számla Agent sandboxes in this process (127.0.0.1, rate limit off,
   ``--latency`` seconds added to every request), writes a connections file for ``--tenants``
   tenants and declares a topology of its own (``bench.<id>.*``) with a fresh SQLite ledger in
   a temporary directory (or ``--ledger-url``);
2. pre-loads ``--sales`` ``sale.paid`` events into the work queue, then spawns ``--processes``
   ``python -m worker run`` subprocesses and times, with a listener bound to ``invoice.*``,
   from the first ``invoice.issued`` to the last (with ``--rate R`` the workers start first
   and the sales are published at R per second, which makes the latency figures meaningful);
3. samples the workers' RSS (``/proc/<pid>/status``) and CPU time, counts the provider
   requests in the sandboxes' logs;
4. runs, in the same way, a bare aio-pika loop (consume → the same number of HTTP calls to a
   local aiohttp server answering after ``--latency`` → confirmed publish → ack, same prefetch,
   same message count, same message bodies): the ceiling the worker is compared with;
5. deletes every queue and exchange it declared and prints a table and the command line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import random
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from worker.settings import Settings

CEILING_FLAG = "--ceiling-child"
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


# --- options ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchOptions:
    sales: int = 5000
    tenants: int = 4
    provider: str = "billingo"
    latency: float = 0.0
    prefetch: int = 64
    processes: int = 1
    new_customers: float = 0.0
    ledger_url: str | None = None
    rate: float = 0.0
    log_level: str = "info"
    uvloop: bool = False
    ceiling: bool = True
    py_spy: str | None = None
    stall_seconds: float = 60.0
    keep: bool = False
    fairness: bool = False
    window: float = 60.0
    sandbox_rate_limit: int = 300
    #: With --latency: run the same settings at zero latency first (no ceiling) and compare
    #: with the lower of the concurrency bound and that throughput.
    zero_latency_reference: bool = False
    #: Also run the bare loop with the ledger writes of an issued sale added (SQLite, as the
    #: worker's): what the exactly-once record alone costs against the ceiling.
    ledger_floor: bool = False

    def command_line(self) -> str:
        """The exact command that repeats this run."""
        if self.fairness:
            return shlex.join(
                [
                    "invoicing-worker",
                    "bench",
                    "--fairness",
                    f"--sales={self.sales}",
                    f"--prefetch={self.prefetch}",
                    f"--window={self.window:g}",
                    f"--sandbox-rate-limit={self.sandbox_rate_limit}",
                    f"--log-level={self.log_level}",
                ]
                + ([f"--ledger-url={self.ledger_url}"] if self.ledger_url else [])
                + (["--uvloop"] if self.uvloop else [])
            )
        argv = [
            "invoicing-worker",
            "bench",
            f"--sales={self.sales}",
            f"--tenants={self.tenants}",
            f"--provider={self.provider}",
            f"--latency={self.latency:g}",
            f"--prefetch={self.prefetch}",
            f"--processes={self.processes}",
            f"--new-customers={self.new_customers:g}",
            f"--log-level={self.log_level}",
        ]
        if self.rate:
            argv.append(f"--rate={self.rate:g}")
        if self.ledger_url:
            argv.append(f"--ledger-url={self.ledger_url}")
        if self.uvloop:
            argv.append("--uvloop")
        if not self.ceiling:
            argv.append("--no-ceiling")
        if self.py_spy:
            argv.append(f"--py-spy={self.py_spy}")
        if self.zero_latency_reference:
            argv.append("--zero-latency-reference")
        if self.ledger_floor:
            argv.append("--ledger-floor")
        return shlex.join(argv)


def options_from(args: argparse.Namespace) -> BenchOptions:
    sales = args.sales or (10_000 if args.fairness else 5000)
    return BenchOptions(
        sales=sales,
        tenants=args.tenants,
        provider=args.provider,
        latency=args.latency,
        prefetch=args.prefetch,
        processes=args.processes,
        new_customers=args.new_customers,
        ledger_url=args.ledger_url,
        rate=args.rate,
        log_level=args.log_level,
        uvloop=args.uvloop,
        ceiling=args.ceiling,
        py_spy=args.py_spy,
        stall_seconds=args.stall_seconds,
        keep=args.keep,
        fairness=args.fairness,
        window=args.window,
        sandbox_rate_limit=args.sandbox_rate_limit,
        zero_latency_reference=args.zero_latency_reference,
        ledger_floor=args.ledger_floor,
    )


async def bench_command(args: argparse.Namespace, settings: Settings) -> int:
    """``invoicing-worker bench``: its arguments are registered by :mod:`worker.cli`."""
    options = options_from(args)
    if options.fairness:
        try:
            fairness = await run_fairness(options, settings)
        except BenchError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(fairness.render())
        return 0 if fairness.b_issued_after is not None else 1
    try:
        reference: Report | None = None
        if options.zero_latency_reference and options.latency > 0:
            reference = await run_bench(
                dataclasses.replace(options, latency=0.0, ceiling=False, py_spy=None), settings
            )
        report = await run_bench(options, settings)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if reference is not None:
        report.zero_latency_throughput = reference.worker.throughput
    print(report.render())
    return 0 if report.complete else 1


def _log_level(line: str) -> str | None:
    """The level of a worker log line (JSON, compact or not), None for anything else."""
    if not line.startswith("{"):
        return None
    try:
        level = json.loads(line).get("level")
    except ValueError:
        return None
    return level if isinstance(level, str) else None


class BenchError(Exception):
    """The run could not be made (broker unreachable, worker did not start, stall)."""


# --- measurement primitives ------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); nan for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def proc_status_kib(pid: int, field_name: str) -> int | None:
    """A ``/proc/<pid>/status`` field in KiB (VmRSS, VmHWM), None once the process is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def proc_cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process (all its threads), None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            text = stat.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def broker_cpu_seconds() -> float | None:
    """CPU time of the local RabbitMQ node (beam.smp), when it runs on this machine."""
    total: float | None = None
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text(encoding="ascii").strip()
        except OSError:
            continue
        if comm.startswith("beam"):
            cpu = proc_cpu_seconds(int(entry.name))
            if cpu is not None:
                total = (total or 0.0) + cpu
    return total


def self_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Arrivals:
    """What the listener saw, by sale id, on the bench process's monotonic clock."""

    issued: dict[str, float] = field(default_factory=dict)
    ceiling: dict[str, float] = field(default_factory=dict)
    failed: Counter[str] = field(default_factory=Counter)
    other: Counter[str] = field(default_factory=Counter)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def on_body(self, routing_key: str, body: bytes) -> None:
        now = time.monotonic()
        if routing_key == "invoice.ceiling":
            self.ceiling[body.decode()] = now
        else:
            event = json.loads(body)
            if routing_key == "invoice.issued":
                self.issued.setdefault(str(event.get("sale_id")), now)
            elif routing_key == "invoice.failed":
                self.failed[str((event.get("error") or {}).get("code"))] += 1
            else:
                self.other[routing_key] += 1
        self.changed.set()


@dataclass
class RssSeries:
    """VmRSS samples (KiB, summed over the workers) with the progress at each sample."""

    samples: list[tuple[float, int, int]] = field(default_factory=list)  # (t, done, rss)
    peak_hwm_kib: int = 0

    def add(self, t: float, done: int, pids: list[int]) -> None:
        rss = [proc_status_kib(pid, "VmRSS") for pid in pids]
        hwm = [proc_status_kib(pid, "VmHWM") for pid in pids]
        if any(v is None for v in rss):
            return
        self.samples.append((t, done, sum(v for v in rss if v is not None)))
        self.peak_hwm_kib = max(self.peak_hwm_kib, max((v or 0) for v in hwm))

    def at_progress(self, fraction: float, total: int) -> int | None:
        """The first sample taken once ``fraction`` of the sales were done."""
        for _, done, rss in self.samples:
            if done >= fraction * total:
                return rss
        return self.samples[-1][2] if self.samples else None

    def max_between(self, lo: float, hi: float, total: int) -> int | None:
        values = [rss for _, done, rss in self.samples if lo * total <= done <= hi * total]
        return max(values) if values else None


@dataclass
class Phase:
    """One timed pass (the worker, or the bare loop) over the same sales."""

    name: str
    count: int
    started: float
    published: dict[str, float]
    arrived: dict[str, float]
    cpu_seconds: float | None = None
    bench_cpu_seconds: float | None = None
    broker_cpu_seconds: float | None = None
    preloaded: bool = True

    @property
    def done(self) -> int:
        return len(self.arrived)

    @property
    def seconds(self) -> float:
        if not self.arrived:
            return math.nan
        last = max(self.arrived.values())
        if self.preloaded:
            return last - min(self.arrived.values())
        return last - min(self.published.values())

    @property
    def throughput(self) -> float:
        # Pre-loaded: n-1 intervals between the first and the last arrival.
        n = self.done - 1 if self.preloaded else self.done
        return n / self.seconds if self.seconds and self.seconds > 0 else math.nan

    def latencies_ms(self, second_half: bool = False) -> list[float]:
        """Published → arrived, ms; ``second_half``: only the sales published last (warm)."""
        since = percentile(list(self.published.values()), 50) if second_half else -math.inf
        return [
            (t - self.published[sale]) * 1000
            for sale, t in self.arrived.items()
            if sale in self.published and self.published[sale] >= since
        ]

    def cpu_ms_per_sale(self, cpu: float | None) -> float:
        return cpu * 1000 / self.done if cpu is not None and self.done else math.nan


# --- the run -----------------------------------------------------------------------------------


@dataclass
class Report:
    options: BenchOptions
    run_id: str
    worker: Phase
    ceiling: Phase | None
    #: --ledger-floor: the bare loop plus the ledger writes of an issued sale.
    floor: Phase | None
    requests: Counter[str]
    rss: RssSeries
    failed: Counter[str]
    dead_lettered: int
    worker_warnings: int
    ready_skew: float
    machine: str
    notes: list[str] = field(default_factory=list)
    #: --zero-latency-reference: the same settings' throughput at zero latency, run just before.
    zero_latency_throughput: float | None = None

    @property
    def complete(self) -> bool:
        return self.worker.done == self.options.sales

    def requests_per_sale(self) -> float:
        return sum(self.requests.values()) / self.worker.done if self.worker.done else math.nan

    def concurrency_bound(self) -> float:
        """prefetch × processes / (requests per sale × latency): the most a worker can do when
        it only waits for the provider."""
        rps = self.requests_per_sale()
        if self.options.latency <= 0 or not rps:
            return math.inf
        return self.options.prefetch * self.options.processes / (rps * self.options.latency)

    def render(self) -> str:
        o, w, c = self.options, self.worker, self.ceiling
        lat = w.latencies_ms()
        how = "pre-loaded queue" if w.preloaded else f"published at {o.rate:g}/s"
        rows: list[tuple[str, str]] = [
            ("run", f"bench.{self.run_id} ({how}; {self.machine})"),
            ("sales issued", f"{w.done} / {o.sales}"),
            ("worker throughput", f"{w.throughput:,.0f} sales/s over {w.seconds:.2f} s"),
        ]
        if c is not None and c.preloaded:
            ratio = w.throughput / c.throughput if c.throughput else math.nan
            rows += [
                (
                    "ceiling (bare aio-pika loop)",
                    f"{c.throughput:,.0f} msg/s over {c.seconds:.2f} s "
                    f"({self._ceiling_calls()} HTTP call(s)/msg)",
                ),
                ("worker / ceiling", f"{ratio:.0%}"),
            ]
            f = self.floor
            if f is not None:
                rows.append(
                    (
                        "bare loop + ledger writes",
                        f"{f.throughput:,.0f} msg/s = {f.throughput / c.throughput:.0%} of the "
                        f"ceiling (acquire, start_issue, record_issued per msg, SQLite); worker "
                        f"at {w.throughput / f.throughput:.0%} of it",
                    )
                )
        if o.latency > 0:
            bound = self.concurrency_bound()
            rows.append(
                (
                    "concurrency bound",
                    f"{bound:,.0f} sales/s = {o.prefetch}×{o.processes} / "
                    f"({self.requests_per_sale():.2f} req × {o.latency:g} s)"
                    + (f"; worker at {w.throughput / bound:.0%}" if w.preloaded else ""),
                )
            )
            zero = self.zero_latency_throughput
            if zero is not None:
                lower = min(bound, zero)
                rows.append(
                    (
                        "zero-latency reference",
                        f"{zero:,.0f} sales/s (same settings, latency 0, run just before); "
                        f"lower bound {lower:,.0f} sales/s"
                        + (f"; worker at {w.throughput / lower:.0%}" if w.preloaded else ""),
                    )
                )
        label = "latency p50 / p99" + (" (incl. queue wait)" if w.preloaded else "")
        rows.append((label, f"{percentile(lat, 50):,.1f} / {percentile(lat, 99):,.1f} ms"))
        if not w.preloaded:
            late = w.latencies_ms(second_half=True)
            rows.append(
                (
                    "  2nd half (warm) p50 / p99",
                    f"{percentile(late, 50):,.1f} / {percentile(late, 99):,.1f} ms",
                )
            )
        if not w.preloaded:
            calls_ms = self.requests_per_sale() * o.latency * 1000
            rows.append(
                (
                    "p99 beyond provider calls",
                    f"{percentile(lat, 99) - calls_ms:,.1f} ms "
                    f"(p50 {percentile(lat, 50) - calls_ms:,.1f} ms; provider calls "
                    f"{calls_ms:,.0f} ms)",
                )
            )
        if c is not None and not c.preloaded:
            # The same path without the worker: broker hops, confirms, the harness's own
            # publisher, listener and HTTP server, at the same rate and provider latency.
            bare = c.latencies_ms()
            calls_ms = self._ceiling_calls() * o.latency * 1000
            rows += [
                (
                    "bare loop at the same rate",
                    f"{c.done} / {c.count} msgs; latency p50 / p99 {percentile(bare, 50):,.1f} / "
                    f"{percentile(bare, 99):,.1f} ms; beyond its calls p99 "
                    f"{percentile(bare, 99) - calls_ms:,.1f} ms",
                ),
                (
                    "worker − bare loop",
                    f"p50 {percentile(lat, 50) - percentile(bare, 50):+,.1f} ms, "
                    f"p99 {percentile(lat, 99) - percentile(bare, 99):+,.1f} ms",
                ),
            ]
        rows.append(("provider requests / sale", self._requests_text()))
        mid = self.rss.at_progress(0.5, o.sales)
        end = self.rss.at_progress(1.0, o.sales)
        second_half = self.rss.max_between(0.5, 1.0, o.sales)
        rows.append(
            (
                "worker RSS",
                f"peak VmHWM {self.rss.peak_hwm_kib / 1024:,.1f} MiB (max over processes); "
                f"VmRSS (sum) at 50% {_mib(mid)}, at 100% {_mib(end)}, "
                f"max in 2nd half {_mib(second_half)}",
            )
        )
        rows.append(
            (
                "CPU ms / sale",
                f"worker {w.cpu_ms_per_sale(w.cpu_seconds):.2f}, bench+sandboxes "
                f"{w.cpu_ms_per_sale(w.bench_cpu_seconds):.2f}, broker "
                f"{w.cpu_ms_per_sale(w.broker_cpu_seconds):.2f}",
            )
        )
        if c is not None:
            rows.append(
                (
                    "ceiling CPU ms / msg",
                    f"loop {c.cpu_ms_per_sale(c.cpu_seconds):.2f}, bench+server "
                    f"{c.cpu_ms_per_sale(c.bench_cpu_seconds):.2f}, broker "
                    f"{c.cpu_ms_per_sale(c.broker_cpu_seconds):.2f}" + self._floor_cpu_text(),
                )
            )
        failed = ", ".join(f"{k}×{v}" for k, v in self.failed.items()) or "none"
        rows.append(("invoice.failed / dead-lettered", f"{failed} / {self.dead_lettered}"))
        if self.worker_warnings:
            rows.append(("worker warning/error lines", str(self.worker_warnings)))
        if o.processes > 1:
            rows.append(("workers ready within", f"{self.ready_skew * 1000:.0f} ms of each other"))
        width = max(len(k) for k, _ in rows)
        lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
        lines += [f"note: {n}" for n in self.notes]
        lines.append(f"repeat: {o.command_line()}")
        return "\n".join(lines)

    def _floor_cpu_text(self) -> str:
        f = self.floor
        return "" if f is None else f"; loop + ledger writes {f.cpu_ms_per_sale(f.cpu_seconds):.2f}"

    def _ceiling_calls(self) -> int:
        return ceiling_calls(self.requests_per_sale())

    def _requests_text(self) -> str:
        if not self.worker.done:
            return "-"
        detail = ", ".join(
            f"{op} {n / self.worker.done:.3f}" for op, n in sorted(self.requests.items())
        )
        return f"{self.requests_per_sale():.3f} ({detail})"


def ceiling_calls(requests_per_sale: float) -> int:
    if math.isnan(requests_per_sale):
        return 1
    return max(1, round(requests_per_sale))


def _mib(kib: int | None) -> str:
    return "-" if kib is None else f"{kib / 1024:,.1f} MiB"


def machine_line(uvloop: bool = False) -> str:
    loop = "uvloop" if uvloop else "asyncio"
    return f"{os.cpu_count()} CPU, Python {sys.version.split()[0]}, {loop}"


def uses_uvloop(options: BenchOptions, settings: Settings) -> bool:
    """Whether the workers run on uvloop: ``--uvloop``, or the worker's own ``uvloop`` setting
    (INVOICING_UVLOOP) when uvloop is installed. The bare loop then runs on it too."""
    if not (options.uvloop or getattr(settings, "uvloop", False)):
        return False
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def _customer(i: int, run_id: str, new_fraction: float, rng: random.Random) -> dict[str, Any]:
    from worker.devtools.samples import COMPANY, PERSON

    if rng.random() < new_fraction:
        return {
            **PERSON,
            "name": f"Vendég {run_id} {i}",
            "email": f"guest-{run_id}-{i}@example.hu",
        }
    return COMPANY if i % 2 else PERSON


def make_sales(
    options: BenchOptions, run_id: str, tenants: list[str]
) -> list[tuple[str, str, bytes]]:
    """(sale id, message id, body) of every sale.paid, in publishing order."""
    from worker.devtools.samples import paid_event

    rng = random.Random(run_id)
    sales: list[tuple[str, str, bytes]] = []
    for i in range(options.sales):
        sale_id = f"B-{run_id}-{i:07d}"
        event = paid_event(
            tenants[i % len(tenants)],
            sale_id,
            customer=_customer(i, run_id, options.new_customers, rng),
        )
        sales.append((sale_id, event["event_id"], json.dumps(event).encode()))
    return sales


def connections_toml(tenants: dict[str, tuple[str, str]]) -> str:
    lines: list[str] = []
    for tenant_id, (provider, secret) in tenants.items():
        lines.append(f'[tenants."{tenant_id}"]')
        lines.append(f'provider = "{provider}"')
        if provider == "billingo":
            lines += [f'api_key = "{secret}"', "block_id = 111"]
        else:
            lines += [f'agent_key = "{secret}"', 'invoice_prefix = "BENCH"']
        lines.append("")
    return "\n".join(lines)


def run_settings(
    base: Settings,
    options: BenchOptions,
    run_id: str,
    tmp: Path,
    tenants: dict[str, tuple[str, str]],
    **extra: Any,
) -> Settings:
    """One run's own names, connections file and ledger, so runs never meet on the broker."""
    connections = tmp / "connections.toml"
    connections.write_text(connections_toml(tenants), encoding="utf-8")
    return base.model_copy(
        update={
            "exchange": f"bench.{run_id}.bookinda",
            "queue": f"bench.{run_id}.sales",
            "dead_letter_queue": f"bench.{run_id}.dead",
            "connections_file": str(connections),
            "ledger_url": options.ledger_url or f"sqlite:///{tmp / 'ledger.db'}",
            "prefetch": options.prefetch,
            "log_level": options.log_level,
            **extra,
        }
    )


def worker_environ(settings: Settings, http_port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INVOICING_")}
    for name, value in settings.model_dump().items():
        env[f"INVOICING_{name.upper()}"] = str(value)
    env["INVOICING_HTTP_PORT"] = str(http_port)
    env["INVOICING_HTTP_HOST"] = "127.0.0.1"
    return env


def _python_argv(uvloop: bool, *args: str) -> list[str]:
    """``python -m worker ARGS``, or the same under uvloop (no change to the worker code)."""
    if not uvloop:
        return [sys.executable, "-m", "worker", *args]
    code = (
        "import asyncio, sys, uvloop; asyncio.set_event_loop_policy(uvloop.EventLoopPolicy()); "
        "from worker.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    return [sys.executable, "-c", code, *args]


async def _ready(port: int) -> bool:
    import aiohttp

    try:
        async with (
            aiohttp.ClientSession() as s,
            s.get(f"http://127.0.0.1:{port}/readyz", timeout=aiohttp.ClientTimeout(total=1)) as r,
        ):
            return r.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False


async def _wait_ready(
    procs: list[asyncio.subprocess.Process], ports: list[int], timeout: float
) -> list[float]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    ready_at: dict[int, float] = {}
    while len(ready_at) < len(ports):
        for i, port in enumerate(ports):
            if i in ready_at:
                continue
            if procs[i].returncode is not None:
                raise BenchError(f"worker {i} exited with {procs[i].returncode} before ready")
            if await _ready(port):
                ready_at[i] = time.monotonic()
        if loop.time() > deadline:
            raise BenchError(f"workers not ready within {timeout:.0f}s")
        await asyncio.sleep(0.05)
    return [ready_at[i] for i in range(len(ports))]


async def _publish_all(
    channel: Any, exchange: str, routing_key: str, sales: list[tuple[str, str, bytes]]
) -> dict[str, float]:
    """Confirmed, persistent publishes, 256 at a time; the publish time of each sale."""
    import aio_pika

    ex = await channel.get_exchange(exchange) if exchange else channel.default_exchange
    published: dict[str, float] = {}

    async def one(sale_id: str, message_id: str, body: bytes) -> None:
        published[sale_id] = time.monotonic()
        await ex.publish(
            aio_pika.Message(
                body=body,
                content_type="application/json",
                message_id=message_id,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=routing_key,
        )

    for start in range(0, len(sales), 256):
        await asyncio.gather(*(one(*s) for s in sales[start : start + 256]))
    return published


async def _publish_at_rate(
    channel: Any,
    exchange: str,
    routing_key: str,
    sales: list[tuple[str, str, bytes]],
    rate: float,
) -> dict[str, float]:
    import aio_pika

    ex = await channel.get_exchange(exchange) if exchange else channel.default_exchange
    published: dict[str, float] = {}
    pending: set[asyncio.Task[Any]] = set()
    t0 = time.monotonic()
    for i, (sale_id, message_id, body) in enumerate(sales):
        delay = t0 + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        published[sale_id] = time.monotonic()
        task = asyncio.ensure_future(
            ex.publish(
                aio_pika.Message(
                    body=body,
                    content_type="application/json",
                    message_id=message_id,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
                routing_key=routing_key,
            )
        )
        pending.add(task)
        task.add_done_callback(pending.discard)
    if pending:
        await asyncio.gather(*pending)
    return published


async def _warm_up(
    channel: Any,
    exchange: str,
    options: BenchOptions,
    run_id: str,
    tenants: list[str],
    arrivals: Arrivals,
) -> int:
    """Before a --rate run: one sale per tenant and returning customer, waited for and then
    forgotten. A sale whose customer's partner is still being created waits for that request
    (the first ~0.3 s of a 200 ms run took 400+ ms); the timed run measures the steady state,
    where returning customers' partner ids are known, as the target is about."""
    # Each worker process has its own partner cache: enough sales that every process sees
    # each tenant's customers (twice over: deliveries are spread over the consumers by
    # prefetch, not strictly in turn).
    count = 2 * len(tenants) * options.processes * 2
    warm = make_sales(
        dataclasses.replace(options, sales=count, new_customers=0.0), f"{run_id}-warm", tenants
    )
    await _publish_all(channel, exchange, "sale.paid", warm)
    await _wait_arrivals(arrivals, arrivals.issued, len(warm), options.stall_seconds)
    missing = [sale_id for sale_id, _, _ in warm if sale_id not in arrivals.issued]
    if missing or arrivals.failed:
        raise BenchError(
            f"warm-up: {len(missing)} of {len(warm)} sales not issued "
            f"({dict(arrivals.failed) or 'no invoice.failed'}); is the worker healthy?"
        )
    for sale_id, _, _ in warm:
        arrivals.issued.pop(sale_id, None)
    return count


async def _wait_arrivals(
    arrivals: Arrivals,
    arrived: dict[str, float],
    expected: int,
    stall_seconds: float,
    tick: Callable[[int], None] | None = None,
) -> None:
    """Until ``expected`` arrivals (or sales failed for good), or no progress for a while."""
    last_progress, last_count = time.monotonic(), -1
    while True:
        count = len(arrived) + sum(arrivals.failed.values())
        if len(arrived) >= expected:
            return
        now = time.monotonic()
        if count != last_count:
            last_progress, last_count = now, count
        elif now - last_progress > stall_seconds:
            return
        if tick is not None:
            tick(len(arrived))
        arrivals.changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(arrivals.changed.wait(), timeout=0.25)


async def _sample_rss(
    rss: RssSeries, pids: list[int], progress: dict[str, float], stop: asyncio.Event
) -> None:
    while not stop.is_set():
        rss.add(time.monotonic(), len(progress), pids)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=0.2)
    rss.add(time.monotonic(), len(progress), pids)


async def _stop_process(proc: asyncio.subprocess.Process, sig: int = signal.SIGTERM) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            await asyncio.wait_for(proc.wait(), timeout=30)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


def _start_py_spy(path: str, pid: int) -> asyncio.Future[asyncio.subprocess.Process] | None:
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(exe).exists():
        print("py-spy not found; not profiling", file=sys.stderr)
        return None
    return asyncio.ensure_future(
        asyncio.create_subprocess_exec(
            exe,
            "record",
            "--pid",
            str(pid),
            "--format",
            "raw",
            "--rate",
            "200",
            "--output",
            path,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
    )


async def run_bench(options: BenchOptions, base: Settings) -> Report:
    import aio_pika

    from worker.devtools.billingo_sandbox import BillingoSandbox
    from worker.devtools.szamlazz_sandbox import SzamlazzSandbox

    run_id = uuid.uuid4().hex[:8]
    tmp = Path(tempfile.mkdtemp(prefix=f"invoicing-bench-{run_id}-"))
    billingo = BillingoSandbox(rate_limit_per_minute=0)
    szamlazz = SzamlazzSandbox()
    billingo.plan.latency = szamlazz.plan.latency = options.latency
    tenants: dict[str, tuple[str, str]] = {}
    for i in range(options.tenants):
        provider = options.provider
        if provider == "both":
            provider = "billingo" if i % 2 == 0 else "szamlazz"
        secret = f"bench-{run_id}-{i}-{uuid.uuid4().hex[:8]}"
        tenants[f"bench-{run_id}-t{i}"] = (provider, secret)
        if provider == "billingo":
            billingo.add_account(secret, block_ids=(111,))
        else:
            szamlazz.add_account(secret, prefixes=("BENCH",))
    settings = run_settings(
        base,
        options,
        run_id,
        tmp,
        tenants,
        billingo_url=await billingo.start(),
        szamlazz_url=await szamlazz.start(),
        # The sandboxes' rate limit is off, so is the worker's pacing: this measures the
        # pipeline, not 300 requests/min per key (that is --fairness).
        billingo_requests_per_minute=0.0,
        szamlazz_requests_per_minute=0.0,
    )
    print(f"bench.{run_id}: temporary files in {tmp}", file=sys.stderr)
    try:
        connection = await aio_pika.connect(settings.amqp_url, timeout=10)
    except Exception as exc:
        await billingo.stop()
        await szamlazz.stop()
        raise BenchError(f"cannot reach RabbitMQ: {exc}") from exc
    procs: list[asyncio.subprocess.Process] = []
    ceiling_queue = f"bench.{run_id}.ceiling"
    notes: list[str] = []
    try:
        from worker.topology import declare

        await declare(connection, settings)
        channel = await connection.channel(publisher_confirms=True)
        arrivals = Arrivals()
        listen = await channel.declare_queue(exclusive=True, auto_delete=True)
        await listen.bind(settings.exchange, routing_key="invoice.*")
        await listen.bind(settings.exchange, routing_key="connection.*")

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            arrivals.on_body(message.routing_key or "", message.body)

        await listen.consume(on_message, no_ack=True)
        sales = make_sales(options, run_id, list(tenants))

        ports = [free_port() for _ in range(options.processes)]
        logs = [tmp / f"worker-{i}.log" for i in range(options.processes)]

        async def spawn() -> None:
            for port, log in zip(ports, logs, strict=True):
                with log.open("ab") as out:
                    procs.append(
                        await asyncio.create_subprocess_exec(
                            *_python_argv(options.uvloop, "run"),
                            env=worker_environ(settings, port),
                            stdout=out,
                            stderr=asyncio.subprocess.STDOUT,
                        )
                    )

        preloaded = options.rate <= 0
        if preloaded:
            published = await _publish_all(channel, settings.exchange, "sale.paid", sales)
            await spawn()
            ready = await _wait_ready(procs, ports, 60)
        else:
            await spawn()
            ready = await _wait_ready(procs, ports, 60)
            published = {}
            warm = await _warm_up(
                channel, settings.exchange, options, run_id, list(tenants), arrivals
            )
            for sandbox in (billingo, szamlazz):  # requests per sale: the timed run's only
                sandbox.plan.requests.clear()
            notes.append(
                f"warm-up: {warm} sales (each tenant's returning customers, for every worker "
                "process) issued before the timed run, not counted"
            )
            if options.ledger_floor:
                notes.append("--ledger-floor applies to pre-loaded runs only; not run")
        pids = [p.pid for p in procs]
        spy = _start_py_spy(options.py_spy, pids[0]) if options.py_spy else None
        cpu0 = [proc_cpu_seconds(pid) or 0.0 for pid in pids]
        bench0, broker0 = self_cpu_seconds(), broker_cpu_seconds()
        rss = RssSeries()
        stop = asyncio.Event()
        sampler = asyncio.ensure_future(_sample_rss(rss, pids, arrivals.issued, stop))
        started = time.monotonic()
        if not preloaded:
            published.update(
                await _publish_at_rate(channel, settings.exchange, "sale.paid", sales, options.rate)
            )
        await _wait_arrivals(arrivals, arrivals.issued, options.sales, options.stall_seconds)
        cpu1 = [proc_cpu_seconds(pid) or 0.0 for pid in pids]
        bench1, broker1 = self_cpu_seconds(), broker_cpu_seconds()
        stop.set()
        await sampler
        if spy is not None:
            spy_proc = await spy
            await _stop_process(spy_proc, signal.SIGINT)
        worker = Phase(
            "worker",
            options.sales,
            started,
            published,
            dict(arrivals.issued),
            cpu_seconds=sum(cpu1) - sum(cpu0),
            bench_cpu_seconds=bench1 - bench0,
            broker_cpu_seconds=(broker1 - broker0) if broker0 and broker1 else None,
            preloaded=preloaded,
        )
        _write_latencies(tmp / "latencies.csv", published, arrivals.issued)
        for proc in procs:
            await _stop_process(proc)
        requests: Counter[str] = Counter()
        for sandbox in (billingo, szamlazz):
            for r in sandbox.plan.requests:
                requests[r.operation] += 1
        dead = await channel.declare_queue(settings.dead_letter_queue, passive=True)
        dead_count = int(dead.declaration_result.message_count or 0)
        warnings = sum(
            1
            for log in logs
            for line in log.read_text(encoding="utf-8", errors="replace").splitlines()
            if _log_level(line) in ("warning", "error", "critical")
        )
        if worker.done < options.sales:
            notes.append(
                f"stalled: {options.sales - worker.done} sales without invoice.issued after "
                f"{options.stall_seconds:g}s without progress; logs in {tmp}"
            )
        ceiling: Phase | None = None
        floor: Phase | None = None
        if options.ceiling and worker.done:
            calls = ceiling_calls(sum(requests.values()) / worker.done)
            ceiling = await _run_ceiling(
                options, settings, channel, ceiling_queue, sales, calls, arrivals
            )
            if options.ledger_floor and preloaded:
                if options.ledger_url:
                    notes.append("--ledger-floor: the bare loop's ledger is SQLite regardless")
                arrivals.ceiling.clear()  # the same sale ids again, on a queue of its own
                floor = await _run_ceiling(
                    options,
                    settings,
                    channel,
                    f"{ceiling_queue}.floor",
                    sales,
                    calls,
                    arrivals,
                    ledger_path=tmp / "floor-ledger.db",
                )
        if options.py_spy:
            notes.append(f"py-spy raw profile of worker 0: {options.py_spy}")
        return Report(
            options=options,
            run_id=run_id,
            worker=worker,
            ceiling=ceiling,
            floor=floor,
            requests=requests,
            rss=rss,
            failed=arrivals.failed,
            dead_lettered=dead_count,
            worker_warnings=warnings,
            ready_skew=max(ready) - min(ready),
            machine=machine_line(uses_uvloop(options, settings)),
            notes=notes,
        )
    finally:
        for proc in procs:
            await _stop_process(proc, signal.SIGKILL)
        with contextlib.suppress(Exception):
            await _delete_topology(connection, settings, ceiling_queue)
        await connection.close()
        await billingo.stop()
        await szamlazz.stop()
        if options.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def _write_latencies(path: Path, published: dict[str, float], issued: dict[str, float]) -> None:
    """Per sale: published and issued (bench clock, seconds), for a look at where the slow
    ones fall in time (kept with --keep)."""
    with path.open("w", encoding="utf-8") as out:
        out.write("sale_id,published,issued,latency_ms\n")
        for sale_id, at in sorted(published.items(), key=lambda item: item[1]):
            done = issued.get(sale_id)
            latency = f"{(done - at) * 1000:.3f}" if done is not None else ""
            out.write(f"{sale_id},{at:.6f},{done if done is not None else ''},{latency}\n")


async def _delete_topology(connection: Any, settings: Settings, ceiling_queue: str) -> None:
    from worker.topology import Names

    names = Names.from_settings(settings)
    channel = await connection.channel()
    queues = [names.queue, names.dead_letter_queue, ceiling_queue, f"{ceiling_queue}.floor"]
    queues += [name for _, name in names.delay_queues]
    for queue in queues:
        await channel.queue_delete(queue)
    for exchange in (names.exchange, names.dead_letter_exchange):
        await channel.exchange_delete(exchange)
    await channel.close()


# --- fairness: a burst for one tenant, one sale for another ----------------------------------


@dataclass
class FairnessReport:
    options: BenchOptions
    run_id: str
    worker_pacing_per_minute: float
    throttle_max_wait: float
    retry_delays: str
    burst_publish_seconds: float
    #: B: publish → invoice.issued, seconds (None: not issued within the stall limit).
    b_issued_after: float | None
    #: More B sales published during the window, and their publish → issued times (ms).
    b_probes: int
    b_probe_ms: list[float]
    #: A sales issued before B was published / before B was issued / during the window.
    a_before_b_published: int
    a_before_b_issued: int
    a_in_window: int
    window_seconds: float
    #: Billingo requests (all keys) and 429 answers: in total and inside the window.
    requests_total: int
    requests_in_window: int
    status_429_total: int
    status_429_in_window: int
    #: The most requests any one calendar minute saw (the sandbox's fixed window).
    busiest_minute: int
    deferred_before_b_issued: int
    deferred_total: int
    deferred_tiers: Counter[str]
    max_deferrals: int
    rate_limited_retries: int
    a_failed: Counter[str]
    queue_depths: dict[str, int]
    worker_cpu_in_window: float | None
    broker_cpu_in_window: float | None
    #: CPU seconds of the worker, the broker and the bench (publisher, listener, sandbox) from
    #: the first burst sale published to B issued, and that span's wall-clock length.
    burst_cpu: tuple[float | None, float | None, float | None]
    burst_wall_seconds: float
    machine: str
    notes: list[str] = field(default_factory=list)

    def render(self) -> str:
        o = self.options
        w = self.window_seconds or math.nan
        a_rate = self.a_in_window / w
        req_rate = self.requests_in_window / w * 60
        b = f"{self.b_issued_after:.2f} s" if self.b_issued_after is not None else "NOT issued"
        target = "met" if self.b_issued_after is not None and self.b_issued_after < 5 else "missed"
        tiers = ", ".join(f"{k}×{v}" for k, v in sorted(self.deferred_tiers.items())) or "none"
        depths = ", ".join(f"{k} {v}" for k, v in self.queue_depths.items())
        rows: list[tuple[str, str]] = [
            (
                "run",
                f"bench.{self.run_id} fairness ({self.machine}); worker pacing "
                f"{self.worker_pacing_per_minute:g}/min per key, sandbox limit "
                f"{o.sandbox_rate_limit}/min per key, prefetch {o.prefetch}, throttle max wait "
                f"{self.throttle_max_wait:g} s, retry ladder {self.retry_delays}",
            ),
            (
                "burst",
                f"{o.sales} sales for tenant A published in {self.burst_publish_seconds:.2f} s, "
                "then 1 sale for tenant B",
            ),
            ("B publish → invoice.issued", f"{b} (target < 5 s: {target})"),
            (
                "B during the window",
                f"{len(self.b_probe_ms)} of {self.b_probes} one-off B sales issued, "
                f"p50 {percentile(self.b_probe_ms, 50):,.0f} ms, "
                f"max {max(self.b_probe_ms, default=math.nan):,.0f} ms",
            ),
            (
                "A issued",
                f"{self.a_before_b_published} before B was published, "
                f"{self.a_before_b_issued} before B was issued",
            ),
            (
                "A drain rate in window",
                f"{a_rate:.2f} sales/s = {a_rate * 60:.0f}/min ({self.a_in_window} in {w:.0f} s "
                "after B was issued)",
            ),
            (
                "Billingo requests",
                f"{self.requests_total} in total; {self.requests_in_window} in the window = "
                f"{req_rate:.0f}/min; busiest calendar minute {self.busiest_minute}",
            ),
            (
                "429 answers",
                f"{self.status_429_in_window} in the window (steady state), "
                f"{self.status_429_total} in total; rate_limited retries "
                f"{self.rate_limited_retries}",
            ),
            (
                "deferrals (message.deferred)",
                f"{self.deferred_total} in total, {self.deferred_before_b_issued} before B was "
                f"issued; by delay tier: {tiers}; most deferrals of one message "
                f"{self.max_deferrals}",
            ),
            (
                "CPU until B was issued",
                self._burst_cpu_text(),
            ),
            (
                "worker / broker CPU in window",
                f"{_pct(self.worker_cpu_in_window, w)} / {_pct(self.broker_cpu_in_window, w)} "
                "of one core",
            ),
            ("queues at the end", depths),
        ]
        if self.a_failed:
            rows.append(("invoice.failed", ", ".join(f"{k}×{v}" for k, v in self.a_failed.items())))
        width = max(len(k) for k, _ in rows)
        lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
        lines += [f"note: {n}" for n in self.notes]
        lines.append(f"repeat: {o.command_line()}")
        return "\n".join(lines)

    def _burst_cpu_text(self) -> str:
        # Per message moved: each burst sale ahead of B costs the worker a consume, a confirmed
        # copy to a delay queue and an ack; the broker a quorum enqueue and a settle.
        moved = max(self.deferred_before_b_issued + self.a_before_b_issued, 1)
        parts = [
            f"{who} {cpu * 1000 / moved:.3f} ms/msg ({_pct(cpu, self.burst_wall_seconds)})"
            for who, cpu in zip(("worker", "broker", "bench"), self.burst_cpu, strict=True)
            if cpu is not None
        ]
        return (
            f"{self.burst_wall_seconds:.2f} s from the first burst sale, {moved} messages "
            f"handled; " + ", ".join(parts)
        )


def _cpu_deltas(
    before: tuple[float | None, ...], after: tuple[float | None, ...]
) -> tuple[float | None, float | None, float | None]:
    worker, broker, bench = (
        (end - start) if start is not None and end is not None else None
        for start, end in zip(before, after, strict=True)
    )
    return worker, broker, bench


def _pct(cpu: float | None, seconds: float) -> str:
    return "-" if cpu is None or not seconds else f"{cpu / seconds:.0%}"


@dataclass
class LogCounts:
    deferred: int = 0
    tiers: Counter[str] = field(default_factory=Counter)
    max_deferrals: int = 0
    rate_limited: int = 0


async def scrape_deferrals(port: int) -> int:
    """``invoicing_deferred_total`` summed over reasons, from the worker's /metrics."""
    import aiohttp

    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/metrics") as response,
        ):
            text = await response.text()
    except aiohttp.ClientError:
        return 0
    total = 0.0
    for line in text.splitlines():
        if line.startswith("invoicing_deferred_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def count_log_events(path: Path) -> LogCounts:
    """``message.deferred`` (by delay tier) and ``rate_limited`` retries in a worker's log."""
    counts = LogCounts()
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return counts
    for line in text.splitlines():
        if "message.deferred" not in line and "rate_limited" not in line:
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("event") == "message.deferred":
            counts.deferred += 1
            counts.tiers[f"{entry.get('delay', '?'):g}s"] += 1
            counts.max_deferrals = max(counts.max_deferrals, int(entry.get("deferrals") or 0))
        elif entry.get("event") == "retry.scheduled" and entry.get("error_code") == "rate_limited":
            counts.rate_limited += 1
    return counts


def fairness_sales(
    run_id: str, count: int, tenant_a: str, tenant_b: str
) -> tuple[list[tuple[str, str, bytes]], tuple[str, str, bytes]]:
    """Tenant A's burst (two customers that repeat: returning customers) and B's one sale."""
    from worker.devtools.samples import COMPANY, PERSON, paid_event

    def one(tenant: str, sale_id: str, customer: dict[str, Any]) -> tuple[str, str, bytes]:
        event = paid_event(tenant, sale_id, customer=customer)
        return sale_id, event["event_id"], json.dumps(event).encode()

    burst = [
        one(tenant_a, f"A-{run_id}-{i:07d}", COMPANY if i % 2 else PERSON) for i in range(count)
    ]
    return burst, one(tenant_b, f"B-{run_id}-only", COMPANY)


def fairness_probe(run_id: str, n: int, tenant_b: str) -> tuple[str, str, bytes]:
    from worker.devtools.samples import PERSON, paid_event

    sale_id = f"B-{run_id}-probe-{n}"
    event = paid_event(tenant_b, sale_id, customer=PERSON)
    return sale_id, event["event_id"], json.dumps(event).encode()


async def run_fairness(options: BenchOptions, base: Settings) -> FairnessReport:
    import aio_pika

    from worker.devtools.billingo_sandbox import BillingoSandbox
    from worker.topology import Names, declare

    run_id = uuid.uuid4().hex[:8]
    tmp = Path(tempfile.mkdtemp(prefix=f"invoicing-fairness-{run_id}-"))
    billingo = BillingoSandbox(rate_limit_per_minute=options.sandbox_rate_limit)
    billingo.plan.latency = options.latency
    tenant_a, tenant_b = f"bench-{run_id}-A", f"bench-{run_id}-B"
    tenants: dict[str, tuple[str, str]] = {}
    for tenant in (tenant_a, tenant_b):
        secret = f"{tenant}-{uuid.uuid4().hex[:8]}"
        tenants[tenant] = ("billingo", secret)
        billingo.add_account(secret, block_ids=(111,))
    settings = run_settings(
        base, options, run_id, tmp, tenants, billingo_url=await billingo.start()
    )
    print(f"bench.{run_id}: temporary files in {tmp}", file=sys.stderr)
    names = Names.from_settings(settings)
    try:
        connection = await aio_pika.connect(settings.amqp_url, timeout=10)
    except Exception as exc:
        await billingo.stop()
        raise BenchError(f"cannot reach RabbitMQ: {exc}") from exc
    proc: asyncio.subprocess.Process | None = None
    notes: list[str] = []
    log = tmp / "worker-0.log"
    try:
        await declare(connection, settings)
        channel = await connection.channel(publisher_confirms=True)
        arrivals = Arrivals()
        listen = await channel.declare_queue(exclusive=True, auto_delete=True)
        await listen.bind(settings.exchange, routing_key="invoice.*")

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            arrivals.on_body(message.routing_key or "", message.body)

        await listen.consume(on_message, no_ack=True)
        burst, b_sale = fairness_sales(run_id, options.sales, tenant_a, tenant_b)
        port = free_port()
        with log.open("ab") as out:
            proc = await asyncio.create_subprocess_exec(
                *_python_argv(options.uvloop, "run"),
                env=worker_environ(settings, port),
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
            )
        await _wait_ready([proc], [port], 60)
        # Both clocks at one moment: the sandbox logs wall-clock times, the bench monotonic.
        spy = _start_py_spy(options.py_spy, proc.pid) if options.py_spy else None
        wall0, mono0 = time.time(), time.monotonic()
        burst_cpu0 = (proc_cpu_seconds(proc.pid), broker_cpu_seconds(), self_cpu_seconds())

        def wall(mono: float) -> float:
            return wall0 + (mono - mono0)

        published = await _publish_all(channel, settings.exchange, "sale.paid", burst)
        burst_seconds = time.monotonic() - mono0
        b_id = b_sale[0]
        published.update(await _publish_all(channel, settings.exchange, "sale.paid", [b_sale]))
        b_published = published[b_id]
        a_before_b_published = len(arrivals.issued)
        await _wait_arrivals_of(arrivals, b_id, max(options.stall_seconds, 120.0))
        b_issued = arrivals.issued.get(b_id)
        if b_issued is None:
            notes.append(f"B not issued within {max(options.stall_seconds, 120.0):g} s")
        window_start = b_issued if b_issued is not None else time.monotonic()
        burst_cpu1 = (proc_cpu_seconds(proc.pid), broker_cpu_seconds(), self_cpu_seconds())
        # Counted at B's issue, before py-spy is stopped (that takes a while, and the worker
        # goes on deferring the burst meanwhile).
        deferred_at_b = max(count_log_events(log).deferred, await scrape_deferrals(port))
        a_before_b_issued = sum(1 for s, t in arrivals.issued.items() if s != b_id)
        if spy is not None:  # the burst only: publish → B issued
            await _stop_process(await spy, signal.SIGINT)
            notes.append(f"py-spy raw profile of the worker until B was issued: {options.py_spy}")
        cpu0, broker0 = proc_cpu_seconds(proc.pid), broker_cpu_seconds()
        # During the window, one more B sale every 10 s: another tenant's latency while A's
        # deferred burst keeps coming back from the delay queues (the steady state).
        probes: dict[str, float] = {}
        probe_at, n = window_start + 5.0, 0
        while probe_at < window_start + options.window - 5.0:
            await asyncio.sleep(max(0.0, probe_at - time.monotonic()))
            probe = fairness_probe(run_id, n, tenant_b)
            probes.update(await _publish_all(channel, settings.exchange, "sale.paid", [probe]))
            probe_at, n = probe_at + 10.0, n + 1
        await asyncio.sleep(max(0.0, window_start + options.window - time.monotonic()))
        window_end = time.monotonic()
        b_ids = {b_id, *probes}
        cpu1, broker1 = proc_cpu_seconds(proc.pid), broker_cpu_seconds()
        a_in_window = sum(
            1
            for s, t in arrivals.issued.items()
            if s not in b_ids and window_start < t <= window_end
        )
        probe_ms = [
            (arrivals.issued[s] - t) * 1000 for s, t in probes.items() if s in arrivals.issued
        ]
        requests = list(billingo.plan.requests)
        lo, hi = wall(window_start), wall(window_end)
        in_window = [r for r in requests if lo < r.at <= hi]
        minutes = Counter(int(r.at // 60) for r in requests)
        depths: dict[str, int] = {}
        for queue in (names.queue, *(n for _, n in names.delay_queues), names.dead_letter_queue):
            declared = await channel.declare_queue(queue, passive=True)
            depths[queue.removeprefix(f"bench.{run_id}.")] = int(
                declared.declaration_result.message_count or 0
            )
        # Paced deferrals are logged at debug only; the counter sees them all (read it while
        # the worker still runs).
        scraped = await scrape_deferrals(port)
        await _stop_process(proc)
        counts = count_log_events(log)
        counts.deferred = max(counts.deferred, scraped)
        return FairnessReport(
            options=options,
            run_id=run_id,
            worker_pacing_per_minute=settings.billingo_requests_per_minute,
            throttle_max_wait=settings.throttle_max_wait_seconds,
            retry_delays=settings.retry_delays,
            burst_publish_seconds=burst_seconds,
            b_issued_after=(b_issued - b_published) if b_issued is not None else None,
            b_probes=len(probes),
            b_probe_ms=probe_ms,
            a_before_b_published=a_before_b_published,
            a_before_b_issued=a_before_b_issued,
            a_in_window=a_in_window,
            window_seconds=window_end - window_start,
            requests_total=len(requests),
            requests_in_window=len(in_window),
            status_429_total=sum(1 for r in requests if r.status == 429),
            status_429_in_window=sum(1 for r in in_window if r.status == 429),
            busiest_minute=max(minutes.values(), default=0),
            deferred_before_b_issued=deferred_at_b,
            deferred_total=counts.deferred,
            deferred_tiers=counts.tiers,
            max_deferrals=counts.max_deferrals,
            rate_limited_retries=counts.rate_limited,
            a_failed=arrivals.failed,
            queue_depths=depths,
            worker_cpu_in_window=(cpu1 - cpu0) if cpu0 is not None and cpu1 is not None else None,
            broker_cpu_in_window=(broker1 - broker0) if broker0 and broker1 else None,
            burst_cpu=_cpu_deltas(burst_cpu0, burst_cpu1),
            burst_wall_seconds=window_start - mono0,
            machine=machine_line(uses_uvloop(options, settings)),
            notes=notes,
        )
    finally:
        if proc is not None:
            await _stop_process(proc, signal.SIGKILL)
        with contextlib.suppress(Exception):
            await _delete_topology(connection, settings, f"bench.{run_id}.ceiling")
        await connection.close()
        await billingo.stop()
        if options.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


async def _wait_arrivals_of(arrivals: Arrivals, sale_id: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while sale_id not in arrivals.issued and time.monotonic() < deadline:
        arrivals.changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(arrivals.changed.wait(), timeout=0.25)


# --- the ceiling: a bare aio-pika loop -------------------------------------------------------

#: About the size of a Billingo document answer.
_ANSWER = {"id": 1, "invoice_number": "BENCH-2026-000001", "padding": "x" * 900}


async def _run_ceiling(
    options: BenchOptions,
    settings: Settings,
    channel: Any,
    queue_name: str,
    sales: list[tuple[str, str, bytes]],
    calls: int,
    arrivals: Arrivals,
    ledger_path: Path | None = None,
) -> Phase:
    """Pre-load the same bodies into a quorum queue of the same kind, then run the bare loop
    in a subprocess (its own CPU, like the worker) against a minimal local aiohttp server;
    with ``ledger_path``, the loop also makes the ledger writes of an issued sale there."""
    from aiohttp import web

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        if options.latency > 0:
            await asyncio.sleep(options.latency)
        return web.json_response(_ANSWER)

    app = web.Application()
    app.router.add_post("/call", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    proc: asyncio.subprocess.Process | None = None
    try:
        await channel.declare_queue(queue_name, durable=True, arguments={"x-queue-type": "quorum"})
        at_rate = options.rate > 0
        # Pre-loaded like the worker's queue, or (--rate) published at the same rate once the
        # loop consumes, for its latency at the same load: the broker's and the harness's
        # share of the worker's.
        published = {} if at_rate else await _publish_all(channel, "", queue_name, sales)
        spec = {
            "amqp_url": settings.amqp_url,
            "queue": queue_name,
            "exchange": settings.exchange,
            "prefetch": options.prefetch,
            "count": len(sales),
            "calls": calls,
            "url": f"http://127.0.0.1:{port}/call",
            "ledger": str(ledger_path) if ledger_path is not None else None,
        }
        argv = (
            [sys.executable, "-c", _UVLOOP_CEILING, CEILING_FLAG, json.dumps(spec)]
            if uses_uvloop(options, settings)
            else [sys.executable, "-m", "worker.devtools.bench", CEILING_FLAG, json.dumps(spec)]
        )
        bench0, broker0 = self_cpu_seconds(), broker_cpu_seconds()
        proc = await asyncio.create_subprocess_exec(*argv)
        if at_rate:
            await _wait_consumer(channel, queue_name)
            first_cpu = [proc_cpu_seconds(proc.pid) or 0.0]
            bench0, broker0 = self_cpu_seconds(), broker_cpu_seconds()
            started = time.monotonic()
            published = await _publish_at_rate(channel, "", queue_name, sales, options.rate)
        else:
            started = time.monotonic()
            # The loop's CPU from its first message on (not its interpreter start and imports).
            first_cpu = []

        def tick(count: int) -> None:
            if count and not first_cpu:
                first_cpu.append(proc_cpu_seconds(proc.pid) or 0.0)

        await _wait_arrivals(arrivals, arrivals.ceiling, len(sales), options.stall_seconds, tick)
        bench1, broker1 = self_cpu_seconds(), broker_cpu_seconds()
        end_cpu = proc_cpu_seconds(proc.pid)
        loop_cpu = end_cpu - first_cpu[0] if end_cpu is not None and first_cpu else None
        await _stop_process(proc)
        return Phase(
            "ceiling" if ledger_path is None else "floor",
            len(sales),
            started,
            published,
            dict(arrivals.ceiling),
            cpu_seconds=loop_cpu,
            bench_cpu_seconds=bench1 - bench0,
            broker_cpu_seconds=(broker1 - broker0) if broker0 and broker1 else None,
            preloaded=not at_rate,
        )
    finally:
        if proc is not None:  # a no-op when it was stopped above
            await _stop_process(proc, signal.SIGKILL)
        await runner.cleanup()


async def _wait_consumer(channel: Any, queue_name: str, timeout: float = 60.0) -> None:
    """Until the bare loop consumes from ``queue_name`` (it is a fresh process)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        declared = await channel.declare_queue(queue_name, passive=True)
        if declared.declaration_result.consumer_count:
            return
        await asyncio.sleep(0.05)
    raise BenchError(f"the bare loop did not start consuming {queue_name} in {timeout:g} s")


_UVLOOP_CEILING = (
    "import asyncio, sys, uvloop; asyncio.set_event_loop_policy(uvloop.EventLoopPolicy()); "
    "from worker.devtools.bench import ceiling_main; sys.exit(ceiling_main(sys.argv[1:]))"
)


async def ceiling_loop(spec: dict[str, Any]) -> None:
    """consume → ``calls`` HTTP POSTs of the body → confirmed publish → ack, until ``count``."""
    import aio_pika
    import aiohttp

    from handlers.ledger import SaleKey
    from providers.base import IssuedInvoice
    from worker.ledger.sqlite import SqliteLedger

    done = asyncio.Event()
    handled = 0
    ledger = SqliteLedger(spec["ledger"]) if spec.get("ledger") else None
    if ledger is not None:
        await ledger.open()
    invoice = IssuedInvoice("1", "BENCH-2026-000001", Decimal("49980"), "HUF")
    connection = await aio_pika.connect(spec["amqp_url"], timeout=10)
    # limit=0: no connection cap, so the ceiling is the loop's own, not aiohttp's default 100.
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    try:
        channel = await connection.channel(publisher_confirms=True)
        await channel.set_qos(prefetch_count=spec["prefetch"])
        exchange = await channel.get_exchange(spec["exchange"])
        queue = await channel.get_queue(spec["queue"])

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal handled
            event = json.loads(message.body)
            if ledger is not None:
                # The three writes handle_paid makes for a new sale, nothing else of it.
                sale = event["sale"]
                key = SaleKey(event["tenant_id"], sale["id"], sale["invoice_generation"])
                owner = f"floor:{message.delivery_tag}"
                await ledger.acquire(key, owner, 60)
                await ledger.start_issue(key, owner, "billingo", event["event_id"])
            for _ in range(spec["calls"]):
                async with session.post(spec["url"], data=message.body) as response:
                    json.loads(await response.read())
            if ledger is not None:
                await ledger.record_issued(
                    key, owner, event["event_id"], "billingo", invoice, found=False, release=True
                )
            await exchange.publish(
                aio_pika.Message(
                    body=event["sale"]["id"].encode(),
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
                routing_key="invoice.ceiling",
            )
            await message.ack()
            handled += 1
            if handled >= spec["count"]:
                done.set()

        await queue.consume(on_message)
        await done.wait()
    finally:
        await session.close()
        await connection.close()
        if ledger is not None:
            await ledger.close()


def ceiling_main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != CEILING_FLAG:
        print(f"usage: python -m worker.devtools.bench {CEILING_FLAG} SPEC_JSON", file=sys.stderr)
        return 2
    asyncio.run(ceiling_loop(json.loads(argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(ceiling_main(sys.argv[1:]))
