"""The HL7 FHIR R4 facade: its CapabilityStatement, which lists exactly what is served, and the
AuditEvent search (the audit log as FHIR R4 AuditEvent resources in a searchset Bundle).

Mapping of one audit record to an AuditEvent:

- `id` the event id; `type` DICOM/FHIR `rest`; `subtype` our event type (`urn:hie:audit-event-type`);
  `action` C/R/U/D/E; `recorded` when the event occurred (the `date` search parameter's element);
  `outcome` 0 / 4 / 8 / 12.
- `purposeOfEvent`: the v3 ActReason (PurposeOfUse) code, plus our own word in
  `urn:hie:purpose-of-use` and as text (several of our words share one v3 code, see PURPOSES).
- `agent`: the practitioner (role in `urn:hie:role`, id in `urn:hie:practitioner:<organisation>`,
  network address) as requestor, and the organisation (`urn:hie:organization`).
- `source`: the recording service, an application server; `entity`: the patient (enterprise id)
  and every object the event touched; extensions `urn:hie:trace-id` and `urn:hie:audit-hash`.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from gateway.deps import CallContext
from gateway.errors import ApiError
from gateway.routes.audit import AuditContext, action_name, isoformat, query_page, timestamp
from gateway.routes.fhir.negotiation import FHIR_JSON
from gateway.routes.fhir.search import date_range, token_code
from hie.audit.v1 import audit_pb2

router = APIRouter(prefix="/fhir/R4", tags=["fhir"])

AUDIT_EVENT_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/audit-event-type"
HIE_EVENT_TYPE_SYSTEM = "urn:hie:audit-event-type"
ACT_REASON_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
HIE_PURPOSE_SYSTEM = "urn:hie:purpose-of-use"
ENTITY_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE_SYSTEM = "http://terminology.hl7.org/CodeSystem/object-role"
SOURCE_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/security-source-type"
ENTERPRISE_ID_SYSTEM = "urn:hie:enterprise-id"
TRACE_ID_EXTENSION = "urn:hie:trace-id"
HASH_EXTENSION = "urn:hie:audit-hash"

# Our purpose of use → v3 ActReason code and its display. Referral and consultation are care of
# the patient (TREAT); the audit purpose is oversight of compliance with the law and the
# exchange's rules (HCOMPL, "health compliance"), operations the exchange's running (HOPERAT).
PURPOSES: dict[str, tuple[str, str]] = {
    "treatment": ("TREAT", "treatment"),
    "referral": ("TREAT", "treatment"),
    "consultation": ("TREAT", "treatment"),
    "emergency": ("ETREAT", "Emergency Treatment"),
    "research": ("HRESCH", "healthcare research"),
    "public-health": ("PUBHLTH", "public health"),
    "operations": ("HOPERAT", "healthcare operations"),
    "audit": ("HCOMPL", "health compliance"),
}
_PURPOSES_BY_V3: dict[str, list[str]] = {}
for _word, (_code, _) in PURPOSES.items():
    _PURPOSES_BY_V3.setdefault(_code, []).append(_word)
_ACTION_CODES = {"create": "C", "read": "R", "update": "U", "delete": "D", "execute": "E"}
_OUTCOME_CODES = {
    audit_pb2.OUTCOME_SUCCESS: "0",
    audit_pb2.OUTCOME_MINOR_FAILURE: "4",
    audit_pb2.OUTCOME_SERIOUS_FAILURE: "8",
    audit_pb2.OUTCOME_MAJOR_FAILURE: "12",
}
_OUTCOMES_BY_CODE = {code: outcome for outcome, code in _OUTCOME_CODES.items()}
_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_RESOURCE_TYPE = re.compile(r"[A-Z][A-Za-z]{1,63}")

# The AuditEvent search parameters served (strict handling: any other parameter is refused).
AUDIT_EVENT_SEARCH_PARAMS: list[dict[str, str]] = [
    {
        "name": "date",
        "definition": "http://hl7.org/fhir/SearchParameter/AuditEvent-date",
        "type": "date",
        "documentation": "When the event occurred (AuditEvent.recorded); prefixes eq (default), ge, gt, le, lt; "
        "repeat to give a range (date=ge2026-11-01&date=lt2026-12-01). A time needs a zone; a date "
        "without a time is a UTC day.",
    },
    {
        "name": "agent",
        "definition": "http://hl7.org/fhir/SearchParameter/AuditEvent-agent",
        "type": "reference",
        "documentation": "The acting practitioner's id in their hospital (`<id>` or `Practitioner/<id>`).",
    },
    {
        "name": "patient",
        "definition": "http://hl7.org/fhir/SearchParameter/AuditEvent-patient",
        "type": "reference",
        "documentation": "The patient's enterprise id (`Patient/<id>` or `<id>`). Regional auditors only; a "
        "hospital asks for a patient access report through the REST API with its own local id.",
    },
    {
        "name": "type",
        "definition": "http://hl7.org/fhir/SearchParameter/AuditEvent-type",
        "type": "token",
        "documentation": f"Every event's type is `{AUDIT_EVENT_TYPE_SYSTEM}|rest` (which matches all); any other "
        f"code is taken as the exchange's event type (`{HIE_EVENT_TYPE_SYSTEM}`, as subtype), e.g. "
        "document.retrieve.",
    },
    {
        "name": "subtype",
        "definition": "http://hl7.org/fhir/SearchParameter/AuditEvent-subtype",
        "type": "token",
        "documentation": f"The exchange's event type (`{HIE_EVENT_TYPE_SYSTEM}`), e.g. document.retrieve.",
    },
    {
        "name": "outcome",
        "definition": "http://hl7.org/fhir/SearchParameter/AuditEvent-outcome",
        "type": "token",
        "documentation": "0 (success), 4 (minor failure, e.g. denied by consent), 8 (serious), 12 (major).",
    },
    {
        "name": "purpose",
        "definition": "http://hl7.org/fhir/SearchParameter/AuditEvent-purpose",
        "type": "token",
        "documentation": f"A v3 PurposeOfUse code ({ACT_REASON_SYSTEM}: TREAT, ETREAT, HRESCH, PUBHLTH, HOPERAT, "
        f"HCOMPL) or the exchange's own purpose ({HIE_PURPOSE_SYSTEM}: treatment, referral, consultation, "
        "emergency, research, public-health, operations, audit). TREAT matches treatment, referral and "
        "consultation.",
    },
]
_RESULT_PARAMS = {"_count", "page"}
_SEARCH_PARAM_NAMES = {p["name"] for p in AUDIT_EVENT_SEARCH_PARAMS} | _RESULT_PARAMS
_DEFAULT_COUNT = 100
_MAX_COUNT = 500


# The AuditEvent entry of the CapabilityStatement (gateway/routes/fhir/capability.py assembles it).
AUDIT_EVENT_CAPABILITY: dict[str, Any] = {
    "type": "AuditEvent",
    "profile": "http://hl7.org/fhir/StructureDefinition/AuditEvent",
    "documentation": "The exchange's audit log (scope system/AuditEvent.r; the authority's "
    "auditors read the whole region's, a hospital's auditors the records of its own "
    "requests). Search handling is strict: an unknown search parameter, modifier or "
    "comma-separated (OR) value is refused with 400 and an OperationOutcome. Results "
    f"in sequence order, _count per page (default {_DEFAULT_COUNT}, at most {_MAX_COUNT}); "
    "follow the Bundle's next link (opaque `page` parameter). Bundle.total is not given.",
    "interaction": [{"code": "search-type"}],
    "searchParam": AUDIT_EVENT_SEARCH_PARAMS,
}
CAPABILITY_RESOURCES = [AUDIT_EVENT_CAPABILITY]


def _coding(system: str, code: str, display: str = "") -> dict[str, str]:
    coding = {"system": system, "code": code}
    if display:
        coding["display"] = display
    return coding


def _purpose(word: str) -> dict[str, Any]:
    codings = []
    if word in PURPOSES:
        code, display = PURPOSES[word]
        codings.append(_coding(ACT_REASON_SYSTEM, code, display))
    codings.append(_coding(HIE_PURPOSE_SYSTEM, word))
    return {"coding": codings, "text": word}


# Resource types the facade serves by id: only their references resolve within the exchange.
# ServiceRequest: referrals and consultations are read by id on the facade
# (fhir/referral.py, fhir/teleconsult.py).
_RESOLVABLE_TYPES = frozenset({"DocumentReference", "Binary", "Consent", "ServiceRequest"})


def _entity_what(type: str, id: str) -> dict[str, Any]:
    """AuditEvent.entity.what: a reference where the facade serves that resource by that id (so
    the reference resolves), an identifier otherwise (a patient's enterprise id is an identifier
    of the person, not a Patient id; records are `<domain>|<local id>`)."""
    if type in _RESOLVABLE_TYPES and _FHIR_ID.fullmatch(id):
        return {"reference": f"{type}/{id}"}
    if type == "Organization":
        # The same identifier system as the agent's organisation.
        return {"identifier": {"system": "urn:hie:organization", "value": id}}
    return {"identifier": {"system": f"urn:hie:entity:{type or 'unknown'}", "value": id}}


def audit_event_resource(event: audit_pb2.AuditEvent) -> dict[str, Any]:
    """One audit record as a FHIR R4 AuditEvent; empty fields are left out (FHIR has no empty strings)."""
    actor = event.actor
    resource: dict[str, Any] = {"resourceType": "AuditEvent", "id": event.event_id}
    extensions = [
        {"url": url, "valueString": value}
        for url, value in ((TRACE_ID_EXTENSION, event.trace_id), (HASH_EXTENSION, event.hash))
        if value
    ]
    if extensions:
        resource["extension"] = extensions
    resource["type"] = _coding(AUDIT_EVENT_TYPE_SYSTEM, "rest", "RESTful Operation")
    resource["subtype"] = [_coding(HIE_EVENT_TYPE_SYSTEM, event.type)]
    action = _ACTION_CODES.get(action_name(event.action))
    if action:
        resource["action"] = action
    resource["recorded"] = isoformat(event.occurred)
    outcome = _OUTCOME_CODES.get(event.outcome)
    if outcome:
        resource["outcome"] = outcome
    if actor.purpose_of_use:
        resource["purposeOfEvent"] = [_purpose(actor.purpose_of_use)]
    agents: list[dict[str, Any]] = []
    if actor.practitioner_id:
        who: dict[str, Any] = {
            "identifier": {"system": f"urn:hie:practitioner:{actor.organization_id}", "value": actor.practitioner_id}
        }
        if actor.practitioner_name:
            who["display"] = actor.practitioner_name
        agent: dict[str, Any] = {}
        if actor.role:
            agent["type"] = {"coding": [_coding("urn:hie:role", actor.role)]}
        agent["who"] = who
        agent["requestor"] = True
        if event.source_address:
            agent["network"] = {"address": event.source_address, "type": "2"}
        agents.append(agent)
    if actor.organization_id:
        agents.append(
            {
                "who": {"identifier": {"system": "urn:hie:organization", "value": actor.organization_id}},
                "requestor": not agents,
            }
        )
    if agents:
        resource["agent"] = agents
    resource["source"] = {
        "observer": {"display": f"hie-{event.source_service or 'exchange'}"},
        "type": [_coding(SOURCE_TYPE_SYSTEM, "4", "Application Server")],
    }
    entities: list[dict[str, Any]] = []
    if event.patient_enterprise_id:
        entities.append(
            {
                "what": {"identifier": {"system": ENTERPRISE_ID_SYSTEM, "value": event.patient_enterprise_id}},
                "type": _coding(ENTITY_TYPE_SYSTEM, "1", "Person"),
                "role": _coding(OBJECT_ROLE_SYSTEM, "1", "Patient"),
            }
        )
    for entity in event.entities:
        if entity.type == "Patient" and entity.id == event.patient_enterprise_id:
            continue
        entities.append(
            {"what": _entity_what(entity.type, entity.id), "type": _coding(ENTITY_TYPE_SYSTEM, "2", "System Object")}
        )
    if entities:
        resource["entity"] = entities
    return resource


def _bad(reason: str, message: str) -> ApiError:
    # Messages name the parameter only, never its value (it may be a patient id).
    return ApiError(400, reason, message)


@dataclass
class _AuditSearch:
    """A FHIR AuditEvent search as audit service queries, whose results are OR-ed."""

    query: audit_pb2.QueryRequest = field(default_factory=audit_pb2.QueryRequest)
    purposes: list[str] = field(default_factory=list)
    count: int = _DEFAULT_COUNT
    page: str = ""
    # Parameters ANDed into a contradiction (two different event types, say): nothing matches.
    matches_nothing: bool = False

    def set(self, attribute: str, value: object) -> None:
        current = getattr(self.query, attribute)
        if current and current != value:
            self.matches_nothing = True
        setattr(self.query, attribute, value)

    def queries(self) -> list[audit_pb2.QueryRequest]:
        if not self.purposes:
            return [self.query]
        found = []
        for purpose in self.purposes:
            one = audit_pb2.QueryRequest()
            one.CopyFrom(self.query)
            one.purpose_of_use = purpose
            found.append(one)
        return found


def _parse_search(items: list[tuple[str, str]]) -> _AuditSearch:
    search = _AuditSearch()
    since: datetime.datetime | None = None
    until: datetime.datetime | None = None
    for name, raw in items:
        if name not in _SEARCH_PARAM_NAMES:
            raise _bad("search-param-unknown", f"unknown search parameter {name[:64]!r} (strict handling)")
        value = raw.strip()
        if not value:
            raise _bad("search-value-invalid", f"{name}: a value is required")
        if "," in value:
            raise _bad("search-value-invalid", f"{name}: comma-separated (OR) values are not supported")
        if name == "date":
            prefix, start, end = date_range(value)
            low = {"eq": start, "ge": start, "gt": end}.get(prefix)
            high = {"eq": end, "le": end, "lt": start}.get(prefix)
            if low is not None:
                since = low if since is None else max(since, low)
            if high is not None:
                until = high if until is None else min(until, high)
        elif name == "agent":
            practitioner = value.removeprefix("Practitioner/")
            if not practitioner or len(practitioner) > 64:
                raise _bad("search-value-invalid", "agent: a practitioner id")
            search.set("practitioner_id", practitioner)
        elif name == "patient":
            patient = value.removeprefix("Patient/")
            if not _FHIR_ID.fullmatch(patient) or len(patient) > 36:
                raise _bad("search-value-invalid", "patient: Patient/<enterprise id>")
            search.set("patient_enterprise_id", patient)
        elif name in {"type", "subtype"}:
            systems = {HIE_EVENT_TYPE_SYSTEM} | ({AUDIT_EVENT_TYPE_SYSTEM} if name == "type" else set())
            system = value.rpartition("|")[0]
            code = token_code(name, value, systems)
            if name == "type" and code == "rest" and system in {"", AUDIT_EVENT_TYPE_SYSTEM}:
                continue  # every event is a RESTful operation
            if system == AUDIT_EVENT_TYPE_SYSTEM or len(code) > 64:
                search.matches_nothing = True
                continue
            search.set("type", code)
        elif name == "outcome":
            if value not in _OUTCOMES_BY_CODE:
                raise _bad("outcome-invalid", "outcome: 0, 4, 8 or 12")
            search.set("outcome", _OUTCOMES_BY_CODE[value])
        elif name == "purpose":
            system = value.rpartition("|")[0]
            code = token_code(name, value, {ACT_REASON_SYSTEM, HIE_PURPOSE_SYSTEM})
            words = _PURPOSES_BY_V3.get(code, []) if system in {"", ACT_REASON_SYSTEM} else []
            if not words and system in {"", HIE_PURPOSE_SYSTEM} and code in PURPOSES:
                words = [code]
            if not words:
                raise _bad("purpose-invalid", "purpose: a v3 PurposeOfUse code the exchange uses")
            if search.purposes and set(search.purposes) != set(words):
                search.matches_nothing = True
            search.purposes = words
        elif name == "_count":
            if not value.isdigit() or int(value) < 1:
                raise _bad("count-invalid", "_count: a positive number")
            search.count = min(int(value), _MAX_COUNT)
        elif name == "page":
            if not value.isdigit() or len(value) > 19:
                raise _bad("page-invalid", "page: use the Bundle's next link")
            search.page = value
    if since is not None:
        search.query.since.CopyFrom(timestamp(since, "date"))
    if until is not None:
        search.query.until.CopyFrom(timestamp(until, "date"))
    if since is not None and until is not None and since >= until:
        search.matches_nothing = True
    return search


async def _run(request: Request, ctx: CallContext, search: _AuditSearch) -> tuple[list[audit_pb2.AuditEvent], str]:
    """One page of the OR of the search's queries, in sequence order, and the next page token."""
    results = [
        await query_page(request, ctx, query, page_size=search.count, page_token=search.page)
        for query in search.queries()
    ]
    if len(results) == 1:
        return list(results[0].events), results[0].page.next_page_token
    # Several queries (one v3 code for several of our purposes): the audit service's page token is
    # the last sequence returned, so the merged page continues after the last sequence taken.
    merged = sorted({e.event_id: e for r in results for e in r.events}.values(), key=lambda e: e.sequence)
    page = merged[: search.count]
    more = len(merged) > search.count or any(r.page.next_page_token for r in results)
    return page, str(page[-1].sequence) if more and page else ""


def _search_url(base: str, items: list[tuple[str, str]]) -> str:
    return f"{base}/fhir/R4/AuditEvent" + (f"?{urlencode(items)}" if items else "")


@router.get(
    "/AuditEvent",
    response_class=JSONResponse,
    responses={200: {"content": {FHIR_JSON: {}}, "description": "a searchset Bundle of AuditEvent resources"}},
)
async def search_audit_events(
    ctx: AuditContext,
    request: Request,
    # Declared for the OpenAPI document and length limits; the search itself is read from the raw
    # query string (repeated parameters, strict refusal of unknown ones).
    date: list[str] = Query(default=[], description=AUDIT_EVENT_SEARCH_PARAMS[0]["documentation"]),
    agent: str = Query(default="", max_length=80),
    patient: str = Query(default="", max_length=80),
    type: str = Query(default="", max_length=128),
    subtype: str = Query(default="", max_length=128),
    outcome: str = Query(default="", max_length=16),
    purpose: str = Query(default="", max_length=128),
    count: str = Query(default="", alias="_count", max_length=6),
    page: str = Query(default="", max_length=20),
) -> JSONResponse:
    """FHIR R4 AuditEvent search (search-type): a searchset Bundle, `_count` per page, next link."""
    items = list(request.query_params.multi_items())
    search = _parse_search(items)
    events, next_token = await _run(request, ctx, search) if not search.matches_nothing else ([], "")
    base = request.app.state.settings.public_url
    links = [{"relation": "self", "url": _search_url(base, items)}]
    if next_token:
        following = [(k, v) for k, v in items if k != "page"] + [("page", next_token)]
        links.append({"relation": "next", "url": _search_url(base, following)})
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset", "link": links}
    if events:  # JSON-FHIR has no empty arrays: an empty searchset has no entry
        bundle["entry"] = [
            {
                "fullUrl": f"{base}/fhir/R4/AuditEvent/{event.event_id}",
                "resource": audit_event_resource(event),
                "search": {"mode": "match"},
            }
            for event in events
        ]
    return JSONResponse(bundle, media_type=FHIR_JSON)
