"""Invalidations a writer waits for: after a commit that may change what another service keeps
(the registry's cross-references, its consent decisions), the writer tells that service and waits
for the acknowledgement before it answers, briefly retrying an unavailable peer. A peer that cannot
be told is logged (status code only: no identifiers) and the write still succeeds; the kept
entries' own lifetime bounds staleness then."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import grpc

_log = logging.getLogger(__name__)

# Short: a peer that does not answer must not hold up the writer for long.
TIMEOUT_SECONDS = 2.0
_ATTEMPTS = 2


async def acknowledged(call: Callable[[float], Awaitable[object]], *, what: str) -> None:
    """Run `call(timeout)` until it succeeds, retrying once if the peer is UNAVAILABLE; log
    "`what` not acknowledged: CODE" when it does not."""
    for attempt in range(_ATTEMPTS):
        try:
            await call(TIMEOUT_SECONDS)
            return
        except grpc.aio.AioRpcError as exc:
            if attempt + 1 < _ATTEMPTS and exc.code() == grpc.StatusCode.UNAVAILABLE:
                await asyncio.sleep(0.05)
                continue
            _log.warning("%s not acknowledged: %s", what, exc.code().name)
            return
