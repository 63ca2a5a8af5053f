"""Referrals (REST). Consultations: routes/teleconsult.py."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from gateway.deps import Context, IdempotencyKey
from gateway.errors import ApiError
from gateway.routes import rpc
from gateway.routes.referrals import DIRECTIONS, SERVICES, URGENCIES, directory_metadata, referral_json
from gateway.routes.workflow_contract import STRICT_BODY, VISIBLE, DateTime
from hie.common.v1 import common_pb2
from hie.referral.v1 import referral_pb2
from services.shared.timestamps import to_timestamp_or_none

router = APIRouter(prefix="/api/v1", tags=["workflows"])


class DiagnosisIn(BaseModel):
    model_config = STRICT_BODY

    # ICD-10, checked by the referral service (referral-diagnosis: form and chapter range).
    code: str = Field(min_length=1, max_length=16)
    text: str = Field(default="", max_length=200)


class FollowUpIn(BaseModel):
    model_config = STRICT_BODY

    description: str = Field(min_length=1, max_length=500, pattern=VISIBLE)
    due: DateTime


class CarePlanIn(BaseModel):
    model_config = STRICT_BODY

    follow_ups: list[FollowUpIn] = Field(default_factory=list, max_length=20)
    medication: str = Field(default="", max_length=4000)
    warning_signs: str = Field(default="", max_length=4000)


# One target, or candidates (the first to accept wins): never both, never neither.
_ONE_TARGET: dict[str, Any] = {
    "oneOf": [
        {
            "required": ["target_organization_id"],
            "properties": {
                "target_organization_id": {"minLength": 1},
                "candidate_organization_ids": {"maxItems": 0},
            },
        },
        {
            "required": ["candidate_organization_ids"],
            "properties": {
                "target_organization_id": {"maxLength": 0},
                "candidate_organization_ids": {"minItems": 1},
            },
        },
    ]
}


class ReferralIn(BaseModel):
    """A referral of a patient of the caller's domain to one target or to candidates."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_ONE_TARGET)

    patient_local_id: str = Field(min_length=1, max_length=64)
    target_organization_id: str = Field(default="", max_length=64)
    candidate_organization_ids: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(
        default_factory=list, max_length=5
    )
    # Derived from the organisations' tiers; stated only where a tier is not registered.
    direction: Literal["up", "down", "lateral"] | None = None
    reason: str = Field(default="", max_length=2000)
    diagnosis: DiagnosisIn | None = None
    urgency: Literal["routine", "urgent", "emergency"] = "routine"
    service: Literal["outpatient", "admission", "examination", "rehabilitation"] = "outpatient"
    target_department: str = Field(default="", max_length=64)
    target_practitioner_id: str = Field(default="", max_length=64)
    clinical_summary: str = Field(default="", max_length=4000)
    contact: str = Field(default="", max_length=200)
    document_ids: list[str] = Field(default_factory=list, max_length=20)
    care_plan: CarePlanIn | None = None
    parent_referral_id: str = Field(default="", max_length=64)
    book_slot_id: str = Field(default="", max_length=64)


@router.post("/referrals", status_code=201)
async def create_referral(
    body: ReferralIn, ctx: Context, request: Request, idempotency_key: IdempotencyKey
) -> dict[str, Any]:
    """A referral from the caller organisation; its direction follows from the organisations'
    tiers in the exchange's directory (signed here for the referral service)."""
    ctx.require_scope("ServiceRequest", "c")
    plan = body.care_plan
    result = await rpc(
        request.app.state.stubs.referral.CreateReferral(
            referral_pb2.CreateReferralRequest(
                referral=referral_pb2.Referral(
                    patient=common_pb2.PatientRef(local_id=body.patient_local_id),
                    target_organization_id=body.target_organization_id,
                    candidate_organization_ids=body.candidate_organization_ids,
                    direction=DIRECTIONS[body.direction] if body.direction else 0,
                    reason=body.reason,
                    diagnosis=referral_pb2.Diagnosis(code=body.diagnosis.code, text=body.diagnosis.text)
                    if body.diagnosis
                    else None,
                    urgency=URGENCIES[body.urgency],
                    service=SERVICES[body.service],
                    target_department=body.target_department,
                    target_practitioner_id=body.target_practitioner_id,
                    clinical_summary=body.clinical_summary,
                    contact=body.contact,
                    document_ids=body.document_ids,
                    care_plan=referral_pb2.CarePlan(
                        medication=plan.medication,
                        warning_signs=plan.warning_signs,
                        follow_ups=[
                            referral_pb2.FollowUp(description=f.description, due=to_timestamp_or_none(f.due))
                            for f in plan.follow_ups
                        ],
                    )
                    if plan
                    else None,
                    parent_referral_id=body.parent_referral_id,
                    book_slot_id=body.book_slot_id,
                ),
                idempotency_key=idempotency_key,
            ),
            metadata=await directory_metadata(
                ctx, request, [body.target_organization_id, *body.candidate_organization_ids]
            ),
        )
    )
    return referral_json(result.referral)


def _if_match(request: Request) -> int | None:
    """The version an If-Match header names (`W/"3"`, `"3"` or `3`), None without one."""
    value = request.headers.get("if-match", "").strip().removeprefix("W/").strip('"')
    if not value:
        return None
    if not value.isdigit() or len(value) > 9:
        raise ApiError(400, "if-match", 'If-Match names a referral version, e.g. W/"3"')
    return int(value)


class TransitionIn(BaseModel):
    model_config = STRICT_BODY

    reason: str = Field(default="", max_length=2000)
    # reject: duplicate | inappropriate | incomplete | no-capacity | patient-choice
    rejection_code: Literal["", "duplicate", "inappropriate", "incomplete", "no-capacity", "patient-choice"] = ""
    advice: str = Field(default="", max_length=2000)
    slot_id: str = Field(default="", max_length=64)
    bed_department: str = Field(default="", max_length=64)
    outcome_document_id: str = Field(default="", max_length=64)


# Every move of the referral workflow (services/referral/workflow.py): the receiving organisation
# receives, holds, accepts, rejects, schedules, records arrival / no-show / start / notes,
# completes and confirms a cancellation; the referring organisation supplies, cancels and
# acknowledges the outcome. Accepting grants the receiver access (purpose referral) to the
# attached documents and the patient's summary until completion plus the region's grace;
# cancelling or rejecting ends it.
ReferralMove = Literal[
    "receive",
    "hold",
    "supply",
    "accept",
    "reject",
    "schedule",
    "arrive",
    "no-show",
    "start",
    "note",
    "complete",
    "acknowledge",
    "cancel",
    "confirm-cancel",
]


@router.post("/referrals/{referral_id}/{transition}")
async def move_referral(
    referral_id: str,
    transition: ReferralMove,
    ctx: Context,
    request: Request,
    idempotency_key: IdempotencyKey,
    body: TransitionIn | None = None,
) -> dict[str, Any]:
    """One move of a referral by the side allowed to make it (an Idempotency-Key makes it retryable)."""
    ctx.require_scope("ServiceRequest", "u")
    body = body or TransitionIn()
    result = await rpc(
        request.app.state.stubs.referral.MoveReferral(
            referral_pb2.MoveReferralRequest(
                referral_id=referral_id[:64],
                move=transition,
                reason=body.reason,
                idempotency_key=idempotency_key,
                rejection_code=body.rejection_code,
                advice=body.advice,
                slot_id=body.slot_id,
                bed_department=body.bed_department,
                outcome_document_id=body.outcome_document_id,
                expected_version=_if_match(request),
            ),
            metadata=ctx.metadata,
        )
    )
    return {**referral_json(result.referral), "audit_event_ids": list(result.audit_event_ids)}


@router.get("/referrals/{referral_id}")
async def get_referral(referral_id: str, ctx: Context, request: Request) -> dict[str, Any]:
    """A referral, to its two parties only."""
    ctx.require_scope("ServiceRequest", "r")
    result = await rpc(
        request.app.state.stubs.referral.GetReferral(
            referral_pb2.GetReferralRequest(referral_id=referral_id[:64]), metadata=ctx.metadata
        )
    )
    return referral_json(result.referral)
