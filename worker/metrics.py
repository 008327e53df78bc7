"""Prometheus metrics (CONTRACTS §8), plus a few the team needs to see inside the worker."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

connection_up = Gauge(
    "invoicing_connection_up",
    "1 while the tenant's provider connection is ACTIVE, 0 in ERROR",
    ["tenant", "provider"],
)
events_total = Counter(
    "invoicing_events_total", "Sale events handled, by outcome", ["event_type", "outcome"]
)
dead_lettered_total = Counter(
    "invoicing_dead_lettered_total", "Messages parked in the dead-letter queue", ["error_code"]
)
provider_requests_total = Counter(
    "invoicing_provider_requests_total",
    "HTTP requests to providers",
    ["provider", "operation", "status"],
)
provider_request_duration_seconds = Histogram(
    "invoicing_provider_request_duration_seconds",
    "Provider request latency",
    ["provider", "operation"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
broker_connected = Gauge("invoicing_broker_connected", "1 while connected to RabbitMQ")

# Not in the contract; for the people debugging the worker itself.
in_flight = Gauge("invoicing_messages_in_flight", "Deliveries being handled right now")
ack_failures_total = Counter(
    "invoicing_ack_failures_total",
    "Acks that failed because the channel was lost (the message will be redelivered)",
)
announce_failures_total = Counter(
    "invoicing_announce_failures_total",
    "Outcome events that could not be published after the message's copy was parked (the "
    "copy is not handed back twice; its next attempt announces again)",
)
deferred_total = Counter(
    "invoicing_deferred_total",
    "Sales put back through a delay queue without a failure: paced (the key's rate limit), "
    "busy (another worker holds the sale) or in_doubt (an earlier request's grace is not over)",
    ["reason"],
)
liveness_up = Gauge(
    "invoicing_liveness_up",
    "1 while this worker renews its liveness in the ledger (its leases are safe from takeover)",
)
handle_seconds = Histogram(
    "invoicing_handle_seconds",
    "Time from delivery to ack",
    ["event_type"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)


def observe_provider_request(provider: str, operation: str, status: str, seconds: float) -> None:
    """The providers' RequestObserver hook."""
    provider_requests_total.labels(provider, operation, status).inc()
    provider_request_duration_seconds.labels(provider, operation).observe(seconds)
