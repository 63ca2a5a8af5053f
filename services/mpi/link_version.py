"""Invalidations acknowledged before a link change returns: the mpi's half of the registry's
cross-reference cache (services/registry/xref_cache.py explains the whole protocol).

Every write the mpi servicer commits may change who is whom (a registration that links, link,
unlink, merge, unmerge, a steward's same/different decision), so after each commit the mpi asks
the registry to drop its cross-references and waits for the acknowledgement before answering.
Writes that change no link (a review task assigned) invalidate too: cheap, and never wrong.
Every registry replica keeps its own cache, so every replica is told (HIE_REGISTRY_REPLICAS:
services/shared/invalidation.py), in parallel; each replica's own generation keeps an answer it
asked for before the invalidation from being kept after it.
"""

from __future__ import annotations

from hie.registry.v1 import registry_pb2, registry_pb2_grpc
from services.shared.process import ServiceRuntime


async def invalidate_registry(runtime: ServiceRuntime) -> None:
    """Have every registry replica drop its cached cross-references; returns once each
    acknowledged (or, for those that cannot be reached, after logging that they were not told)."""
    if "registry" not in runtime.settings.targets:
        return
    request = registry_pb2.InvalidateCrossReferencesRequest()
    await runtime.replicas("registry").tell_each(
        lambda channel, timeout: registry_pb2_grpc.DocumentRegistryStub(channel).InvalidateCrossReferences(
            request, metadata=runtime.credentials.metadata(), timeout=timeout
        ),
        what="registry cross-reference invalidation",
    )
