"""Billingo API v3: the provider client."""

from providers.billingo.client import BillingoProvider

__all__ = ["BillingoProvider"]
