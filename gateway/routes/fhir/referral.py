"""FHIR R4 facade of the referral workflow, as a 360X-over-FHIR client uses it (HL7 FHIR
Clinical Order Workflows: the ServiceRequest is the authorisation, a coordination Task the work).

- `ServiceRequest` (create, read, search): the referral. `subject` the patient's local id in the
  referring organisation's domain (`urn:hie:patient-id:<domain>`); `performer` the target
  organisation (`urn:hie:organization`); `reasonCode` the ICD-10 diagnosis
  (`http://hl7.org/fhir/sid/icd-10`); `priority` routine / urgent / stat (= emergency);
  `category` the requested service (`urn:hie:referral-service`); `supportingInfo` the attached
  DocumentReferences; `note` the reason. Its id is the referral id.
- `Task` (read, search, update): the coordination task, id = the referral id, `focus` the
  ServiceRequest. `status` FHIR Task status, `businessStatus` HL7 BSeR TaskBusinessStatusCS (the
  exchange's own codes where BSeR has none), `statusReason` the coded rejection reason,
  `output` the outcome DocumentReference. A move is made by updating the Task (PUT) with the new
  status / businessStatus; `meta.versionId` (or If-Match) makes the update conditional; inputs:
  `slot` (Slot reference), `bed-department` (string); `output` `outcome` (DocumentReference).
- `Appointment` (read): a scheduled referral's appointment (id = the referral id).
- `Slot` (search): a receiving organisation's published slots.
- `CarePlan` (read): a down-referral's care plan (id = the referral id), follow-ups as activities.
- `Communication` (search by `based-on`): the interim notes.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from gateway.deps import Context, IdempotencyKey
from gateway.errors import ApiError
from gateway.routes import rpc
from gateway.routes.fhir.patient.resource import (
    own_local_id_of_identifier,
    own_local_id_of_patient,
    patient_id_of_reference,
)
from gateway.routes.referrals import SERVICES, URGENCIES, directory_metadata, state_code, state_name
from gateway.routes.workflow_contract import FHIR_REFERRAL_STATUS, fhir_body, iso
from hie.common.v1 import common_pb2
from hie.referral.v1 import referral_pb2

router = APIRouter(prefix="/fhir/R4", tags=["fhir"])
FHIR_JSON = "application/fhir+json"
ICD10_SYSTEM = "http://hl7.org/fhir/sid/icd-10"
BSER_SYSTEM = "http://hl7.org/fhir/us/bser/CodeSystem/TaskBusinessStatusCS"
LOCAL_STATUS_SYSTEM = "urn:hie:referral-business-status"
REJECTION_SYSTEM = "urn:hie:referral-rejection-reason"
SERVICE_SYSTEM = "urn:hie:referral-service"
ORG_SYSTEM = "urn:hie:organization"
PATIENT_SYSTEM_PREFIX = "urn:hie:patient-id:"
_PRIORITY = {"routine": "routine", "urgent": "urgent", "emergency": "stat"}
_URGENCY_OF_PRIORITY = {"routine": "routine", "urgent": "urgent", "asap": "urgent", "stat": "emergency"}
_BSER_CODES = {"2.0", "3.0", "4.0", "5.2", "5.1.1", "5.1.2", "6.0", "7.0"}
# FHIR Task.status of each referral state.
_TASK_STATUS = {
    "requested": "requested",
    "received": "received",
    "on_hold": "on-hold",
    "accepted": "accepted",
    "rejected": "rejected",
    "scheduled": "accepted",
    "cancel_requested": "accepted",
    "arrived": "in-progress",
    "in_progress": "in-progress",
    "no_show": "on-hold",
    "completed": "completed",
    "closed": "completed",
    "cancelled": "cancelled",
}
_REQUEST_STATUS = {"completed": "completed", "closed": "completed", "rejected": "revoked", "cancelled": "revoked"}
# The move an updated Task asks for: by its new businessStatus, else by its new status.
_MOVE_BY_BUSINESS = {
    "received": "receive",
    "on-hold": "hold",
    "3.0": "accept",
    "4.0": "reject",
    "5.1.1": "schedule",
    "arrived": "arrive",
    "in-progress": "start",
    "5.1.2": "no-show",
    "7.0": "complete",
    "loop-closed": "acknowledge",
    "5.2": "cancel",
    "6.0": "cancel",
}
_MOVE_BY_STATUS = {
    "received": "receive",
    "on-hold": "hold",
    "accepted": "accept",
    "rejected": "reject",
    "in-progress": "arrive",
    "completed": "complete",
    "cancelled": "cancel",
}

CAPABILITY_RESOURCES: list[dict[str, Any]] = [
    {
        "type": "ServiceRequest",
        "profile": "http://hl7.org/fhir/StructureDefinition/ServiceRequest",
        "documentation": "A referral (双向转诊). Create (system/ServiceRequest.c) for a patient of the caller's "
        "domain; performer the target organisation (urn:hie:organization); reasonCode ICD-10; priority "
        "routine | urgent | stat; the direction follows from the organisations' tiers. Read and search by the "
        "two parties (system/ServiceRequest.r). Moves are Task updates.",
        "interaction": [{"code": "create"}, {"code": "read"}, {"code": "search-type"}],
        "searchParam": [
            {"name": "_box", "type": "token", "documentation": "incoming or outgoing (default outgoing)"},
            {"name": "status", "type": "token", "documentation": "a referral state, e.g. requested"},
        ],
    },
    {
        "type": "Task",
        "profile": "http://hl7.org/fhir/StructureDefinition/Task",
        "documentation": "The referral's coordination Task (id = the ServiceRequest's). status + businessStatus "
        "(HL7 BSeR TaskBusinessStatusCS, else urn:hie:referral-business-status), statusReason (coded "
        "rejection), output (outcome DocumentReference). Update (PUT, system/ServiceRequest.u) with a new "
        "businessStatus or status makes the move; meta.versionId / If-Match makes it conditional.",
        "interaction": [{"code": "read"}, {"code": "update"}, {"code": "search-type"}],
        "searchParam": [
            {"name": "_box", "type": "token", "documentation": "incoming (owner) or outgoing (requester)"},
            {"name": "status", "type": "token", "documentation": "a referral state"},
        ],
    },
    {
        "type": "Appointment",
        "profile": "http://hl7.org/fhir/StructureDefinition/Appointment",
        "documentation": "A scheduled referral's appointment (id = the referral id).",
        "interaction": [{"code": "read"}],
    },
    {
        "type": "Slot",
        "profile": "http://hl7.org/fhir/StructureDefinition/Slot",
        "documentation": "Bookable slots a receiving organisation publishes (REST /api/v1/referral-slots).",
        "interaction": [{"code": "search-type"}],
        "searchParam": [
            {"name": "organization", "type": "token", "documentation": "the organisation id"},
            {"name": "status", "type": "token", "documentation": "free or busy"},
        ],
    },
    {
        "type": "CarePlan",
        "profile": "http://hl7.org/fhir/StructureDefinition/CarePlan",
        "documentation": "A down-referral's care plan for the community (id = the referral id).",
        "interaction": [{"code": "read"}],
    },
    {
        "type": "Communication",
        "profile": "http://hl7.org/fhir/StructureDefinition/Communication",
        "documentation": "Interim notes of a referral (search by based-on=ServiceRequest/<id>).",
        "interaction": [{"code": "search-type"}],
        "searchParam": [{"name": "based-on", "type": "reference", "documentation": "ServiceRequest/<id>"}],
    },
]


def _fhir(body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, media_type=FHIR_JSON, headers=headers)


def _bad(message: str, reason: str = "referral-invalid") -> ApiError:
    return ApiError(400, reason, message)


def _org(org_id: str) -> dict[str, Any]:
    return {"identifier": {"system": ORG_SYSTEM, "value": org_id}}


def _business(code: str) -> dict[str, Any]:
    system = BSER_SYSTEM if code in _BSER_CODES else LOCAL_STATUS_SYSTEM
    return {"coding": [{"system": system, "code": code}], "text": code}


def service_request(r: referral_pb2.Referral) -> dict[str, Any]:
    state = state_name(r.state)
    urgency = referral_pb2.ReferralUrgency.Name(r.urgency).removeprefix("REFERRAL_URGENCY_").lower()
    service = referral_pb2.ReferralService.Name(r.service).removeprefix("REFERRAL_SERVICE_").lower()
    resource: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "id": r.referral_id,
        "meta": {"versionId": str(r.version)},
        "identifier": [{"system": "urn:hie:referral-number", "value": r.referral_number}],
        "status": _REQUEST_STATUS.get(state, "active"),
        "intent": "order",
        "priority": _PRIORITY.get(urgency, "routine"),
        "category": [{"coding": [{"system": SERVICE_SYSTEM, "code": service}]}] if r.service else [],
        "code": {"text": "referral"},
        "subject": {
            "identifier": {"system": f"{PATIENT_SYSTEM_PREFIX}{r.patient.domain}", "value": r.patient.local_id}
        },
        "authoredOn": iso(r.created),
        "requester": _org(r.requester_organization_id),
        "performer": [
            _org(o) for o in ([r.target_organization_id] if r.target_organization_id else r.candidate_organization_ids)
        ],
        "supportingInfo": [{"reference": f"DocumentReference/{d}"} for d in r.document_ids],
    }
    if r.diagnosis.code:
        concept: dict[str, Any] = {"coding": [{"system": ICD10_SYSTEM, "code": r.diagnosis.code}]}
        if r.diagnosis.text:
            concept["text"] = r.diagnosis.text
        resource["reasonCode"] = [concept]
    if r.reason:
        resource["note"] = [{"text": r.reason}]
    return {k: v for k, v in resource.items() if v not in (None, [], "")}


def task(r: referral_pb2.Referral) -> dict[str, Any]:
    state = state_name(r.state)
    resource: dict[str, Any] = {
        "resourceType": "Task",
        "id": r.referral_id,
        "meta": {"versionId": str(r.version)},
        "status": _TASK_STATUS.get(state, "requested"),
        "businessStatus": _business(r.business_status),
        "intent": "order",
        "focus": {"reference": f"ServiceRequest/{r.referral_id}"},
        "for": {"identifier": {"system": f"{PATIENT_SYSTEM_PREFIX}{r.patient.domain}", "value": r.patient.local_id}},
        "authoredOn": iso(r.created),
        "requester": _org(r.requester_organization_id),
        "owner": _org(r.target_organization_id) if r.target_organization_id else None,
    }
    if r.history:
        resource["lastModified"] = iso(r.history[-1].changed)
    if r.rejection_code:
        resource["statusReason"] = {
            "coding": [{"system": REJECTION_SYSTEM, "code": r.rejection_code}],
            "text": r.advice or None,
        }
    if r.outcome_document_id:
        resource["output"] = [
            {
                "type": {"coding": [{"system": "urn:hie:referral-output", "code": "outcome"}]},
                "valueReference": {"reference": f"DocumentReference/{r.outcome_document_id}"},
            }
        ]
    return {k: v for k, v in resource.items() if v not in (None, [], "")}


def appointment(r: referral_pb2.Referral) -> dict[str, Any]:
    state = state_name(r.state)
    status = {
        "scheduled": "booked",
        "cancel_requested": "booked",
        "arrived": "arrived",
        "in_progress": "arrived",
        "completed": "fulfilled",
        "closed": "fulfilled",
        "no_show": "noshow",
        "cancelled": "cancelled",
    }.get(state, "proposed")
    resource = {
        "resourceType": "Appointment",
        "id": r.referral_id,
        "status": status,
        "basedOn": [{"reference": f"ServiceRequest/{r.referral_id}"}],
        "slot": [{"reference": f"Slot/{r.slot_id}"}],
        "start": iso(r.appointment_start),
        "participant": [{"actor": {"display": r.target_organization_id}, "status": "accepted"}],
    }
    return {k: v for k, v in resource.items() if v is not None}


def _slot(s: referral_pb2.Slot) -> dict[str, Any]:
    return {
        "resourceType": "Slot",
        "id": s.slot_id,
        "schedule": {"identifier": {"system": f"urn:hie:schedule:{s.organization_id}", "value": s.department}},
        "status": s.status,
        "start": iso(s.start),
        "end": iso(s.end),
    }


def care_plan(r: referral_pb2.Referral) -> dict[str, Any]:
    plan = r.care_plan
    description = "；".join(x for x in (plan.medication, plan.warning_signs) if x)
    return {
        "resourceType": "CarePlan",
        "id": r.referral_id,
        "status": "completed" if state_name(r.state) in ("completed", "closed") else "active",
        "intent": "plan",
        "basedOn": [{"reference": f"ServiceRequest/{r.referral_id}"}],
        "subject": {
            "identifier": {"system": f"{PATIENT_SYSTEM_PREFIX}{r.patient.domain}", "value": r.patient.local_id}
        },
        "description": description or None,
        "note": [{"text": f"用药: {plan.medication}"}] if plan.medication else None,
        "activity": [
            {
                "detail": {
                    "status": "completed" if f.HasField("done") else "scheduled",
                    "description": f.description,
                    "scheduledString": iso(f.due) or "",
                }
            }
            for f in plan.follow_ups
        ],
    }


async def _get(request: Request, ctx: Context, referral_id: str) -> referral_pb2.Referral:
    ctx.require_scope("ServiceRequest", "r")
    result = await rpc(
        request.app.state.stubs.referral.GetReferral(
            referral_pb2.GetReferralRequest(referral_id=referral_id[:64]), metadata=ctx.metadata
        )
    )
    return result.referral


def _bundle(request: Request, resources: list[dict[str, Any]]) -> dict[str, Any]:
    base = request.app.state.settings.public_url
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": len(resources),
        "link": [{"relation": "self", "url": f"{base}{request.url.path}?{request.url.query}"}],
        "entry": [
            {"fullUrl": f"{base}/fhir/R4/{r['resourceType']}/{r['id']}", "resource": r, "search": {"mode": "match"}}
            for r in resources
        ],
    }


async def _local_id(ctx: Context, request: Request, subject: Any) -> str:
    """The caller's local id of ServiceRequest.subject, by the facade's one rule: `Patient/<id>` is
    the id the exchange gives the caller's own record, a local id goes in the identifier
    `urn:hie:patient-id:<own organisation>|<local id>`."""
    if isinstance(subject, dict):
        reference = subject.get("reference")
        if isinstance(reference, str) and reference:
            patient_id = patient_id_of_reference(reference, request.app.state.settings.public_url)
            return await own_local_id_of_patient(ctx, request, patient_id)
        identifier = subject.get("identifier")
        if isinstance(identifier, dict) and isinstance(identifier.get("value"), str) and identifier["value"]:
            return own_local_id_of_identifier(
                ctx, str(identifier.get("system", "")), identifier["value"], "ServiceRequest.subject.identifier"
            )
    raise _bad("ServiceRequest.subject needs Patient/<id> or the urn:hie:patient-id identifier")


def _organization(reference: Any) -> str:
    if isinstance(reference, dict):
        identifier = reference.get("identifier")
        if isinstance(identifier, dict) and identifier.get("value"):
            return str(identifier["value"])[:64]
        ref = str(reference.get("reference", ""))
        if ref.startswith("Organization/"):
            return ref.removeprefix("Organization/")[:64]
    raise _bad("ServiceRequest.performer needs an Organization reference or identifier")


async def _json(request: Request, resource_type: str) -> dict[str, Any]:
    try:
        resource = await request.json()
    except ValueError:
        raise _bad("the body is not JSON") from None
    if not isinstance(resource, dict) or resource.get("resourceType") != resource_type:
        raise _bad(f"the body must be a {resource_type} resource")
    return resource


@router.post("/ServiceRequest", status_code=201, response_class=JSONResponse, openapi_extra=fhir_body("ServiceRequest"))
async def create_service_request(request: Request, idempotency_key: IdempotencyKey, ctx: Context) -> JSONResponse:
    """FHIR create: a referral from a ServiceRequest (its coordination Task has the same id)."""
    ctx.require_scope("ServiceRequest", "c")
    resource = await _json(request, "ServiceRequest")
    performers = resource.get("performer") or []
    if not isinstance(performers, list) or not performers:
        raise _bad("ServiceRequest.performer (the target organisation) is required")
    targets = [_organization(p) for p in performers]
    reasons = resource.get("reasonCode") or []
    code = text = ""
    for concept in reasons if isinstance(reasons, list) else []:
        for coding in (concept or {}).get("coding") or []:
            if isinstance(coding, dict) and coding.get("system") == ICD10_SYSTEM:
                code, text = (
                    str(coding.get("code", ""))[:16],
                    str(concept.get("text") or coding.get("display") or "")[:200],
                )
    if reasons and not code:
        raise _bad(
            "ServiceRequest.reasonCode needs an ICD-10 coding (http://hl7.org/fhir/sid/icd-10)", "referral-diagnosis"
        )
    priority = str(resource.get("priority", "routine"))
    if priority not in _URGENCY_OF_PRIORITY:
        raise _bad("ServiceRequest.priority is routine, urgent, asap or stat")
    service = "outpatient"
    for category in resource.get("category") or []:
        for coding in (category or {}).get("coding") or []:
            if isinstance(coding, dict) and coding.get("system") == SERVICE_SYSTEM:
                service = str(coding.get("code", ""))
    if service not in SERVICES:
        raise _bad(f"ServiceRequest.category ({SERVICE_SYSTEM}) is one of {', '.join(SERVICES)}")
    notes = [str(n.get("text", "")) for n in resource.get("note") or [] if isinstance(n, dict)]
    documents = [
        str(s.get("reference", "")).removeprefix("DocumentReference/")[:64]
        for s in resource.get("supportingInfo") or []
        if isinstance(s, dict) and str(s.get("reference", "")).startswith("DocumentReference/")
    ]
    local_id = await _local_id(ctx, request, resource.get("subject"))
    result = await rpc(
        request.app.state.stubs.referral.CreateReferral(
            referral_pb2.CreateReferralRequest(
                referral=referral_pb2.Referral(
                    patient=common_pb2.PatientRef(local_id=local_id),
                    target_organization_id=targets[0] if len(targets) == 1 else "",
                    candidate_organization_ids=targets if len(targets) > 1 else [],
                    reason="\n".join(notes)[:2000],
                    diagnosis=referral_pb2.Diagnosis(code=code, text=text) if code else None,
                    urgency=URGENCIES[_URGENCY_OF_PRIORITY[priority]],
                    service=SERVICES[service],
                    document_ids=documents,
                ),
                idempotency_key=idempotency_key,
            ),
            metadata=await directory_metadata(ctx, request, targets),
        )
    )
    base = request.app.state.settings.public_url
    r = result.referral
    return _fhir(
        service_request(r), 201, {"Location": f"{base}/fhir/R4/ServiceRequest/{r.referral_id}/_history/{r.version}"}
    )


# Reads of one resource, the Task search and the Communication / Slot searches are served by the
# consultation routes (fhir_teleconsult.py: mounted first, they hand a referral over to these).
async def read_service_request(referral_id: str, ctx: Context, request: Request) -> JSONResponse:
    r = await _get(request, ctx, referral_id)
    return _fhir(service_request(r), headers={"ETag": f'W/"{r.version}"'})


# The parameters a referral search (ServiceRequest, Task) may carry; Task's owner / requester
# (a consultation worklist) may stand there empty.
_SEARCH_PARAMETERS = {"_box", "status", "_count", "owner", "requester"}


async def _search(request: Request, ctx: Context, box: str, status: str) -> list[referral_pb2.Referral]:
    ctx.require_scope("ServiceRequest", "r")
    unknown = {k for k in request.query_params if k not in _SEARCH_PARAMETERS}
    if unknown:
        raise ApiError(400, "search-parameter-unknown", "unknown search parameters: " + ", ".join(sorted(unknown)))
    try:
        states = [state_code(status.replace("-", "_"))] if status else []
    except ValueError:
        raise _bad("status is a referral state, e.g. requested") from None
    result = await rpc(
        request.app.state.stubs.referral.ListReferrals(
            referral_pb2.ListReferralsRequest(box=box, states=states, page_size=200), metadata=ctx.metadata
        )
    )
    return list(result.referrals)


@router.get("/ServiceRequest", response_class=JSONResponse)
async def search_service_requests(
    ctx: Context,
    request: Request,
    _box: str = Query(default="outgoing", pattern="^(incoming|outgoing)$"),
    status: str = Query(default="", pattern=FHIR_REFERRAL_STATUS),
) -> JSONResponse:
    return _fhir(_bundle(request, [service_request(r) for r in await _search(request, ctx, _box, status)]))


async def search_tasks(
    ctx: Context,
    request: Request,
    _box: str = Query(default="incoming", pattern="^(incoming|outgoing)$"),
    status: str = "",
) -> JSONResponse:
    return _fhir(_bundle(request, [task(r) for r in await _search(request, ctx, _box, status)]))


async def read_task(referral_id: str, ctx: Context, request: Request) -> JSONResponse:
    r = await _get(request, ctx, referral_id)
    return _fhir(task(r), headers={"ETag": f'W/"{r.version}"'})


def _inputs(resource: dict[str, Any]) -> tuple[str, str]:
    slot_id = bed = ""
    for item in resource.get("input") or []:
        if not isinstance(item, dict):
            continue
        kind = next((c.get("code") for c in (item.get("type") or {}).get("coding") or [] if isinstance(c, dict)), "")
        if kind == "slot":
            slot_id = str((item.get("valueReference") or {}).get("reference", "")).removeprefix("Slot/")[:64]
        elif kind == "bed-department":
            bed = str(item.get("valueString", ""))[:64]
    return slot_id, bed


@router.put("/Task/{task_id}", response_class=JSONResponse, openapi_extra=fhir_body("Task"))
async def update_task(task_id: str, ctx: Context, request: Request, idempotency_key: IdempotencyKey) -> JSONResponse:
    """A move by updating the Task: the new businessStatus (or status) names it."""
    referral_id = task_id
    ctx.require_scope("ServiceRequest", "u")
    resource = await _json(request, "Task")
    current = await _get(request, ctx, referral_id)
    business = next(
        (
            str(c.get("code", ""))
            for c in (resource.get("businessStatus") or {}).get("coding") or []
            if isinstance(c, dict)
        ),
        "",
    )
    status = str(resource.get("status", ""))
    move = ""
    if business and business != current.business_status:
        move = _MOVE_BY_BUSINESS.get(business, "")
    elif status and status != _TASK_STATUS.get(state_name(current.state)):
        move = _MOVE_BY_STATUS.get(status, "")
        if move == "complete" and state_name(current.state) == "completed":
            move = "acknowledge"
    if move == "cancel" and state_name(current.state) == "cancel_requested":
        move = "confirm-cancel"
    notes = [str(n.get("text", "")) for n in resource.get("note") or [] if isinstance(n, dict)]
    if not move and notes:
        move = "note"
    if not move:
        raise _bad(
            "the update changes no status the workflow knows (Task.businessStatus or Task.status)", "referral-move"
        )
    reason_code = next(
        (
            str(c.get("code", ""))
            for c in (resource.get("statusReason") or {}).get("coding") or []
            if isinstance(c, dict)
        ),
        "",
    )
    outcome = next(
        (
            str((o.get("valueReference") or {}).get("reference", "")).removeprefix("DocumentReference/")
            for o in resource.get("output") or []
            if isinstance(o, dict)
        ),
        "",
    )
    slot_id, bed = _inputs(resource)
    version = (resource.get("meta") or {}).get("versionId") or request.headers.get("if-match", "").removeprefix(
        "W/"
    ).strip('"')
    result = await rpc(
        request.app.state.stubs.referral.MoveReferral(
            referral_pb2.MoveReferralRequest(
                referral_id=referral_id[:64],
                move=move,
                reason=(notes[-1] if notes else "")[:2000],
                idempotency_key=idempotency_key,
                rejection_code=reason_code[:32],
                advice=str((resource.get("statusReason") or {}).get("text") or "")[:2000],
                slot_id=slot_id,
                bed_department=bed,
                outcome_document_id=outcome[:64],
                expected_version=int(version) if str(version).isdigit() else None,
            ),
            metadata=ctx.metadata,
        )
    )
    return _fhir(task(result.referral), headers={"ETag": f'W/"{result.referral.version}"'})


async def read_appointment(referral_id: str, ctx: Context, request: Request) -> JSONResponse:
    r = await _get(request, ctx, referral_id)
    if not r.slot_id:
        raise ApiError(404, "appointment-not-found", "this referral has no appointment")
    return _fhir(appointment(r))


@router.get("/CarePlan/{referral_id}", response_class=JSONResponse)
async def read_care_plan(referral_id: str, ctx: Context, request: Request) -> JSONResponse:
    r = await _get(request, ctx, referral_id)
    if not r.care_plan.follow_ups and not r.care_plan.medication and not r.care_plan.warning_signs:
        raise ApiError(404, "care-plan-not-found", "this referral has no care plan")
    return _fhir({k: v for k, v in care_plan(r).items() if v is not None})


async def search_communications(ctx: Context, request: Request, based_on: str) -> JSONResponse:
    r = await _get(request, ctx, based_on.removeprefix("ServiceRequest/"))
    notes = [
        {
            "resourceType": "Communication",
            "id": f"{r.referral_id}-{index}",
            "status": "completed",
            "basedOn": [{"reference": f"ServiceRequest/{r.referral_id}"}],
            "sent": iso(h.changed),
            "sender": _org(h.organization_id),
            "payload": [{"contentString": h.reason}],
        }
        for index, h in enumerate(r.history)
        if h.move == "note"
    ]
    return _fhir(_bundle(request, notes))


async def search_slots(ctx: Context, request: Request, organization: str, status: str) -> JSONResponse:
    ctx.require_scope("ServiceRequest", "r")
    result = await rpc(
        request.app.state.stubs.referral.ListSlots(
            referral_pb2.ListSlotsRequest(organization_id=organization, free_only=status == "free"),
            metadata=ctx.metadata,
        )
    )
    slots = [_slot(s) for s in result.slots if not status or s.status == status]
    return _fhir(_bundle(request, slots))
