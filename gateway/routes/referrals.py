"""Referral worklists, statistics, slots, beds, follow-ups and episodes (REST), and the pieces the
referral routes of workflows.py share: the JSON of a referral and the directory statement of the
organisations' tiers the gateway signs for the referral service (services/referral/directory.py)."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field

from gateway import store
from gateway.deps import CallContext, Context, IdempotencyKey
from gateway.errors import ApiError
from gateway.routes import rpc
from gateway.routes.workflow_contract import (
    REFERRAL_STATE_ITEMS,
    STRICT_BODY,
    DateTime,
    PeriodIn,
    WholeNumber,
    clocks_json,
    history_json,
    iso,
)
from hie.referral.v1 import referral_pb2
from services.referral.directory import DIRECTORY_METADATA_KEY
from services.shared.timestamps import to_timestamp_or_none

router = APIRouter(prefix="/api/v1", tags=["referrals"])

DIRECTIONS = {
    "up": referral_pb2.REFERRAL_DIRECTION_UP,
    "down": referral_pb2.REFERRAL_DIRECTION_DOWN,
    "lateral": referral_pb2.REFERRAL_DIRECTION_LATERAL,
}
URGENCIES = {
    "routine": referral_pb2.REFERRAL_URGENCY_ROUTINE,
    "urgent": referral_pb2.REFERRAL_URGENCY_URGENT,
    "emergency": referral_pb2.REFERRAL_URGENCY_EMERGENCY,
}
SERVICES = {
    "outpatient": referral_pb2.REFERRAL_SERVICE_OUTPATIENT,
    "admission": referral_pb2.REFERRAL_SERVICE_ADMISSION,
    "examination": referral_pb2.REFERRAL_SERVICE_EXAMINATION,
    "rehabilitation": referral_pb2.REFERRAL_SERVICE_REHABILITATION,
}
_NAME = {
    **{v: k for k, v in DIRECTIONS.items()},
}


def state_name(state: int) -> str:
    return referral_pb2.ReferralState.Name(state).removeprefix("REFERRAL_STATE_").lower()  # type: ignore[arg-type]


def state_code(name: str) -> int:
    return referral_pb2.ReferralState.Value(f"REFERRAL_STATE_{name.upper()}")


def referral_json(r: referral_pb2.Referral) -> dict[str, Any]:
    """A referral as the REST API shows it."""
    urgency = referral_pb2.ReferralUrgency.Name(r.urgency).removeprefix("REFERRAL_URGENCY_").lower()
    service = referral_pb2.ReferralService.Name(r.service).removeprefix("REFERRAL_SERVICE_").lower()
    return {
        "referral_id": r.referral_id,
        "referral_number": r.referral_number,
        "state": state_name(r.state),
        "business_status": r.business_status,
        "version": r.version,
        "requester_organization_id": r.requester_organization_id,
        "target_organization_id": r.target_organization_id,
        "candidate_organization_ids": list(r.candidate_organization_ids),
        "direction": _NAME.get(r.direction, ""),
        "origin_tier": r.origin_tier,
        "target_tier": r.target_tier,
        "urgency": urgency if r.urgency else "",
        "service": service if r.service else "",
        "patient": {"domain": r.patient.domain, "local_id": r.patient.local_id},
        "reason": r.reason,
        "diagnosis": {"code": r.diagnosis.code, "text": r.diagnosis.text},
        "target_department": r.target_department,
        "target_practitioner_id": r.target_practitioner_id,
        "clinical_summary": r.clinical_summary,
        "contact": r.contact,
        "document_ids": list(r.document_ids),
        "rejection_code": r.rejection_code,
        "advice": r.advice,
        "slot_id": r.slot_id,
        "appointment_start": iso(r.appointment_start),
        "bed_department": r.bed_department,
        "outcome_document_id": r.outcome_document_id,
        "care_plan": {
            "medication": r.care_plan.medication,
            "warning_signs": r.care_plan.warning_signs,
            "follow_ups": [
                {
                    "follow_up_id": f.follow_up_id,
                    "description": f.description,
                    "due": iso(f.due),
                    "done": iso(f.done),
                    "note": f.note,
                }
                for f in r.care_plan.follow_ups
            ],
        },
        "episode_id": r.episode_id,
        "parent_referral_id": r.parent_referral_id,
        "created": iso(r.created),
        "clocks": clocks_json(r.clocks),
        "overdue": r.overdue,
        "allowed_moves": list(r.allowed_moves),
        "history": history_json(r.history, state_name),
    }


async def directory_metadata(
    ctx: CallContext, request: Request, organization_ids: list[str]
) -> tuple[tuple[str, str], ...]:
    """The caller's metadata plus the signed tiers of the caller's and the named organisations,
    read from the gateway's organisation store (never from the request)."""
    orgs = sorted({ctx.caller.organization_id, *organization_ids})
    async with request.app.state.sessions() as session:
        tiers = await store.tiers(session, orgs)
    statement = request.app.state.authorization.directory_statement(client_id=ctx.caller.client_id, tiers=tiers)
    return (*ctx.metadata, (DIRECTORY_METADATA_KEY, statement))


# --- worklists -----------------------------------------------------------------------------------


@router.get("/referrals")
async def list_referrals(
    ctx: Context,
    request: Request,
    box: Literal["incoming", "outgoing"],
    # Stated as an enum; an unknown state is refused by name (400 referral-state).
    state: list[str] = Query(default=[], json_schema_extra=REFERRAL_STATE_ITEMS),
    urgency: Literal["routine", "urgent", "emergency"] | None = None,
    direction: Literal["up", "down", "lateral"] | None = None,
    overdue: bool = False,
    department: str = Query(default="", max_length=64),
    page_size: int = Query(default=50, ge=1, le=200),
    page_token: str = Query(default="", max_length=20),
) -> dict[str, Any]:
    """The organisation's incoming or outgoing referrals (worklist), newest first."""
    ctx.require_scope("ServiceRequest", "r")
    try:
        states = [state_code(s) for s in state]
    except ValueError:
        raise ApiError(400, "referral-state", "unknown state") from None
    result = await rpc(
        request.app.state.stubs.referral.ListReferrals(
            referral_pb2.ListReferralsRequest(
                box=box,
                states=states,
                urgency=URGENCIES[urgency] if urgency else 0,
                direction=DIRECTIONS[direction] if direction else 0,
                overdue_only=overdue,
                department=department,
                page_size=page_size,
                page_token=page_token,
            ),
            metadata=ctx.metadata,
        )
    )
    return {"referrals": [referral_json(r) for r in result.referrals], "next_page_token": result.next_page_token}


@router.get("/referral-episodes/{episode_id}")
async def get_episode(episode_id: str, ctx: Context, request: Request) -> dict[str, Any]:
    """An up-referral and the down-referrals that follow it (those the caller takes part in)."""
    ctx.require_scope("ServiceRequest", "r")
    result = await rpc(
        request.app.state.stubs.referral.GetEpisode(
            referral_pb2.GetEpisodeRequest(episode_id=episode_id[:64]), metadata=ctx.metadata
        )
    )
    return {
        "episode_id": result.episode_id,
        "status": result.status,
        "referrals": [referral_json(r) for r in result.referrals],
    }


class FollowUpDoneIn(BaseModel):
    model_config = STRICT_BODY

    note: str = Field(default="", max_length=2000)


@router.post("/referrals/{referral_id}/follow-ups/{follow_up_id}/complete")
async def complete_follow_up(
    referral_id: str,
    follow_up_id: str,
    ctx: Context,
    request: Request,
    idempotency_key: IdempotencyKey,
    body: FollowUpDoneIn | None = None,
) -> dict[str, Any]:
    """The community records a follow-up of a down-referral's care plan as done (an Idempotency-Key
    makes a retry answer the first response)."""
    ctx.require_scope("ServiceRequest", "u")
    result = await rpc(
        request.app.state.stubs.referral.CompleteFollowUp(
            referral_pb2.CompleteFollowUpRequest(
                referral_id=referral_id[:64],
                follow_up_id=follow_up_id[:64],
                note=body.note if body else "",
                idempotency_key=idempotency_key,
            ),
            metadata=ctx.metadata,
        )
    )
    return {**referral_json(result.referral), "audit_event_ids": list(result.audit_event_ids)}


# --- statistics ----------------------------------------------------------------------------------


@router.get("/referral-statistics")
async def referral_statistics(
    ctx: Context,
    request: Request,
    since: DateTime | None = None,
    until: DateTime | None = None,
    organization_id: str = Query(default="", max_length=64),
) -> dict[str, Any]:
    """Regional referral statistics (the authority), or a hospital's own."""
    result = await rpc(
        request.app.state.stubs.referral.ReferralStatistics(
            referral_pb2.ReferralStatisticsRequest(
                since=to_timestamp_or_none(since) if since else None,
                until=to_timestamp_or_none(until) if until else None,
                organization_id=organization_id,
            ),
            metadata=ctx.metadata,
        )
    )

    def rows(items: Any) -> dict[str, int]:
        return {row.key: row.count for row in items}

    return {
        "total": result.total,
        "by_direction": rows(result.by_direction),
        "by_tier_pair": rows(result.by_tier_pair),
        "by_state": rows(result.by_state),
        "acceptance_rate": result.acceptance_rate,
        "durations": {
            d.name: {"samples": d.samples, "median_hours": d.median_hours, "p90_hours": d.p90_hours}
            for d in result.durations
        },
        "loop_closure_rate": result.loop_closure_rate,
        "breaches": result.breaches,
        "breaches_by_clock": rows(result.breaches_by_clock),
        "by_organization_month": [
            {
                "organization_id": row.organization_id,
                "month": row.month,
                "sent": row.sent,
                "received": row.received,
                "accepted": row.accepted,
                "closed": row.closed,
                "breaches": row.breaches,
            }
            for row in result.by_organization_month
        ],
    }


# --- slots and beds ------------------------------------------------------------------------------


class SlotIn(PeriodIn):
    department: str = Field(min_length=1, max_length=64)


class SlotsIn(BaseModel):
    model_config = STRICT_BODY

    slots: list[SlotIn] = Field(min_length=1, max_length=200)


def slot_json(slot: referral_pb2.Slot) -> dict[str, Any]:
    return {
        "slot_id": slot.slot_id,
        "organization_id": slot.organization_id,
        "department": slot.department,
        "start": iso(slot.start),
        "end": iso(slot.end),
        "status": slot.status,
    }


@router.post("/referral-slots", status_code=201)
async def publish_slots(
    body: SlotsIn, ctx: Context, request: Request, idempotency_key: IdempotencyKey
) -> dict[str, Any]:
    """The caller organisation publishes bookable slots of its departments (an Idempotency-Key makes
    a retry answer the first response: the same slots, not new ones)."""
    ctx.require_scope("ServiceRequest", "u")
    result = await rpc(
        request.app.state.stubs.referral.PublishSlots(
            referral_pb2.PublishSlotsRequest(
                slots=[
                    referral_pb2.Slot(
                        department=s.department, start=to_timestamp_or_none(s.start), end=to_timestamp_or_none(s.end)
                    )
                    for s in body.slots
                ],
                idempotency_key=idempotency_key,
            ),
            metadata=ctx.metadata,
        )
    )
    return {"slots": [slot_json(s) for s in result.slots]}


@router.get("/referral-slots")
async def list_slots(
    ctx: Context,
    request: Request,
    organization_id: str = Query(default="", max_length=64),
    department: str = Query(default="", max_length=64),
    free: bool = False,
) -> dict[str, Any]:
    """An organisation's slots (free ones only with free=true)."""
    ctx.require_scope("ServiceRequest", "r")
    result = await rpc(
        request.app.state.stubs.referral.ListSlots(
            referral_pb2.ListSlotsRequest(organization_id=organization_id, department=department, free_only=free),
            metadata=ctx.metadata,
        )
    )
    return {"slots": [slot_json(s) for s in result.slots]}


class BedsIn(BaseModel):
    model_config = STRICT_BODY

    total: WholeNumber = Field(ge=0, le=10000)


def bed_json(bed: referral_pb2.BedCount) -> dict[str, Any]:
    return {
        "organization_id": bed.organization_id,
        "department": bed.department,
        "total": bed.total,
        "reserved": bed.reserved,
        "free": bed.total - bed.reserved,
    }


@router.put("/referral-beds/{department}")
async def set_beds(
    department: str, body: BedsIn, ctx: Context, request: Request, idempotency_key: IdempotencyKey
) -> dict[str, Any]:
    """The caller organisation's admission beds for referrals in a department."""
    ctx.require_scope("ServiceRequest", "u")
    result = await rpc(
        request.app.state.stubs.referral.SetBedCount(
            referral_pb2.SetBedCountRequest(
                department=department[:64], total=body.total, idempotency_key=idempotency_key
            ),
            metadata=ctx.metadata,
        )
    )
    return bed_json(result.bed_count)


@router.get("/referral-beds")
async def list_beds(
    ctx: Context, request: Request, organization_id: str = Query(default="", max_length=64)
) -> dict[str, Any]:
    ctx.require_scope("ServiceRequest", "r")
    result = await rpc(
        request.app.state.stubs.referral.ListBedCounts(
            referral_pb2.ListBedCountsRequest(organization_id=organization_id), metadata=ctx.metadata
        )
    )
    return {"beds": [bed_json(b) for b in result.bed_counts]}
