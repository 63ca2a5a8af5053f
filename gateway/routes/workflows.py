"""Referrals (REST; the full workflow grows in its own issue). Consultations: routes/teleconsult.py."""

from __future__ import annotations

import datetime
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from gateway.deps import Context
from gateway.routes import rpc
from hie.common.v1 import common_pb2
from hie.referral.v1 import referral_pb2

router = APIRouter(prefix="/api/v1", tags=["workflows"])
_DIRECTIONS = {
    "up": referral_pb2.REFERRAL_DIRECTION_UP,
    "down": referral_pb2.REFERRAL_DIRECTION_DOWN,
    "lateral": referral_pb2.REFERRAL_DIRECTION_LATERAL,
}


class ReferralIn(BaseModel):
    patient_local_id: str = Field(min_length=1, max_length=64)
    target_organization_id: str = Field(min_length=1, max_length=64)
    direction: Literal["up", "down", "lateral"]
    reason: str = Field(default="", max_length=2000)
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
            message(referral_id=referral_id[:64], reason=body.reason if body else ""), metadata=ctx.metadata
        )
    )
    return {**_referral_json(result.referral), "audit_event_ids": list(result.audit_event_ids)}


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
