"""The values providers speak in: who the buyer is, how the sale was paid, which provider.

They arrive inside sale events (CONTRACTS §4); :mod:`handlers.messages` builds its message
models on them and re-exports them, so both layers share one definition.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

ProviderName = Literal["billingo", "szamlazz"]
PaymentMethod = Literal["cash", "bankcard", "transfer", "szep_card", "online"]


class Inbound(BaseModel):
    # Unknown extra fields are ignored (CONTRACTS §4); the models are read-only once parsed.
    model_config = ConfigDict(extra="ignore", frozen=True, str_strip_whitespace=True)


class Address(Inbound):
    country_code: str = Field(min_length=2, max_length=2)
    post_code: str = Field(min_length=1, max_length=16)
    city: str = Field(min_length=1, max_length=200)
    street: str = Field(min_length=1, max_length=300)


class Customer(Inbound):
    kind: Literal["person", "company"]
    name: str = Field(min_length=1, max_length=300)
    email: str | None = Field(default=None, max_length=300)
    tax_number: str | None = Field(default=None, max_length=32)
    eu_vat_number: str | None = Field(default=None, max_length=32)
    address: Address
