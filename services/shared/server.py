"""gRPC server bootstrap shared by every service: interceptors, health, reflection, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import signal
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.shared.auth import FORWARDED_KEYS, TokenVerifier, current_caller, forwarded_metadata
from services.shared.errors import REASON_METADATA_KEY, DomainError, InvalidArgument, Unauthenticated, status_for
from services.shared.rpc_metrics import RpcMetricsInterceptor
from services.shared.storage_faults import storage_unavailable
from services.shared.tracing import annotate_caller, server_interceptors
from services.shared.transport import GrpcTls

_log = logging.getLogger(__name__)
_OPEN_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# (add_XServicer_to_server, servicer instance, full service name)
ServicerBinding = tuple[Callable[[Any, grpc.aio.Server], None], Any, str]


class CallerInterceptor(grpc.aio.ServerInterceptor):
    """Verifies the caller on every call and maps domain errors to status codes.

    The caller's token is checked before the handler runs; the handler sees the caller
    through `services.shared.auth.caller()`. No exception text from outside the domain
    reaches the client.
    """

    def __init__(self, verifier: TokenVerifier, *, component: str = "service") -> None:
        self._verifier = verifier
        self._component = component

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(_OPEN_PREFIXES):
            return handler
        metadata = {k: v for k, v in handler_call_details.invocation_metadata or ()}
        guard = _CallGuard(self._verifier, metadata, method, self._component)
        kwargs = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                async with guard.call(context):
                    _refuse_nul(request)
                    return await inner_uu(request, context)

            return grpc.unary_unary_rpc_method_handler(unary_unary, **kwargs)
        if handler.stream_unary is not None:
            inner_su = handler.stream_unary

            async def stream_unary(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
                async with guard.call(context):
                    return await inner_su(_checked(requests), context)

            return grpc.stream_unary_rpc_method_handler(stream_unary, **kwargs)
        if handler.unary_stream is not None:
            inner_us = handler.unary_stream

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                async with guard.call(context):
                    _refuse_nul(request)
                    async for response in _responses(inner_us(request, context)):
                        yield response

            return grpc.unary_stream_rpc_method_handler(unary_stream, **kwargs)
        inner_ss = handler.stream_stream

        async def stream_stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async with guard.call(context):
                async for response in _responses(inner_ss(_checked(requests), context)):
                    yield response

        return grpc.stream_stream_rpc_method_handler(stream_stream, **kwargs)


class _CallGuard:
    """What every call kind shares: the verified caller, the forwarded metadata, and the one
    mapping of domain errors (and anything unexpected) to status codes."""

    def __init__(self, verifier: TokenVerifier, metadata: dict[str, Any], method: str, component: str) -> None:
        self._verifier = verifier
        self._metadata = metadata
        self._method = method
        self._component = component

    @contextlib.asynccontextmanager
    async def call(self, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        try:
            caller = self._verifier.caller_from_metadata(self._metadata)
        except Unauthenticated as exc:
            context.set_trailing_metadata(((REASON_METADATA_KEY, exc.reason),))
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, exc.message)
        annotate_caller(caller)
        caller_token = current_caller.set(caller)
        forwarded = tuple((k, v) for k in FORWARDED_KEYS if isinstance(v := self._metadata.get(k), str))
        forwarded_token = forwarded_metadata.set(forwarded)
        try:
            yield
        except grpc.aio.AbortError:
            raise
        except DomainError as exc:
            context.set_trailing_metadata(((REASON_METADATA_KEY, exc.reason),))
            await context.abort(status_for(exc), exc.message)
        except Exception as exc:
            fault = storage_unavailable(exc, component=self._component, where=self._method)
            if fault is not None:
                # A full disk or an unreachable database: the caller may retry later (503), the
                # operator is told once per burst and by the hie.storage.faults counter.
                context.set_trailing_metadata(((REASON_METADATA_KEY, fault.reason),))
                await context.abort(status_for(fault), fault.message)
            # The exception text may quote stored data: log its type and the code path only.
            _log.error(
                "unhandled %s in %s\n%s",
                type(exc).__name__,
                self._method,
                "".join(traceback.format_tb(exc.__traceback__)),
            )
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")
        finally:
            # A streaming handler's generator may be finalised in another context: the variables
            # then die with the call's task anyway.
            with contextlib.suppress(ValueError):
                current_caller.reset(caller_token)
            with contextlib.suppress(ValueError):
                forwarded_metadata.reset(forwarded_token)


def _refuse_nul(request: Message) -> None:
    if _has_nul(request):
        raise InvalidArgument("text fields may not contain NUL characters", reason="nul-character")


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """A client stream whose every message is held to the same rules as a unary request."""
    async for request in requests:
        _refuse_nul(request)
        yield request


async def _responses(produced: Any) -> AsyncIterator[Any]:
    """A server-streaming handler's responses, whether it is an async generator or writes them
    itself with `context.write` (then it returns a coroutine and yields nothing here)."""
    if inspect.isawaitable(produced):
        await produced
        return
    async for response in produced:
        yield response


def _has_nul(message: Message) -> bool:
    """Whether any string field, at any depth, holds a NUL (PostgreSQL text cannot store it)."""
    # A NUL in a string serialises as a 0x00 byte: a message with none has no NUL anywhere, and
    # one serialisation in C is far cheaper than walking a large message's fields in Python.
    if b"\x00" not in message.SerializeToString():
        return False
    for field, value in message.ListFields():
        if field.type == FieldDescriptor.TYPE_STRING:
            values = value if field.is_repeated else (value,)
            if any("\x00" in v for v in values):
                return True
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            values = value if field.is_repeated else (value,)
            if any(_has_nul(v) for v in values):
                return True
    return False


async def create_server(
    *,
    bindings: Sequence[ServicerBinding],
    listen: str,
    verifier: TokenVerifier,
    tls: GrpcTls | None = None,
    component: str = "service",
) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """A started server with the bindings, health and reflection; returns it and its bound port."""
    server = grpc.aio.server(
        interceptors=[
            *server_interceptors(),
            RpcMetricsInterceptor(component),
            CallerInterceptor(verifier, component=component),
        ],
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            # gRPC binds with SO_REUSEPORT by default: a second exchange's service would share the
            # port silently and answer the first one's health checks. Fail to bind instead.
            ("grpc.so_reuseport", 0),
        ],
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME]
    for add, servicer, name in bindings:
        add(servicer, server)
        names.append(name)
    reflection.enable_server_reflection(names, server)
    port = server.add_secure_port(listen, tls.server_credentials()) if tls else server.add_insecure_port(listen)
    if port == 0:
        raise RuntimeError(f"could not bind {listen}")
    await server.start()
    for _add, _servicer, name in bindings:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    return server, port, health_servicer


async def create_health_server(listen: str, health_servicer: health.aio.HealthServicer) -> grpc.aio.Server:
    """A plaintext server with the health service alone, sharing the main server's status.

    It carries no clinical data and no credentials, so it may stay plaintext when the main port
    uses TLS: kubelet gRPC probes do not speak TLS.
    """
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if server.add_insecure_port(listen) == 0:
        raise RuntimeError(f"could not bind {listen}")
    await server.start()
    return server


async def run_until_signalled(
    server: grpc.aio.Server, health_servicer: health.aio.HealthServicer, *, grace: float = 5.0
) -> None:
    """Serve until SIGTERM / SIGINT, then report NOT_SERVING and drain in-flight calls."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await health_servicer.enter_graceful_shutdown()
    await server.stop(grace)


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)
