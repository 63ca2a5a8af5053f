"""Remote consultations (远程会诊 / 远程诊断), REST: the application form, the workflow's moves, the
signed report, imaging links through consent, worklists, statistics, the specialist directory,
on-call rosters, bookable slots, and the organisations' published keys that verify a report."""

from __future__ import annotations

import datetime
import json
from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field, StrictBool

from gateway import store
from gateway.deps import Context, IdempotencyKey
from gateway.errors import ApiError
from gateway.routes import rpc
from gateway.routes.workflow_contract import (
    CONSULTATION_STATE_ITEMS,
    STRICT_BODY,
    VISIBLE,
    DateTime,
    PeriodIn,
    WholeNumber,
    clocks_json,
    history_json,
    iso,
)
from hie.common.v1 import common_pb2
from hie.registry.v1 import registry_pb2
from hie.teleconsult.v1 import teleconsult_pb2
from services.shared.timestamps import to_datetime, to_timestamp_or_none
from services.teleconsult import report as report_model
from services.teleconsult.deadlines import KINDS, URGENCIES
from services.teleconsult.workflow import MOVES, state_name

router = APIRouter(prefix="/api/v1", tags=["consultations"])
MODES = {
    "asynchronous": teleconsult_pb2.CONSULTATION_MODE_ASYNCHRONOUS,
    "interactive": teleconsult_pb2.CONSULTATION_MODE_INTERACTIVE,
}
# Professional titles a specialist directory entry and an application may name (directory.TITLES).
Title = Literal["", "住院医师", "主治医师", "副主任医师", "主任医师"]
KindName = Literal["imaging", "ecg", "pathology", "ultrasound", "specialist", "multidisciplinary"]
_KIND_NAME = {v: k for k, v in KINDS.items()}
_MODE_NAME = {v: k for k, v in MODES.items()}
_URGENCY_NAME = {v: k for k, v in URGENCIES.items()}


def state_code(name: str) -> int:
    try:
        return teleconsult_pb2.ConsultationState.Value(f"CONSULTATION_STATE_{name.upper()}")
    except ValueError:
        raise ApiError(400, "consultation-state", "unknown consultation state") from None


def consultation_json(c: teleconsult_pb2.Consultation) -> dict[str, Any]:
    return {
        "consultation_id": c.consultation_id,
        "state": state_name(c.state),
        "business_status": c.business_status,
        "kind": _KIND_NAME.get(c.kind, ""),
        "mode": _MODE_NAME.get(c.mode, ""),
        "urgency": _URGENCY_NAME.get(c.urgency, ""),
        "requester_organization_id": c.requester_organization_id,
        "consultant_organization_id": c.consultant_organization_id,
        "patient": {"domain": c.patient.domain, "local_id": c.patient.local_id},
        "question": c.question,
        "purpose": c.purpose,
        "summary": c.summary,
        "department": c.department,
        "specialty": c.specialty,
        "professional_title": c.professional_title,
        "invited_practitioner_id": c.invited_practitioner_id,
        "any_available": c.any_available,
        "document_ids": list(c.document_ids),
        "imaging_studies": [
            {"study_instance_uid": s.study_instance_uid, "wado_rs_url": s.wado_rs_url, "document_id": s.document_id}
            for s in c.imaging_studies
        ],
        "informed_consent": (
            {
                "evidence_document_id": c.informed_consent.evidence_document_id,
                "signer": c.informed_consent.signer,
                "guardian_name": c.informed_consent.guardian_name,
                "guardian_relationship": c.informed_consent.guardian_relationship,
                "signed": iso(c.informed_consent.signed),
            }
            if c.HasField("informed_consent")
            else None
        ),
        "assignee_ids": list(c.assignee_ids),
        "appointment": (
            {
                "start": iso(c.appointment.start),
                "end": iso(c.appointment.end),
                "join_url": c.appointment.join_url,
                "slot_ids": list(c.appointment.slot_ids),
            }
            if c.HasField("appointment")
            else None
        ),
        "decline_code": c.decline_code,
        "report_version": c.report_version,
        "messages": [
            {
                "message_id": m.message_id,
                "organization_id": m.organization_id,
                "practitioner_id": m.practitioner_id,
                "move": m.move,
                "text": m.text,
                "document_ids": list(m.document_ids),
                "sent": iso(m.sent),
            }
            for m in c.messages
        ],
        "clocks": clocks_json(c.clocks),
        "history": history_json(c.history, state_name),
        "allowed_moves": list(c.allowed_moves),
        "created": iso(c.created),
    }


class ImagingStudyIn(BaseModel):
    """Imaging by reference: the DICOM Study Instance UID and the WADO-RS endpoint at the source PACS."""

    model_config = STRICT_BODY

    study_instance_uid: str = Field(min_length=1, max_length=64, pattern=r"^\s*[0-9]+(\.[0-9]+)*\s*$")
    wado_rs_url: str = Field(min_length=9, max_length=512, pattern=r"^https://")
    document_id: str = Field(default="", max_length=64)


# A guardian's consent names the guardian and the relationship.
_GUARDIAN_NAMED: dict[str, Any] = {
    "if": {"properties": {"signer": {"const": "guardian"}}},
    "then": {
        "required": ["guardian_name", "guardian_relationship"],
        "properties": {"guardian_name": {"pattern": VISIBLE}, "guardian_relationship": {"pattern": VISIBLE}},
    },
}


class InformedConsentIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra=_GUARDIAN_NAMED)

    evidence_document_id: str = Field(min_length=1, max_length=64)
    signer: Literal["patient", "guardian"]
    guardian_name: str = Field(default="", max_length=64)
    guardian_relationship: str = Field(default="", max_length=32)
    signed: DateTime | None = None


def _studies(studies: list[ImagingStudyIn]) -> list[teleconsult_pb2.ImagingStudy]:
    return [teleconsult_pb2.ImagingStudy(**s.model_dump()) for s in studies]


class ConsultationIn(BaseModel):
    """The application form (申请单)."""

    model_config = STRICT_BODY

    patient_local_id: str = Field(min_length=1, max_length=64)
    consultant_organization_id: str = Field(min_length=1, max_length=64)
    kind: KindName
    mode: Literal["asynchronous", "interactive"] = "asynchronous"
    urgency: Literal["routine", "urgent", "emergency"] = "routine"
    question: str = Field(min_length=1, max_length=4000, pattern=VISIBLE)
    purpose: str = Field(default="", max_length=2000)
    summary: str = Field(default="", max_length=20000)
    department: str = Field(default="", max_length=64)
    specialty: str = Field(default="", max_length=64)
    professional_title: Title = ""
    invited_practitioner_id: str = Field(default="", max_length=64)
    any_available: StrictBool = False
    document_ids: list[str] = Field(default_factory=list, max_length=50)
    imaging_studies: list[ImagingStudyIn] = Field(default_factory=list, max_length=20)


@router.post("/consultations", status_code=201)
async def request_consultation(
    body: ConsultationIn, ctx: Context, request: Request, idempotency_key: IdempotencyKey
) -> dict[str, Any]:
    ctx.require_scope("ServiceRequest", "c")
    result = await rpc(
        request.app.state.stubs.teleconsult.RequestConsultation(
            teleconsult_pb2.RequestConsultationRequest(
                consultation=teleconsult_pb2.Consultation(
                    patient=common_pb2.PatientRef(local_id=body.patient_local_id),
                    consultant_organization_id=body.consultant_organization_id,
                    kind=KINDS[body.kind],
                    mode=MODES[body.mode],
                    urgency=URGENCIES[body.urgency],
                    question=body.question,
                    purpose=body.purpose,
                    summary=body.summary,
                    department=body.department,
                    specialty=body.specialty,
                    professional_title=body.professional_title,
                    invited_practitioner_id=body.invited_practitioner_id,
                    any_available=body.any_available,
                    document_ids=body.document_ids,
                    imaging_studies=_studies(body.imaging_studies),
                ),
                idempotency_key=idempotency_key,
            ),
            metadata=ctx.metadata,
        )
    )
    return consultation_json(result.consultation)


@router.get("/consultations")
async def worklist(
    ctx: Context,
    request: Request,
    box: Literal["incoming", "outgoing"],
    # Stated as an enum; an unknown state is refused by name (400 consultation-state).
    state: list[str] = Query(default_factory=list, json_schema_extra=CONSULTATION_STATE_ITEMS),
    practitioner_id: str = Query(default="", max_length=64),
    overdue: bool = False,
    on_call: bool = False,
    page_size: int = Query(default=50, ge=1, le=200),
    page_token: str = Query(default="", max_length=16),
) -> dict[str, Any]:
    """Worklists: outgoing (requester) or incoming (consultant; `practitioner_id`: one specialist's
    assignments; `on_call`: the requests waiting for whoever is on call now for their type)."""
    ctx.require_scope("ServiceRequest", "r")
    result = await rpc(
        request.app.state.stubs.teleconsult.ListConsultations(
            teleconsult_pb2.ListConsultationsRequest(
                box=box,
                states=[state_code(s) for s in state],
                practitioner_id=practitioner_id,
                overdue_only=overdue,
                on_call=on_call,
                page_size=page_size,
                page_token=page_token,
            ),
            metadata=ctx.metadata,
        )
    )
    return {
        "consultations": [consultation_json(c) for c in result.consultations],
        "next_page_token": result.next_page_token,
    }


@router.get("/consultations/{consultation_id}")
async def get_consultation(consultation_id: str, ctx: Context, request: Request) -> dict[str, Any]:
    """A consultation, to its two parties only."""
    ctx.require_scope("ServiceRequest", "r")
    result = await rpc(
        request.app.state.stubs.teleconsult.GetConsultation(
            teleconsult_pb2.GetConsultationRequest(consultation_id=consultation_id[:64]), metadata=ctx.metadata
        )
    )
    return consultation_json(result.consultation)


class OpinionIn(BaseModel):
    model_config = STRICT_BODY

    practitioner_id: str = Field(min_length=1, max_length=64)
    practitioner_name: str = Field(default="", max_length=64)
    opinion: str = Field(min_length=1, max_length=8000)


class ReportIn(BaseModel):
    model_config = STRICT_BODY

    findings: str = Field(default="", max_length=20000)
    impression: str = Field(default="", max_length=8000)
    recommendations: str = Field(default="", max_length=8000)
    opinions: list[OpinionIn] = Field(default_factory=list, max_length=20)
    conclusion: str = Field(default="", max_length=8000)

    def message(self) -> teleconsult_pb2.ReportContent:
        return teleconsult_pb2.ReportContent(
            findings=self.findings,
            impression=self.impression,
            recommendations=self.recommendations,
            opinions=[teleconsult_pb2.Opinion(**o.model_dump()) for o in self.opinions],
            conclusion=self.conclusion,
        )


class MoveIn(BaseModel):
    model_config = STRICT_BODY

    reason: str = Field(default="", max_length=2000)
    decline_code: str = Field(default="", max_length=32)
    assignee_ids: list[str] = Field(default_factory=list, max_length=20)
    slot_ids: list[str] = Field(default_factory=list, max_length=20)
    text: str = Field(default="", max_length=8000)
    document_ids: list[str] = Field(default_factory=list, max_length=50)
    imaging_studies: list[ImagingStudyIn] = Field(default_factory=list, max_length=20)
    informed_consent: InformedConsentIn | None = None
    report: ReportIn | None = None
    # sign / amend: the DiagnosticReport from report-draft and its detached JWS.
    diagnostic_report: dict[str, Any] | None = None
    signature: str = Field(default="", max_length=20000)


class DraftIn(BaseModel):
    model_config = STRICT_BODY

    report: ReportIn
    amend: StrictBool = False


@router.post("/consultations/{consultation_id}/report-draft")
async def report_draft(consultation_id: str, body: DraftIn, ctx: Context, request: Request) -> dict[str, Any]:
    """The DiagnosticReport of the next report version, rendered for the consulting hospital to
    sign (a detached JWS over its canonical form, services/teleconsult/report.py) and send back
    with the sign or amend move. Nothing is stored."""
    ctx.require_scope("ServiceRequest", "u")
    c = (
        await rpc(
            request.app.state.stubs.teleconsult.GetConsultation(
                teleconsult_pb2.GetConsultationRequest(consultation_id=consultation_id[:64]), metadata=ctx.metadata
            )
        )
    ).consultation
    if ctx.caller.organization_id != c.consultant_organization_id:
        raise ApiError(403, "consultation-party", "only the consultant organisation drafts the report")
    resource = report_model.render(
        consultation_id=c.consultation_id,
        version=c.report_version + 1,
        status="amended" if body.amend else "final",
        kind=c.kind,
        patient_domain=c.patient.domain,
        patient_local_id=c.patient.local_id,
        consultant_organization_id=c.consultant_organization_id,
        interpreters=list(c.assignee_ids),
        content=report_model.content_dict(body.report.message()),
        issued=datetime.datetime.now(datetime.UTC).replace(microsecond=0),
        imaging_study_uids=[s.study_instance_uid for s in c.imaging_studies],
    )
    return {"diagnostic_report": resource, "canonical": report_model.canonical(resource).decode()}


@router.get("/consultations/{consultation_id}/report")
async def get_report(consultation_id: str, ctx: Context, request: Request) -> dict[str, Any]:
    """Every version of the report, newest first: the DiagnosticReport, its Provenance (with the
    signature) and the registry entry of the filed consultation record."""
    ctx.require_scope("ServiceRequest", "r")
    result = await rpc(
        request.app.state.stubs.teleconsult.GetReport(
            teleconsult_pb2.GetReportRequest(consultation_id=consultation_id[:64]), metadata=ctx.metadata
        )
    )
    return {"versions": [report_json(r) for r in result.versions], "audit_event_ids": list(result.audit_event_ids)}


def report_json(r: teleconsult_pb2.Report) -> dict[str, Any]:
    resource = json.loads(r.diagnostic_report_json or "{}")
    provenance = None
    if r.signature_jws:
        # The same Provenance as the one filed in the registry with the report.
        provenance = report_model.provenance(
            resource=resource,
            jws=r.signature_jws,
            organization_id=(resource.get("performer") or [{}])[0].get("identifier", {}).get("value", ""),
            practitioner_id=r.signer_practitioner_id,
            signed=to_datetime(r.signed),
            sm2_signature=r.sm2_signature,
        )
    return {
        "version": r.version,
        "status": r.status,
        "findings": r.content.findings,
        "impression": r.content.impression,
        "recommendations": r.content.recommendations,
        "opinions": [
            {"practitioner_id": o.practitioner_id, "practitioner_name": o.practitioner_name, "opinion": o.opinion}
            for o in r.content.opinions
        ],
        "conclusion": r.content.conclusion,
        "diagnostic_report": resource,
        "provenance": provenance,
        "signature": r.signature_jws,
        # RFC 7638 thumbprint (= kid in the published JWKS) of the key that signed it.
        "sm2_signature": r.sm2_signature,
        "signer_key_id": json.loads(r.signer_jwk_json).get("kid", "") if r.signer_jwk_json else "",
        "document_id": r.document_id,
        "sha256": r.sha256,
        "signed": iso(r.signed),
    }


@router.get("/consultations/{consultation_id}/imaging")
async def imaging_links(consultation_id: str, ctx: Context, request: Request) -> dict[str, Any]:
    """The WADO-RS retrieval links of the consultation's imaging studies, each through the
    registry's consent decision for the caller (a consultant after the grant ended gets none)."""
    ctx.require_scope("ServiceRequest", "r")
    c = (
        await rpc(
            request.app.state.stubs.teleconsult.GetConsultation(
                teleconsult_pb2.GetConsultationRequest(consultation_id=consultation_id[:64]), metadata=ctx.metadata
            )
        )
    ).consultation
    ctx.require_scope("DocumentReference", "r")
    links = []
    for study in c.imaging_studies:
        if not study.document_id:
            continue
        entry = (
            await rpc(
                request.app.state.stubs.registry.GetDocumentEntry(
                    registry_pb2.GetDocumentEntryRequest(document_id=study.document_id), metadata=ctx.metadata
                )
            )
        ).entry
        links.append(
            {
                "document_id": entry.document_id,
                "study_instance_uid": entry.imaging_study.study_instance_uid,
                "wado_rs_url": entry.imaging_study.wado_rs_url,
            }
        )
    return {"imaging_studies": links}


@router.get("/consultation-statistics")
async def statistics(
    ctx: Context,
    request: Request,
    since: DateTime | None = None,
    until: DateTime | None = None,
    organization_id: str = Query(default="", max_length=64),
) -> dict[str, Any]:
    """Volume by type and mode, turnaround median / p90, breaches, per organisation and month
    (the authority's auditors: the region or one organisation; a hospital: its own)."""
    r = await rpc(
        request.app.state.stubs.teleconsult.ConsultationStatistics(
            teleconsult_pb2.ConsultationStatisticsRequest(
                since=to_timestamp_or_none(since), until=to_timestamp_or_none(until), organization_id=organization_id
            ),
            metadata=ctx.metadata,
        )
    )
    return {
        "total": r.total,
        "by_kind_mode": {row.key: row.count for row in r.by_kind_mode},
        "by_state": {row.key: row.count for row in r.by_state},
        "reported": r.reported,
        "turnaround_median_hours": r.turnaround_median_hours,
        "turnaround_p90_hours": r.turnaround_p90_hours,
        "breaches": r.breaches,
        "by_organization_month": [
            {
                "organization_id": row.organization_id,
                "month": row.month,
                "requested": row.requested,
                "received": row.received,
                "reported": row.reported,
                "breaches": row.breaches,
                "turnaround_median_hours": row.turnaround_median_hours,
                "turnaround_p90_hours": row.turnaround_p90_hours,
            }
            for row in r.by_organization_month
        ],
    }


class SpecialistIn(BaseModel):
    model_config = STRICT_BODY

    name: str = Field(min_length=1, max_length=64, pattern=VISIBLE)
    role: str = Field(default="doctor", max_length=32)
    department: str = Field(default="", max_length=64)
    specialty: str = Field(default="", max_length=64)
    professional_title: Title = ""
    years_independent_practice: WholeNumber = Field(ge=0, le=70)
    kinds: list[KindName] = Field(default_factory=list, max_length=6)


def specialist_json(s: teleconsult_pb2.Specialist) -> dict[str, Any]:
    return {
        "organization_id": s.organization_id,
        "practitioner_id": s.practitioner_id,
        "name": s.name,
        "role": s.role,
        "department": s.department,
        "specialty": s.specialty,
        "professional_title": s.professional_title,
        "years_independent_practice": s.years_independent_practice,
        "kinds": [_KIND_NAME.get(k, "") for k in s.kinds],
    }


@router.put("/specialists/{practitioner_id}")
async def set_specialist(
    practitioner_id: str, body: SpecialistIn, ctx: Context, request: Request, idempotency_key: IdempotencyKey
) -> dict[str, Any]:
    """The caller's directory entry of one specialist (its administrator)."""
    ctx.require_scope("ServiceRequest", "u")
    r = await rpc(
        request.app.state.stubs.teleconsult.SetSpecialist(
            teleconsult_pb2.SetSpecialistRequest(
                specialist=teleconsult_pb2.Specialist(
                    practitioner_id=practitioner_id[:64],
                    name=body.name,
                    role=body.role,
                    department=body.department,
                    specialty=body.specialty,
                    professional_title=body.professional_title,
                    years_independent_practice=body.years_independent_practice,
                    kinds=[KINDS[k] for k in body.kinds],
                ),
                idempotency_key=idempotency_key,
            ),
            metadata=ctx.metadata,
        )
    )
    return {**specialist_json(r.specialist), "qualified": r.qualified}


@router.get("/organizations/{organization_id}/specialists")
async def list_specialists(
    organization_id: str, ctx: Context, request: Request, kind: KindName | None = None
) -> dict[str, Any]:
    ctx.require_scope("ServiceRequest", "r")
    r = await rpc(
        request.app.state.stubs.teleconsult.ListSpecialists(
            teleconsult_pb2.ListSpecialistsRequest(
                organization_id=organization_id[:64], kind=KINDS[kind] if kind else 0
            ),
            metadata=ctx.metadata,
        )
    )
    return {"specialists": [specialist_json(s) for s in r.specialists]}


class ShiftIn(PeriodIn):
    practitioner_id: str = Field(min_length=1, max_length=64)
    kind: KindName


def shift_json(s: teleconsult_pb2.RosterShift) -> dict[str, Any]:
    return {
        "shift_id": s.shift_id,
        "practitioner_id": s.practitioner_id,
        "kind": _KIND_NAME.get(s.kind, ""),
        "start": iso(s.start),
        "end": iso(s.end),
    }


@router.post("/roster-shifts", status_code=201)
async def add_shift(body: ShiftIn, ctx: Context, request: Request, idempotency_key: IdempotencyKey) -> dict[str, Any]:
    """An on-call shift of the caller's organisation (who reads emergency ECG / stroke imaging now)."""
    ctx.require_scope("ServiceRequest", "u")
    r = await rpc(
        request.app.state.stubs.teleconsult.AddRosterShift(
            teleconsult_pb2.AddRosterShiftRequest(
                shift=teleconsult_pb2.RosterShift(
                    practitioner_id=body.practitioner_id,
                    kind=KINDS[body.kind],
                    start=to_timestamp_or_none(body.start),
                    end=to_timestamp_or_none(body.end),
                ),
                idempotency_key=idempotency_key,
            ),
            metadata=ctx.metadata,
        )
    )
    return shift_json(r.shift)


@router.get("/organizations/{organization_id}/on-call")
async def on_call(organization_id: str, ctx: Context, request: Request, kind: KindName | None = None) -> dict[str, Any]:
    ctx.require_scope("ServiceRequest", "r")
    r = await rpc(
        request.app.state.stubs.teleconsult.ListOnCall(
            teleconsult_pb2.ListOnCallRequest(organization_id=organization_id[:64], kind=KINDS[kind] if kind else 0),
            metadata=ctx.metadata,
        )
    )
    return {"shifts": [shift_json(s) for s in r.shifts]}


class SlotIn(PeriodIn):
    practitioner_id: str = Field(min_length=1, max_length=64)


class SlotsIn(BaseModel):
    model_config = STRICT_BODY

    slots: list[SlotIn] = Field(min_length=1, max_length=500)


def slot_json(s: teleconsult_pb2.Slot) -> dict[str, Any]:
    return {
        "slot_id": s.slot_id,
        "organization_id": s.organization_id,
        "practitioner_id": s.practitioner_id,
        "start": iso(s.start),
        "end": iso(s.end),
        "status": s.status,
        "consultation_id": s.consultation_id,
    }


@router.post("/consultation-slots", status_code=201)
async def publish_slots(
    body: SlotsIn, ctx: Context, request: Request, idempotency_key: IdempotencyKey
) -> dict[str, Any]:
    """Bookable session slots of the caller's specialists."""
    ctx.require_scope("ServiceRequest", "u")
    r = await rpc(
        request.app.state.stubs.teleconsult.PublishSlots(
            teleconsult_pb2.PublishSlotsRequest(
                slots=[
                    teleconsult_pb2.Slot(
                        practitioner_id=s.practitioner_id,
                        start=to_timestamp_or_none(s.start),
                        end=to_timestamp_or_none(s.end),
                    )
                    for s in body.slots
                ],
                idempotency_key=idempotency_key,
            ),
            metadata=ctx.metadata,
        )
    )
    return {"slots": [slot_json(s) for s in r.slots]}


@router.get("/organizations/{organization_id}/consultation-slots")
async def list_slots(
    organization_id: str,
    ctx: Context,
    request: Request,
    practitioner_id: str = Query(default="", max_length=64),
    free: bool = False,
) -> dict[str, Any]:
    ctx.require_scope("ServiceRequest", "r")
    r = await rpc(
        request.app.state.stubs.teleconsult.ListSlots(
            teleconsult_pb2.ListSlotsRequest(
                organization_id=organization_id[:64], practitioner_id=practitioner_id, free_only=free
            ),
            metadata=ctx.metadata,
        )
    )
    return {"slots": [slot_json(s) for s in r.slots]}


@router.get("/organizations/{organization_id}/jwks.json")
async def organization_keys(organization_id: str, request: Request) -> dict[str, Any]:
    """An organisation's registered public keys (public: anyone verifies the signature of a
    consultation report with them)."""
    async with request.app.state.sessions() as session:
        org = await store.organization(session, organization_id[:64])
    if org is None:
        raise ApiError(404, "organization-not-found", "no such organisation")
    return {"keys": org.keys}


# Last: the catch-all move path must not shadow report-draft.
@router.post("/consultations/{consultation_id}/{move}")
async def move_consultation(
    consultation_id: str,
    move: str,
    ctx: Context,
    request: Request,
    idempotency_key: IdempotencyKey,
    body: MoveIn | None = None,
) -> dict[str, Any]:
    """One move of the workflow (services/teleconsult/workflow.py); only the right side may make it."""
    ctx.require_scope("ServiceRequest", "u")
    if move not in MOVES:
        raise ApiError(404, "consultation-move", "unknown consultation move")
    body = body or MoveIn()
    consent = None
    if body.informed_consent is not None:
        ic = body.informed_consent
        consent = teleconsult_pb2.InformedConsent(
            evidence_document_id=ic.evidence_document_id,
            signer=ic.signer,
            guardian_name=ic.guardian_name,
            guardian_relationship=ic.guardian_relationship,
            signed=to_timestamp_or_none(ic.signed),
        )
    result = await rpc(
        request.app.state.stubs.teleconsult.MoveConsultation(
            teleconsult_pb2.MoveConsultationRequest(
                consultation_id=consultation_id[:64],
                move=move,
                reason=body.reason,
                # Idempotency-Key: the first answer to a retry, kept with the move (and the
                # engine's own retry key, so a retried amendment files no second version).
                request_key=idempotency_key,
                idempotency_key=idempotency_key,
                decline_code=body.decline_code,
                assignee_ids=body.assignee_ids,
                slot_ids=body.slot_ids,
                text=body.text,
                document_ids=body.document_ids,
                imaging_studies=_studies(body.imaging_studies),
                informed_consent=consent,
                report=body.report.message() if body.report else None,
                signature_jws=body.signature,
                report_json=json.dumps(body.diagnostic_report, ensure_ascii=False) if body.diagnostic_report else "",
            ),
            metadata=ctx.metadata,
        )
    )
    return {**consultation_json(result.consultation), "audit_event_ids": list(result.audit_event_ids)}
