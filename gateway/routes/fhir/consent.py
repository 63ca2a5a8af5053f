"""HL7 FHIR R4 `Consent`: create, read and search by patient, over the consent service's directives.

Mapping (a directive ↔ a Consent):

- `status` active / inactive (revoked); `scope` consentscope `patient-privacy`; `category` LOINC
  59284-0 Patient Consent; `patient` the caller's own record of the patient (identifier in
  `urn:hie:patient-id:<organisation>`, the one local-id system of the facade); `dateTime` when
  recorded; `organization` the recording one; `meta.versionId` the revision.
- IHE BPPC: `policy[].uri` the acknowledged policy ids (a directive acknowledging none has
  `policyRule` = the region's policy instead: invariant ppc-1 wants one of them, and JSON-FHIR has
  no empty arrays); `sourceReference` the signed form
  (`DocumentReference/<evidence document id>`); the directive's effective period in the
  extension `urn:hie:directive-period`.
- `provision` (nested as FHIR nests it): `type`, `period`, `actor[].reference` (Organization /
  Practitioner / department as an Organization identifier in `urn:hie:department:<org>` / the
  region as Group `urn:hie:region`), `action` (consentaction), `securityLabel` (v3 ActCode or
  Confidentiality), `purpose` (`urn:hie:purpose-of-use`; v3 TREAT, ETREAT, HRESCH, PUBHLTH, HCOMPL,
  HOPERAT accepted on input), `class` (`urn:hie:document-class`), `code` (document type, LOINC),
  `dataPeriod`, `data[].reference` (`DocumentReference/<id>`, meaning instance), obligations in the
  extension `urn:hie:obligation`.
"""

from __future__ import annotations

import datetime
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from gateway.deps import Context, IdempotencyKey
from gateway.errors import ApiError
from gateway.routes import rpc
from gateway.routes.consent import ACTOR_KINDS, PROVISION_TYPES, isoformat, timestamp
from gateway.routes.fhir.models import validate_resource
from gateway.routes.fhir.negotiation import FHIR_JSON
from gateway.routes.fhir.patient.resource import (
    local_id_system,
    own_local_id_of_identifier,
    own_local_id_of_patient,
    patient_id_of_reference,
)
from hie.common.v1 import common_pb2
from hie.consent.v1 import consent_pb2

router = APIRouter(prefix="/fhir/R4", tags=["fhir"])
HIE_PURPOSE_SYSTEM = "urn:hie:purpose-of-use"
ACT_REASON_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
ACT_CODE_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
CONFIDENTIALITY_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
CONSENT_ACTION_SYSTEM = "http://terminology.hl7.org/CodeSystem/consentaction"
CLASS_SYSTEM = "urn:hie:document-class"
LOINC = "http://loinc.org"
ORGANIZATION_SYSTEM = "urn:hie:organization"
REGION_SYSTEM = "urn:hie:region"
PERIOD_EXTENSION = "urn:hie:directive-period"
OBLIGATION_EXTENSION = "urn:hie:obligation"
# Consent.policyRule of a directive that names no policy of its own: the region's (opt-in / opt-out
# as configured in the consent service).
REGION_POLICY_RULE: dict[str, Any] = {
    "coding": [{"system": "urn:hie:consent-policy", "code": "region"}],
    "text": "the regional exchange's consent policy",
}
# Unambiguous v3 PurposeOfUse codes accepted on input (referral and consultation have none of their own).
_V3_PURPOSES = {
    "TREAT": "treatment",
    "ETREAT": "emergency",
    "HRESCH": "research",
    "PUBHLTH": "public-health",
    "HCOMPL": "audit",
    "HOPERAT": "operations",
}
_CONFIDENTIALITY = frozenset({"U", "L", "M", "N", "R", "V"})
_PROVISION_TYPE_NAMES = {v: k for k, v in PROVISION_TYPES.items()}


# The Consent entry of the CapabilityStatement (gateway/routes/fhir/capability.py assembles it).
CONSENT_CAPABILITY: dict[str, Any] = {
    "type": "Consent",
    "profile": "http://hl7.org/fhir/StructureDefinition/Consent",
    "documentation": "Patient privacy consent directives (IHE BPPC evidence in sourceReference and policy; nested "
    "provisions). Create (scope system/Consent.c) for a patient of the caller's own domain; read and search by "
    "patient (system/Consent.r) for patients the caller's domain registered. Errors are OperationOutcome.",
    "interaction": [{"code": "create"}, {"code": "read"}, {"code": "search-type"}],
    "searchParam": [
        {
            "name": "patient",
            "type": "reference",
            "documentation": "Patient/<id> (or its absolute URL): the id the exchange gives the caller's own record",
        },
        {
            "name": "patient.identifier",
            "type": "token",
            "documentation": "urn:hie:patient-id:<your organisation>|<local id> (urn:hie:patient:… still accepted)",
        },
        {"name": "status", "type": "token", "documentation": "active or inactive"},
    ],
}
CAPABILITY_RESOURCES = [CONSENT_CAPABILITY]


def _invalid(message: str) -> ApiError:
    return ApiError(400, "consent-invalid", message)


def _fhir_period(message: Any, name: str) -> dict[str, str] | None:
    if not message.HasField(name):
        return None
    period = getattr(message, name)
    out = {}
    if period.HasField("start"):
        out["start"] = isoformat(period.start, True)
    if period.HasField("end"):
        out["end"] = isoformat(period.end, True)
    return out


def _period_message(value: Any, what: str) -> consent_pb2.Period | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _invalid(f"{what} must be a Period")
    out = consent_pb2.Period()
    for side in ("start", "end"):
        if value.get(side):
            try:
                moment = datetime.datetime.fromisoformat(str(value[side]).replace("Z", "+00:00"))
            except ValueError:
                raise _invalid(f"{what}.{side} is not a FHIR dateTime") from None
            if moment.tzinfo is None:
                raise _invalid(f"{what}.{side} must carry a time zone")
            getattr(out, side).CopyFrom(timestamp(moment, what))
    return out


def _actor_resource(actor: consent_pb2.Actor) -> dict[str, Any]:
    kind = actor.kind
    if kind == consent_pb2.ACTOR_KIND_ORGANIZATION:
        reference = {
            "type": "Organization",
            "identifier": {"system": ORGANIZATION_SYSTEM, "value": actor.organization_id},
        }
    elif kind == consent_pb2.ACTOR_KIND_DEPARTMENT:
        reference = {
            "type": "Organization",
            "identifier": {"system": f"urn:hie:department:{actor.organization_id}", "value": actor.department},
        }
    elif kind == consent_pb2.ACTOR_KIND_PRACTITIONER:
        reference = {
            "type": "Practitioner",
            "identifier": {"system": f"urn:hie:practitioner:{actor.organization_id}", "value": actor.practitioner_id},
        }
    else:
        reference = {"type": "Group", "identifier": {"system": REGION_SYSTEM, "value": "all-members"}}
    return {
        "role": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "IRCP"}]},
        "reference": reference,
    }


def _actor_message(value: Any) -> consent_pb2.Actor:
    reference = value.get("reference") if isinstance(value, dict) else None
    identifier = reference.get("identifier") if isinstance(reference, dict) else None
    if not isinstance(identifier, dict):
        raise _invalid("provision.actor.reference needs an identifier")
    system, code = str(identifier.get("system", "")), str(identifier.get("value", ""))[:64]
    if system == REGION_SYSTEM:
        return consent_pb2.Actor(kind=ACTOR_KINDS["region"])
    if system == ORGANIZATION_SYSTEM:
        return consent_pb2.Actor(kind=ACTOR_KINDS["organization"], organization_id=code)
    for prefix, kind, field in (
        ("urn:hie:department:", "department", "department"),
        ("urn:hie:practitioner:", "practitioner", "practitioner_id"),
    ):
        if system.startswith(prefix):
            return consent_pb2.Actor(
                kind=ACTOR_KINDS[kind], organization_id=system.removeprefix(prefix)[:64], **{field: code}
            )
    raise _invalid("provision.actor identifier system is not one the exchange knows")


def _codes(values: Any, what: str) -> list[tuple[str, str]]:
    if values is None:
        return []
    if not isinstance(values, list) or len(values) > 50:
        raise _invalid(f"{what} must be a list")
    out = []
    for value in values:
        if not isinstance(value, dict):
            raise _invalid(f"{what} entries must be Codings")
        out.append((str(value.get("system", "")), str(value.get("code", ""))[:128]))
    return out


def _concept_codes(values: Any, what: str) -> list[tuple[str, str]]:
    if values is None:
        return []
    if not isinstance(values, list) or len(values) > 50:
        raise _invalid(f"{what} must be a list")
    codings = []
    for concept in values:
        if not isinstance(concept, dict):
            raise _invalid(f"{what} entries must be CodeableConcepts")
        codings.extend(_codes(concept.get("coding", []), f"{what}.coding"))
    return codings


def _purpose(system: str, code: str) -> str:
    if system == HIE_PURPOSE_SYSTEM:
        return code
    if system == ACT_REASON_SYSTEM and code in _V3_PURPOSES:
        return _V3_PURPOSES[code]
    raise _invalid("provision.purpose must be in urn:hie:purpose-of-use or an unambiguous v3 PurposeOfUse code")


def provision_message(value: Any, depth: int = 0) -> consent_pb2.Provision:
    """A provision message from a FHIR R4 Consent.provision (the consent service checks the rest)."""
    if not isinstance(value, dict):
        raise _invalid("provision must be an object")
    if depth > 10:
        raise _invalid("provisions nest too deeply")
    type_name = value.get("type")
    if type_name not in (None, "permit", "deny"):
        raise _invalid("provision.type must be permit or deny")
    data = value.get("data") or []
    if not isinstance(data, list):
        raise _invalid("provision.data must be a list")
    documents = []
    for entry in data:
        reference = str(((entry or {}).get("reference") or {}).get("reference", ""))
        if not reference.startswith("DocumentReference/"):
            raise _invalid("provision.data references DocumentReference/<id>")
        documents.append(reference.removeprefix("DocumentReference/")[:64])
    actors = value.get("actor") or []
    children = value.get("provision") or []
    if not isinstance(actors, list) or not isinstance(children, list):
        raise _invalid("provision.actor and provision.provision must be lists")
    return consent_pb2.Provision(
        type=PROVISION_TYPES.get(type_name or "", consent_pb2.PROVISION_TYPE_UNSPECIFIED),
        period=_period_message(value.get("period"), "provision.period"),
        actors=[_actor_message(a) for a in actors],
        actions=[code for _, code in _concept_codes(value.get("action"), "provision.action")],
        purposes=[_purpose(system, code) for system, code in _codes(value.get("purpose"), "provision.purpose")],
        classes=[code for _, code in _codes(value.get("class"), "provision.class")],
        types=[code for _, code in _concept_codes(value.get("code"), "provision.code")],
        security_labels=[code for _, code in _codes(value.get("securityLabel"), "provision.securityLabel")],
        data_period=_period_message(value.get("dataPeriod"), "provision.dataPeriod"),
        documents=documents,
        obligations=[
            str(e.get("valueCode", ""))[:64]
            for e in value.get("extension") or []
            if isinstance(e, dict) and e.get("url") == OBLIGATION_EXTENSION
        ],
        provisions=[provision_message(c, depth + 1) for c in children],
    )


def provision_resource(p: consent_pb2.Provision) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if p.obligations:
        out["extension"] = [{"url": OBLIGATION_EXTENSION, "valueCode": code} for code in p.obligations]
    if p.type:
        out["type"] = _PROVISION_TYPE_NAMES[p.type]
    if p.HasField("period"):
        out["period"] = _fhir_period(p, "period")
    if p.actors:
        out["actor"] = [_actor_resource(a) for a in p.actors]
    if p.actions:
        out["action"] = [{"coding": [{"system": CONSENT_ACTION_SYSTEM, "code": a}]} for a in p.actions]
    if p.security_labels:
        out["securityLabel"] = [
            {"system": CONFIDENTIALITY_SYSTEM if label in _CONFIDENTIALITY else ACT_CODE_SYSTEM, "code": label}
            for label in p.security_labels
        ]
    if p.purposes:
        out["purpose"] = [{"system": HIE_PURPOSE_SYSTEM, "code": code} for code in p.purposes]
    if p.classes:
        out["class"] = [{"system": CLASS_SYSTEM, "code": code} for code in p.classes]
    if p.types:
        out["code"] = [{"coding": [{"system": LOINC, "code": code}]} for code in p.types]
    if p.HasField("data_period"):
        out["dataPeriod"] = _fhir_period(p, "data_period")
    if p.documents:
        out["data"] = [
            {"meaning": "instance", "reference": {"reference": f"DocumentReference/{d}"}} for d in p.documents
        ]
    if p.provisions:
        out["provision"] = [provision_resource(c) for c in p.provisions]
    return out


def consent_resource(d: consent_pb2.Directive) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Consent",
        "id": d.directive_id,
        "meta": {"versionId": str(d.revision), "lastUpdated": isoformat(d.updated, d.HasField("updated"))},
        "status": "active" if d.status == consent_pb2.DIRECTIVE_STATUS_ACTIVE else "inactive",
        "scope": {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]
        },
        "category": [{"coding": [{"system": LOINC, "code": "59284-0", "display": "Patient Consent"}]}],
        "patient": {"identifier": {"system": local_id_system(d.patient.domain), "value": d.patient.local_id}},
        "dateTime": isoformat(d.recorded, d.HasField("recorded")),
        "organization": [{"identifier": {"system": ORGANIZATION_SYSTEM, "value": d.recorded_by_organization_id}}],
    }
    if d.policy_ids:
        resource["policy"] = [{"uri": uri} for uri in d.policy_ids]
    else:
        resource["policyRule"] = REGION_POLICY_RULE
    resource["provision"] = provision_resource(d.provision)
    if d.evidence_document_id:
        resource["sourceReference"] = {"reference": f"DocumentReference/{d.evidence_document_id}"}
    period = _fhir_period(d, "period")
    if period:
        resource["extension"] = [{"url": PERIOD_EXTENSION, "valuePeriod": period}]
    return resource


async def _patient_local_id(ctx: Context, request: Request, resource: dict[str, Any]) -> str:
    """The caller's local id of Consent.patient: `Patient/<id>` (or its absolute URL) of the caller's
    own record, or the local-id identifier of the caller's domain."""
    patient = resource.get("patient")
    if not isinstance(patient, dict):
        raise _invalid("Consent.patient is required")
    reference = patient.get("reference")
    if isinstance(reference, str) and reference:
        patient_id = patient_id_of_reference(reference, request.app.state.settings.public_url)
        return await own_local_id_of_patient(ctx, request, patient_id)
    identifier = patient.get("identifier")
    if isinstance(identifier, dict) and isinstance(identifier.get("value"), str) and identifier["value"]:
        return own_local_id_of_identifier(
            ctx, str(identifier.get("system", "")), identifier["value"], "Consent.patient.identifier"
        )
    raise _invalid("Consent.patient needs a Patient/<id> reference or the urn:hie:patient-id identifier")


def _fhir(body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, media_type=FHIR_JSON, headers=headers)


@router.post("/Consent", status_code=201, response_class=JSONResponse)
async def create_consent(request: Request, ctx: Context, key: IdempotencyKey) -> JSONResponse:
    """FHIR create: record a directive from a Consent resource for a patient of the caller's domain."""
    ctx.require_scope("Consent", "c")
    try:
        resource = await request.json()
    except ValueError:
        raise _invalid("the body is not JSON") from None
    if not isinstance(resource, dict) or resource.get("resourceType") != "Consent":
        raise _invalid("the body must be a Consent resource")
    validate_resource(resource, "Consent")
    if resource.get("status", "active") != "active":
        raise _invalid("only an active Consent can be created")
    if not isinstance(resource.get("provision"), dict):
        raise _invalid("Consent.provision is required")
    source = resource.get("sourceReference") or {}
    evidence = str(source.get("reference", "")) if isinstance(source, dict) else ""
    policies = resource.get("policy") or []
    if not isinstance(policies, list):
        raise _invalid("Consent.policy must be a list")
    uris = [str(p["uri"])[:256] for p in policies if isinstance(p, dict) and isinstance(p.get("uri"), str) and p["uri"]]
    if not uris and not isinstance(resource.get("policyRule"), dict):
        # FHIR R4 Consent invariant ppc-1: "Either a Policy or PolicyRule" (for a privacy consent).
        raise ApiError(
            400, "consent-policy-missing", "Consent.policy (with uri) or Consent.policyRule is required (ppc-1)"
        )
    period = next(
        (
            e.get("valuePeriod")
            for e in resource.get("extension") or []
            if isinstance(e, dict) and e.get("url") == PERIOD_EXTENSION
        ),
        None,
    )
    result = await rpc(
        request.app.state.stubs.consent.RecordDirective(
            consent_pb2.RecordDirectiveRequest(
                directive=consent_pb2.Directive(
                    patient=common_pb2.PatientRef(local_id=await _patient_local_id(ctx, request, resource)),
                    policy_ids=uris,
                    evidence_document_id=evidence.removeprefix("DocumentReference/")[:64],
                    period=_period_message(period, "extension.valuePeriod"),
                    provision=provision_message(resource["provision"]),
                ),
                idempotency_key=key,
            ),
            metadata=ctx.metadata,
        )
    )
    base = request.app.state.settings.public_url
    location = f"{base}/fhir/R4/Consent/{result.directive.directive_id}/_history/{result.directive.revision}"
    return _fhir(consent_resource(result.directive), 201 if result.created else 200, {"Location": location})


@router.get("/Consent/{consent_id}", response_class=JSONResponse)
async def read_consent(consent_id: str, ctx: Context, request: Request) -> JSONResponse:
    ctx.require_scope("Consent", "r")
    result = await rpc(
        request.app.state.stubs.consent.GetDirective(
            consent_pb2.GetDirectiveRequest(directive_id=consent_id[:64]), metadata=ctx.metadata
        )
    )
    return _fhir(consent_resource(result.directive), headers={"ETag": f'W/"{result.directive.revision}"'})


@router.get("/Consent", response_class=JSONResponse)
async def search_consent(
    ctx: Context,
    request: Request,
    patient: str = Query(default="", max_length=200, description="Patient/<id> (the caller's own record)"),
    patient_identifier: str = Query(
        default="", alias="patient.identifier", max_length=200, description="urn:hie:patient-id:<org>|<local id>"
    ),
    status: str = Query(
        default="",
        max_length=16,
        description="active (default: all) or inactive",
        json_schema_extra={"enum": ["", "active", "inactive"]},
    ),
) -> JSONResponse:
    """FHIR search by patient: every directive of the person (recorded by any hospital)."""
    ctx.require_scope("Consent", "r")
    if status not in {"", "active", "inactive"}:
        raise _invalid("status must be active or inactive")
    unknown = {k for k in request.query_params if k not in {"patient", "patient.identifier", "status"}}
    if unknown:
        raise ApiError(400, "search-parameter-unknown", "unknown search parameters: " + ", ".join(sorted(unknown)))
    if bool(patient) == bool(patient_identifier):
        raise ApiError(400, "patient-required", "give one of patient or patient.identifier")
    if patient:
        patient_id = patient_id_of_reference(patient, request.app.state.settings.public_url)
        local_id = await own_local_id_of_patient(ctx, request, patient_id)
    else:
        system, _, value = patient_identifier.rpartition("|")
        local_id = own_local_id_of_identifier(ctx, system, value, "patient.identifier")
    result = await rpc(
        request.app.state.stubs.consent.ListDirectives(
            consent_pb2.ListDirectivesRequest(patient=common_pb2.PatientRef(local_id=local_id), include_revoked=True),
            metadata=ctx.metadata,
        )
    )
    base = request.app.state.settings.public_url
    resources = [consent_resource(d) for d in result.directives]
    if status:
        resources = [r for r in resources if r["status"] == status]
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": len(resources),
        "link": [{"relation": "self", "url": f"{base}/fhir/R4/Consent?{request.url.query}"}],
    }
    if resources:  # JSON-FHIR has no empty arrays: an empty searchset has no entry
        bundle["entry"] = [
            {"fullUrl": f"{base}/fhir/R4/Consent/{r['id']}", "resource": r, "search": {"mode": "match"}}
            for r in resources
        ]
    return _fhir(bundle)
