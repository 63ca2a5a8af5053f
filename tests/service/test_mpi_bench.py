"""`hie bench mpi` (services/mpi/bench.py) run small: what it logs while it measures."""

from __future__ import annotations

import logging

import pytest

from services.mpi import bench


def test_the_bench_tells_no_registry_of_link_changes(caplog: pytest.LogCaptureFixture) -> None:
    """No registry runs in the bench: each timed registration used to try the default registry
    port, log "registry cross-reference invalidation not acknowledged: UNAVAILABLE" and count
    the retry in its latency."""
    messages: list[str] = []
    with caplog.at_level(logging.WARNING):
        result = bench.run(records=200, domains=2, latency_samples=5, database_url="", seed=3, log=messages.append)
    assert result["latency"]["samples"] == 5
    assert not [r for r in caplog.records if "not acknowledged" in r.getMessage()]
