"""Operations: a broken key trips the tenant's breaker, a new key recovers it, ops tools answer."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from tests.conftest import Env, wait_until
from worker.devtools.samples import paid_event, storno_event
from worker.report import build_report, render
from worker.tools import connections_check

pytestmark = pytest.mark.broker


async def _dead(env: Env) -> int:
    return await env.queue_depth(env.settings.dead_letter_queue)


async def test_revoked_key_parks_the_tenant_and_a_new_key_replays_its_sales(env: Env) -> None:
    env.settings = env.settings.model_copy(update={"auto_replay": True})
    tenant = env.add_tenant("breaker", "billingo")
    other = env.add_tenant("breaker-ok", "szamlazz")  # another tenant keeps working
    env.billingo.revoke(tenant.secret)
    await env.start_worker()

    await env.publish(paid_event(tenant.tenant_id, "S-B-0"))
    await wait_until(lambda: _dead_is(env, 1), what="the first sale to be parked")
    calls_for_first = env.billingo.plan.count()
    assert calls_for_first >= 1  # the first sale asked Billingo and learnt the key is revoked
    for i in range(1, 6):
        await env.publish(paid_event(tenant.tenant_id, f"S-B-{i}"))
    await env.publish(paid_event(other.tenant_id, "S-OK"))
    await wait_until(lambda: _dead_is(env, 6), what="the rest to be parked")
    await env.outbox.wait_for(lambda o: len(o.of_type("invoice.issued", sale_id="S-OK")) == 1)
    assert env.billingo.plan.count() == calls_for_first  # parked without a provider call
    assert (
        REGISTRY.get_sample_value(
            "invoicing_connection_up", {"tenant": tenant.tenant_id, "provider": "billingo"}
        )
        == 0
    )
    codes = {dead.headers["x-error-code"] for dead in await env.dead_letters()}
    assert codes == {"auth_failed"}

    # Ops generate a new key and save it in the connections file.
    env.add_tenant(tenant.tenant_id, "billingo")
    await env.outbox.wait_for(
        lambda o: (
            {f"S-B-{i}" for i in range(6)} <= {e["sale_id"] for e in o.of_type("invoice.issued")}
        ),
        timeout=30,
    )
    statuses = [e["status"] for e in env.outbox.of_type("connection.status")]
    assert statuses == ["ERROR", "ACTIVE"]  # ACTIVE is announced before the replay
    assert len(env.documents(tenant.tenant_id)) == 6
    await wait_until(lambda: _dead_is(env, 0), what="the dead-letter queue to empty")


async def _dead_is(env: Env, n: int) -> bool:
    return await _dead(env) == n


async def test_error_state_survives_a_restart(env: Env) -> None:
    tenant = env.add_tenant("sticky", "billingo")
    env.billingo.revoke(tenant.secret)
    await env.start_worker()
    await env.publish(paid_event(tenant.tenant_id, "S-S-0"))
    await wait_until(lambda: _dead_is(env, 1), what="the first sale to be parked")
    await env.stop_worker()
    calls = env.billingo.plan.count()

    await env.start_worker()
    assert (
        REGISTRY.get_sample_value(
            "invoicing_connection_up", {"tenant": tenant.tenant_id, "provider": "billingo"}
        )
        == 0
    )
    await env.publish(paid_event(tenant.tenant_id, "S-S-1"))
    await wait_until(lambda: _dead_is(env, 2), what="the second sale to be parked")
    assert env.billingo.plan.count() == calls


async def test_connections_check_prints_active_and_error_with_the_fix(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    good = env.add_tenant("check-good", "szamlazz")
    bad = env.add_tenant("check-bad", "billingo")
    env.billingo.revoke(bad.secret)

    assert await connections_check(env.settings, None) == 1
    out = capsys.readouterr().out
    assert f"{good.tenant_id}" in out
    assert "ACTIVE" in out
    assert "check-bad" in out
    assert "ERROR  auth_failed" in out
    assert "Connect → Disconnect" in out
    assert bad.secret not in out
    assert await connections_check(env.settings, good.tenant_id) == 0


async def test_report_shows_storno_rate_and_dead_letters(env: Env) -> None:
    tenant = env.add_tenant("report", "billingo").tenant_id
    await env.start_worker()
    for i in range(4):
        await env.publish(paid_event(tenant, f"S-R-{i}"))
    await env.outbox.wait_for(lambda o: len(o.of_type("invoice.issued")) == 4)
    await env.publish(storno_event(tenant, "S-R-0"))
    await env.publish(paid_event("nobody", "S-R-X"))
    await env.outbox.wait_for(lambda o: len(o.of_type("invoice.cancelled")) == 1)
    await wait_until(lambda: _dead_is(env, 1), what="the unknown tenant to be parked")

    text = render(await build_report(env.settings, days=7, stale_minutes=30))

    assert "report" in text
    assert "cancelled     1   25.0%  ⚠ check why" in text
    assert "unknown_tenant" in text


async def test_history_prints_the_audit_trail(
    env: Env, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    tenant = env.add_tenant("history", "szamlazz").tenant_id
    await env.start_worker()
    await env.publish(paid_event(tenant, "S-H"))
    await env.outbox.wait_for(lambda o: len(o.of_type("invoice.issued")) == 1)
    await env.publish(storno_event(tenant, "S-H"))
    await env.outbox.wait_for(lambda o: len(o.of_type("invoice.cancelled")) == 1)
    await env.stop_worker()
    monkeypatch.setenv("INVOICING_LEDGER_URL", env.settings.ledger_url)

    from worker.cli import build_parser

    args = build_parser().parse_args(["history", "S-H", "--tenant", tenant])
    assert await args.func(args, env.settings) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "S-H" in line or "BELLA" in line]
    assert lines
    for operation in ("issue.requested", "issue.succeeded", "cancel.requested", "cancel.succeeded"):
        assert operation in out
    assert out.index("issue.succeeded") < out.index("cancel.succeeded")
