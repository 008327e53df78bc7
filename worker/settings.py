"""Settings from ``INVOICING_*`` environment variables (CONTRACTS §1), optionally a ``.env``."""

from __future__ import annotations

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def parse_duration(text: str) -> float:
    """'500ms' → 0.5, '30s' → 30, '2m' → 120, '1h' → 3600, '45' → 45."""
    text = text.strip().lower()
    for suffix, factor in (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0)):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def format_duration(seconds: float) -> str:
    """The inverse of :func:`parse_duration`, used in delay-queue names (``retry.30s``)."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    if seconds < 60 or seconds % 60:
        return f"{seconds:g}s"
    if seconds < 3600 or seconds % 3600:
        return f"{seconds / 60:g}m"
    return f"{seconds / 3600:g}h"


def safe_url(url: str) -> str:
    """The broker URL without its credentials, for anything a person or a log may see."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="INVOICING_", env_file=".env", extra="ignore", frozen=True
    )

    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    exchange: str = "bookinda"
    queue: str = "invoicing.sales"
    dead_letter_queue: str = "invoicing.dead"
    connections_file: str = "connections.toml"
    ledger_url: str = "sqlite:///invoicing-ledger.db"
    http_port: int = 9108
    http_host: str = "0.0.0.0"
    prefetch: int = Field(default=64, ge=1, le=65535)
    billingo_url: str = "https://api.billingo.hu/v3"
    szamlazz_url: str = "https://www.szamlazz.hu/szamla/"
    log_level: str = "info"

    #: The delay-queue ladder. A retry waits in the smallest tier at least as long as the
    #: backoff asks for; the longest tier is the cap ("wait 5 min, auto-retry").
    retry_delays: str = "1s,5s,15s,30s,1m,2m,5m"
    #: First backoff step; attempt n asks for base·2^(n-1), jittered, capped at the top tier.
    retry_base_seconds: float = 5.0
    #: Transient errors past this budget are dead-lettered as ``retries_exhausted``.
    retry_budget_seconds: float = 24 * 3600.0
    #: The HMAC key of the worker's own retry headers (x-retry-count, x-not-before, ...): every
    #: replica of a deployment must use the same one. Unset, it is derived from ledger_url,
    #: which they share. Retry state without a valid seal counts as absent.
    header_key: SecretStr | None = None
    #: Never send one create/cancel to a provider more often than this (the Számla Agent's rule).
    max_provider_attempts: int = 5
    #: An unexpected error inside the worker is retried this many times (it may have been a
    #: passing state of the process), then dead-lettered as ``internal_error``.
    internal_error_retries: int = Field(default=3, ge=0)

    #: Plausibility limits (issue 13): a sale beyond them is refused before any provider call
    #: (``invalid_invoice_data``), since a typo of this size costs a storno once it is issued.
    #: The largest gross total of one invoice in HUF, and in every other currency.
    max_gross_huf: int = Field(default=500_000_000, gt=0)
    max_gross_other: int = Field(default=2_000_000, gt=0)
    #: The fulfilment date may lie at most this many days before or after ``paid_at``, and
    #: ``paid_at`` at most this many days from the invoice's date (today).
    fulfillment_window_days: int = Field(default=400, ge=0)

    #: Requests a minute per provider key and worker process (Billingo allows 300 per key;
    #: with N replicas give each 300 / N). 0 means no pacing.
    billingo_requests_per_minute: float = 300.0
    szamlazz_requests_per_minute: float = 0.0
    #: A sale waits this long in-process for its key's pacing; longer, it is deferred through
    #: a delay queue so a tenant's burst never holds the prefetch slots other tenants need.
    throttle_max_wait_seconds: float = 2.0

    provider_timeout_seconds: float = 15.0
    publish_timeout_seconds: float = 10.0
    #: How long a worker may hold a sale before another worker may take it over. One
    #: delivery's attempt ends by a deadline of 80 % of it (attempt_deadline_seconds).
    lease_seconds: float = 90.0
    #: A worker that stopped renewing its liveness this long ago (SIGKILL, a lost host) holds
    #: nothing: its sales are taken over without waiting for their leases. Renewed every
    #: quarter of it.
    liveness_seconds: float = Field(default=6.0, gt=0)
    #: A create or cancel whose answer was lost is looked up no sooner than this after it was
    #: sent: a provider may still commit a request whose client already gave up.
    in_doubt_grace_seconds: float = Field(default=60.0, ge=0)
    #: On SIGTERM: how long in-flight messages may take before they are handed back.
    shutdown_grace_seconds: float = 25.0
    #: Bodies larger than this are dead-lettered as invalid_message without being parsed.
    max_body_bytes: int = 1_000_000
    #: How often the connections file is checked for changes.
    connections_poll_seconds: float = 2.0
    #: AMQP heartbeat; aiormq's 60 s default detects a dead broker only after ~3 minutes.
    heartbeat_seconds: int = 15
    #: Replay a tenant's dead-lettered messages when its connection becomes ACTIVE again.
    auto_replay: bool = False
    #: Run on uvloop when it is installed (it is, on Linux): less CPU per sale.
    uvloop: bool = True

    @field_validator("log_level")
    @classmethod
    def _lower(cls, value: str) -> str:
        return value.lower()

    @model_validator(mode="after")
    def _lease_outlives_provider_calls(self) -> Settings:
        # One message may make up to five provider calls (lookup, rate, partner, create...).
        # A lease that expired mid-call would let a second worker create a second invoice.
        if self.lease_seconds < 5 * self.provider_timeout_seconds:
            raise ValueError(
                "INVOICING_LEASE_SECONDS must be at least 5 × INVOICING_PROVIDER_TIMEOUT_SECONDS"
            )
        return self

    @property
    def attempt_deadline_seconds(self) -> float:
        """Everything one delivery does under a sale's lease ends by then (the lease outlives
        the attempt by a fifth, for the clocks and the release)."""
        return self.lease_seconds * 0.8

    @property
    def retry_ladder(self) -> tuple[float, ...]:
        return tuple(sorted(parse_duration(part) for part in self.retry_delays.split(",")))
