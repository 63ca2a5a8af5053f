"""Invalidations acknowledged before a consent change returns: the consent service's half of the
registry's consent decision cache (services/registry/decision_cache.py explains the protocol).

Every write that bumps a patient's consent version (record, revise or revoke a directive, grant or
revoke a grant, declare break-the-glass) may change a decision about that patient, so after the
write commits the servicer asks the registry to drop the decisions it keeps for the patient and
waits for the acknowledgement before answering. Time needs no push: a kept decision carries the
first moment the records decide differently on their own (`policy.next_change`). Every registry
replica keeps its own decisions, so every replica is told (HIE_REGISTRY_REPLICAS:
services/shared/invalidation.py), in parallel.
"""

from __future__ import annotations

from hie.registry.v1 import registry_pb2, registry_pb2_grpc
from services.shared.process import ServiceRuntime


def registry_caches(runtime: ServiceRuntime) -> bool:
    """Whether the registry keeps decisions at all (the one setting both services read: `0`
    turns the cache off, and consent then has nobody to tell)."""
    return "registry" in runtime.settings.targets and bool(runtime.options.value("HIE_REGISTRY_CONSENT_CACHE_SECONDS"))


async def invalidate_registry(runtime: ServiceRuntime, enterprise_id: str) -> None:
    """Have every registry replica drop its decisions about the patient; returns once each
    acknowledged (or, for those that cannot be reached, after logging that they were not told:
    never the enterprise id)."""
    if not registry_caches(runtime):
        return
    request = registry_pb2.InvalidateConsentDecisionsRequest(enterprise_id=enterprise_id)
    await runtime.replicas("registry").tell_each(
        lambda channel, timeout: registry_pb2_grpc.DocumentRegistryStub(channel).InvalidateConsentDecisions(
            request, metadata=runtime.credentials.metadata(), timeout=timeout
        ),
        what="registry consent decision invalidation",
    )
