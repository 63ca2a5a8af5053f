"""The teleconsult service as the process runner sees it."""

from pathlib import Path

from hie.teleconsult.v1 import teleconsult_pb2, teleconsult_pb2_grpc
from services.shared import workflow
from services.shared.process import ServiceRuntime, ServiceSpec
from services.shared.protection.rotation import ProtectedColumns
from services.shared.workflow.engine import register_relays
from services.teleconsult.deadlines import DeadlinePolicy
from services.teleconsult.directory import QualificationRules
from services.teleconsult.servicer import TeleconsultationsServicer
from services.teleconsult.store import history_context, message_context, metadata, report_context, sealed_context


def _build(runtime: ServiceRuntime) -> list:
    register_relays(runtime)
    options = runtime.options
    servicer = TeleconsultationsServicer(
        runtime,
        deadlines=DeadlinePolicy.parse(options.get("HIE_TELECONSULT_DEADLINES")),
        rules=QualificationRules(min_practice_years=options.value("HIE_TELECONSULT_MIN_PRACTICE_YEARS")),
        join_url_template=options.get("HIE_TELECONSULT_JOIN_URL"),
    )
    servicer.scanner.interval = options.value("HIE_TELECONSULT_DEADLINE_SCAN_SECONDS")
    servicer.scanner.start()
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
    # Free text (question, purpose, summary, move reasons, messages, report) is sealed at rest.
    protects_personal_data=True,
    protected=(
        ProtectedColumns(table="consultation", columns={"sealed": lambda row: sealed_context(row["id"])}),
        ProtectedColumns(table="consultation_message", columns={"sealed": lambda row: message_context(row["id"])}),
        ProtectedColumns(table="consultation_report", columns={"sealed": lambda row: report_context(row["id"])}),
        ProtectedColumns(table="consultation_state_change", columns={"reason": lambda row: history_context(row["id"])}),
    ),
)
