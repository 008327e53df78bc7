"""What the handler tests' scripted providers share: the parts of the Provider protocol that
the flows under test do not exercise."""

from __future__ import annotations

from typing import Any

from providers.base import TenantConnection


class QuietProvider:
    """No pacing, a connection that always tests fine, nothing to close."""

    name: Any = "billingo"
    caps_resends: bool = False

    async def check_connection(self, conn: TenantConnection) -> None:
        return None

    def defer_seconds(self, conn: TenantConnection, max_wait: float, *, due: bool = False) -> float:
        return 0.0

    async def close(self) -> None:
        return None
