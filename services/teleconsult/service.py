"""The teleconsult service as the process runner sees it."""

from pathlib import Path

from hie.teleconsult.v1 import teleconsult_pb2, teleconsult_pb2_grpc
from services.shared.consent_grants import GRANT_TOPIC, consent_grant_sender
from services.shared.process import ServiceRuntime, ServiceSpec
from services.teleconsult.servicer import TeleconsultationsServicer
from services.teleconsult.store import metadata


def _build(runtime: ServiceRuntime) -> list:
    runtime.outbox.register(GRANT_TOPIC, consent_grant_sender(runtime.channel("consent"), runtime.credentials))
    return [
        (
            teleconsult_pb2_grpc.add_TeleconsultationsServicer_to_server,
            TeleconsultationsServicer(runtime),
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
