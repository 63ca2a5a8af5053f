"""The exchange's components, listed once.

`hie up`, the gateway's stubs, the test fixture that starts the exchange, the data-key rotation
and the configuration (ports, targets, schemas) all read this list. Adding a gRPC service means
one entry here (plus its own package, proto and deployment manifests).

The service spec and the stub class are named by import path and loaded on first use: this module
is imported by `services.shared.config`, which every service imports, so it must not import the
services themselves.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from services.shared.process import ServiceSpec

# The first gRPC port; each service listens on this plus its offset (`hie up --service-base-port`).
SERVICE_BASE_PORT = 7101
GATEWAY_PORT = 8400


@dataclass(frozen=True)
class Component:
    """One gRPC service of the exchange."""

    name: str
    # Its port is SERVICE_BASE_PORT + port_offset (and the base `hie up` is given + the offset).
    port_offset: int
    # "package.module:ATTRIBUTE" of its `ServiceSpec` and of the gRPC stub the gateway calls it with.
    spec_path: str
    stub_path: str

    @property
    def port(self) -> int:
        """The default port."""
        return SERVICE_BASE_PORT + self.port_offset

    def spec(self) -> ServiceSpec:
        """The service's `ServiceSpec` (imports the service)."""
        return _load(self.spec_path)

    def stub(self) -> Any:
        """The generated gRPC stub class for this service."""
        return _load(self.stub_path)


def _load(path: str) -> Any:
    module, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module), attribute)


# In start order: audit first (every service relays its audit events there), then the services
# others call (mpi and consent, which the registry calls), then the rest.
SERVICES: tuple[Component, ...] = (
    Component("audit", 5, "services.audit.service:SPEC", "hie.audit.v1.audit_pb2_grpc:AuditLogStub"),
    Component("mpi", 0, "services.mpi.service:SPEC", "hie.mpi.v1.mpi_pb2_grpc:PatientIndexStub"),
    Component(
        "consent", 2, "services.consent.service:SPEC", "hie.consent.v1.consent_pb2_grpc:ConsentDecisionPointStub"
    ),
    Component("referral", 3, "services.referral.service:SPEC", "hie.referral.v1.referral_pb2_grpc:ReferralsStub"),
    Component(
        "teleconsult",
        4,
        "services.teleconsult.service:SPEC",
        "hie.teleconsult.v1.teleconsult_pb2_grpc:TeleconsultationsStub",
    ),
    Component(
        "registry", 1, "services.registry.service:SPEC", "hie.registry.v1.registry_pb2_grpc:DocumentRegistryStub"
    ),
)


def by_port() -> tuple[Component, ...]:
    """The services in port order (the order of `--service-base-port`'s consecutive ports)."""
    return tuple(sorted(SERVICES, key=lambda c: c.port_offset))


def component(name: str) -> Component:
    """The service called `name` (KeyError if there is none)."""
    for candidate in SERVICES:
        if candidate.name == name:
            return candidate
    raise KeyError(name)


# Every component with a database schema of its own: the services (in port order) and the gateway.
DATABASE_COMPONENTS: tuple[str, ...] = (*(c.name for c in by_port()), "gateway")
