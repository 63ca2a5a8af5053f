"""Services started by their spec for a test: a real gRPC server on loopback port 0 and a real
database (SQLite or PostgreSQL), stopped and its schemas dropped at the end."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from services.shared.config import Settings
from services.shared.process import RunningService, ServiceSpec, start_service
from tests.conftest import base_settings, drop_schemas


class Services:
    """Starts services by their spec, each with settings of its own; stops them all at the end."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory, keys_dir: Path) -> None:
        self._tmp = tmp_path_factory
        self._keys_dir = keys_dir
        self._started: list[tuple[RunningService, Settings]] = []

    def settings(self, backend: str, **changes: Any) -> Settings:
        """The test settings for `backend` ("sqlite" or "postgres") in a fresh data directory,
        with `changes` to their fields (e.g. `crypto_suite="sm"`)."""
        settings = base_settings(self._tmp.mktemp("service"), self._keys_dir, backend)
        return dataclasses.replace(settings, **changes) if changes else settings

    async def start(self, spec: ServiceSpec, settings: Settings, *, quiet_outbox: bool = False) -> RunningService:
        """Start `spec` on a free loopback port. `quiet_outbox`: no audit service runs beside it,
        so its events stay in the outbox instead of being retried."""
        running = await start_service(spec, settings, listen="127.0.0.1:0")
        if quiet_outbox:
            running.runtime.outbox.poll_interval = 3600
        self._started.append((running, settings))
        return running

    async def close(self) -> None:
        """Stop every service started here (last first) and drop its schemas."""
        for running, settings in reversed(self._started):
            await running.stop(grace=None)
            await drop_schemas(settings)
        self._started.clear()
