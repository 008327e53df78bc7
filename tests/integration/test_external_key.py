"""Two tenants on one provider account never find each other's invoices by external key.

Given tenant ``h`` and tenant ``h:x`` sharing one Billingo or Számla Agent key, and ``h``
invoiced for sale ``x:1``, when ``h:x`` stornos its sale ``1`` (with or without its own
invoice, whose create answer was lost), then nothing of ``h`` is cancelled and ``h``'s
document is never announced as ``h:x``'s. (Under the old ``bookinda:{tenant}:{sale}:{gen}``
key both read ``bookinda:h:x:1:1``.)
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import Env, Tenant
from tests.integration.test_exactly_once import CREATES, original_of
from worker.devtools.faults import Fault
from worker.devtools.samples import paid_event, storno_event

pytestmark = pytest.mark.broker


def _share_account(env: Env, owner: str, tenant_id: str) -> None:
    """``tenant_id`` connects with ``owner``'s key: the same account, the same block."""
    theirs = env.tenants[owner]
    env.tenants[tenant_id] = Tenant(tenant_id, theirs.provider, theirs.secret)
    env.write_connections()


def _document_id(doc: dict[str, Any]) -> str:
    return str(doc["id"] if "id" in doc else doc["number"])


@pytest.mark.parametrize("provider", ["billingo", "szamlazz"])
@pytest.mark.parametrize("own_paid", [False, True], ids=["storno-only", "paid-answer-lost"])
async def test_storno_of_one_tenant_never_cancels_anothers_invoice(
    env: Env, provider: str, own_paid: bool
) -> None:
    env.add_tenant("h", provider)
    _share_account(env, "h", "h:x")
    await env.start_worker()
    await env.publish(paid_event("h", "x:1"))
    await env.outbox.wait_for(lambda o: len(o.of_type("invoice.issued", tenant_id="h")) == 1)
    h_document = env.outbox.of_type("invoice.issued", tenant_id="h")[0]["document_id"]

    if own_paid:
        # h:x's own invoice is created but its answer is lost: the retry looks it up by key.
        env.sandbox("h").plan.add(
            Fault("commit_then_fail", method="POST", path=CREATES[provider], status=502, times=1)
        )
        await env.publish(paid_event("h:x", "1"))
        await env.outbox.wait_for(lambda o: bool(o.of_type("invoice.issued", tenant_id="h:x")))
    await env.publish(storno_event("h:x", "1"))
    await env.outbox.wait_for(
        lambda o: bool(
            o.of_type("invoice.cancelled", tenant_id="h:x")
            or o.of_type("invoice.voided", tenant_id="h:x")
            or [f for f in o.of_type("invoice.failed", tenant_id="h:x") if f["final"]]
        )
    )

    announced = [
        e["document_id"]
        for kind in ("invoice.issued", "invoice.cancelled")
        for e in env.outbox.of_type(kind, tenant_id="h:x")
    ]
    assert h_document not in announced
    [h_invoice] = [d for d in env.documents("h") if _document_id(d) == h_document]
    assert not h_invoice.get("cancelled")
    assert not h_invoice.get("reversed_by")
    cancelled_originals = {original_of(c) for c in env.cancellations("h")}
    assert h_document not in cancelled_originals
    if own_paid:
        # h:x's own invoice is the one it announced and cancelled.
        [cancelled] = env.outbox.of_type("invoice.cancelled", tenant_id="h:x")
        assert cancelled["document_id"] != h_document
        assert cancelled_originals == {cancelled["document_id"]}
        assert len(env.documents("h")) == 2  # one each, no duplicate from the lost answer
    else:
        # Nothing of h:x's was ever invoiced: the generation is voided, nothing is cancelled.
        [voided] = env.outbox.of_type("invoice.voided", tenant_id="h:x")
        assert (voided["sale_id"], voided["invoice_generation"]) == ("1", 1)
        assert env.outbox.of_type("invoice.cancelled") == []
