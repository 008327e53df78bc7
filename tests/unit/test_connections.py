"""The connections file (CONTRACTS §3): secrets inline, from a file or the environment."""

from __future__ import annotations

import io
import json
import logging
import os
import sys
from pathlib import Path

import pytest
import structlog
from prometheus_client import REGISTRY

from providers.errors import ErrorCode, InvoicingError
from worker import logging as worker_logging
from worker.connections import ConnectionRegistry, parse_connections
from worker.settings import Settings
from worker.tools import connections_check

FILE = """
[tenants."hotel-aurora"]
provider = "billingo"
api_key_file = "aurora.key"
block_id = 111
currency = "HUF"

[tenants."panzio-bella"]
provider = "szamlazz"
agent_key_env = "BELLA_AGENT_KEY"
invoice_prefix = "BELLA"
e_invoice = true

[tenants."inline"]
provider = "billingo"
api_key = "inline-secret"
block_id = 5
auto_invoice = false

[tenants."broken"]
provider = "billingo"
api_key_file = "missing.key"
"""


def test_secrets_from_file_env_and_inline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "aurora.key").write_text("file-secret\n")
    monkeypatch.setenv("BELLA_AGENT_KEY", "env-secret")
    parsed = parse_connections(FILE, tmp_path)
    tenants = parsed.tenants
    assert tenants["hotel-aurora"].secret.get_secret_value() == "file-secret"
    assert tenants["panzio-bella"].secret.get_secret_value() == "env-secret"
    assert tenants["panzio-bella"].e_invoice is True
    assert tenants["inline"].auto_invoice is False
    assert "file-secret" not in repr(tenants["hotel-aurora"])
    # A tenant whose key file is missing stays known (a connection ERROR, not an unknown
    # tenant), and does not take the others down.
    assert parsed.problems == []
    assert "broken" in tenants
    assert parsed.unusable == {
        "broken": f"tenant 'broken': cannot read api_key_file "
        f"{str(tmp_path / 'missing.key')!r}: No such file or directory"
    }
    assert tmp_path / "missing.key" in parsed.files  # watched, so its arrival is noticed


def test_registry_reloads_changed_tenants_and_tracks_health(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[tenants.a]\nprovider = "billingo"\napi_key = "k1"\nblock_id = 1\n')
    registry = ConnectionRegistry(path)
    registry.load()
    conn = registry.get("a")
    assert conn is not None
    change = registry.assess(conn, InvoicingError(ErrorCode.AUTH_FAILED, "401"))
    assert change is not None
    assert change.event is not None
    assert change.event.status == "ERROR"
    assert registry.breaker_error(conn) is None  # nothing applies before the publish
    registry.apply(change)
    breaker = registry.breaker_error(conn)
    assert breaker is not None
    assert breaker.code is ErrorCode.AUTH_FAILED
    # Data errors say nothing about the connection.
    assert registry.assess(conn, InvoicingError(ErrorCode.INVALID_CUSTOMER_DATA, "x")) is None

    path.write_text('[tenants.a]\nprovider = "billingo"\napi_key = "k2"\nblock_id = 1\n')
    os.utime(path, (1, 1))  # a different stamp even within one clock tick
    changed = registry.reload_if_changed()
    assert [c.tenant_id for c in changed] == ["a"]
    new = registry.get("a")
    assert new is not None
    assert registry.breaker_error(new) is None
    change = registry.assess(new, None)
    assert change is not None
    assert change.event is not None
    assert change.event.status == "ACTIVE"


def test_registered_secrets_are_scrubbed_from_log_lines() -> None:
    worker_logging.register_secrets(["super-secret-key-123"])
    out = io.StringIO()
    structlog.configure(
        processors=[worker_logging.scrub, structlog.processors.JSONRenderer()],
        logger_factory=structlog.PrintLoggerFactory(file=out),
    )
    structlog.get_logger().warning("oops", error="401 for key super-secret-key-123", n=1)
    line = json.loads(out.getvalue())
    assert line["error"] == "401 for key [redacted]"
    structlog.reset_defaults()


def test_a_key_rotated_in_its_secret_file_is_noticed(tmp_path: Path) -> None:
    key = tmp_path / "aurora.key"
    key.write_text("old-key")
    path = tmp_path / "c.toml"
    path.write_text('[tenants.a]\nprovider = "billingo"\napi_key_file = "aurora.key"\n')
    registry = ConnectionRegistry(path)
    registry.load()
    assert registry.reload_if_changed() == []

    key.write_text("new-key-2")  # only the secret file changes
    os.utime(key, (5, 5))
    changed = registry.reload_if_changed()
    assert [c.tenant_id for c in changed] == ["a"]
    conn = registry.get("a")
    assert conn is not None
    assert conn.secret.get_secret_value() == "new-key-2"


def test_the_breaker_message_stays_bounded_however_many_sales_are_parked(
    tmp_path: Path,
) -> None:
    # The pipeline assesses the breaker's own error like any other failure; before, each
    # parked sale wrapped the stored message once more (57,015 characters after 1,000 sales).
    path = tmp_path / "c.toml"
    path.write_text('[tenants.a]\nprovider = "billingo"\napi_key = "k1"\nblock_id = 1\n')
    registry = ConnectionRegistry(path)
    registry.load()
    conn = registry.get("a")
    assert conn is not None
    change = registry.assess(conn, InvoicingError(ErrorCode.AUTH_FAILED, "401 Unauthorized"))
    assert change is not None
    registry.apply(change)

    lengths: set[tuple[int, int]] = set()
    for _ in range(1000):
        breaker = registry.breaker_error(conn)
        assert breaker is not None
        assert breaker.code is ErrorCode.AUTH_FAILED
        change = registry.assess(conn, breaker)
        if change is not None:
            assert change.event is None  # the same ERROR: nothing to announce
            registry.apply(change)
        health = registry.health("a")
        assert health is not None
        assert health.status == "ERROR"
        lengths.add((len(health.message), len(breaker.message)))
    assert len(lengths) == 1, sorted(lengths)[:3]
    ((health_length, breaker_length),) = lengths
    assert health_length < 500
    assert breaker_length < 500
    health = registry.health("a")
    assert health is not None
    assert health.message == "401 Unauthorized"
    breaker = registry.breaker_error(conn)
    assert breaker is not None
    assert "401 Unauthorized" in breaker.message


def _registry(tmp_path: Path, body: str) -> ConnectionRegistry:
    path = tmp_path / "c.toml"
    path.write_text(body, encoding="utf-8")
    registry = ConnectionRegistry(path)
    registry.load()
    return registry


def test_a_deleted_connections_file_keeps_the_last_good_configuration(tmp_path: Path) -> None:
    registry = _registry(tmp_path, '[tenants.a]\nprovider = "billingo"\napi_key = "k1"\n')
    registry.path.unlink()  # a redeploy, a ConfigMap swap, a careless rm
    assert registry.reload_if_changed() == []
    assert registry.get("a") is not None  # not every sale dead-lettered as unknown_tenant
    assert registry.configured


def test_no_connections_file_at_start_means_not_configured_until_it_appears(
    tmp_path: Path,
) -> None:
    path = tmp_path / "c.toml"
    registry = ConnectionRegistry(path)
    registry.load()  # the secret is not mounted yet: no error, no tenants, not configured
    assert not registry.configured
    assert registry.reload_if_changed() == []
    path.write_text('[tenants.a]\nprovider = "billingo"\napi_key = "k1"\n', encoding="utf-8")
    assert [c.tenant_id for c in registry.reload_if_changed()] == ["a"]
    assert registry.configured


def _up(tenant: str) -> float | None:
    return REGISTRY.get_sample_value(
        "invoicing_connection_up", {"tenant": tenant, "provider": "billingo"}
    )


def test_a_missing_key_file_is_a_connection_error_until_it_appears(tmp_path: Path) -> None:
    key = tmp_path / "k.key"
    registry = _registry(
        tmp_path, '[tenants.kf]\nprovider = "billingo"\napi_key_file = "k.key"\nblock_id = 1\n'
    )
    conn = registry.get("kf")
    assert conn is not None  # known: its sales are not unknown_tenant
    breaker = registry.breaker_error(conn)  # parked without a provider call, at once
    assert breaker is not None
    assert breaker.code is ErrorCode.AUTH_FAILED
    assert str(key) in breaker.message
    assert "not in the connections file" not in breaker.message
    assert _up("kf") == 0

    (change,) = registry.config_changes()
    assert change.event is not None
    assert change.event.status == "ERROR"
    assert change.event.error_code == "auth_failed"
    assert str(key) in change.event.message
    registry.apply(change)
    assert registry.config_changes() == []  # announced once

    key.write_text("the-key-1\n", encoding="utf-8")  # mounted again
    assert [c.tenant_id for c in registry.reload_if_changed()] == ["kf"]
    conn = registry.get("kf")
    assert conn is not None
    assert conn.secret.get_secret_value() == "the-key-1"
    assert registry.breaker_error(conn) is None  # the re-test and the next sale may go
    assert registry.config_changes() == []
    recovered = registry.assess(conn, None)
    assert recovered is not None
    assert recovered.event is not None
    assert recovered.event.status == "ACTIVE"
    registry.apply(recovered)
    assert _up("kf") == 1


def _toml_escaped(text: str) -> str:
    return "".join(c if 0x20 <= ord(c) < 0x7F else f"\\u{ord(c):04x}" for c in text)


@pytest.mark.parametrize(
    ("key", "what"),
    [
        ("s3cr3t-one\ns3cr3t-two", "a line break"),
        ("s3cr3t\rcr", "a line break"),
        ("s3cr3t\x00nul", "a control character"),
        ("s3cr3t-\u0151", "a character outside latin-1"),
    ],
)
def test_a_key_an_http_header_cannot_carry_is_refused_at_load(
    tmp_path: Path, key: str, what: str
) -> None:
    (tmp_path / "k.key").write_text(key, encoding="utf-8")
    registry = _registry(
        tmp_path,
        '[tenants.f]\nprovider = "billingo"\napi_key_file = "k.key"\n'
        f'[tenants.i]\nprovider = "szamlazz"\nagent_key = "{_toml_escaped(key)}"\n',
    )
    for tenant in ("f", "i"):
        conn = registry.get(tenant)
        assert conn is not None
        # Found at load, parked without a call: not a provider_unavailable retried for hours.
        breaker = registry.breaker_error(conn)
        assert breaker is not None, tenant
        assert breaker.code is ErrorCode.AUTH_FAILED
        assert what in breaker.message
        assert "s3cr3t" not in breaker.message  # not even part of the key
    breaker = registry.breaker_error(registry.get("f"))  # type: ignore[arg-type]
    assert breaker is not None
    assert str(tmp_path / "k.key") in breaker.message


def test_stdlib_records_are_one_scrubbed_json_line_each(capsys: pytest.CaptureFixture[str]) -> None:
    worker_logging.register_secrets(["pg-password-4711"])
    excepthook = sys.excepthook
    worker_logging.configure("info")
    try:
        try:
            raise ConnectionRefusedError("connect to postgresql://u:pg-password-4711@db\nfailed")
        except ConnectionRefusedError:
            logging.getLogger("asyncpg.pool").exception("connection to %s lost", "db")
        logging.getLogger("aiormq.connection").warning("heartbeat\nmissed")
        logging.getLogger("aiohttp.access").info("below WARNING: not written")
        structlog.get_logger("worker.process").info("message.handled", elapsed_ms=1.5)
    finally:
        sys.excepthook = excepthook
        structlog.reset_defaults()
        root = logging.getLogger()
        for handler in list(root.handlers):
            if getattr(handler, "stream", None) is sys.stdout:
                root.removeHandler(handler)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3, lines
    asyncpg, aiormq, ours = map(json.loads, lines)
    assert asyncpg["event"] == "connection to db lost"
    assert asyncpg["level"] == "error"
    assert asyncpg["logger"] == "asyncpg.pool"
    assert "Traceback" in asyncpg["exception"]
    assert "ConnectionRefusedError" in asyncpg["exception"]
    assert "pg-password-4711" not in lines[0]
    assert "[redacted]" in asyncpg["exception"]
    assert aiormq["event"] == "heartbeat\nmissed"
    assert {"timestamp", "level"} <= set(aiormq)
    # structlog's own lines keep their shape.
    assert ours["event"] == "message.handled"
    assert ours["elapsed_ms"] == 1.5
    assert {"timestamp", "level"} <= set(ours)


async def test_connections_check_names_a_missing_key_file_without_asking_the_provider(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "c.toml"
    settings = Settings(
        connections_file=str(path),
        billingo_url="http://127.0.0.1:9/",  # nothing listens: a provider call would fail
    )
    assert await connections_check(settings, None) == 1  # no connections file at all
    assert "missing or not mounted" in capsys.readouterr().out

    path.write_text('[tenants.kf]\nprovider = "billingo"\napi_key_file = "k.key"\n')
    assert await connections_check(settings, None) == 1
    out = capsys.readouterr().out
    assert "ERROR  auth_failed" in out
    assert str(tmp_path / "k.key") in out
    assert "network_error" not in out
