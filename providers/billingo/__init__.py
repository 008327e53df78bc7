"""Billingo API v3: the provider client and a local sandbox that speaks the same protocol."""

from providers.billingo.client import BillingoProvider
from providers.billingo.sandbox import BillingoSandbox

__all__ = ["BillingoProvider", "BillingoSandbox"]
