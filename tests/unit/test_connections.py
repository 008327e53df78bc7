"""The connections file (CONTRACTS §3): secrets inline, from a file or the environment."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
import structlog

from providers.errors import ErrorCode, InvoicingError
from worker import logging as worker_logging
from worker.connections import ConnectionRegistry, parse_connections

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
    tenants, problems = parse_connections(FILE, tmp_path)
    assert tenants["hotel-aurora"].secret.get_secret_value() == "file-secret"
    assert tenants["panzio-bella"].secret.get_secret_value() == "env-secret"
    assert tenants["panzio-bella"].e_invoice is True
    assert tenants["inline"].auto_invoice is False
    assert "file-secret" not in repr(tenants["hotel-aurora"])
    # A broken tenant is reported, and does not take the others down.
    assert problems == [
        f"tenant 'broken': cannot read api_key_file {str(tmp_path / 'missing.key')!r}: "
        "No such file or directory"
    ]


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
