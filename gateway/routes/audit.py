"""Audit log search (REST): auditors see everything, a hospital its own requests."""

from __future__ import annotations

import datetime
from typing import Any

from fastapi import APIRouter, Query, Request

from gateway.deps import Context
from gateway.routes import rpc
from hie.audit.v1 import audit_pb2
from hie.common.v1 import common_pb2

router = APIRouter(prefix="/api/v1/audit", tags=["audit"])


def event_json(event: audit_pb2.AuditEvent) -> dict[str, Any]:
    return {
        "event_id": event.event_id,
        "sequence": event.sequence,
        "occurred": event.occurred.ToDatetime(tzinfo=datetime.UTC).isoformat(),
        "type": event.type,
        "action": audit_pb2.Action.Name(event.action).removeprefix("ACTION_").lower(),
        "outcome": audit_pb2.Outcome.Name(event.outcome).removeprefix("OUTCOME_").lower(),
        "organization_id": event.actor.organization_id,
        "client_id": event.actor.client_id,
        "practitioner_id": event.actor.practitioner_id,
        "practitioner_name": event.actor.practitioner_name,
        "role": event.actor.role,
        "purpose_of_use": event.actor.purpose_of_use,
        "patient_enterprise_id": event.patient_enterprise_id,
        "entities": [{"type": e.type, "id": e.id} for e in event.entities],
        "source_address": event.source_address,
        "trace_id": event.trace_id,
        "span_id": event.span_id,
        "source_service": event.source_service,
        "hash": event.hash,
    }


@router.get("/events")
async def search_events(
    ctx: Context,
    request: Request,
    trace_id: str = Query(default="", max_length=32, pattern="^[0-9a-f]*$"),
    organization_id: str = Query(default="", max_length=64),
    patient_enterprise_id: str = Query(default="", max_length=36),
    type: str = Query(default="", max_length=64),
    patient_local_id: str = Query(default="", max_length=64, description="patient access report"),
    patient_domain: str = Query(default="", max_length=64),
    page_size: int = Query(default=100, ge=1, le=500),
    page_token: str = Query(default="", max_length=32),
) -> dict[str, Any]:
    ctx.require_scope("AuditEvent", "r")
    result = await rpc(
        request.app.state.stubs.audit.Query(
            audit_pb2.QueryRequest(
                trace_id=trace_id,
                organization_id=organization_id,
                patient_enterprise_id=patient_enterprise_id,
                type=type,
                patient=common_pb2.PatientRef(domain=patient_domain, local_id=patient_local_id),
                page=common_pb2.PageRequest(page_size=page_size, page_token=page_token),
            ),
            metadata=ctx.metadata,
        )
    )
    return {"events": [event_json(e) for e in result.events], "next_page_token": result.page.next_page_token}
