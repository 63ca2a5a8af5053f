"""HTTP routes, one module per resource."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TypeVar

import grpc

from gateway.errors import from_rpc_error

T = TypeVar("T")


async def rpc(call: Awaitable[T]) -> T:
    """Await a gRPC call, turning its status into the matching HTTP error."""
    try:
        return await call
    except grpc.aio.AioRpcError as exc:
        raise from_rpc_error(exc) from None
