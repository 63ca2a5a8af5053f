"""The index outside the gRPC server: the mpi's own database for the bulk loader, the link
export and EM estimation (the HL7 v2 ingress calls the service instead). Changes go through the
same `MasterIndex` as the RPCs; their audit and link events wait in the mpi outbox for the
service's relay."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from services.mpi import estimation, matching, store
from services.mpi.index import MasterIndex
from services.mpi.service import PARAMETERS_ENV, SPEC
from services.shared import migrations
from services.shared.audit_trail import AuditTrail
from services.shared.config import ComponentSettings, Settings
from services.shared.db import engine_for, session_factory
from services.shared.outbox import Outbox
from services.shared.protection import DataProtection


@dataclass
class IndexHandle:
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    outbox: Outbox
    master: MasterIndex


def parameters(path: Path | None = None) -> matching.MatchParameters:
    """The match parameters in force: a given file, else HIE_MPI_MATCH_PARAMETERS, else the default."""
    env = ComponentSettings.from_env("mpi").get(PARAMETERS_ENV)
    return matching.load_parameters(path or (Path(env) if env else None))


@asynccontextmanager
async def open_index(
    settings: Settings, *, params: matching.MatchParameters | None = None
) -> AsyncIterator[IndexHandle]:
    """The mpi database (migrated to the current schema) with the index over it."""
    engine = engine_for(settings, SPEC.name)
    protection = DataProtection.from_settings(settings)
    await migrations.upgrade(
        engine,
        schema=settings.schema_for(SPEC.name),
        versions=SPEC.versions,
        metadata=SPEC.metadata,
        protection=protection,
    )
    sessions = session_factory(engine)
    store.sealed_sessions(sessions, protection)
    outbox = Outbox(SPEC.metadata.tables["outbox"], sessions)
    base = params or parameters()
    # Stored estimates are used over the parameters unless they say `"learn_weights": false`.
    master = MasterIndex(
        audit=AuditTrail(outbox, service=SPEC.name), outbox=outbox, params=base, use_estimates=base.learn_weights
    )
    try:
        yield IndexHandle(engine=engine, sessions=sessions, outbox=outbox, master=master)
    finally:
        await engine.dispose()


async def estimate_from_index(handle: IndexHandle, *, sample: int) -> estimation.Estimate:
    """EM estimate of m / u from up to `sample` stored records (`estimation`), starting from the
    configured parameters (the census priors, not an earlier estimate)."""
    async with handle.sessions() as session:
        return await estimation.estimate_from_index(session, handle.master.base_params, sample=sample)
