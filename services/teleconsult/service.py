"""The teleconsult service as the process runner sees it."""

from pathlib import Path

from hie.teleconsult.v1 import teleconsult_pb2, teleconsult_pb2_grpc
from services.shared import workflow
from services.shared.process import ServiceRuntime, ServiceSpec
from services.shared.workflow.engine import register_relays
from services.teleconsult.servicer import TeleconsultationsServicer
from services.teleconsult.store import metadata


def _build(runtime: ServiceRuntime) -> list:
    register_relays(runtime)
    servicer = TeleconsultationsServicer(runtime)
    workflow.attach(runtime, servicer)
    return [
        (
            teleconsult_pb2_grpc.add_TeleconsultationsServicer_to_server,
            servicer,
            teleconsult_pb2.DESCRIPTOR.services_by_name["Teleconsultations"].full_name,
        )
    ]


SPEC = ServiceSpec(
    name="teleconsult",
    metadata=metadata,
    versions=Path(__file__).parent / "migrations",
    build=_build,
    # Clinical free text (referral reason / consultation question) is field-encrypted.
    protects_personal_data=True,
)
