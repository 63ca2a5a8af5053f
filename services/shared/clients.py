"""Channels to other exchange services, carrying the original caller's context."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import grpc

from services.shared.auth import PlatformCredentials, forwarded_metadata
from services.shared.server import MAX_MESSAGE_BYTES
from services.shared.tracing import client_interceptors
from services.shared.transport import GrpcTls

DEFAULT_TIMEOUT_SECONDS = 10.0
# gRPC's default reconnect backoff starts at 1 s and grows by 1.6x up to 120 s: a service down
# for a few seconds stayed unreachable for 5-8 s after it came back (issue 23). Bounded here,
# a restarted peer is reached again within about a second; the retries it costs while a peer
# is down are a connection attempt per half second, nothing a loopback or cluster network notices.
RECONNECT_OPTIONS: list[tuple[str, int]] = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
]


class CallerForwarding(grpc.aio.UnaryUnaryClientInterceptor):
    """Adds the incoming request's token and assertions to outgoing calls.

    A call made outside any request (a relay, a background task) goes under the
    service's own platform identity instead. Every call gets a deadline.
    """

    def __init__(self, credentials: PlatformCredentials | None) -> None:
        self._credentials = credentials

    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Any],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        metadata = list(client_call_details.metadata or ())
        if not any(k == "authorization" for k, _ in metadata):
            forwarded = forwarded_metadata.get()
            if forwarded:
                metadata.extend(forwarded)
            elif self._credentials is not None:
                metadata.extend(self._credentials.metadata())
        details = grpc.aio.ClientCallDetails(
            client_call_details.method,
            client_call_details.timeout if client_call_details.timeout is not None else DEFAULT_TIMEOUT_SECONDS,
            grpc.aio.Metadata(*metadata),
            client_call_details.credentials,
            client_call_details.wait_for_ready,
        )
        return await continuation(details, request)


def open_channel(
    target: str,
    *,
    credentials: PlatformCredentials | None = None,
    tls: GrpcTls | None = None,
    extra_options: Sequence[tuple[str, Any]] = (),
) -> grpc.aio.Channel:
    """A channel to a service, traced and forwarding the caller; TLS when configured.
    `extra_options`: further channel arguments (a replica addressed by IP names its host)."""
    interceptors = [*client_interceptors(), CallerForwarding(credentials)]
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        *RECONNECT_OPTIONS,
        *extra_options,
    ]
    if tls is not None:
        return grpc.aio.secure_channel(target, tls.channel_credentials(), options=options, interceptors=interceptors)
    return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
