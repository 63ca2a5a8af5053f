"""The registry service as the process runner sees it."""

from pathlib import Path

from hie.registry.v1 import registry_pb2, registry_pb2_grpc
from services.registry.servicer import DocumentRegistryServicer
from services.registry.store import metadata
from services.shared.process import ServiceRuntime, ServiceSpec


def _build(runtime: ServiceRuntime) -> list:
    return [
        (
            registry_pb2_grpc.add_DocumentRegistryServicer_to_server,
            DocumentRegistryServicer(runtime),
            registry_pb2.DESCRIPTOR.services_by_name["DocumentRegistry"].full_name,
        )
    ]


SPEC = ServiceSpec(name="registry", metadata=metadata, versions=Path(__file__).parent / "migrations", build=_build)
