"""Operator tools that talk to providers: ``connections check``."""

from __future__ import annotations

from providers.errors import InvoicingError
from worker.app import load_registry, make_providers
from worker.settings import Settings


async def connections_check(settings: Settings, tenant: str | None) -> int:
    """The help pages' "Test": each connection ACTIVE, or ERROR with the reason and the fix."""
    registry = load_registry(settings)
    if not registry.configured:
        print(f"{settings.connections_file}: cannot be read (missing or not mounted)")
        return 1
    tenants = [t for t in registry.tenants() if tenant is None or t.tenant_id == tenant]
    if tenant is not None and not tenants:
        print(f"{tenant}: not in {settings.connections_file} (unknown_tenant)")
        return 1
    providers = make_providers(settings)
    failures = 0
    try:
        for conn in tenants:
            try:
                error = registry.config_error(conn)
                if error is not None:  # no usable key: nothing to ask the provider with
                    raise error
                await providers[conn.provider].check_connection(conn)
            except InvoicingError as exc:
                failures += 1
                print(f"{conn.tenant_id:<24} {conn.provider:<9} ERROR  {exc.code}: {exc.message}")
                print(f"{'':<35}fix: {exc.fix}")
            else:
                print(f"{conn.tenant_id:<24} {conn.provider:<9} ACTIVE")
    finally:
        for provider in providers.values():
            await provider.close()
    return 1 if failures else 0
