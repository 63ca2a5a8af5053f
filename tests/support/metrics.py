"""The test process's own Prometheus scrape page (every in-process component reports to it), read
by the tests that assert metrics move."""

from __future__ import annotations

import asyncio
import re

import httpx
from prometheus_client.parser import text_string_to_metric_families

from services.shared.metrics import serve_metrics

_METRICS_URL: list[str] = []


def metrics_url() -> str:
    """The test process's scrape endpoint (every in-process component reports to it)."""
    if not _METRICS_URL:
        _server, port = serve_metrics("127.0.0.1:0")
        _METRICS_URL.append(f"http://127.0.0.1:{port}/metrics")
    return _METRICS_URL[0]


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(*names: str) -> tuple[str, Samples]:
    """The scrape page and its samples (only the series `names`, when given), parsed off the
    event loop. Every exchange a full test run starts reports into this one process, so by the
    time these tests run the page holds many thousands of series (each test's organisations,
    routes and histograms): parsing all of it on the loop, ten times a second in `until`,
    starved the exchange under test until its samplers timed out and its gauges went stale."""
    async with httpx.AsyncClient() as http:
        page = (await http.get(metrics_url(), timeout=10)).text
    return page, await asyncio.to_thread(_parse, page, frozenset(names))


def _parse(page: str, names: frozenset[str]) -> Samples:
    if names:  # the sample lines of those series only (untyped to the parser; values unchanged)
        page = "\n".join(line for line in page.splitlines() if re.split(r"[{ ]", line, maxsplit=1)[0] in names)
    samples: Samples = {}
    for family in text_string_to_metric_families(page):
        for sample in family.samples:
            labels = frozenset((k, v) for k, v in sample.labels.items() if not k.startswith("otel_scope"))
            samples[(sample.name, labels)] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum over the series of `name` whose labels include `labels` (0 when there is none)."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)
