"""Endpoint policy at delivery time: where a hospital's notifications may go (its allow-listed
base URLs, addresses the policy allows, resolved names included), and the request pinned to the
address that was checked (no second lookup between the check and the connection)."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urlsplit, urlunsplit

from services.registry import dsub
from services.shared.config import GATEWAY_PORT, SERVICE_PORTS, Settings


class EndpointRefused(Exception):
    """The endpoint is (no longer) allowed: not under the organisation's allow-listed base URLs,
    or its host resolves to an address notifications may not go to."""


_RESOLVE_TIMEOUT_SECONDS = 5.0


async def check_endpoint(
    policy: dsub.EndpointPolicy, organization_id: str, url: str, *, delivering: bool = False
) -> list[str]:
    """The addresses notifications to `url` may connect to; EndpointRefused if the endpoint is
    outside the organisation's allow-listed base URLs, or its host is or resolves to an address
    notifications may not go to. The host is resolved in every mode (a numeric host such as
    `2852039166` is an address); a name that does not resolve is refused in production and at
    delivery, and accepted at subscription in development (hospital hosts that do not exist yet)."""
    base = policy.base_for(organization_id, url)
    if base is None:
        raise EndpointRefused("endpoint-not-allowed")
    host = urlsplit(url).hostname or ""
    literal = dsub.literal_ip(url)
    if literal:
        addresses = [literal]
    else:
        try:
            infos = await asyncio.wait_for(
                asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM),
                _RESOLVE_TIMEOUT_SECONDS,
            )
        except (OSError, TimeoutError):
            if policy.production or delivering:
                raise EndpointRefused("endpoint-unresolvable") from None
            return []
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    port = dsub.endpoint_port(url)
    # Every address the name resolves to must be allowed: the connection may use any of them.
    if not addresses or not all(policy.address_allowed(address, base, port) for address in addresses):
        raise EndpointRefused("endpoint-address-not-allowed")
    return addresses


def pinned(url: str, address: str) -> tuple[str, dict[str, str], dict[str, str]]:
    """The request to `url` sent to `address` (the one checked), with the original Host header and,
    for https, the original name for SNI and certificate verification."""
    parts = urlsplit(url)
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    literal = f"[{ip}]" if ip.version == 6 else str(ip)
    netloc = f"{literal}:{parts.port}" if parts.port else literal
    host_header = parts.netloc.rsplit("@", 1)[-1]
    extensions = {"sni_hostname": parts.hostname or ""} if parts.scheme == "https" else {}
    return urlunsplit(parts._replace(netloc=netloc)), {"host": host_header}, extensions


def own_ports(settings: Settings) -> frozenset[int]:
    """The ports the exchange itself listens on (its services' targets and the gateway)."""
    ports = {GATEWAY_PORT, *SERVICE_PORTS.values()}
    for target in settings.targets.values():
        _, _, port = target.rpartition(":")
        if port.isdigit():
            ports.add(int(port))
    public = urlsplit(settings.public_url)
    try:
        if public.port:
            ports.add(public.port)
    except ValueError:
        pass
    return frozenset(ports)
