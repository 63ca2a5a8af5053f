"""Referrals and teleconsultation requests (REST; the full workflows grow in their own issues)."""

from __future__ import annotations

import datetime
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


def _state_name(state: int) -> str:
    return referral_pb2.ReferralState.Name(state).removeprefix("REFERRAL_STATE_").lower()  # type: ignore[arg-type]


def _referral_json(r: referral_pb2.Referral) -> dict[str, Any]:
    return {
        "referral_id": r.referral_id,
        "state": _state_name(r.state),
        "requester_organization_id": r.requester_organization_id,
        "target_organization_id": r.target_organization_id,
        "patient": {"domain": r.patient.domain, "local_id": r.patient.local_id},
        "reason": r.reason,
        "document_ids": list(r.document_ids),
        "history": [
            {
                "from": _state_name(h.from_state),
                "to": _state_name(h.to_state),
                "organization_id": h.organization_id,
                "practitioner_id": h.practitioner_id,
                "reason": h.reason,
                "changed": h.changed.ToDatetime(tzinfo=datetime.UTC).isoformat(),
            }
            for h in r.history
        ],
    }


class TransitionIn(BaseModel):
    reason: str = Field(default="", max_length=2000)


# Referral transitions: the receiving organisation accepts, rejects or completes; the referring
# organisation cancels. Accepting grants the receiver access (purpose referral) to the attached
# documents and the patient's summary until completion plus the region's grace; cancelling revokes it.
_TRANSITIONS = {
    "accept": ("AcceptReferral", referral_pb2.AcceptReferralRequest),
    "reject": ("RejectReferral", referral_pb2.RejectReferralRequest),
    "complete": ("CompleteReferral", referral_pb2.CompleteReferralRequest),
    "cancel": ("CancelReferral", referral_pb2.CancelReferralRequest),
}


@router.post("/referrals/{referral_id}/{transition}")
async def move_referral(
    referral_id: str,
    transition: Literal["accept", "reject", "complete", "cancel"],
    ctx: Context,
    request: Request,
    body: TransitionIn | None = None,
) -> dict[str, Any]:
    """Accept / reject / complete (receiving organisation) or cancel (referring organisation)."""
    ctx.require_scope("ServiceRequest", "u")
    method, message = _TRANSITIONS[transition]
    result = await rpc(
        getattr(request.app.state.stubs.referral, method)(
            message(
                referral_id=referral_id[:64],
                reason=body.reason if body else "",
                idempotency_key=request.headers.get("idempotency-key", "")[:128],
            ),
            metadata=ctx.metadata,
        )
    )
    return {**_referral_json(result.referral), "audit_event_ids": list(result.audit_event_ids)}


def _consultation_state(state: int) -> str:
    return teleconsult_pb2.ConsultationState.Name(state).removeprefix("CONSULTATION_STATE_").lower()  # type: ignore[arg-type]


def _consultation_json(c: teleconsult_pb2.Consultation) -> dict[str, Any]:
    return {
        "consultation_id": c.consultation_id,
        "state": _consultation_state(c.state),
        "document_ids": list(c.document_ids),
        "history": [
            {
                "from": _consultation_state(h.from_state),
                "to": _consultation_state(h.to_state),
                "organization_id": h.organization_id,
                "practitioner_id": h.practitioner_id,
                "reason": h.reason,
                "changed": h.changed.ToDatetime(tzinfo=datetime.UTC).isoformat(),
            }
            for h in c.history
        ],
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


_CONSULTATION_TRANSITIONS = {
    "accept": ("AcceptConsultation", teleconsult_pb2.AcceptConsultationRequest),
    "cancel": ("CancelConsultation", teleconsult_pb2.CancelConsultationRequest),
}


@router.post("/consultations/{consultation_id}/{transition}")
async def move_consultation(
    consultation_id: str,
    transition: Literal["accept", "cancel"],
    ctx: Context,
    request: Request,
    body: TransitionIn | None = None,
) -> dict[str, Any]:
    """Accept (consultant organisation: grants it the attached documents and the patient's summary
    for the purpose consultation) or cancel (requesting organisation: revokes that grant)."""
    ctx.require_scope("ServiceRequest", "u")
    method, message = _CONSULTATION_TRANSITIONS[transition]
    result = await rpc(
        getattr(request.app.state.stubs.teleconsult, method)(
            message(
                consultation_id=consultation_id[:64],
                reason=body.reason if body else "",
                idempotency_key=request.headers.get("idempotency-key", "")[:128],
            ),
            metadata=ctx.metadata,
        )
    )
    return {**_consultation_json(result.consultation), "audit_event_ids": list(result.audit_event_ids)}
