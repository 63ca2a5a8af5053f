"""The mpi's operator functions: the weights in force (and an EM re-estimate), the bulk load of a
hospital's historical patients, and the link export. `hie mpi …` (services/ops/cli_mpi.py) calls
them; they work on the mpi's own database through the index's own code (services/mpi/standalone.py),
so the mpi's rules apply as they do in the service."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from services.mpi import estimation, store
from services.mpi.bulk import LoadReport, load_csv
from services.mpi.standalone import open_index
from services.mpi.standalone import parameters as load_parameters
from services.shared.config import Settings


async def weights(
    settings: Settings, *, parameters: Path | None = None, estimate: bool = False, sample: int = 5_000
) -> tuple[Any, dict[str, Any] | None, estimation.Estimate | None]:
    """The match parameters in force, the stored EM estimate they come from (None: the shipped
    priors), and, with `estimate`, a fresh EM estimate from the index (stored when reliable)."""
    async with open_index(settings, params=load_parameters(parameters) if parameters else None) as handle:
        master = handle.master
        async with handle.sessions() as session:
            await master.refresh_parameters(session, force=True)
        fresh = None
        if estimate:
            async with handle.sessions() as session, session.begin():
                fresh = await estimation.estimate_from_index(session, master.base_params, sample=sample)
                if fresh.reliable:
                    await estimation.save(session, fresh, source="on-demand")
            async with handle.sessions() as session:
                await master.refresh_parameters(session, force=True)
        return master.params, master.estimate, fresh


async def load_patients(
    settings: Settings,
    file: Path,
    *,
    domain: str,
    mapping: list[str],
    rejects: Path,
    batch_size: int,
    progress: Callable[[int], object],
    encoding: str,
) -> LoadReport:
    """Bulk-load a hospital's CSV of patients in batches (resumable; rejects to `rejects`)."""
    async with open_index(settings) as index:
        return await load_csv(
            index,
            file,
            domain_id=domain,
            mapping=mapping,
            rejects=rejects,
            batch_size=batch_size,
            progress=progress,
            encoding=encoding,
        )


async def links(settings: Settings) -> AsyncIterator[Any]:
    """Every active record's link: rows of (domain, local_id, enterprise_id, link_method)."""
    async with open_index(settings) as index, index.sessions() as session:
        async for row in store.all_links(session):
            yield row
