"""The FHIR R4 facade of remote consultations: the request as ServiceRequest, its workflow as Task
(the Clinical Order Workflows pattern: Task.status / businessStatus follow the moves, on-hold
while more information is requested), the session as Appointment, specialists' Schedule / Slot,
the information thread as Communication, the signed report as DiagnosticReport + Provenance;
imaging material by reference (ImagingStudy identifiers: Study Instance UID, WADO-RS endpoint).
Reads only: moves are made through the REST API (routes/teleconsult.py).

Each resource module registers its CapabilityStatement entries; fhir.py assembles the statement.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from gateway.deps import CallContext, Context
from gateway.errors import ApiError
from gateway.routes import rpc
from gateway.routes.fhir import referral as fhir_referral
from gateway.routes.teleconsult import iso, report_json
from gateway.routes.workflow_contract import FHIR_REFERRAL_STATUS, reference
from hie.teleconsult.v1 import teleconsult_pb2
from services.teleconsult.workflow import state_name

router = APIRouter(prefix="/fhir/R4", tags=["fhir"])
FHIR_JSON = "application/fhir+json"
_ORG = "urn:hie:organization"
# Consultation state → FHIR Task.status (businessStatus carries our finer step).
_TASK_STATUS = {
    "requested": "requested",
    "assigned": "accepted",
    "declined": "rejected",
    "scheduled": "accepted",
    "in_session": "in-progress",
    "in_review": "in-progress",
    "information_requested": "on-hold",
    "report_preliminary": "in-progress",
    "report_final": "completed",
    "closed": "completed",
    "cancelled": "cancelled",
}
_REQUEST_STATUS = {"declined": "revoked", "cancelled": "revoked", "report_final": "completed", "closed": "completed"}
_PRIORITY = {
    teleconsult_pb2.CONSULTATION_URGENCY_ROUTINE: "routine",
    teleconsult_pb2.CONSULTATION_URGENCY_URGENT: "urgent",
    teleconsult_pb2.CONSULTATION_URGENCY_EMERGENCY: "stat",
}
_KIND_DISPLAY = {
    teleconsult_pb2.CONSULTATION_KIND_IMAGING: ("imaging", "远程影像诊断"),
    teleconsult_pb2.CONSULTATION_KIND_ECG: ("ecg", "远程心电诊断"),
    teleconsult_pb2.CONSULTATION_KIND_PATHOLOGY: ("pathology", "远程病理诊断"),
    teleconsult_pb2.CONSULTATION_KIND_ULTRASOUND: ("ultrasound", "远程超声诊断"),
    teleconsult_pb2.CONSULTATION_KIND_SPECIALIST: ("specialist", "远程专科会诊"),
    teleconsult_pb2.CONSULTATION_KIND_MULTIDISCIPLINARY: ("multidisciplinary", "多学科远程会诊"),
}


def _read(name: str, doc: str, search: list[dict[str, str]] | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "type": name,
        "profile": f"http://hl7.org/fhir/StructureDefinition/{name}",
        "documentation": doc,
        "interaction": [{"code": "read"}] + ([{"code": "search-type"}] if search else []),
    }
    if search:
        entry["searchParam"] = search
    return entry


CAPABILITY_RESOURCES: list[dict[str, Any]] = [
    _read(
        "ServiceRequest",
        "A remote consultation request (远程会诊申请), to its two parties (scope system/ServiceRequest.r). "
        "Imaging material as supportingInfo identifiers (Study Instance UID) with the WADO-RS endpoint; "
        "attached documents as DocumentReference references. Created and moved through /api/v1/consultations.",
    ),
    _read(
        "Task",
        "The consultation's workflow (Clinical Order Workflows): status and businessStatus follow the moves "
        "(on-hold while more information is requested), owner the consultant organisation, restriction.period.end "
        "the turnaround deadline, output the DiagnosticReport. Search is a worklist.",
        [
            {"name": "owner", "type": "reference", "documentation": "Organization/<caller>: incoming"},
            {"name": "requester", "type": "reference", "documentation": "Organization/<caller>: outgoing"},
            {"name": "status", "type": "token", "documentation": "Task.status"},
        ],
    ),
    _read("Appointment", "An interactive consultation's session: participants, period and the join link."),
    _read(
        "Slot",
        "Bookable session slots of an organisation's specialists.",
        [
            {"name": "schedule", "type": "reference", "documentation": "Schedule/<organisation>.<practitioner>"},
            {"name": "status", "type": "token", "documentation": "free or busy"},
        ],
    ),
    _read(
        "Schedule",
        "One specialist's consultation schedule (id <organisation>.<practitioner>).",
        [{"name": "actor", "type": "reference", "documentation": "Organization/<id>: its specialists' schedules"}],
    ),
    _read(
        "Communication",
        "The more-information thread of a consultation.",
        [{"name": "based-on", "type": "reference", "documentation": "ServiceRequest/<consultation id>"}],
    ),
    _read(
        "DiagnosticReport",
        "The consultation report, every version (id <consultation>-v<n>); a signed version comes with its "
        "Provenance (search mode include) whose signature is the consulting hospital's detached JWS over the "
        "canonical report, verifiable with GET /api/v1/organizations/{id}/jwks.json.",
        [{"name": "based-on", "type": "reference", "documentation": "ServiceRequest/<consultation id>"}],
    ),
    _read("Provenance", "The signature of a report version (id <consultation>-v<n>-provenance)."),
]


def _fhir(body: dict[str, Any]) -> JSONResponse:
    return JSONResponse(body, media_type=FHIR_JSON)


def _org(org_id: str) -> dict[str, Any]:
    return {"identifier": {"system": _ORG, "value": org_id}}


def _bundle(resources: list[tuple[dict[str, Any], str]]) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": sum(1 for _, mode in resources if mode == "match"),
        "entry": [
            {"fullUrl": f"{r['resourceType']}/{r['id']}", "resource": r, "search": {"mode": mode}}
            for r, mode in resources
        ],
    }


async def _consultation(request: Request, ctx: CallContext, consultation_id: str) -> teleconsult_pb2.Consultation:
    ctx.require_scope("ServiceRequest", "r")
    return (
        await rpc(
            request.app.state.stubs.teleconsult.GetConsultation(
                teleconsult_pb2.GetConsultationRequest(consultation_id=consultation_id[:64]), metadata=ctx.metadata
            )
        )
    ).consultation


def _reference_id(value: str, resource_type: str) -> str:
    prefix = f"{resource_type}/"
    if not value.startswith(prefix) or len(value) > len(prefix) + 128:
        raise ApiError(400, "search-invalid", f"expected a {resource_type}/<id> reference")
    return value[len(prefix) :]


def service_request(c: teleconsult_pb2.Consultation) -> dict[str, Any]:
    code, display = _KIND_DISPLAY.get(c.kind, ("specialist", "远程会诊"))
    state = state_name(c.state)
    resource: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "id": c.consultation_id,
        "status": _REQUEST_STATUS.get(state, "active"),
        "intent": "order",
        "category": [{"coding": [{"system": "urn:hie:consultation-kind", "code": code, "display": display}]}],
        "priority": _PRIORITY.get(c.urgency, "routine"),
        "code": {"text": display},
        "subject": {"identifier": {"system": f"urn:hie:patient:{c.patient.domain}", "value": c.patient.local_id}},
        "authoredOn": iso(c.created),
        "requester": _org(c.requester_organization_id),
        "performer": [_org(c.consultant_organization_id)],
        "reasonCode": [{"text": c.question}],
        "note": [{"text": t} for t in (c.purpose, c.summary) if t],
        "supportingInfo": [{"reference": f"DocumentReference/{d}"} for d in c.document_ids]
        + [
            {
                "type": "ImagingStudy",
                "identifier": {"system": "urn:dicom:uid", "value": f"urn:oid:{s.study_instance_uid}"},
                "display": s.wado_rs_url,
            }
            for s in c.imaging_studies
        ],
    }
    if c.HasField("informed_consent"):
        resource["supportingInfo"].append(
            {"reference": f"DocumentReference/{c.informed_consent.evidence_document_id}", "display": "知情同意书"}
        )
    if c.department or c.specialty:
        resource["performerType"] = {
            "text": " / ".join(p for p in (c.department, c.specialty, c.professional_title) if p)
        }
    return resource


def task(c: teleconsult_pb2.Consultation) -> dict[str, Any]:
    state = state_name(c.state)
    resource: dict[str, Any] = {
        "resourceType": "Task",
        "id": c.consultation_id,
        "basedOn": [{"reference": f"ServiceRequest/{c.consultation_id}"}],
        "status": _TASK_STATUS.get(state, "requested"),
        "businessStatus": {"coding": [{"system": "urn:hie:consultation-status", "code": c.business_status}]},
        "intent": "order",
        "priority": _PRIORITY.get(c.urgency, "routine"),
        "focus": {"reference": f"ServiceRequest/{c.consultation_id}"},
        "for": {"identifier": {"system": f"urn:hie:patient:{c.patient.domain}", "value": c.patient.local_id}},
        "authoredOn": iso(c.created),
        "requester": _org(c.requester_organization_id),
        "owner": _org(c.consultant_organization_id),
    }
    if state == "declined" and c.decline_code:
        resource["statusReason"] = {"coding": [{"system": "urn:hie:consultation-decline", "code": c.decline_code}]}
    due = [k for k in c.clocks if not k.stopped]
    if due:
        resource["restriction"] = {"period": {"end": iso(due[0].due)}}
    if c.report_version:
        resource["output"] = [
            {
                "type": {"text": "report"},
                "valueReference": {"reference": f"DiagnosticReport/{c.consultation_id}-v{c.report_version}"},
            }
        ]
    return resource


# Referrals and consultations share the ServiceRequest / Task / Appointment / Communication / Slot
# endpoints (both are ServiceRequests with a Task): this router is mounted first and answers for a
# consultation, handing anything else to the referral routes (a referral id, a referral search).


async def _consultation_or_none(
    request: Request, ctx: CallContext, consultation_id: str
) -> teleconsult_pb2.Consultation | None:
    try:
        return await _consultation(request, ctx, consultation_id)
    except ApiError as error:
        if error.status == 404 and error.reason == "consultation-not-found":
            return None
        raise


@router.get("/ServiceRequest/{consultation_id}")
async def read_service_request(consultation_id: str, ctx: Context, request: Request) -> JSONResponse:
    c = await _consultation_or_none(request, ctx, consultation_id)
    if c is None:
        return await fhir_referral.read_service_request(consultation_id, ctx, request)
    return _fhir(service_request(c))


@router.get("/Task/{task_id}")
async def read_task(task_id: str, ctx: Context, request: Request) -> JSONResponse:
    """A consultation's or a referral's coordination Task (its id is theirs)."""
    c = await _consultation_or_none(request, ctx, task_id)
    if c is None:
        return await fhir_referral.read_task(task_id, ctx, request)
    return _fhir(task(c))


@router.get("/Task")
async def search_task(
    ctx: Context,
    request: Request,
    owner: str = Query(default="", max_length=140, pattern=reference("Organization", optional=True)),
    requester: str = Query(default="", max_length=140, pattern=reference("Organization", optional=True)),
    status: str = Query(default="", max_length=32, pattern=FHIR_REFERRAL_STATUS),
    box: str = Query(default="incoming", alias="_box", pattern="^(incoming|outgoing)$"),
) -> JSONResponse:
    """A worklist: owner=Organization/<caller> (incoming) or requester=Organization/<caller> (outgoing).
    Without either, the referral worklist (`_box`)."""
    ctx.require_scope("ServiceRequest", "r")
    if not owner and not requester:
        return await fhir_referral.search_tasks(ctx, request, _box=box, status=status)
    if bool(owner) == bool(requester):
        raise ApiError(400, "search-invalid", "search Task by owner or by requester (the caller's organisation)")
    org = _reference_id(owner or requester, "Organization")
    if org != ctx.caller.organization_id:
        raise ApiError(403, "search-scope", "a worklist is the caller's own organisation's")
    result = await rpc(
        request.app.state.stubs.teleconsult.ListConsultations(
            teleconsult_pb2.ListConsultationsRequest(box="incoming" if owner else "outgoing", page_size=200),
            metadata=ctx.metadata,
        )
    )
    tasks = [task(c) for c in result.consultations]
    if status:
        tasks = [t for t in tasks if t["status"] == status]
    return _fhir(_bundle([(t, "match") for t in tasks]))


@router.get("/Appointment/{consultation_id}")
async def read_appointment(consultation_id: str, ctx: Context, request: Request) -> JSONResponse:
    c = await _consultation_or_none(request, ctx, consultation_id)
    if c is None:
        return await fhir_referral.read_appointment(consultation_id, ctx, request)
    if not c.HasField("appointment"):
        raise ApiError(404, "appointment-not-found", "no session is scheduled for this consultation")
    state = state_name(c.state)
    status = {"cancelled": "cancelled", "in_session": "arrived"}.get(state, "booked")
    return _fhir(
        {
            "resourceType": "Appointment",
            "id": c.consultation_id,
            "status": status,
            "basedOn": [{"reference": f"ServiceRequest/{c.consultation_id}"}],
            "start": iso(c.appointment.start),
            "end": iso(c.appointment.end),
            "slot": [{"reference": f"Slot/{s}"} for s in c.appointment.slot_ids],
            "participant": [
                {
                    "actor": {
                        "identifier": {"system": f"urn:hie:practitioner:{c.consultant_organization_id}", "value": p}
                    },
                    "status": "accepted",
                }
                for p in c.assignee_ids
            ]
            + [{"actor": _org(c.requester_organization_id), "status": "accepted"}],
            "extension": [{"url": "urn:hie:consultation:join-url", "valueUrl": c.appointment.join_url}],
        }
    )


def _slot(s: teleconsult_pb2.Slot) -> dict[str, Any]:
    return {
        "resourceType": "Slot",
        "id": s.slot_id,
        "schedule": {"reference": f"Schedule/{s.organization_id}.{s.practitioner_id}"},
        "status": s.status,
        "start": iso(s.start),
        "end": iso(s.end),
    }


@router.get("/Slot")
async def search_slot(
    ctx: Context,
    request: Request,
    schedule: str = Query(default="", max_length=200, pattern=reference("Schedule", optional=True)),
    organization: str = Query(default="", max_length=64),
    status: str = Query(default="", pattern="^(free|busy)?$"),
) -> JSONResponse:
    """A specialist's consultation slots by `schedule`; without it, a referral target's (`organization`)."""
    ctx.require_scope("ServiceRequest", "r")
    if not schedule:
        if not organization:
            raise ApiError(400, "search-invalid", "search Slot by schedule or by organization")
        return await fhir_referral.search_slots(ctx, request, organization=organization, status=status)
    org, _, practitioner = _reference_id(schedule, "Schedule").partition(".")
    result = await rpc(
        request.app.state.stubs.teleconsult.ListSlots(
            teleconsult_pb2.ListSlotsRequest(
                organization_id=org, practitioner_id=practitioner, free_only=status == "free"
            ),
            metadata=ctx.metadata,
        )
    )
    slots = [_slot(s) for s in result.slots if not status or s.status == status]
    return _fhir(_bundle([(s, "match") for s in slots]))


@router.get("/Schedule")
async def search_schedule(
    ctx: Context, request: Request, actor: str = Query(min_length=1, max_length=140, pattern=reference("Organization"))
) -> JSONResponse:
    ctx.require_scope("ServiceRequest", "r")
    org = _reference_id(actor, "Organization")
    result = await rpc(
        request.app.state.stubs.teleconsult.ListSpecialists(
            teleconsult_pb2.ListSpecialistsRequest(organization_id=org), metadata=ctx.metadata
        )
    )
    schedules = [
        {
            "resourceType": "Schedule",
            "id": f"{s.organization_id}.{s.practitioner_id}",
            "active": s.active,
            "serviceType": [{"text": _KIND_DISPLAY.get(k, ("", ""))[1]} for k in s.kinds],
            "specialty": [{"text": s.specialty}] if s.specialty else [],
            "actor": [
                {"identifier": {"system": f"urn:hie:practitioner:{s.organization_id}", "value": s.practitioner_id}},
                _org(s.organization_id),
            ],
        }
        for s in result.specialists
    ]
    return _fhir(_bundle([(s, "match") for s in schedules]))


@router.get("/Communication")
async def search_communication(
    ctx: Context,
    request: Request,
    based_on: str = Query(alias="based-on", min_length=1, max_length=200, pattern=reference("ServiceRequest")),
) -> JSONResponse:
    c = await _consultation_or_none(request, ctx, _reference_id(based_on, "ServiceRequest"))
    if c is None:
        return await fhir_referral.search_communications(ctx, request, based_on=based_on[:90])
    communications = [
        {
            "resourceType": "Communication",
            "id": m.message_id,
            "basedOn": [{"reference": f"ServiceRequest/{c.consultation_id}"}],
            "partOf": [{"reference": f"Task/{c.consultation_id}"}],
            "status": "completed",
            "category": [{"coding": [{"system": "urn:hie:consultation-message", "code": m.move}]}],
            "sent": iso(m.sent),
            "sender": _org(m.organization_id),
            "recipient": [
                _org(
                    c.requester_organization_id
                    if m.organization_id == c.consultant_organization_id
                    else c.consultant_organization_id
                )
            ],
            "payload": [{"contentString": m.text}]
            + [{"contentReference": {"reference": f"DocumentReference/{d}"}} for d in m.document_ids],
        }
        for m in c.messages
    ]
    return _fhir(_bundle([(x, "match") for x in communications]))


async def _reports(request: Request, ctx: CallContext, consultation_id: str) -> list[dict[str, Any]]:
    ctx.require_scope("ServiceRequest", "r")
    result = await rpc(
        request.app.state.stubs.teleconsult.GetReport(
            teleconsult_pb2.GetReportRequest(consultation_id=consultation_id[:64]), metadata=ctx.metadata
        )
    )
    return [report_json(r) for r in result.versions]


@router.get("/DiagnosticReport")
async def search_diagnostic_report(
    ctx: Context,
    request: Request,
    based_on: str = Query(alias="based-on", min_length=1, max_length=200, pattern=reference("ServiceRequest")),
) -> JSONResponse:
    versions = await _reports(request, ctx, _reference_id(based_on, "ServiceRequest"))
    entries: list[tuple[dict[str, Any], str]] = []
    for v in versions:
        entries.append((v["diagnostic_report"], "match"))
        if v["provenance"]:
            entries.append((v["provenance"], "include"))
    return _fhir(_bundle(entries))


def _split_version(report_id: str) -> tuple[str, int]:
    consultation_id, _, version = report_id.rpartition("-v")
    if not consultation_id or not version.isdigit():
        raise ApiError(404, "report-not-found", "no such report")
    return consultation_id, int(version)


@router.get("/DiagnosticReport/{report_id}")
async def read_diagnostic_report(report_id: str, ctx: Context, request: Request) -> JSONResponse:
    consultation_id, version = _split_version(report_id[:80])
    for v in await _reports(request, ctx, consultation_id):
        if v["version"] == version:
            return _fhir(v["diagnostic_report"])
    raise ApiError(404, "report-not-found", "no such report")


@router.get("/Provenance/{provenance_id}")
async def read_provenance(provenance_id: str, ctx: Context, request: Request) -> JSONResponse:
    consultation_id, version = _split_version(provenance_id[:100].removesuffix("-provenance"))
    for v in await _reports(request, ctx, consultation_id):
        if v["version"] == version and v["provenance"]:
            return _fhir(v["provenance"])
    raise ApiError(404, "report-not-found", "no such provenance")
