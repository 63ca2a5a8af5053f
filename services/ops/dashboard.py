"""The operator's Grafana dashboard, written as data: `python -m services.ops.deploy_files --write`
renders it to deploy/grafana/dashboards/hie-exchange.json (and the k8s ConfigMap); a test checks
every query names metrics the code registers."""

from __future__ import annotations

from typing import Any

# (title, unit, [(PromQL, legend)]) per panel, in rows of two.
PANELS: list[tuple[str, str, list[tuple[str, str]]]] = [
    (
        "Gateway requests per second by route",
        "reqps",
        [("sum by (route) (rate(hie_http_server_requests_total[$__rate_interval]))", "{{route}}")],
    ),
    (
        "Gateway p99 latency by route",
        "s",
        [
            (
                "histogram_quantile(0.99, sum by (le, route)"
                " (rate(hie_http_server_duration_seconds_bucket[$__rate_interval])))",
                "{{route}}",
            )
        ],
    ),
    (
        "Gateway errors by reason",
        "reqps",
        [("sum by (status, reason) (rate(hie_http_server_errors_total[$__rate_interval]))", "{{status}} {{reason}}")],
    ),
    (
        "Service calls per second by component and status",
        "reqps",
        [
            (
                "sum by (component, code) (rate(hie_rpc_server_requests_total[$__rate_interval]))",
                "{{component}} {{code}}",
            )
        ],
    ),
    (
        "Service p99 latency by component",
        "s",
        [
            (
                "histogram_quantile(0.99, sum by (le, component)"
                " (rate(hie_rpc_server_duration_seconds_bucket[$__rate_interval])))",
                "{{component}}",
            )
        ],
    ),
    (
        "Service errors by reason",
        "reqps",
        [
            (
                "sum by (component, reason) (rate(hie_rpc_server_errors_total[$__rate_interval]))",
                "{{component}} {{reason}}",
            )
        ],
    ),
    (
        "Consent denials (by rule) and break-the-glass",
        "short",
        [
            ("sum by (basis) (increase(hie_consent_denials_total[$__rate_interval]))", "denied: {{basis}}"),
            ("sum(increase(hie_consent_break_glass_accesses_total[$__rate_interval]))", "break-glass accesses"),
            ("sum(increase(hie_consent_break_glass_declarations_total[$__rate_interval]))", "break-glass declared"),
        ],
    ),
    (
        "Tokens issued and refused by organisation",
        "short",
        [
            (
                "sum by (organization, outcome) (increase(hie_oauth_tokens_total[$__rate_interval]))",
                "{{organization}} {{outcome}}",
            )
        ],
    ),
    (
        "Outbox backlog by component",
        "short",
        [("sum by (component) (hie_outbox_backlog)", "{{component}}")],
    ),
    (
        "Oldest undelivered outbox message",
        "s",
        [("max by (component) (hie_outbox_oldest_age_seconds)", "{{component}}")],
    ),
    (
        "Notification deliveries, retries and dead letters",
        "short",
        [("sum by (outcome) (increase(hie_notify_deliveries_total[$__rate_interval]))", "{{outcome}}")],
    ),
    (
        "Outbox deliveries and dead letters by topic",
        "short",
        [
            ("sum by (topic) (increase(hie_outbox_delivered_total[$__rate_interval]))", "delivered {{topic}}"),
            ("sum by (topic) (increase(hie_outbox_dead_letters_total[$__rate_interval]))", "dead {{topic}}"),
        ],
    ),
    (
        "MPI review queue and bulk loads",
        "short",
        [
            ("max(hie_mpi_review_queue_size)", "open review tasks"),
            ("max by (domain) (hie_mpi_bulk_load_rows)", "bulk load rows {{domain}}"),
        ],
    ),
    (
        "Audit checkpoints",
        "s",
        [
            ("max(hie_audit_checkpoint_age_seconds)", "since last checkpoint"),
            ("max(hie_audit_unsigned_age_seconds)", "oldest unsigned record"),
        ],
    ),
    (
        "Certificate expiry (days)",
        "d",
        [
            (
                "(min by (component, credential) (hie_credential_expiry_seconds) - time()) / 86400",
                "{{component}} {{credential}}",
            )
        ],
    ),
    (
        "Storage faults",
        "short",
        [
            (
                "sum by (component, reason) (increase(hie_storage_faults_total[$__rate_interval]))",
                "{{component}} {{reason}}",
            )
        ],
    ),
    (
        "Cache invalidations a replica did not acknowledge",
        "short",
        [
            (
                "sum by (component, peer, code) (increase(hie_invalidation_unacknowledged_total[$__rate_interval]))",
                "{{component}} → {{peer}} {{code}}",
            )
        ],
    ),
]


def dashboard() -> dict[str, Any]:
    """The Grafana dashboard model (schema 39), datasource by uid `prometheus`."""
    datasource = {"type": "prometheus", "uid": "prometheus"}
    panels = []
    for i, (title, unit, queries) in enumerate(PANELS):
        panels.append(
            {
                "id": i + 1,
                "type": "timeseries",
                "title": title,
                "datasource": datasource,
                "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
                "targets": [
                    {"refId": chr(ord("A") + j), "datasource": datasource, "expr": expr, "legendFormat": legend}
                    for j, (expr, legend) in enumerate(queries)
                ],
            }
        )
    return {
        "uid": "hie-exchange",
        "title": "Health information exchange: operations",
        "tags": ["hie"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "panels": panels,
    }


def queries() -> list[str]:
    return [expr for _title, _unit, targets in PANELS for expr, _legend in targets]
