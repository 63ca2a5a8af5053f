"""Invalidations acknowledged before a link change returns: the mpi's half of the registry's
cross-reference cache (services/registry/xref_cache.py explains the whole protocol).

Every write the mpi servicer commits may change who is whom (a registration that links, link,
unlink, merge, unmerge, a steward's same/different decision), so after each commit the mpi asks
the registry to drop its cross-references and waits for the acknowledgement before answering.
Writes that change no link (a review task assigned) invalidate too: cheap, and never wrong.
"""

from __future__ import annotations

from hie.registry.v1 import registry_pb2, registry_pb2_grpc
from services.shared.invalidation import acknowledged
from services.shared.process import ServiceRuntime


async def invalidate_registry(runtime: ServiceRuntime) -> None:
    """Have the registry drop its cached cross-references; returns once it acknowledged (or,
    when it cannot be reached, after logging that it was not told)."""
    if "registry" not in runtime.settings.targets:
        return
    stub = registry_pb2_grpc.DocumentRegistryStub(runtime.channel("registry"))
    await acknowledged(
        lambda timeout: stub.InvalidateCrossReferences(
            registry_pb2.InvalidateCrossReferencesRequest(), metadata=runtime.credentials.metadata(), timeout=timeout
        ),
        what="registry cross-reference invalidation",
    )
