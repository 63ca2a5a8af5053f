"""Invalidations acknowledged before a link change returns: the mpi's half of the registry's
cross-reference cache (services/registry/xref_cache.py explains the whole protocol).

Every write the mpi servicer commits may change who is whom (a registration that links, link,
unlink, merge, unmerge, a steward's same/different decision), so after each commit the mpi asks
the registry to drop its cross-references and waits for the acknowledgement before answering.
Writes that change no link (a review task assigned) invalidate too: cheap, and never wrong.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from hie.registry.v1 import registry_pb2, registry_pb2_grpc
from services.shared.process import ServiceRuntime

_log = logging.getLogger(__name__)

# Short: a registry that does not answer must not hold up the mpi's writes for long. Its
# cache entries expire on their own (xref_cache's ttl), which bounds staleness in that case.
_TIMEOUT_SECONDS = 2.0
_ATTEMPTS = 2


async def invalidate_registry(runtime: ServiceRuntime) -> None:
    """Have the registry drop its cached cross-references; returns once it acknowledged (or,
    when it cannot be reached, after logging that it was not told)."""
    if "registry" not in runtime.settings.targets:
        return
    stub = registry_pb2_grpc.DocumentRegistryStub(runtime.channel("registry"))
    for attempt in range(_ATTEMPTS):
        try:
            await stub.InvalidateCrossReferences(
                registry_pb2.InvalidateCrossReferencesRequest(),
                metadata=runtime.credentials.metadata(),
                timeout=_TIMEOUT_SECONDS,
            )
            return
        except grpc.aio.AioRpcError as exc:
            if attempt + 1 < _ATTEMPTS and exc.code() == grpc.StatusCode.UNAVAILABLE:
                await asyncio.sleep(0.05)
                continue
            # No PHI: the status code only.
            _log.warning("registry cross-reference invalidation not acknowledged: %s", exc.code().name)
            return
