"""Fixtures of the service tests: any service started by its spec on a real gRPC server (loopback,
port 0) and a real database, stopped and its schemas dropped afterwards."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.mpi.service import SPEC as MPI
from services.shared.process import RunningService
from tests.conftest import _backends
from tests.support.services import Services


@pytest.fixture
async def services(tmp_path_factory: pytest.TempPathFactory, keys_dir: Path) -> AsyncIterator[Services]:
    """Services started for one test."""
    started = Services(tmp_path_factory, keys_dir)
    try:
        yield started
    finally:
        await started.close()


@pytest.fixture(scope="module", params=_backends())
async def mpi(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, keys_dir: Path
) -> AsyncIterator[RunningService]:
    """One mpi per module and backend, with no audit service beside it (events stay in the outbox)."""
    started = Services(tmp_path_factory, keys_dir)
    try:
        yield await started.start(MPI, started.settings(request.param), quiet_outbox=True)
    finally:
        await started.close()
