"""Számlázz.hu through the Számla Agent (multipart XML over HTTP)."""

from providers.szamlazz.client import SzamlazzProvider

__all__ = ["SzamlazzProvider"]
