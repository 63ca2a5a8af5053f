"""Referrals and teleconsultation requests (REST; the full workflows grow in their own issues)."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from gateway.deps import Context
from gateway.routes import rpc
from hie.common.v1 import common_pb2
from hie.referral.v1 import referral_pb2
from hie.teleconsult.v1 import teleconsult_pb2

router = APIRouter(prefix="/api/v1", tags=["workflows"])
_DIRECTIONS = {
    "up": referral_pb2.REFERRAL_DIRECTION_UP,
    "down": referral_pb2.REFERRAL_DIRECTION_DOWN,
    "lateral": referral_pb2.REFERRAL_DIRECTION_LATERAL,
}
_KINDS = {
    "imaging": teleconsult_pb2.CONSULTATION_KIND_IMAGING,
    "ecg": teleconsult_pb2.CONSULTATION_KIND_ECG,
    "pathology": teleconsult_pb2.CONSULTATION_KIND_PATHOLOGY,
    "ultrasound": teleconsult_pb2.CONSULTATION_KIND_ULTRASOUND,
    "specialist": teleconsult_pb2.CONSULTATION_KIND_SPECIALIST,
    "multidisciplinary": teleconsult_pb2.CONSULTATION_KIND_MULTIDISCIPLINARY,
}


class ReferralIn(BaseModel):
    patient_local_id: str = Field(min_length=1, max_length=64)
    target_organization_id: str = Field(min_length=1, max_length=64)
    direction: Literal["up", "down", "lateral"]
    reason: str = Field(default="", max_length=2000)
    document_ids: list[str] = Field(default_factory=list, max_length=50)


class ConsultationIn(BaseModel):
    patient_local_id: str = Field(min_length=1, max_length=64)
    consultant_organization_id: str = Field(min_length=1, max_length=64)
    kind: Literal["imaging", "ecg", "pathology", "ultrasound", "specialist", "multidisciplinary"]
    question: str = Field(default="", max_length=4000)
    document_ids: list[str] = Field(default_factory=list, max_length=50)


@router.post("/referrals", status_code=201)
async def create_referral(body: ReferralIn, ctx: Context, request: Request) -> dict[str, Any]:
    ctx.require_scope("ServiceRequest", "c")
    result = await rpc(
        request.app.state.stubs.referral.CreateReferral(
            referral_pb2.CreateReferralRequest(
                referral=referral_pb2.Referral(
                    patient=common_pb2.PatientRef(local_id=body.patient_local_id),
                    target_organization_id=body.target_organization_id,
                    direction=_DIRECTIONS[body.direction],
                    reason=body.reason,
                    document_ids=body.document_ids,
                ),
                idempotency_key=request.headers.get("idempotency-key", "")[:128],
            ),
            metadata=ctx.metadata,
        )
    )
    return _referral_json(result.referral)


def _referral_json(r: referral_pb2.Referral) -> dict[str, Any]:
    return {
        "referral_id": r.referral_id,
        "state": referral_pb2.ReferralState.Name(r.state).removeprefix("REFERRAL_STATE_").lower(),
        "requester_organization_id": r.requester_organization_id,
        "target_organization_id": r.target_organization_id,
        "patient": {"domain": r.patient.domain, "local_id": r.patient.local_id},
        "reason": r.reason,
    }


def _consultation_json(c: teleconsult_pb2.Consultation) -> dict[str, Any]:
    return {
        "consultation_id": c.consultation_id,
        "state": teleconsult_pb2.ConsultationState.Name(c.state).removeprefix("CONSULTATION_STATE_").lower(),
        "requester_organization_id": c.requester_organization_id,
        "consultant_organization_id": c.consultant_organization_id,
        "patient": {"domain": c.patient.domain, "local_id": c.patient.local_id},
        "question": c.question,
    }


@router.get("/referrals/{referral_id}")
async def get_referral(referral_id: str, ctx: Context, request: Request) -> dict[str, Any]:
    """A referral, to its two parties only."""
    ctx.require_scope("ServiceRequest", "r")
    result = await rpc(
        request.app.state.stubs.referral.GetReferral(
            referral_pb2.GetReferralRequest(referral_id=referral_id[:64]), metadata=ctx.metadata
        )
    )
    return _referral_json(result.referral)


@router.get("/consultations/{consultation_id}")
async def get_consultation(consultation_id: str, ctx: Context, request: Request) -> dict[str, Any]:
    """A consultation, to its two parties only."""
    ctx.require_scope("ServiceRequest", "r")
    result = await rpc(
        request.app.state.stubs.teleconsult.GetConsultation(
            teleconsult_pb2.GetConsultationRequest(consultation_id=consultation_id[:64]), metadata=ctx.metadata
        )
    )
    return _consultation_json(result.consultation)


@router.post("/consultations", status_code=201)
async def request_consultation(body: ConsultationIn, ctx: Context, request: Request) -> dict[str, Any]:
    ctx.require_scope("ServiceRequest", "c")
    result = await rpc(
        request.app.state.stubs.teleconsult.RequestConsultation(
            teleconsult_pb2.RequestConsultationRequest(
                consultation=teleconsult_pb2.Consultation(
                    patient=common_pb2.PatientRef(local_id=body.patient_local_id),
                    consultant_organization_id=body.consultant_organization_id,
                    kind=_KINDS[body.kind],
                    question=body.question,
                    document_ids=body.document_ids,
                ),
                idempotency_key=request.headers.get("idempotency-key", "")[:128],
            ),
            metadata=ctx.metadata,
        )
    )
    return _consultation_json(result.consultation)
