"""`hie status`: is the exchange ready, and how is each component doing — health, version,
outbox backlog — and which alerts fire, read from the metrics endpoints the components expose
(the same conditions as the Prometheus rules, services/ops/alerts.py, on one scrape).

Where the endpoints are: `hie up` records them in its state file; `--metrics name=url` names
them for an exchange started otherwise (compose, Kubernetes port-forwards).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx
from prometheus_client.parser import text_string_to_metric_families

from services.ops.alerts import ALERTS, Samples, evaluate
from services.shared.config import SERVICE_PORTS

# `hie up`'s metrics ports: the gateway on the base port, the services on the ports after it.
METRICS_BASE_PORT = 9400
COMPONENTS = ("gateway", *SERVICE_PORTS)
_COMPONENT_DOWN = next(a for a in ALERTS if a.name == "HieComponentDown")


def default_metrics_base_port(service_base_port: int) -> int:
    """9400, or the service base port + 40 when the services were moved off their defaults, so two
    exchanges on one machine do not collide (as the MLLP port does)."""
    return METRICS_BASE_PORT if service_base_port == 7101 else service_base_port + 40


def metrics_ports(base: int) -> dict[str, int]:
    """The metrics port of each component `hie up` starts, from the base port."""
    return {name: base + i for i, name in enumerate(COMPONENTS)}


def metrics_env(ports: Mapping[str, int], component: str) -> dict[str, str]:
    """The environment that turns a component's metrics endpoint on (nothing when ports are off)."""
    return {"HIE_METRICS_LISTEN": f"127.0.0.1:{ports[component]}"} if component in ports else {}


def metrics_endpoints(ports: Mapping[str, int]) -> dict[str, str]:
    return {name: f"http://127.0.0.1:{port}/metrics" for name, port in ports.items()}


def parse_endpoints(values: list[str]) -> dict[str, str]:
    """`name=url` (or a bare url, named by its position) from the command line; ValueError
    naming the value when it is not an http(s) URL with a host."""
    endpoints = {}
    for i, item in enumerate(values):
        name, sep, url = item.partition("=")
        if "://" in name:  # a bare URL (one whose query may hold "=")
            name, sep, url = f"endpoint-{i + 1}", "", item
        parsed = urlsplit(url)
        if (sep and not name) or parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"--metrics {item!r}: give name=http://host:port/metrics or a bare http(s) URL")
        endpoints[name] = url
    return endpoints


def gateway_readiness(url: str) -> dict[str, object] | None:
    """The gateway's /readyz answer (ready or degraded, and which services are down); None when
    it does not answer at all."""
    try:
        answer = httpx.get(f"{url}/readyz", timeout=2)
    except httpx.HTTPError:
        return None
    try:
        body = answer.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def wait_until_ready(url_of: Callable[[], str], wait: float) -> tuple[str, bool]:
    """Ask until the gateway answers ready or `wait` seconds have passed: (url, ready)."""
    deadline = time.monotonic() + wait
    while True:
        url = url_of()
        if url:
            answer = gateway_readiness(url)
            if answer is not None and answer.get("status") == "ready":
                return url, True
        if time.monotonic() >= deadline:
            return url, False
        time.sleep(0.5)


@dataclass
class Scrape:
    """Every endpoint's samples merged, and which endpoints did not answer."""

    samples: Samples = field(default_factory=dict)
    unreachable: list[str] = field(default_factory=list)


def scrape(endpoints: Mapping[str, str], timeout: float = 3.0) -> Scrape:
    result = Scrape()
    for name, url in endpoints.items():
        try:
            page = httpx.get(url, timeout=timeout).text
        except httpx.HTTPError:
            result.unreachable.append(name)
            continue
        for family in text_string_to_metric_families(page):
            for sample in family.samples:
                labels = frozenset((k, v) for k, v in sample.labels.items() if not k.startswith("otel_scope"))
                key = (sample.name, labels)
                result.samples[key] = result.samples.get(key, 0.0) + sample.value
    return result


@dataclass
class Row:
    component: str
    health: str
    version: str = "-"
    backlog: str = "-"
    oldest: str = "-"


def component_rows(readiness: Mapping[str, object], seen: Scrape) -> list[Row]:
    """One row per component: health from the gateway's readiness (services) and from its
    metrics endpoint answering; version and backlog from its metrics."""
    down = set(readiness.get("down", []) or [])  # type: ignore[call-overload]
    versions: dict[str, str] = {}
    backlog: dict[str, float] = {}
    oldest: dict[str, float] = {}
    for (name, labels), value in seen.samples.items():
        attrs = dict(labels)
        component = attrs.get("component", "")
        if name == "hie_build_info":
            versions[component] = attrs.get("version", "?")
        elif name == "hie_outbox_backlog":
            backlog[component] = backlog.get(component, 0.0) + value
        elif name == "hie_outbox_oldest_age_seconds":
            oldest[component] = max(oldest.get(component, 0.0), value)
    names = [*COMPONENTS, *sorted(set(backlog) - set(COMPONENTS))]
    rows = []
    for name in names:
        if name == "gateway":
            health = str(readiness.get("status", "unreachable"))
        else:
            health = "down" if name in down else "serving"
        if name in seen.unreachable:
            health += " (metrics unreachable)"
        rows.append(
            Row(
                component=name,
                health=health,
                version=versions.get(name, "-"),
                backlog=f"{backlog[name]:.0f}" if name in backlog else "-",
                oldest=f"{oldest[name]:.0f} s" if name in oldest else "-",
            )
        )
    return rows


def report(gateway_url: str, endpoints: Mapping[str, str], echo: Callable[[str], None]) -> int:
    """Print the components' table and the firing alerts; returns how many alerts fire."""
    readiness = gateway_readiness(gateway_url) or {"status": "unreachable", "down": list(SERVICE_PORTS)}
    seen = scrape(endpoints)
    echo(f"{'component':<12} {'health':<28} {'version':<10} {'backlog':>8} {'oldest':>8}")
    for row in component_rows(readiness, seen):
        echo(f"{row.component:<12} {row.health:<28} {row.version:<10} {row.backlog:>8} {row.oldest:>8}")
    if not endpoints:
        echo("alerts: not evaluated (no metrics endpoints: start with `hie up` or pass --metrics name=url)")
        return 0
    firing = evaluate(seen.samples)
    firing_names = {alert.name for alert, _what in firing}
    for name in seen.unreachable:
        firing.append((_COMPONENT_DOWN, f"{name}: metrics endpoint {endpoints[name]} does not answer"))
        firing_names.add("HieComponentDown")
    if not firing:
        echo("alerts: none firing")
        return 0
    echo(f"alerts firing ({len(firing_names)}):")
    for alert, what in firing:
        echo(f"  {alert.name:<30} [{alert.severity}] {what}")
    return len(firing_names)
