"""The MPI's sampled gauges: the review queue a data steward works through, and bulk loads'
progress (the load runs in `hie mpi load`; its progress is committed to this service's tables)."""

from __future__ import annotations

import datetime

from sqlalchemy import func, select

from services.mpi.store import BulkLoad, ReviewTask
from services.shared.db import utcnow
from services.shared.metrics import BULK_LOAD_ROWS, MPI_REVIEW_QUEUE, Probe, sample_forever
from services.shared.process import ServiceRuntime

# A load whose progress moved within this window is reported; older ones are finished or stopped.
_RECENT = datetime.timedelta(hours=1)


def mpi_probe(runtime: ServiceRuntime) -> Probe:
    """Samples the open review tasks and the rows done by recently active bulk loads, per domain."""
    reported: set[str] = set()

    async def probe() -> None:
        async with runtime.sessions() as session:
            open_tasks = await session.scalar(select(func.count()).where(ReviewTask.status == "open"))
            loads = (
                await session.execute(
                    select(BulkLoad.domain, func.sum(BulkLoad.rows_done))
                    .where(BulkLoad.updated_at >= utcnow() - _RECENT)
                    .group_by(BulkLoad.domain)
                )
            ).all()
        MPI_REVIEW_QUEUE.set(int(open_tasks or 0), {})
        current = {domain for domain, _rows in loads}
        for domain in reported - current:
            BULK_LOAD_ROWS.clear({"domain": domain})
        for domain, rows in loads:
            BULK_LOAD_ROWS.set(int(rows or 0), {"domain": domain})
        reported.clear()
        reported.update(current)

    return probe


def watch(runtime: ServiceRuntime) -> None:
    """Start the MPI's sampler for the life of the service."""
    runtime.background(
        sample_forever(mpi_probe(runtime), runtime.settings.metrics_sample_seconds, name="mpi"), name="metrics-mpi"
    )
