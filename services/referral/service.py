"""The referral service as the process runner sees it."""

from pathlib import Path

from hie.referral.v1 import referral_pb2, referral_pb2_grpc
from services.referral.servicer import ReferralsServicer
from services.referral.store import metadata
from services.shared.consent_grants import GRANT_TOPIC, consent_grant_sender
from services.shared.process import ServiceRuntime, ServiceSpec


def _build(runtime: ServiceRuntime) -> list:
    runtime.outbox.register(GRANT_TOPIC, consent_grant_sender(runtime.channel("consent"), runtime.credentials))
    return [
        (
            referral_pb2_grpc.add_ReferralsServicer_to_server,
            ReferralsServicer(runtime),
            referral_pb2.DESCRIPTOR.services_by_name["Referrals"].full_name,
        )
    ]


SPEC = ServiceSpec(
    name="referral",
    metadata=metadata,
    versions=Path(__file__).parent / "migrations",
    build=_build,
    # Clinical free text (referral reason / consultation question) is field-encrypted.
    protects_personal_data=True,
)
