"""The mpi service as the process runner sees it."""

from pathlib import Path

from hie.mpi.v1 import mpi_pb2, mpi_pb2_grpc
from services.mpi.servicer import PatientIndexServicer
from services.mpi.store import metadata
from services.shared.process import ServiceRuntime, ServiceSpec


def _build(runtime: ServiceRuntime) -> list:
    return [
        (
            mpi_pb2_grpc.add_PatientIndexServicer_to_server,
            PatientIndexServicer(runtime),
            mpi_pb2.DESCRIPTOR.services_by_name["PatientIndex"].full_name,
        )
    ]


SPEC = ServiceSpec(name="mpi", metadata=metadata, versions=Path(__file__).parent / "migrations", build=_build)
