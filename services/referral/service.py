"""The referral service as the process runner sees it."""

from pathlib import Path

from hie.referral.v1 import referral_pb2, referral_pb2_grpc
from services.referral.servicer import ReferralsServicer
from services.referral.store import metadata
from services.shared import workflow
from services.shared.process import ServiceRuntime, ServiceSpec
from services.shared.workflow.engine import register_relays


def _build(runtime: ServiceRuntime) -> list:
    register_relays(runtime)
    servicer = ReferralsServicer(runtime)
    workflow.attach(runtime, servicer)
    return [
        (
            referral_pb2_grpc.add_ReferralsServicer_to_server,
            servicer,
            referral_pb2.DESCRIPTOR.services_by_name["Referrals"].full_name,
        )
    ]


SPEC = ServiceSpec(name="referral", metadata=metadata, versions=Path(__file__).parent / "migrations", build=_build)
