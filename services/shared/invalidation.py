"""Invalidations a writer waits for: after a commit that may change what another service keeps
(the registry's cross-references, its consent decisions), the writer tells that service and waits
for the acknowledgement before it answers, briefly retrying an unavailable peer.

Every replica of the service keeps its own entries, so every replica is told: the writer resolves
the replicas' address (`Replicas`: HIE_REGISTRY_REPLICAS, a name that resolves to each replica —
a Kubernetes headless Service — or a list of addresses; by default the service's own target) on
each invalidation and sends to each address in parallel. A replica that cannot be told is logged
(status code only: no identifiers) and counted (`hie.invalidation.unacknowledged`), and the write
still succeeds; that replica's kept entries' own lifetime bounds staleness then.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable

import grpc

from services.shared import metrics
from services.shared.auth import PlatformCredentials
from services.shared.clients import open_channel
from services.shared.config import addresses as _addresses
from services.shared.transport import GrpcTls

_log = logging.getLogger(__name__)

# Short: a peer that does not answer must not hold up the writer for long. Replicas are told in
# parallel, so a write waits at most about _ATTEMPTS x TIMEOUT_SECONDS however many there are.
TIMEOUT_SECONDS = 2.0
_ATTEMPTS = 2


async def _acknowledged(call: Callable[[float], Awaitable[object]]) -> str | None:
    """Run `call(timeout)` until it succeeds, retrying once if the peer is UNAVAILABLE: None when
    it was acknowledged, else the gRPC status code's name."""
    for attempt in range(_ATTEMPTS):
        try:
            await call(TIMEOUT_SECONDS)
            return None
        except grpc.aio.AioRpcError as exc:
            if attempt + 1 < _ATTEMPTS and exc.code() == grpc.StatusCode.UNAVAILABLE:
                await asyncio.sleep(0.05)
                continue
            return str(exc.code().name)
        except grpc.aio.UsageError:
            # The channel was closed under the call (its replica left DNS meanwhile): the write
            # has committed, so this is a replica not told, never a failed write.
            return grpc.StatusCode.CANCELLED.name
    return None  # pragma: no cover - the loop always returns


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _target(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Replicas:
    """Every replica of one peer service, for invalidations: `addresses` ("host:port", several
    separated by commas) are resolved on each use, each name to all of its addresses (a headless
    Service's name to each ready pod), and a channel is kept per resolved address.

    Resolving on each invalidation, not once, is what lets a replica that started after the
    writer be told; a name that does not resolve falls back to `fallback` (the service's own
    target), so at least the replica behind it is told. Under TLS the replicas are addressed by
    IP, so their certificates are checked against `fallback`'s host name (the name the
    service's certificate already carries) instead of the IP.
    """

    def __init__(
        self,
        peer: str,
        addresses: str,
        *,
        fallback: str,
        component: str,
        credentials: PlatformCredentials | None = None,
        tls: GrpcTls | None = None,
    ) -> None:
        self.peer = peer
        # As configured, to tell whether the configuration changed (ServiceRuntime.replicas).
        self.configured = (addresses, fallback)
        self._addresses = _addresses(addresses, f"HIE_{peer.upper()}_REPLICAS") or _addresses(fallback, "target")
        # Only names need resolving; a list of IPs (compose, `hie up`, tests) is fixed.
        self._names = [(h, p) for h, p in self._addresses if not _is_ip(h)]
        self._fixed = sorted({_target(h, p) for h, p in self._addresses if _is_ip(h)})
        self._fallback = fallback
        self._component = component
        self._credentials = credentials
        self._tls = tls
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._closing: set[asyncio.Task[None]] = set()

    async def resolve(self) -> list[str]:
        """The replicas' addresses now ("ip:port"), in a stable order; the fallback target when no
        name resolves."""
        if not self._names:
            return self._fixed
        loop = asyncio.get_running_loop()
        found = set(self._fixed)
        for host, port in self._names:
            try:
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError:
                _log.warning("%s replicas: a name did not resolve", self.peer)
                metrics.INVALIDATIONS_UNACKNOWLEDGED.add(
                    1, {"component": self._component, "peer": self.peer, "code": "UNRESOLVED"}
                )
                continue
            found.update(_target(str(sockaddr[0]), port) for *_rest, sockaddr in infos)
        return sorted(found) or [self._fallback]

    def _channel(self, target: str) -> grpc.aio.Channel:
        if target not in self._channels:
            options: list[tuple[str, str]] = []
            if self._tls is not None:
                name = _addresses(self._fallback, "target")[0][0]
                options = [("grpc.ssl_target_name_override", name), ("grpc.default_authority", name)]
            self._channels[target] = open_channel(
                target, credentials=self._credentials, tls=self._tls, extra_options=options
            )
        return self._channels[target]

    async def channels(self) -> list[grpc.aio.Channel]:
        """A channel to each replica there is now; channels to replicas gone are closed (after
        the calls on them had time to end)."""
        targets = await self.resolve()
        for gone in set(self._channels) - set(targets):
            task = asyncio.create_task(self._channels.pop(gone).close(grace=2 * TIMEOUT_SECONDS * _ATTEMPTS))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        return [self._channel(t) for t in targets]

    async def tell_each(self, call: Callable[[grpc.aio.Channel, float], Awaitable[object]], *, what: str) -> bool:
        """Run `call(channel, timeout)` against every replica in parallel (an UNAVAILABLE one is
        retried once); log and count the replicas that did not acknowledge. Returns whether all
        did."""
        channels = await self.channels()
        if len(channels) == 1:  # the usual single replica: no task per call
            codes = [await _acknowledged(lambda t: call(channels[0], t))]
        else:
            codes = await asyncio.gather(*(_acknowledged(lambda t, c=c: call(c, t)) for c in channels))
        missed = [code for code in codes if code is not None]
        for code in missed:
            metrics.INVALIDATIONS_UNACKNOWLEDGED.add(1, {"component": self._component, "peer": self.peer, "code": code})
        if missed:
            # Status codes only: the request (a patient's enterprise id) never reaches the log.
            _log.warning(
                "%s not acknowledged by %d of %d replicas: %s",
                what,
                len(missed),
                len(channels),
                ",".join(sorted(set(missed))),
            )
        return not missed

    async def close(self) -> None:
        """Close every channel (the service is stopping)."""
        for task in list(self._closing):
            with contextlib.suppress(Exception):
                await task
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
