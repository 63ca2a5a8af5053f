"""The referral service as the process runner sees it."""

from pathlib import Path

from hie.referral.v1 import referral_pb2, referral_pb2_grpc
from services.referral.deadlines import DeadlinePolicy
from services.referral.servicer import ReferralsServicer
from services.referral.store import follow_up_context, history_context, metadata, sealed_context
from services.shared import workflow
from services.shared.process import ServiceRuntime, ServiceSpec
from services.shared.protection.rotation import ProtectedColumns
from services.shared.workflow.engine import register_relays


def _build(runtime: ServiceRuntime) -> list:
    register_relays(runtime)
    options = runtime.options
    servicer = ReferralsServicer(runtime, deadlines=DeadlinePolicy.parse(options.get("HIE_REFERRAL_DEADLINES")))
    servicer.scanner.interval = options.value("HIE_REFERRAL_DEADLINE_SCAN_SECONDS")
    servicer.scanner.start()
    workflow.attach(runtime, servicer)
    return [
        (
            referral_pb2_grpc.add_ReferralsServicer_to_server,
            servicer,
            referral_pb2.DESCRIPTOR.services_by_name["Referrals"].full_name,
        )
    ]


SPEC = ServiceSpec(
    name="referral",
    metadata=metadata,
    versions=Path(__file__).parent / "migrations",
    build=_build,
    # Free text (reason, clinical summary, contact, advice, notes, care plans) is sealed at rest.
    protects_personal_data=True,
    protected=(
        ProtectedColumns(table="referral", columns={"sealed": lambda row: sealed_context(row["id"])}),
        ProtectedColumns(table="referral_state_change", columns={"reason": lambda row: history_context(row["id"])}),
        ProtectedColumns(table="follow_up", columns={"sealed": lambda row: follow_up_context(row["id"])}),
    ),
)
