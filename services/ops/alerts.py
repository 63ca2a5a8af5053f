"""The alerts an operator must act on, in one place: the Prometheus rule files in deploy/ and
k8s/ are generated from this table (`python -m services.ops.deploy_files --write`; a test fails
when they drift), and `hie status` evaluates the same conditions on one scrape of each component.

Prometheus evaluates rates over windows; `hie status` sees one moment, so its reading of a
rate-based rule uses the counters since the process started (with a minimum of traffic) and
says so. Thresholds are the module constants below, shared by both.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# Thresholds (seconds unless named otherwise).
OUTBOX_AGE_SECONDS = 300
RELAY_STUCK_WINDOW = "10m"
UNSIGNED_AUDIT_SECONDS = 600
CERT_EXPIRY_DAYS = 14
ERROR_RATIO = 0.05
LATENCY_P99_SECONDS = 0.5
MIN_REQUESTS = 100

Labels = frozenset[tuple[str, str]]
Samples = dict[tuple[str, Labels], float]


def _series(samples: Samples, name: str, **match: str) -> list[tuple[dict[str, str], float]]:
    wanted = set(match.items())
    return [(dict(labels), v) for (n, labels), v in samples.items() if n == name and wanted <= labels]


def _sum_by(samples: Samples, name: str, key: str, **match: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for labels, v in _series(samples, name, **match):
        out[labels.get(key, "")] = out.get(labels.get(key, ""), 0.0) + v
    return out


@dataclass(frozen=True)
class Alert:
    """One alert: its Prometheus rule and its reading on a single scrape (None: Prometheus only)."""

    name: str
    expr: str
    summary: str
    severity: str = "page"
    for_: str = "5m"
    instant: Callable[[Samples, float], list[str]] | None = field(default=None, repr=False)

    def rule(self) -> dict[str, Any]:
        return {
            "alert": self.name,
            "expr": self.expr,
            "for": self.for_,
            "labels": {"severity": self.severity},
            "annotations": {"summary": self.summary},
        }


def _backlog_old(samples: Samples, now: float) -> list[str]:
    return [
        f"{component}: oldest undelivered message is {age:.0f} s old"
        for labels, age in _series(samples, "hie_outbox_oldest_age_seconds")
        if age > OUTBOX_AGE_SECONDS and (component := labels.get("component", "?"))
    ]


def _relay_stuck(samples: Samples, now: float) -> list[str]:
    # One moment cannot show "no delivery for 10 minutes": a backlog whose oldest message has
    # waited twice the age threshold is the same story told by the gauges.
    return [
        f"{component}: {backlog:.0f} message(s) waiting and nothing delivered since"
        for component, backlog in _sum_by(samples, "hie_outbox_backlog", "component").items()
        if backlog > 0
        and max((v for lab, v in _series(samples, "hie_outbox_oldest_age_seconds", component=component)), default=0)
        > 2 * OUTBOX_AGE_SECONDS
    ]


def _dead_letters(samples: Samples, now: float) -> list[str]:
    return [
        f"{topic}: {count:.0f} message(s) dead-lettered since start (list and replay them)"
        for topic, count in _sum_by(samples, "hie_outbox_dead_letters_total", "topic").items()
        if count > 0
    ]


def _invalidations(samples: Samples, now: float) -> list[str]:
    return [
        f"{component}: {count:.0f} invalidation(s) not acknowledged by a replica since start"
        for component, count in _sum_by(samples, "hie_invalidation_unacknowledged_total", "component").items()
        if count > 0
    ]


def _error_ratio(samples: Samples, now: float) -> list[str]:
    total = sum(v for _l, v in _series(samples, "hie_http_server_requests_total"))
    failed = sum(v for lab, v in _series(samples, "hie_http_server_requests_total") if lab.get("status", "")[:1] == "5")
    if total >= MIN_REQUESTS and failed / total > ERROR_RATIO:
        return [f"gateway: {failed / total:.1%} of {total:.0f} requests since start answered 5xx"]
    return []


_SERVER_FAULTS = ("INTERNAL", "UNAVAILABLE", "DEADLINE_EXCEEDED", "UNKNOWN", "DATA_LOSS")


def _rpc_error_ratio(samples: Samples, now: float) -> list[str]:
    found = []
    for component, total in _sum_by(samples, "hie_rpc_server_requests_total", "component").items():
        failed = sum(
            v
            for lab, v in _series(samples, "hie_rpc_server_requests_total", component=component)
            if lab.get("code") in _SERVER_FAULTS
        )
        if total >= MIN_REQUESTS and failed / total > ERROR_RATIO:
            found.append(f"{component}: {failed / total:.1%} of {total:.0f} calls since start failed")
    return found


def quantile(buckets: list[tuple[float, float]], q: float) -> float:
    """The q-quantile of cumulative (upper bound, count) buckets, interpolated as Prometheus's
    histogram_quantile does."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] == 0:
        return math.nan
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / max(count - lower_count, 1e-12)
        lower_bound, lower_count = bound, count
    return buckets[-1][0]


def _latency(samples: Samples, now: float) -> list[str]:
    by_route: dict[str, list[tuple[float, float]]] = {}
    for labels, count in _series(samples, "hie_http_server_duration_seconds_bucket"):
        le = float(labels.get("le", "inf").replace("+Inf", "inf"))
        route = labels.get("route", "")
        merged = dict(by_route.get(route, []))
        merged[le] = merged.get(le, 0.0) + count
        by_route[route] = sorted(merged.items())
    found = []
    for route, buckets in by_route.items():
        if buckets and buckets[-1][1] >= MIN_REQUESTS:
            p99 = quantile(buckets, 0.99)
            if p99 > LATENCY_P99_SECONDS:
                found.append(f"{route}: p99 {p99 * 1000:.0f} ms since start")
    return found


def _unsigned_audit(samples: Samples, now: float) -> list[str]:
    return [
        f"audit: records unsigned for {age:.0f} s (checkpoints not written)"
        for _l, age in _series(samples, "hie_audit_unsigned_age_seconds")
        if age > UNSIGNED_AUDIT_SECONDS
    ]


def _certificates(samples: Samples, now: float) -> list[str]:
    return [
        f"{labels.get('component')}: {labels.get('credential')} certificate expires in {(at - now) / 86400:.1f} days"
        for labels, at in _series(samples, "hie_credential_expiry_seconds")
        if at - now < CERT_EXPIRY_DAYS * 86400
    ]


def _storage_full(samples: Samples, now: float) -> list[str]:
    return [
        f"{component}: {count:.0f} write(s) refused, storage full"
        for component, count in _sum_by(samples, "hie_storage_faults_total", "component", reason="storage-full").items()
        if count > 0
    ]


ALERTS: tuple[Alert, ...] = (
    Alert(
        "HieOutboxRelayStuck",
        "(sum by (component) (hie_outbox_backlog) > 0)"
        f" unless on (component) (sum by (component) (increase(hie_outbox_delivered_total[{RELAY_STUCK_WINDOW}])) > 0)",
        "An outbox relay delivered nothing for 10 minutes while messages wait (receiver down or relay hung)",
        instant=_relay_stuck,
    ),
    Alert(
        "HieOutboxBacklogOld",
        f"max by (component) (hie_outbox_oldest_age_seconds) > {OUTBOX_AGE_SECONDS}",
        "The oldest undelivered outbox message is older than 5 minutes (audit events or notifications delayed)",
        instant=_backlog_old,
    ),
    Alert(
        "HieDeadLetters",
        "sum by (component, topic) (increase(hie_outbox_dead_letters_total[1h])) > 0",
        "Messages were given up on (dead letters): list them and replay once the receiver is fixed",
        severity="ticket",
        for_="0m",
        instant=_dead_letters,
    ),
    Alert(
        "HieGatewayErrorRate",
        'sum(rate(hie_http_server_requests_total{status=~"5.."}[5m]))'
        f" / sum(rate(hie_http_server_requests_total[5m])) > {ERROR_RATIO}",
        "More than 5% of the gateway's answers are server errors",
        for_="10m",
        instant=_error_ratio,
    ),
    Alert(
        "HieServiceErrorRate",
        f'sum by (component) (rate(hie_rpc_server_requests_total{{code=~"{"|".join(_SERVER_FAULTS)}"}}[5m]))'
        f" / sum by (component) (rate(hie_rpc_server_requests_total[5m])) > {ERROR_RATIO}",
        "More than 5% of a service's gRPC calls fail with a server-side status",
        for_="10m",
        instant=_rpc_error_ratio,
    ),
    Alert(
        "HieGatewayLatencyHigh",
        "histogram_quantile(0.99, sum by (le, route) (rate(hie_http_server_duration_seconds_bucket[5m])))"
        f" > {LATENCY_P99_SECONDS}",
        "A gateway route's p99 latency is above 500 ms",
        for_="10m",
        instant=_latency,
    ),
    Alert(
        "HieAuditCheckpointNotWritten",
        f"max(hie_audit_unsigned_age_seconds) > {UNSIGNED_AUDIT_SECONDS}",
        "Audit records have waited more than 10 minutes for a signed checkpoint",
        instant=_unsigned_audit,
    ),
    Alert(
        "HieCertificateExpiresSoon",
        f"min by (component, credential) (hie_credential_expiry_seconds) - time() < {CERT_EXPIRY_DAYS} * 86400",
        "A TLS certificate expires within 14 days: renew it",
        severity="ticket",
        for_="1h",
        instant=_certificates,
    ),
    Alert(
        "HieStorageFull",
        'sum by (component) (increase(hie_storage_faults_total{reason="storage-full"}[5m])) > 0',
        "A component's database refused writes: storage full",
        for_="0m",
        instant=_storage_full,
    ),
    Alert(
        "HieComponentDown",
        # Scraped directly: its endpoint does not answer. Pushed through the collector: it
        # reported ten minutes ago and no longer does (the collector drops a silent series).
        'up{job=~"hie-.*"} == 0'
        " or (count by (component) (hie_build_info offset 10m) unless count by (component) (hie_build_info))",
        "A component (or the telemetry collector) stopped reporting: process down or unreachable",
        for_="2m",
    ),
    Alert(
        "HieInvalidationUnacknowledged",
        # A replica missing an invalidation now and then (stopping during a rollout) is expected;
        # one missing them for 10 minutes is partitioned or hung while it may still answer reads.
        "sum by (component, peer) (increase(hie_invalidation_unacknowledged_total[5m])) > 0",
        "Cache invalidations keep failing to reach a replica: its kept entries are stale up to their lifetime",
        severity="ticket",
        for_="10m",
        instant=_invalidations,
    ),
)

# Names a rule may use that no exchange code registers: Prometheus's own.
PROMETHEUS_BUILTINS = frozenset({"up", "time"})


def evaluate(samples: Samples, now: float | None = None) -> list[tuple[Alert, str]]:
    """The alerts firing on one scrape, each with what fires it."""
    at = time.time() if now is None else now
    return [(alert, found) for alert in ALERTS if alert.instant for found in alert.instant(samples, at)]


def rule_groups() -> dict[str, Any]:
    return {"groups": [{"name": "hie-exchange", "rules": [alert.rule() for alert in ALERTS]}]}
