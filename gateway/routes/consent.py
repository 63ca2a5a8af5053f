"""Patient consent directives, break-the-glass and decision explanations (REST).

A directive's provision is the JSON form of a FHIR Consent provision tree: `type` permit / deny,
`period`, `actors` (kind region / organization / department / practitioner), `actions`,
`purposes`, `classes`, `types`, `security_labels`, `data_period`, `documents`, `obligations` and
nested `provisions` (services/consent/README.md has the rules and their precedence).
"""

from __future__ import annotations

import datetime
from typing import Any, Literal

from fastapi import APIRouter, Query, Request, Response
from google.protobuf.timestamp_pb2 import Timestamp
from pydantic import BaseModel, ConfigDict, Field

from gateway.deps import Context, IdempotencyKey
from gateway.errors import ApiError
from gateway.routes import rpc
from hie.common.v1 import common_pb2
from hie.consent.v1 import consent_pb2
from services.shared.timestamps import isoformat as shared_isoformat
from services.shared.timestamps import to_timestamp

router = APIRouter(prefix="/api/v1/consent", tags=["consent"])

_Code = Field(default_factory=list, max_length=50)
PROVISION_TYPES = {"permit": consent_pb2.PROVISION_TYPE_PERMIT, "deny": consent_pb2.PROVISION_TYPE_DENY}
_PROVISION_TYPE_NAMES = {v: k for k, v in PROVISION_TYPES.items()}
ACTOR_KINDS = {
    "region": consent_pb2.ACTOR_KIND_REGION,
    "organization": consent_pb2.ACTOR_KIND_ORGANIZATION,
    "department": consent_pb2.ACTOR_KIND_DEPARTMENT,
    "practitioner": consent_pb2.ACTOR_KIND_PRACTITIONER,
}
_ACTOR_KIND_NAMES = {v: k for k, v in ACTOR_KINDS.items()}


class PeriodIn(BaseModel):
    start: datetime.datetime | None = None
    end: datetime.datetime | None = None


class ActorIn(BaseModel):
    kind: Literal["region", "organization", "department", "practitioner"]
    organization_id: str = Field(default="", max_length=64)
    department: str = Field(default="", max_length=64)
    practitioner_id: str = Field(default="", max_length=64)


class ProvisionIn(BaseModel):
    type: Literal["permit", "deny"] | None = None
    period: PeriodIn | None = None
    actors: list[ActorIn] = _Code
    actions: list[str] = _Code
    purposes: list[str] = _Code
    classes: list[str] = _Code
    types: list[str] = _Code
    security_labels: list[str] = _Code
    data_period: PeriodIn | None = None
    documents: list[str] = _Code
    obligations: list[str] = _Code
    provisions: list[ProvisionIn] = Field(default_factory=list, max_length=50)


def _evidence_required(schema: dict[str, Any]) -> None:
    """The consent service refuses a directive without its evidence (`evidence-missing`): the
    OpenAPI document says the field is required."""
    schema["required"] = sorted({*schema.get("required", []), "evidence_document_id"})
    evidence = schema["properties"]["evidence_document_id"]
    evidence.pop("default", None)
    evidence["minLength"] = 1


class DirectiveIn(BaseModel):
    model_config = ConfigDict(json_schema_extra=_evidence_required)

    patient_local_id: str = Field(min_length=1, max_length=64)
    policy_ids: list[str] = Field(default_factory=list, max_length=10)
    evidence_document_id: str = Field(default="", max_length=64, description="The signed consent form's document id")
    period: PeriodIn | None = None
    provision: ProvisionIn


class DirectiveRevisionIn(BaseModel):
    model_config = ConfigDict(json_schema_extra=_evidence_required)

    policy_ids: list[str] = Field(default_factory=list, max_length=10)
    evidence_document_id: str = Field(default="", max_length=64)
    period: PeriodIn | None = None
    provision: ProvisionIn
    # int32 in the RPC: a larger number is refused as invalid (400), not a 500.
    expected_revision: int = Field(default=0, ge=0, le=2**31 - 1)


class BreakGlassIn(BaseModel):
    patient_local_id: str = Field(min_length=1, max_length=64)
    reason: str = Field(min_length=1, max_length=500)
    duration_seconds: int = Field(default=0, ge=0, le=7 * 24 * 3600)


class ExplainItemIn(BaseModel):
    document_id: str = Field(min_length=1, max_length=64)
    source_organization_id: str = Field(min_length=1, max_length=64)
    class_code: str = Field(default="", max_length=64)
    type_code: str = Field(default="", max_length=64)
    security_labels: list[str] = Field(default_factory=list, max_length=20)
    data_time: datetime.datetime | None = None


class ExplainIn(BaseModel):
    enterprise_id: str = Field(min_length=1, max_length=64)
    item: ExplainItemIn
    organization_id: str = Field(min_length=1, max_length=64)
    department: str = Field(default="", max_length=64)
    practitioner_id: str = Field(default="", max_length=64)
    purpose_of_use: str = Field(default="treatment", max_length=32)
    action: str = Field(default="access", max_length=16)
    at: datetime.datetime | None = None
    # The requester's role; empty means doctor (the role break-the-glass serves).
    role: str = Field(default="", max_length=32)


def timestamp(value: datetime.datetime | None, what: str) -> Timestamp | None:
    if value is None:
        return None
    if value.tzinfo is None:
        raise ApiError(400, "time-zone-missing", f"{what} must carry a time zone")
    try:
        return to_timestamp(value.astimezone(datetime.UTC))
    except (OverflowError, ValueError):
        # e.g. 0001-01-01T00:00:00+01:00 is before the first representable instant.
        raise ApiError(400, "date-invalid", f"{what}: date out of range") from None


def isoformat(ts: Timestamp, present: bool) -> str | None:
    return shared_isoformat(ts) if present else None


def period_message(period: PeriodIn | None, what: str) -> consent_pb2.Period | None:
    if period is None:
        return None
    return consent_pb2.Period(start=timestamp(period.start, f"{what}.start"), end=timestamp(period.end, f"{what}.end"))


def period_json(message: Any, name: str) -> dict[str, str] | None:
    if not message.HasField(name):
        return None
    period = getattr(message, name)
    out = {}
    if period.HasField("start"):
        out["start"] = isoformat(period.start, True)
    if period.HasField("end"):
        out["end"] = isoformat(period.end, True)
    return out


def provision_message(p: ProvisionIn) -> consent_pb2.Provision:
    return consent_pb2.Provision(
        type=PROVISION_TYPES.get(p.type or "", consent_pb2.PROVISION_TYPE_UNSPECIFIED),
        period=period_message(p.period, "period"),
        actors=[
            consent_pb2.Actor(
                kind=ACTOR_KINDS[a.kind],
                organization_id=a.organization_id,
                department=a.department,
                practitioner_id=a.practitioner_id,
            )
            for a in p.actors
        ],
        actions=p.actions,
        purposes=p.purposes,
        classes=p.classes,
        types=p.types,
        security_labels=p.security_labels,
        data_period=period_message(p.data_period, "data_period"),
        documents=p.documents,
        obligations=p.obligations,
        provisions=[provision_message(c) for c in p.provisions],
    )


def provision_json(p: consent_pb2.Provision) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if p.type:
        out["type"] = _PROVISION_TYPE_NAMES[p.type]
    if p.HasField("period"):
        out["period"] = period_json(p, "period")
    if p.actors:
        out["actors"] = [
            {
                k: v
                for k, v in {
                    "kind": _ACTOR_KIND_NAMES.get(a.kind, ""),
                    "organization_id": a.organization_id,
                    "department": a.department,
                    "practitioner_id": a.practitioner_id,
                }.items()
                if v
            }
            for a in p.actors
        ]
    for name in ("actions", "purposes", "classes", "types", "security_labels", "documents", "obligations"):
        values = list(getattr(p, name))
        if values:
            out[name] = values
    if p.HasField("data_period"):
        out["data_period"] = period_json(p, "data_period")
    if p.provisions:
        out["provisions"] = [provision_json(c) for c in p.provisions]
    return out


def directive_json(d: consent_pb2.Directive) -> dict[str, Any]:
    return {
        "directive_id": d.directive_id,
        "patient": {"domain": d.patient.domain, "local_id": d.patient.local_id},
        "enterprise_id": d.enterprise_id,
        "recorded_by_organization_id": d.recorded_by_organization_id,
        "policy_ids": list(d.policy_ids),
        "evidence_document_id": d.evidence_document_id,
        "period": period_json(d, "period") or {},
        "provision": provision_json(d.provision),
        "status": "active" if d.status == consent_pb2.DIRECTIVE_STATUS_ACTIVE else "revoked",
        "revision": d.revision,
        "recorded": isoformat(d.recorded, d.HasField("recorded")),
        "updated": isoformat(d.updated, d.HasField("updated")),
    }


def decision_json(d: consent_pb2.ItemDecision) -> dict[str, Any]:
    return {
        "document_id": d.item_id,
        "decision": "permit" if d.decision == consent_pb2.DECISION_PERMIT else "deny",
        "basis": d.basis,
        "reference": d.reference,
        "break_glass": d.break_glass,
        "obligations": [
            {"code": o.code, "masked_fields": list(o.masked_fields), "display": o.display} for o in d.obligations
        ],
    }


@router.post("/directives", status_code=201)
async def record_directive(
    body: DirectiveIn, ctx: Context, request: Request, response: Response, key: IdempotencyKey
) -> dict[str, Any]:
    """Record a patient's directive (FHIR Consent provisions, BPPC evidence) for a patient of the
    caller's own domain."""
    ctx.require_scope("Consent", "c")
    result = await rpc(
        request.app.state.stubs.consent.RecordDirective(
            consent_pb2.RecordDirectiveRequest(
                directive=consent_pb2.Directive(
                    patient=common_pb2.PatientRef(local_id=body.patient_local_id),
                    policy_ids=body.policy_ids,
                    evidence_document_id=body.evidence_document_id,
                    period=period_message(body.period, "period"),
                    provision=provision_message(body.provision),
                ),
                idempotency_key=key,
            ),
            metadata=ctx.metadata,
        )
    )
    if not result.created:
        response.status_code = 200
    return {
        **directive_json(result.directive),
        "created": result.created,
        "audit_event_ids": list(result.audit_event_ids),
    }


@router.get("/directives")
async def list_directives(
    ctx: Context,
    request: Request,
    patient_local_id: str = Query(min_length=1, max_length=64),
    include_revoked: bool = False,
) -> dict[str, Any]:
    """The directives of a patient of the caller's domain (every hospital's, for the same person)."""
    ctx.require_scope("Consent", "r")
    result = await rpc(
        request.app.state.stubs.consent.ListDirectives(
            consent_pb2.ListDirectivesRequest(
                patient=common_pb2.PatientRef(local_id=patient_local_id), include_revoked=include_revoked
            ),
            metadata=ctx.metadata,
        )
    )
    return {"enterprise_id": result.enterprise_id, "directives": [directive_json(d) for d in result.directives]}


@router.get("/directives/{directive_id}")
async def get_directive(directive_id: str, ctx: Context, request: Request) -> dict[str, Any]:
    ctx.require_scope("Consent", "r")
    result = await rpc(
        request.app.state.stubs.consent.GetDirective(
            consent_pb2.GetDirectiveRequest(directive_id=directive_id[:64]), metadata=ctx.metadata
        )
    )
    return directive_json(result.directive)


@router.put("/directives/{directive_id}")
async def revise_directive(
    directive_id: str, body: DirectiveRevisionIn, ctx: Context, request: Request, key: IdempotencyKey
) -> dict[str, Any]:
    """Replace a directive's provisions, policies, evidence and period (a new revision). With an
    `Idempotency-Key` a retry gets the first answer (one revision)."""
    ctx.require_scope("Consent", "u")
    result = await rpc(
        request.app.state.stubs.consent.ReviseDirective(
            consent_pb2.ReviseDirectiveRequest(
                directive=consent_pb2.Directive(
                    directive_id=directive_id[:64],
                    policy_ids=body.policy_ids,
                    evidence_document_id=body.evidence_document_id,
                    period=period_message(body.period, "period"),
                    provision=provision_message(body.provision),
                ),
                expected_revision=body.expected_revision,
                idempotency_key=key,
            ),
            metadata=ctx.metadata,
        )
    )
    return {**directive_json(result.directive), "audit_event_ids": list(result.audit_event_ids)}


@router.delete("/directives/{directive_id}")
async def revoke_directive(directive_id: str, ctx: Context, request: Request, key: IdempotencyKey) -> dict[str, Any]:
    """Revoke a directive: it stops applying on the next request. With an `Idempotency-Key` a
    retry gets the first answer (its audit event ids included)."""
    ctx.require_scope("Consent", "d")
    result = await rpc(
        request.app.state.stubs.consent.RevokeDirective(
            consent_pb2.RevokeDirectiveRequest(directive_id=directive_id[:64], idempotency_key=key),
            metadata=ctx.metadata,
        )
    )
    return {**directive_json(result.directive), "audit_event_ids": list(result.audit_event_ids)}


@router.post("/break-glass", status_code=201)
async def declare_break_glass(
    body: BreakGlassIn, ctx: Context, request: Request, key: IdempotencyKey
) -> dict[str, Any]:
    """A clinician declares an emergency (purpose emergency): for a bounded time, requests for the
    purpose emergency see what a deny would hide, except what the region never lets be overridden.
    Audited as break-glass; the patient's home hospitals are notified."""
    ctx.require_scope("Consent", "c")
    result = await rpc(
        request.app.state.stubs.consent.DeclareBreakGlass(
            consent_pb2.DeclareBreakGlassRequest(
                patient=common_pb2.PatientRef(local_id=body.patient_local_id),
                reason=body.reason,
                duration_seconds=body.duration_seconds,
                idempotency_key=key,
            ),
            metadata=ctx.metadata,
        )
    )
    return {
        "break_glass_id": result.break_glass_id,
        "enterprise_id": result.enterprise_id,
        "starts": isoformat(result.starts, True),
        "expires": isoformat(result.expires, True),
        "audit_event_ids": list(result.audit_event_ids),
    }


@router.post("/explain")
async def explain_decision(body: ExplainIn, ctx: Context, request: Request) -> dict[str, Any]:
    """For auditors: the decision for one document and one requester, with its rule, the
    provision, grant or break-glass that decided, obligations, and the reason in words."""
    result = await rpc(
        request.app.state.stubs.consent.Explain(
            consent_pb2.ExplainRequest(
                enterprise_id=body.enterprise_id,
                item=consent_pb2.DecisionItem(
                    item_id=body.item.document_id,
                    source_organization_id=body.item.source_organization_id,
                    class_code=body.item.class_code,
                    type_code=body.item.type_code,
                    security_labels=body.item.security_labels,
                    data_time=timestamp(body.item.data_time, "item.data_time"),
                ),
                organization_id=body.organization_id,
                department=body.department,
                practitioner_id=body.practitioner_id,
                purpose_of_use=body.purpose_of_use,
                action=body.action,
                at=timestamp(body.at, "at"),
                role=body.role,
            ),
            metadata=ctx.metadata,
        )
    )
    return {**decision_json(result.decision), "explanation": result.explanation}
