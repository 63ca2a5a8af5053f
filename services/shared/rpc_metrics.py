"""gRPC server metrics: one interceptor recording `hie.rpc.server.*` for every call a service
answers — calls by status code, latency, and error answers by their machine-readable reason.

It sits outside the caller interceptor (services/shared/server.py), so it sees the status that
interceptor mapped a domain error to, and the reason it put in the trailing metadata. Health
checks and reflection are not counted: probes would drown the exchange's own calls.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from services.shared.errors import REASON_METADATA_KEY
from services.shared.metrics import RPC_DURATION, RPC_ERRORS, RPC_REQUESTS

_UNMEASURED = ("/grpc.health.v1.", "/grpc.reflection.")


class RpcMetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts and times each call by component, RPC and status code."""

    def __init__(self, component: str) -> None:
        self._component = component

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(_UNMEASURED):
            return handler
        record = _Recorder(self._component, method)
        kwargs = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                start = time.perf_counter()
                try:
                    return await inner_uu(request, context)
                finally:
                    record(context, start)

            return grpc.unary_unary_rpc_method_handler(unary_unary, **kwargs)
        if handler.stream_unary is not None:
            inner_su = handler.stream_unary

            async def stream_unary(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
                start = time.perf_counter()
                try:
                    return await inner_su(requests, context)
                finally:
                    record(context, start)

            return grpc.stream_unary_rpc_method_handler(stream_unary, **kwargs)
        if handler.unary_stream is not None:
            inner_us = handler.unary_stream

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                start = time.perf_counter()
                try:
                    async for response in inner_us(request, context):
                        yield response
                finally:
                    record(context, start)

            return grpc.unary_stream_rpc_method_handler(unary_stream, **kwargs)
        inner_ss = handler.stream_stream

        async def stream_stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            start = time.perf_counter()
            try:
                async for response in inner_ss(requests, context):
                    yield response
            finally:
                record(context, start)

        return grpc.stream_stream_rpc_method_handler(stream_stream, **kwargs)


class _Recorder:
    """Records one finished call; the attribute dictionaries of a method are built once."""

    def __init__(self, component: str, method: str) -> None:
        self._component = component
        self._method = method
        self._timing = {"component": component, "method": method}

    def __call__(self, context: grpc.aio.ServicerContext, start: float) -> None:
        RPC_DURATION.record(time.perf_counter() - start, self._timing)
        code = context.code()
        # An aborted call has its code set; a handler that returned normally has none (OK).
        name = code.name if isinstance(code, grpc.StatusCode) else "OK"
        RPC_REQUESTS.add(1, {"component": self._component, "method": self._method, "code": name})
        if name != "OK":
            reason = dict(context.trailing_metadata() or ()).get(REASON_METADATA_KEY) or name.lower()
            RPC_ERRORS.add(
                1, {"component": self._component, "method": self._method, "code": name, "reason": str(reason)}
            )
