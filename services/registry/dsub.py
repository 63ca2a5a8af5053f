"""Subscription and notification rules (IHE DSUB semantics; pure: no I/O).

A notification is a JSON document POSTed to the subscriber's endpoint. Its body names the
event and the document or resource, never clinical content: the subscriber retrieves the
document through the consent-checked, audited path. Documents carrying sensitivity labels or a
restricted / very restricted confidentiality are not announced at all, since no consent decision
can be made for the subscriber when the document is registered.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import re
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from services.registry.domain import CURRENT
from services.shared.errors import InvalidArgument

TOPIC_PATIENT_DOCUMENT, TOPIC_DOCUMENT_TYPE, TOPIC_WORKFLOW_STATE = 1, 2, 3
TOPIC_NAMES = {
    TOPIC_PATIENT_DOCUMENT: "patient-document",
    TOPIC_DOCUMENT_TYPE: "document-type",
    TOPIC_WORKFLOW_STATE: "workflow-state",
}
MAX_LIFETIME = datetime.timedelta(days=366)
_ANNOUNCED_CONFIDENTIALITY = frozenset({"U", "L", "N"})
_EVENT_TYPE = re.compile(r"^[a-z][a-z0-9\-]*(\.[a-z][a-z0-9\-]*){1,3}$")
# The JWS "typ" of a notification signature.
SIGNATURE_TYPE = "hie-notification+jws"


def check_endpoint(url: str, *, production: bool) -> str:
    """An absolute http(s) URL without credentials; https only in production."""
    parts = urlsplit(url.strip())
    if (
        len(url) > 512
        or parts.scheme not in ({"https"} if production else {"https", "http"})
        or not parts.hostname
        or parts.username
        or parts.password
        or any(ch.isspace() or ord(ch) < 0x20 for ch in url)
    ):
        raise InvalidArgument("endpoint must be an https URL (http allowed in development)", reason="endpoint-invalid")
    return url.strip()


# --- endpoint allow list (against server-side request forgery) ------------------------------------

# A key of the allow list that applies to every organisation.
ANY_ORGANIZATION = "*"


@dataclass(frozen=True)
class EndpointPolicy:
    """Where notifications may go: per organisation (or `*` for all), the base URLs its endpoints
    must lie under, and the private networks production may deliver into.

    Without it, the registry would POST wherever a subscriber asks: into the exchange's own network
    (the audit service, a database's HTTP port, a cloud metadata address) — server-side request
    forgery. The admin lists each hospital's notification base URLs; an endpoint must lie under one
    of its own organisation's (or a `*` entry). In production every address the endpoint's host
    resolves to must be public, or inside a listed private network, or named literally by the
    matching base URL. In development with nothing configured any base is accepted.

    In every mode the address checked is the one the connection will use: the host is resolved
    (numeric forms such as `2852039166`, `0xa9fea9fe` or `169.254.43518` are addresses too) and
    delivery connects to the address checked. Whatever is configured, link-local addresses (the
    cloud metadata service), multicast, unspecified and reserved addresses and the exchange's own
    service ports on a non-public address are never allowed; loopback only when configured
    explicitly: named literally by a listed base URL, inside a listed network, or
    HIE_NOTIFY_ALLOW_LOOPBACK (tests that run the receiver on this machine).
    """

    bases: dict[str, tuple[str, ...]]
    private_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    production: bool = False
    allow_loopback: bool = False
    # The exchange's own listening ports (gateway, services): never a notification's target.
    own_ports: frozenset[int] = frozenset()

    @classmethod
    def parse(
        cls,
        allow_list: str,
        private_networks: str = "",
        *,
        production: bool,
        allow_loopback: bool = False,
        own_ports: frozenset[int] = frozenset(),
    ) -> EndpointPolicy:
        """`allow_list`: JSON object of organisation id (or `*`) to a list of base URLs;
        `private_networks`: comma-separated CIDRs. A malformed configuration is refused at start."""
        bases: dict[str, tuple[str, ...]] = {}
        if allow_list.strip():
            data = json.loads(allow_list)
            if not isinstance(data, dict) or not all(
                isinstance(k, str) and isinstance(v, list) and all(isinstance(u, str) for u in v)
                for k, v in data.items()
            ):
                raise ValueError("the endpoint allow list must map organisation ids to lists of base URLs")
            for org, urls in data.items():
                for url in urls:
                    if _parts(url) is None:
                        raise ValueError(f"not an absolute http(s) base URL in the allow list: {url!r}")
                bases[org] = tuple(urls)
        networks = tuple(
            ipaddress.ip_network(cidr.strip(), strict=False) for cidr in private_networks.split(",") if cidr.strip()
        )
        return cls(
            bases=bases,
            private_networks=networks,
            production=production,
            allow_loopback=allow_loopback,
            own_ports=own_ports,
        )

    @property
    def enforced(self) -> bool:
        return self.production or bool(self.bases)

    def base_for(self, organization_id: str, url: str) -> str | None:
        """The allow-listed base URL the endpoint lies under, for this organisation; None if none.
        Without enforcement (development, nothing configured) the endpoint is its own base."""
        if not self.enforced:
            return url
        target = _parts(url)
        if target is None:
            return None
        for base in (*self.bases.get(organization_id, ()), *self.bases.get(ANY_ORGANIZATION, ())):
            allowed = _parts(base)
            if allowed is None or allowed[:3] != target[:3]:
                continue
            prefix, path = allowed[3], target[3]
            if path == prefix or path.startswith(prefix if prefix.endswith("/") else prefix + "/"):
                return base
        return None

    def address_allowed(self, address: str, base: str, port: int = 0) -> bool:
        """Whether a notification may be sent to this IP address and port (resolved from, or
        literally in, an endpoint lying under `base`)."""
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if getattr(ip, "ipv4_mapped", None) is not None:
            ip = ip.ipv4_mapped  # type: ignore[union-attr]
        if ip.is_link_local or ip.is_multicast or ip.is_unspecified or ip.is_reserved:
            return False  # never, whatever is configured: the metadata service lives here
        if port in self.own_ports and not ip.is_global:
            return False  # the exchange's own gRPC services and gateway
        literal = _literal_ip(urlsplit(base).hostname or "")
        if literal is not None and literal == ip and self.enforced:
            return True  # the admin named this very address
        if any(ip in network for network in self.private_networks):
            return True  # the admin listed this network
        if ip.is_loopback:
            return self.allow_loopback  # otherwise only when configured explicitly (tests)
        if self.production:
            return ip.is_global
        return True


def _literal_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def literal_ip(url: str) -> str:
    """The endpoint's host if it is an IP address literal, else ""."""
    ip = _literal_ip(urlsplit(url).hostname or "")
    return str(ip) if ip is not None else ""


def endpoint_port(url: str) -> int:
    """The port a connection to the endpoint uses (the scheme's default when none is given)."""
    parts = _parts(url)
    return parts[2] if parts is not None else 0


def _parts(url: str) -> tuple[str, str, int, str] | None:
    """(scheme, host, port, path) of an absolute http(s) URL with a clean path; None otherwise.
    Dot segments (also percent-encoded) are refused: a server would resolve `/hie/../admin`
    outside the allowed base."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in {"http", "https"} or not parts.hostname or parts.username or parts.password:
        return None
    path = parts.path or "/"
    segments = unquote(path).split("/")
    if any(segment in {".", ".."} for segment in segments) or "\\" in unquote(path):
        return None
    return parts.scheme, parts.hostname.lower().rstrip("."), port or (443 if parts.scheme == "https" else 80), path


def check_expiry(expires: datetime.datetime | None, now: datetime.datetime) -> datetime.datetime:
    if expires is None:
        raise InvalidArgument("a subscription needs an expiry", reason="expiry-missing")
    if expires <= now or expires - now > MAX_LIFETIME:
        raise InvalidArgument("expiry must be in the future and within a year", reason="expiry-invalid")
    return expires


def check_event_type(value: str) -> str:
    if not _EVENT_TYPE.fullmatch(value) or len(value) > 64:
        raise InvalidArgument("event type must look like referral.accepted", reason="event-type-invalid")
    return value


def announced(*, confidentiality: str, security_labels: list[str], status: int) -> bool:
    """Whether a new document may be announced to subscribers at all (see the module docstring)."""
    return status == CURRENT and confidentiality in _ANNOUNCED_CONFIDENTIALITY and not security_labels


@dataclass(frozen=True)
class Notification:
    """One notification for one subscription; `event_id` stays the same across retries."""

    event_id: str
    subscription_id: str
    organization_id: str
    endpoint_url: str
    event_type: str
    body: bytes
    trace_id: str
    span_id: str
    # The person's enterprise id, for the audit events of the deliveries (never in the body).
    enterprise_id: str = ""

    def payload(self) -> bytes:
        """The outbox payload: everything the relay needs to deliver it later (after a restart too)."""
        return json.dumps(
            {
                "event_id": self.event_id,
                "subscription_id": self.subscription_id,
                "organization_id": self.organization_id,
                "endpoint_url": self.endpoint_url,
                "event_type": self.event_type,
                "body": self.body.decode(),
                "trace_id": self.trace_id,
                "span_id": self.span_id,
                "enterprise_id": self.enterprise_id,
            }
        ).encode()

    @classmethod
    def from_payload(cls, payload: bytes) -> Notification:
        data = json.loads(payload)
        return cls(**{**data, "body": data["body"].encode()})


def notification(
    *,
    subscription_id: str,
    organization_id: str,
    endpoint_url: str,
    topic: int,
    event_type: str,
    occurred: datetime.datetime,
    subject: dict[str, Any],
    trace_id: str,
    span_id: str,
    enterprise_id: str = "",
) -> Notification:
    """A notification with a fresh event id; the body is canonical JSON (UTF-8, sorted keys)."""
    event_id = str(uuid.uuid4())
    body = {
        "event_id": event_id,
        "event_type": event_type,
        "occurred": occurred.astimezone(datetime.UTC).isoformat(),
        "subscription_id": subscription_id,
        "topic": TOPIC_NAMES[topic],
        **subject,
    }
    return Notification(
        event_id=event_id,
        subscription_id=subscription_id,
        organization_id=organization_id,
        endpoint_url=endpoint_url,
        event_type=event_type,
        body=json.dumps(body, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode(),
        trace_id=trace_id,
        span_id=span_id,
        enterprise_id=enterprise_id,
    )
