"""The audit service's sampled gauge: how long ago the chain's head was last signed (a
checkpoint not written for long is an alert: removals from the chain's end go unnoticed)."""

from __future__ import annotations

from services.audit import store
from services.shared.db import utcnow
from services.shared.metrics import AUDIT_CHECKPOINT_AGE, Probe, sample_forever
from services.shared.process import ServiceRuntime


def checkpoint_probe(runtime: ServiceRuntime) -> Probe:
    async def probe() -> None:
        async with runtime.sessions() as session:
            latest = await store.latest_checkpoint(session)
        if latest is not None:
            AUDIT_CHECKPOINT_AGE.set((utcnow() - latest.signed_at).total_seconds(), {})

    return probe


def watch(runtime: ServiceRuntime) -> None:
    """Start the audit service's sampler for the life of the service."""
    runtime.background(
        sample_forever(checkpoint_probe(runtime), runtime.settings.metrics_sample_seconds, name="audit"),
        name="metrics-audit",
    )
