"""deploy/ stays usable: alert rules load and behave, compose and k8s manifests parse and agree
with the worker's settings, the dashboard only graphs metrics that exist, the broker
definitions match the topology. promtool and docker-compose come from the Debian packages
``prometheus`` and ``docker-compose``; without them these tests fail rather than skip, so CI
cannot pass with the checks silently off."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERTS_TEST = DEPLOY / "prometheus" / "alerts_test.yml"
K8S = DEPLOY / "k8s"

SHUTDOWN_GRACE_DEFAULT = 25.0  # INVOICING_SHUTDOWN_GRACE_SECONDS (worker/settings.py)

#: CONTRACTS §8, plus the series a histogram exposes.
WORKER_METRICS = {
    "invoicing_connection_up",
    "invoicing_events_total",
    "invoicing_dead_lettered_total",
    "invoicing_provider_requests_total",
    *(
        f"invoicing_provider_request_duration_seconds{suffix}"
        for suffix in ("_bucket", "_sum", "_count")
    ),
    "invoicing_broker_connected",
}
#: rabbitmq_prometheus, /metrics/detailed with queue_coarse_metrics + queue_consumer_count.
RABBITMQ_METRICS = {
    "rabbitmq_detailed_queue_messages",
    "rabbitmq_detailed_queue_messages_ready",
    "rabbitmq_detailed_queue_messages_unacked",
    "rabbitmq_detailed_queue_consumers",
}
KNOWN_METRICS = WORKER_METRICS | RABBITMQ_METRICS | {"up"}

RETRY_TIERS_MS = {
    "1s": 1_000,
    "5s": 5_000,
    "15s": 15_000,
    "30s": 30_000,
    "1m": 60_000,
    "2m": 120_000,
    "5m": 300_000,
}


def tool(name: str, package: str) -> str:
    path = shutil.which(name)
    assert path, (
        f"{name} not found: install the Debian package `{package}` (apt-get install {package})"
    )
    return path


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=90, check=False)


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def k8s_documents() -> list[dict[str, Any]]:
    return [
        doc
        for path in sorted(K8S.glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for doc in k8s_documents() if doc["kind"] == kind]


_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"')
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGES = re.compile(r"\[[^\]]*\]")
_NUMBERS = re.compile(r"\b\d[\w.]*")  # 0.95, 100, 30m (offset)
_LABEL_LISTS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, keywords, labels removed)."""
    for pattern in (_STRINGS, _MATCHERS, _RANGES, _LABEL_LISTS, _NUMBERS):
        expr = pattern.sub(" ", expr)
    names = re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*(?![A-Za-z0-9_:]*\s*\()", expr)
    return {name for name in names if name.lower() not in _KEYWORDS}


def test_metric_names_helper() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, provider) (rate(x_bucket{a="b"}[5m])))'
        " / on (queue) y offset 30m and bool z"
    )
    assert metric_names(expr) == {"x_bucket", "y", "z"}


# ------------------------------------------------------------------------------ Prometheus


def test_alert_rules_are_valid() -> None:
    result = run(tool("promtool", "prometheus"), "check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_pass_their_unit_tests() -> None:
    result = run(tool("promtool", "prometheus"), "test", "rules", str(ALERTS_TEST))
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_config_is_valid() -> None:
    config = DEPLOY / "prometheus" / "prometheus.yml"
    result = run(tool("promtool", "prometheus"), "check", "config", str(config))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    names = {rule["alert"] for rule in alert_rules()}
    cases = [
        case
        for group in yaml.safe_load(ALERTS_TEST.read_text())["tests"]
        for case in group.get("alert_rule_test", [])
    ]
    firing = {case["alertname"] for case in cases if case.get("exp_alerts")}
    quiet = {case["alertname"] for case in cases if not case.get("exp_alerts")}
    assert names - firing == set(), "alerts never tested firing"
    assert names - quiet == set(), "alerts never tested not firing"


def test_alerts_are_the_agreed_set_and_documented() -> None:
    rules = alert_rules()
    assert {rule["alert"] for rule in rules} == {
        "InvoicingConnectionError",
        "InvoicingStornoRateHigh",
        "InvoicingDeadLetterQueueGrowing",
        "InvoicingRetriesBackingUp",
        "InvoicingQueueWithoutConsumer",
        "InvoicingWorkerDown",
        "InvoicingBrokerDisconnected",
    }
    for rule in rules:
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert rule["annotations"].get("summary"), rule["alert"]
        assert rule["annotations"].get("runbook"), rule["alert"]
        assert metric_names(rule["expr"]) <= KNOWN_METRICS, rule["alert"]


# ------------------------------------------------------------------------------ compose, image


def test_compose_file_is_valid() -> None:
    compose = tool("docker-compose", "docker-compose")
    result = run(compose, "-f", str(DEPLOY / "docker-compose.yml"), "config", "-q")
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_the_worker_as_non_root_with_a_healthcheck() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "FROM python:3.11-slim" in dockerfile
    assert re.search(r"^USER (?!root|0\b)", dockerfile, re.M)
    assert "EXPOSE 9108" in dockerfile
    assert re.search(r"^HEALTHCHECK .*/healthz", dockerfile, re.M | re.S)
    assert 'CMD ["invoicing-worker", "run"]' in dockerfile


# ------------------------------------------------------------------------------ Kubernetes


def test_k8s_deployment_probes_grace_and_connections_secret() -> None:
    (deployment,) = of_kind("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert pod["terminationGracePeriodSeconds"] > SHUTDOWN_GRACE_DEFAULT

    (config_map,) = of_kind("ConfigMap")
    settings = config_map["data"]
    grace = float(settings.get("INVOICING_SHUTDOWN_GRACE_SECONDS", SHUTDOWN_GRACE_DEFAULT))
    assert pod["terminationGracePeriodSeconds"] > grace
    sources = {ref["configMapRef"]["name"] for ref in container["envFrom"] if "configMapRef" in ref}
    assert config_map["metadata"]["name"] in sources

    secret_volumes = {
        volume["name"]
        for volume in pod["volumes"]
        if volume.get("secret", {}).get("secretName") == "invoicing-connections"
    }
    mounts = [m for m in container["volumeMounts"] if m["name"] in secret_volumes]
    assert mounts, "no volume from Secret invoicing-connections is mounted"
    connections_file = settings["INVOICING_CONNECTIONS_FILE"]
    assert any(
        connections_file == m["mountPath"] or connections_file.startswith(m["mountPath"] + "/")
        for m in mounts
    ), f"{connections_file} is not inside a mount of Secret invoicing-connections"
    # subPath mounts never see Secret updates, and the worker reloads rotated keys.
    assert not any("subPath" in m for m in mounts)


def test_k8s_pod_is_locked_down_and_scraped() -> None:
    (deployment,) = of_kind("Deployment")
    template = deployment["spec"]["template"]
    (container,) = template["spec"]["containers"]
    assert template["spec"]["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["resources"]["limits"]["memory"] == "256Mi"
    assert template["metadata"]["annotations"]["prometheus.io/port"] == "9108"
    assert of_kind("Service")
    assert of_kind("PodDisruptionBudget")


# ------------------------------------------------------------------------------ Grafana


def test_dashboard_graphs_only_known_metrics() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboard.json").read_text())
    exprs = [
        target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        if "expr" in target
    ]
    assert exprs
    for expr in exprs:
        unknown = metric_names(expr) - KNOWN_METRICS
        assert not unknown, f"{expr!r} uses unknown metrics {unknown}"


def test_grafana_provisioning_parses() -> None:
    for path in (DEPLOY / "grafana" / "provisioning").rglob("*.yml"):
        assert yaml.safe_load(path.read_text())["apiVersion"] == 1, path


# ------------------------------------------------------------------------------ RabbitMQ


@pytest.fixture
def definitions() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((DEPLOY / "rabbitmq" / "definitions.json").read_text())
    return loaded


def test_definitions_queues_match_the_topology(definitions: dict[str, Any]) -> None:
    queues = {q["name"]: q for q in definitions["queues"]}
    assert all(q["durable"] for q in queues.values())
    work = queues["invoicing.sales"]["arguments"]
    assert work["x-queue-type"] == "quorum"
    assert work["x-dead-letter-exchange"] == "invoicing.sales.dead-letter"
    for tier, ttl_ms in RETRY_TIERS_MS.items():
        arguments = queues[f"invoicing.sales.retry.{tier}"]["arguments"]
        assert arguments["x-message-ttl"] == ttl_ms
        assert arguments["x-dead-letter-exchange"] == ""
        assert arguments["x-dead-letter-routing-key"] == "invoicing.sales"
    assert "x-message-ttl" not in queues["invoicing.dead"]["arguments"]
    assert set(queues) == {"invoicing.sales", "invoicing.dead"} | {
        f"invoicing.sales.retry.{tier}" for tier in RETRY_TIERS_MS
    }


class _Recorder:
    """Stands in for an aio-pika connection, channel, exchange and queue: records declarations."""

    def __init__(self, name: str = "", log: dict[str, Any] | None = None) -> None:
        self.name = name
        self.log: dict[str, Any] = (
            log if log is not None else {"exchanges": {}, "queues": {}, "bindings": set()}
        )

    async def channel(self) -> _Recorder:
        return self

    async def close(self) -> None:
        return None

    async def declare_exchange(self, name: str, type: Any, durable: bool) -> _Recorder:
        self.log["exchanges"][name] = getattr(type, "value", type)
        return _Recorder(name, self.log)

    async def declare_queue(self, name: str, durable: bool, arguments: Any) -> _Recorder:
        self.log["queues"][name] = dict(arguments or {})
        return _Recorder(name, self.log)

    async def bind(self, exchange: _Recorder, routing_key: str) -> None:
        self.log["bindings"].add((exchange.name, self.name, routing_key))


async def test_definitions_equal_what_the_worker_declares(definitions: dict[str, Any]) -> None:
    # Different arguments would make the worker's own declare fail with PRECONDITION_FAILED
    # against a broker that loaded these definitions.
    from worker.settings import Settings
    from worker.topology import declare

    recorder = _Recorder()
    settings = Settings(
        _env_file=None,
        exchange="bookinda",
        queue="invoicing.sales",
        dead_letter_queue="invoicing.dead",
    )
    await declare(recorder, settings)  # type: ignore[arg-type]
    declared = recorder.log
    assert {q["name"]: q["arguments"] for q in definitions["queues"]} == declared["queues"]
    assert {e["name"]: e["type"] for e in definitions["exchanges"]} == declared["exchanges"]
    bindings = {(b["source"], b["destination"], b["routing_key"]) for b in definitions["bindings"]}
    assert bindings == declared["bindings"]


def test_definitions_exchanges_and_bindings(definitions: dict[str, Any]) -> None:
    exchanges = {e["name"]: e["type"] for e in definitions["exchanges"]}
    assert exchanges == {"bookinda": "topic", "invoicing.sales.dead-letter": "fanout"}
    bindings = {(b["source"], b["destination"], b["routing_key"]) for b in definitions["bindings"]}
    assert bindings == {
        ("bookinda", "invoicing.sales", "sale.paid"),
        ("bookinda", "invoicing.sales", "sale.storno"),
        ("invoicing.sales.dead-letter", "invoicing.dead", ""),
    }


def test_rabbitmq_loads_definitions_and_prometheus_plugin() -> None:
    conf = (DEPLOY / "rabbitmq" / "rabbitmq.conf").read_text()
    assert re.search(r"^load_definitions\s*=\s*/etc/rabbitmq/definitions.json", conf, re.M)
    plugins = (DEPLOY / "rabbitmq" / "enabled_plugins").read_text()
    assert "rabbitmq_prometheus" in plugins
    assert plugins.strip().endswith("].")
