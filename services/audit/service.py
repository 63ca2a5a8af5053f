"""The audit service as the process runner sees it."""

from pathlib import Path

from hie.audit.v1 import audit_pb2, audit_pb2_grpc
from services.audit import metrics
from services.audit.servicer import AuditLogServicer
from services.audit.store import metadata
from services.shared.process import ServiceRuntime, ServiceSpec


def _build(runtime: ServiceRuntime) -> list:
    metrics.watch(runtime)
    return [
        (
            audit_pb2_grpc.add_AuditLogServicer_to_server,
            AuditLogServicer(runtime),
            audit_pb2.DESCRIPTOR.services_by_name["AuditLog"].full_name,
        )
    ]


SPEC = ServiceSpec(
    name="audit",
    metadata=metadata,
    versions=Path(__file__).parent / "migrations",
    build=_build,
    relays_audit=False,
)
