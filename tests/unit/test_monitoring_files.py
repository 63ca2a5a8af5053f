"""The monitoring files hold together offline: the alert rules and the dashboard query only
metrics the code registers, the generated files are up to date with their sources, the compose
stack mounts files that exist, and `promtool` (when installed, e.g. Debian's `prometheus`
package) accepts the rules, fires them on synthetic series, and accepts the Prometheus config."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
import yaml

from services.ops import alerts, deploy_files
from services.ops.dashboard import queries
from services.shared.metrics import INSTRUMENTS

ROOT = Path(__file__).resolve().parents[2]
PROMTOOL = shutil.which("promtool")
# PromQL words that look like metric names in an expression but are not.
_PROMQL_WORDS = {
    "sum", "max", "min", "count", "avg", "unless", "and", "or", "offset", "rate", "increase",
    "histogram_quantile", "bool", "group_left",
}  # fmt: skip


def registered_series() -> set[str]:
    return {name for instrument in INSTRUMENTS.values() for name in instrument.prometheus_names}


def metric_names(expr: str) -> set[str]:
    """Identifiers of an expression outside label matchers, strings and ranges."""
    stripped = re.sub(r"\{[^}]*\}", "", expr)
    stripped = re.sub(r"\[[^\]]*\]", "", stripped)
    stripped = re.sub(r"\b(by|on|without|ignoring)\s*\([^)]*\)", "", stripped)
    stripped = re.sub(r"(?<![A-Za-z_:])\d[\d.]*[a-z]*", "", stripped)  # numbers and durations (10m)
    return {w for w in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", stripped) if w not in _PROMQL_WORDS}


def test_every_rule_and_panel_names_registered_metrics() -> None:
    known = registered_series() | alerts.PROMETHEUS_BUILTINS
    rules = yaml.safe_load((ROOT / deploy_files.RULES).read_text())
    exprs = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    assert {rule["alert"] for group in rules["groups"] for rule in group["rules"]} == {a.name for a in alerts.ALERTS}
    for expr in [*exprs, *queries()]:
        unknown = metric_names(expr.replace("$__rate_interval", "5m")) - known
        assert not unknown, f"{expr}: {unknown}"
    # Every rule says how urgent it is and what happened.
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in {"page", "ticket"}
            assert rule["annotations"]["summary"]


def test_the_name_check_catches_an_unknown_metric() -> None:
    assert metric_names("sum by (component) (rate(hie_outbox_delivred_total[5m])) > 0") - registered_series() == {
        "hie_outbox_delivred_total"
    }


def test_generated_files_are_up_to_date() -> None:
    for path, text in deploy_files.generated(ROOT).items():
        assert (ROOT / path).read_text(encoding="utf-8") == text, (
            f"{path}: run python -m services.ops.deploy_files --write"
        )
    board = json.loads((ROOT / deploy_files.DASHBOARD).read_text())
    assert board["uid"] == "hie-exchange"
    assert len(board["panels"]) >= 10


def test_compose_mounts_the_monitoring_files() -> None:
    compose = yaml.safe_load((ROOT / "deploy/compose.yaml").read_text())
    services = compose["services"]
    for name in ("otel-collector", "jaeger", "prometheus", "grafana"):
        assert name in services
    for name in ("prometheus", "grafana", "otel-collector"):
        for volume in services[name].get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / "deploy" / source).exists(), f"{name} mounts missing {source}"
    collector = yaml.safe_load((ROOT / deploy_files.COLLECTOR).read_text())
    assert "prometheus" in collector["service"]["pipelines"]["metrics"]["exporters"]
    prometheus = yaml.safe_load((ROOT / deploy_files.PROMETHEUS).read_text())
    targets = [t for job in prometheus["scrape_configs"] for c in job["static_configs"] for t in c["targets"]]
    assert targets == [f"otel-collector:{collector['exporters']['prometheus']['endpoint'].rsplit(':', 1)[1]}"]


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (apt install prometheus)")
def test_promtool_accepts_the_rules_and_config(tmp_path: Path) -> None:
    assert PROMTOOL is not None
    checked = subprocess.run(
        [PROMTOOL, "check", "rules", str(ROOT / deploy_files.RULES)], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    config = (
        (ROOT / deploy_files.PROMETHEUS)
        .read_text()
        .replace("/etc/prometheus/rules.yaml", str(ROOT / deploy_files.RULES))
    )
    (tmp_path / "prometheus.yaml").write_text(config)
    checked = subprocess.run(
        [PROMTOOL, "check", "config", str(tmp_path / "prometheus.yaml")], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (apt install prometheus)")
def test_rules_fire_on_the_conditions_they_name(tmp_path: Path) -> None:
    """promtool's rule unit tests: a stuck relay, an old backlog, a dead letter, a certificate
    near expiry and invalidations that keep failing fire; a relay that keeps delivering and a
    single missed invalidation do not."""
    assert PROMTOOL is not None
    cases = textwrap.dedent(
        f"""
        rule_files: [{ROOT / deploy_files.RULES}]
        evaluation_interval: 1m
        tests:
          - interval: 1m
            input_series:
              - series: 'hie_outbox_backlog{{component="registry"}}'
                values: '5x30'
              - series: 'hie_outbox_delivered_total{{component="registry",topic="audit.events"}}'
                values: '10x30'
              - series: 'hie_outbox_backlog{{component="mpi"}}'
                values: '5x30'
              - series: 'hie_outbox_delivered_total{{component="mpi",topic="audit.events"}}'
                values: '10+1x30'
              - series: 'hie_outbox_oldest_age_seconds{{component="registry"}}'
                values: '0+60x30'
              - series: 'hie_outbox_dead_letters_total{{component="registry",topic="notification"}}'
                values: '0 0 1 1 1'
              - series: 'hie_credential_expiry_seconds{{component="gateway",credential="https"}}'
                values: '86400x100'
              - series: 'hie_invalidation_unacknowledged_total{{component="consent",peer="registry"}}'
                values: '0+1x30'
              - series: 'hie_invalidation_unacknowledged_total{{component="mpi",peer="registry"}}'
                values: '0 1 1x30'
            alert_rule_test:
              - eval_time: 20m
                alertname: HieOutboxRelayStuck
                exp_alerts:
                  - exp_labels: {{severity: page, component: registry}}
                    exp_annotations: {{summary: "{alerts.ALERTS[0].summary}"}}
              - eval_time: 15m
                alertname: HieOutboxBacklogOld
                exp_alerts:
                  - exp_labels: {{severity: page, component: registry}}
                    exp_annotations: {{summary: "{alerts.ALERTS[1].summary}"}}
              - eval_time: 3m
                alertname: HieDeadLetters
                exp_alerts:
                  - exp_labels: {{severity: ticket, component: registry, topic: notification}}
                    exp_annotations:
                      summary: "{alerts.ALERTS[2].summary}"
              - eval_time: 90m
                alertname: HieCertificateExpiresSoon
                exp_alerts:
                  - exp_labels: {{severity: ticket, component: gateway, credential: https}}
                    exp_annotations: {{summary: "{alerts.ALERTS[7].summary}"}}
              - eval_time: 20m
                alertname: HieInvalidationUnacknowledged
                exp_alerts:
                  - exp_labels: {{severity: ticket, component: consent, peer: registry}}
                    exp_annotations: {{summary: "{alerts.ALERTS[-1].summary}"}}
        """
    )
    (tmp_path / "tests.yaml").write_text(cases)
    tested = subprocess.run([PROMTOOL, "test", "rules", str(tmp_path / "tests.yaml")], capture_output=True, text=True)
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_status_evaluates_the_same_conditions_on_one_scrape() -> None:
    now = 1_000_000.0

    def key(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
        return (name, frozenset(labels.items()))

    quiet = {
        key("hie_outbox_backlog", component="registry"): 0.0,
        key("hie_outbox_oldest_age_seconds", component="registry"): 0.0,
    }
    assert alerts.evaluate(quiet, now) == []
    troubled = {
        key("hie_outbox_backlog", component="registry"): 12.0,
        key("hie_outbox_oldest_age_seconds", component="registry"): 900.0,
        key("hie_outbox_dead_letters_total", component="registry", topic="notification"): 2.0,
        key("hie_audit_unsigned_age_seconds"): 3600.0,
        key("hie_credential_expiry_seconds", component="gateway", credential="https"): now + 3 * 86400,
        key("hie_http_server_requests_total", route="/a", method="GET", status="200"): 150.0,
        key("hie_http_server_requests_total", route="/a", method="GET", status="503"): 50.0,
        key("hie_invalidation_unacknowledged_total", component="consent", peer="registry", code="UNAVAILABLE"): 1.0,
    }
    fired = {alert.name for alert, _what in alerts.evaluate(troubled, now)}
    assert fired == {
        "HieOutboxRelayStuck",
        "HieOutboxBacklogOld",
        "HieDeadLetters",
        "HieAuditCheckpointNotWritten",
        "HieCertificateExpiresSoon",
        "HieGatewayErrorRate",
        "HieInvalidationUnacknowledged",
    }


def test_quantile_matches_prometheus_interpolation() -> None:
    buckets = [(0.1, 50.0), (0.5, 90.0), (1.0, 100.0), (float("inf"), 100.0)]
    assert alerts.quantile(buckets, 0.5) == pytest.approx(0.1)
    assert alerts.quantile(buckets, 0.99) == pytest.approx(0.5 + 0.5 * 9 / 10)
