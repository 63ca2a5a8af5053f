"""The index outside the gRPC server: the mpi's own database for the bulk loader, the link
export, the MLLP listener and EM estimation. Changes go through the same `MasterIndex` as the
RPCs; their audit and link events wait in the mpi outbox for the service's relay."""

from __future__ import annotations

import os
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from services.mpi import matching, store
from services.mpi.index import MasterIndex
from services.mpi.service import PARAMETERS_ENV, SPEC
from services.shared import migrations
from services.shared.audit_trail import AuditTrail
from services.shared.config import Settings
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
    env = os.environ.get(PARAMETERS_ENV)
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
    master = MasterIndex(audit=AuditTrail(outbox, service=SPEC.name), outbox=outbox, params=params or parameters())
    try:
        yield IndexHandle(engine=engine, sessions=sessions, outbox=outbox, master=master)
    finally:
        await engine.dispose()


@dataclass(frozen=True)
class Estimate:
    """EM-estimated parameters and what they rest on."""

    parameters: matching.MatchParameters
    records: int
    candidate_pairs: int
    random_pairs: int


async def estimate_from_index(handle: IndexHandle, *, sample: int, seed: int = 1) -> Estimate:
    """EM estimate of m / u from up to `sample` stored records: u from pairs of records drawn at
    random (almost all different people), m and the match share by EM over the candidate pairs
    (blocking as in matching), starting from the parameters in force."""
    vectors: list[dict[str, str]] = []
    opened: list[matching.MatchRecord] = []
    async with handle.sessions() as session:
        ids = list(
            await session.scalars(
                select(store.PatientRecord.id).where(store.PatientRecord.merged_into.is_(None)).limit(sample)
            )
        )
        for start in range(0, len(ids), 500):
            records = await store.records_by_id(session, ids[start : start + 500])
            for record in records.values():
                own = store.match_record_of(record)
                opened.append(own)
                for candidate in await store.candidates(session, matching.search_keys(own), limit=50):
                    if candidate.id != record.id:
                        vectors.append(matching.compare(own, store.match_record_of(candidate)))
    rng = random.Random(seed)
    random_vectors = (
        [matching.compare(*rng.sample(opened, 2)) for _ in range(min(50_000, 10 * len(opened)))]
        if len(opened) >= 2
        else []
    )
    params = matching.estimate_parameters(vectors, handle.master.params, random_vectors=random_vectors)
    return Estimate(params, len(opened), len(vectors), len(random_vectors))
