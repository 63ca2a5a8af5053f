"""The registry's cache of the mpi's cross-references, for the document query and read hot path.

Correctness rests on two rules (DESIGN: "a monotonic link version and invalidations acknowledged
before a link change returns"):

1. The mpi commits a change to who is whom and only then calls InvalidateCrossReferences; the
   change's RPC returns to its caller only after the registry acknowledged. So any query that
   starts after a link change returned finds the cache empty of what the change touched.
2. A query that asked the mpi *before* such an invalidation must not store its (possibly older)
   answer after it. The version is the registry's own monotonic `generation`, bumped by every
   invalidation: an answer is stored only if the generation did not move while it was in flight.
   (Because the mpi commits before it invalidates, an answer fetched after an invalidation was
   received already reflects the change.)

The generation lives in the registry, not in an mpi table: a counter row bumped by every
registration would serialise the mpi's writes on PostgreSQL, and the registry only ever needs
"did an invalidation arrive while I was asking".

The mpi pushes to every registry replica (HIE_REGISTRY_REPLICAS), each with its own generation.
Safety net for what the acknowledged push cannot cover (an mpi that crashes between commit and
push, a bulk load written straight into the mpi's database, a registry replica the push did not
reach): entries expire after `ttl` seconds, so staleness is bounded even then.
"""

from __future__ import annotations

import time
from collections import OrderedDict

from hie.common.v1 import common_pb2
from hie.mpi.v1 import mpi_pb2
from services.shared import mpi_client
from services.shared.process import ServiceRuntime


class CrossReferenceCache:
    """Cross-references by (domain, local id), valid until the mpi invalidates them or `ttl` passes."""

    def __init__(self, *, ttl: float = 30.0, max_entries: int = 50_000) -> None:
        # HIE_REGISTRY_XREF_CACHE_SECONDS; 0 turns the cache off.
        self._ttl = max(0.0, ttl)
        self._max = max_entries
        self._entries: OrderedDict[tuple[str, str], tuple[float, mpi_pb2.CrossReferenceResponse]] = OrderedDict()
        self.generation = 0

    def __contains__(self, key: object) -> bool:
        """Whether (domain, local id) has an entry (expired or not)."""
        return key in self._entries

    def invalidate(self) -> int:
        """Drop every entry and move the generation on (answers in flight are not stored)."""
        self.generation += 1
        self._entries.clear()
        return self.generation

    async def cross_reference(
        self, runtime: ServiceRuntime, ref: common_pb2.PatientRef
    ) -> mpi_pb2.CrossReferenceResponse:
        """`mpi_client.cross_reference`, answered from the cache while it is valid. NotFound and
        other errors are never cached (a registration may come next)."""
        key = (ref.domain, ref.local_id)
        now = time.monotonic()
        hit = self._entries.get(key)
        if hit is not None:
            if hit[0] > now:
                self._entries.move_to_end(key)
                return hit[1]
            del self._entries[key]
        generation = self.generation
        answer = await mpi_client.cross_reference(runtime, ref)
        if generation == self.generation and self._ttl > 0:
            self._entries[key] = (time.monotonic() + self._ttl, answer)
            self._entries.move_to_end(key)
            while len(self._entries) > self._max:
                self._entries.popitem(last=False)
        return answer
