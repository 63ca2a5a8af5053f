"""`hie bench registry` runs end to end at a tiny scale (figures are not asserted: speed is
measured by the command, never by a test). It starts audit, mpi, consent and registry as their
own processes and calls them as a hospital the gateway forwards would; a change to what the
services accept (the user assertion's lifetime) broke it unnoticed before this test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import POSTGRES_URL

pytestmark = pytest.mark.load


def test_the_registry_benchmark_runs_end_to_end_at_a_tiny_scale(tmp_path: Path) -> None:
    """On PostgreSQL when the tests have it (as the benchmark is meant to run), else on SQLite."""
    output = tmp_path / "registry.json"
    args = ["--patients", "20", "--documents", "60", "--sample", "5", "--queries", "10"]
    args += ["--registrations", "4", "--retrievals", "1", "--set-size", "2"]
    env = {k: v for k, v in os.environ.items() if k != "HIE_DATABASE_URL"}
    if POSTGRES_URL:
        args += ["--database-url", POSTGRES_URL]
    done = subprocess.run(
        [sys.executable, "-m", "services.ops.cli", "bench", "registry", *args, "--json", str(output)],
        capture_output=True,
        text=True,
        timeout=280,
        env=env,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(output.read_text())
    assert result["documents"] == 60
    query = result["query_by_patient"]
    assert query["n"] == 10
    # 60 entries over 20 patients: three each, those labelled sensitive (PSY) left out by consent.
    assert 2 <= query["entries_per_query"] <= 3
    assert query["cpu_ms_per_query"]["registry"] > 0
    assert query["cpu_ms_per_query"]["services_and_database"] >= query["cpu_ms_per_query"]["registry"]
    assert result["register_20kb"]["documents"] == 4
    assert result["retrieve_1mb"]["retrievals"] == 5
    assert "query by patient" in done.stdout
    assert "query CPU ms per query" in done.stdout
