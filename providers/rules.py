"""Each provider's rules by provider name: what pre-flight validation asks before sending.

The tables themselves live with the provider that speaks them
(:data:`providers.billingo.mapping.RULES`, :data:`providers.szamlazz.xml.RULES`).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from providers.base import ProviderRules
from providers.billingo import mapping as billingo
from providers.szamlazz import xml as szamlazz

PROVIDER_RULES: Mapping[str, ProviderRules] = MappingProxyType(
    {"billingo": billingo.RULES, "szamlazz": szamlazz.RULES}
)


def rules_for(provider: str) -> ProviderRules:
    """The rules of one provider; KeyError for a name no provider answers to."""
    return PROVIDER_RULES[provider]
