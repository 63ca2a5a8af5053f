"""The audit service's sampled gauges: how long ago the chain's head was last signed, and how
long the oldest record not yet covered by a checkpoint has waited. The second is what an
operator alerts on: a quiet exchange legitimately writes no checkpoint for hours, but a record
left unsigned for long means removals from the chain's end would go unnoticed."""

from __future__ import annotations

from sqlalchemy import func, select

from services.audit import store
from services.shared.db import utcnow
from services.shared.metrics import AUDIT_CHECKPOINT_AGE, AUDIT_UNSIGNED_AGE, Probe, sample_forever
from services.shared.process import ServiceRuntime


def checkpoint_probe(runtime: ServiceRuntime) -> Probe:
    async def probe() -> None:
        async with runtime.sessions() as session:
            latest = await store.latest_checkpoint(session)
            after = latest.sequence if latest is not None else 0
            oldest = await session.scalar(
                select(func.min(store.AuditRecord.recorded)).where(store.AuditRecord.sequence > after)
            )
        now = utcnow()
        if latest is not None:
            AUDIT_CHECKPOINT_AGE.set((now - latest.signed_at).total_seconds(), {})
        AUDIT_UNSIGNED_AGE.set(0.0 if oldest is None else max(0.0, (now - oldest).total_seconds()), {})

    return probe


def watch(runtime: ServiceRuntime) -> None:
    """Start the audit service's sampler for the life of the service."""
    runtime.background(
        sample_forever(checkpoint_probe(runtime), runtime.settings.metrics_sample_seconds, name="audit"),
        name="metrics-audit",
    )
