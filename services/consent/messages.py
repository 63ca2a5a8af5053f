"""Translation between the consent protos and the domain (FHIR Consent provisions, BPPC directives,
grants, verdicts). Provisions go through their JSON form so that the one parser checks them."""

from __future__ import annotations

import datetime
import json
from typing import Any

from hie.common.v1 import common_pb2
from hie.consent.v1 import consent_pb2
from services.consent import policy, provisions
from services.consent.store import DirectiveRecord, GrantRecord
from services.shared.timestamps import isoformat, to_timestamp_or_none
from services.shared.user_assertion import PURPOSES_OF_USE

_TYPE_NAMES = {
    consent_pb2.PROVISION_TYPE_PERMIT: "permit",
    consent_pb2.PROVISION_TYPE_DENY: "deny",
}
_TYPES = {v: k for k, v in _TYPE_NAMES.items()}
_ACTOR_NAMES = {
    consent_pb2.ACTOR_KIND_REGION: "region",
    consent_pb2.ACTOR_KIND_ORGANIZATION: "organization",
    consent_pb2.ACTOR_KIND_DEPARTMENT: "department",
    consent_pb2.ACTOR_KIND_PRACTITIONER: "practitioner",
}
_ACTORS = {v: k for k, v in _ACTOR_NAMES.items()}
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
DECISIONS = {
    policy.ConsentDecision.PERMIT: consent_pb2.DECISION_PERMIT,
    policy.ConsentDecision.DENY: consent_pb2.DECISION_DENY,
}


def _period_json(message: Any, name: str) -> dict[str, str] | None:
    if not message.HasField(name):
        return None
    period = getattr(message, name)
    out = {}
    if period.HasField("start"):
        out["start"] = isoformat(period.start)
    if period.HasField("end"):
        out["end"] = isoformat(period.end)
    return out


def period_message(period: provisions.Period | None) -> consent_pb2.Period | None:
    if period is None:
        return None
    return consent_pb2.Period(start=to_timestamp_or_none(period.start), end=to_timestamp_or_none(period.end))


def provision_json(message: consent_pb2.Provision) -> dict[str, Any]:
    """The JSON form of a provision message (checked by `provisions.provision_from_json`)."""
    out: dict[str, Any] = {
        "type": _TYPE_NAMES.get(message.type, ""),
        "actors": [
            {
                "kind": _ACTOR_NAMES.get(a.kind, ""),
                "organization_id": a.organization_id,
                "department": a.department,
                "practitioner_id": a.practitioner_id,
            }
            for a in message.actors
        ],
        "period": _period_json(message, "period"),
        "data_period": _period_json(message, "data_period"),
        "provisions": [provision_json(c) for c in message.provisions],
    }
    for name in ("actions", "purposes", "classes", "types", "security_labels", "documents", "obligations"):
        out[name] = list(getattr(message, name))
    return out


def provision_message(data: dict[str, Any]) -> consent_pb2.Provision:
    """A provision message from the stored JSON form."""
    parsed = provisions.provision_from_json(data, purposes=PURPOSES_OF_USE)
    return _provision_message(parsed)


def _provision_message(p: provisions.Provision) -> consent_pb2.Provision:
    return consent_pb2.Provision(
        type=_TYPES.get(p.type.value, 0) if p.type else 0,  # type: ignore[arg-type]
        period=period_message(p.period),
        actors=[
            consent_pb2.Actor(
                kind=_ACTORS[a.kind.value],  # type: ignore[arg-type]
                organization_id=a.organization_id,
                department=a.department,
                practitioner_id=a.practitioner_id,
            )
            for a in p.actors
        ],
        actions=sorted(p.actions),
        purposes=sorted(p.purposes),
        classes=sorted(p.classes),
        types=sorted(p.types),
        security_labels=sorted(p.security_labels),
        data_period=period_message(p.data_period),
        documents=sorted(p.documents),
        obligations=list(p.obligations),
        provisions=[_provision_message(c) for c in p.provisions],
    )


def directive_message(record: DirectiveRecord) -> consent_pb2.Directive:
    return consent_pb2.Directive(
        directive_id=record.id,
        patient=common_pb2.PatientRef(domain=record.patient_domain, local_id=record.patient_local_id),
        enterprise_id=record.enterprise_id,
        recorded_by_organization_id=record.recorded_by_organization_id,
        policy_ids=json.loads(record.policy_ids),
        evidence_document_id=record.evidence_document_id,
        period=consent_pb2.Period(
            start=to_timestamp_or_none(record.period_start), end=to_timestamp_or_none(record.period_end)
        ),
        provision=provision_message(json.loads(record.provision)),
        status=(
            consent_pb2.DIRECTIVE_STATUS_ACTIVE if record.status == "active" else consent_pb2.DIRECTIVE_STATUS_REVOKED
        ),
        revision=record.revision,
        recorded=to_timestamp_or_none(record.recorded_at),
        updated=to_timestamp_or_none(record.updated_at),
    )


def grant_message(record: GrantRecord) -> consent_pb2.AccessGrant:
    return consent_pb2.AccessGrant(
        grant_id=record.id,
        organization_id=record.organization_id,
        purpose_of_use=record.purpose_of_use,
        enterprise_id=record.enterprise_id,
        document_ids=json.loads(record.document_ids),
        include_summary=record.include_summary,
        start=to_timestamp_or_none(record.start),
        end=to_timestamp_or_none(record.end),
        revoked=record.revoked_at is not None,
        reference=record.reference,
    )


_NO_LABELS: frozenset[str] = frozenset()


def item_of(message: consent_pb2.DecisionItem) -> policy.Item:
    data_time = None
    if message.HasField("data_time"):
        # Cheaper than Timestamp.ToDatetime, which is measurable at 50 items per batch.
        ts = message.data_time
        data_time = _EPOCH + datetime.timedelta(seconds=ts.seconds, microseconds=ts.nanos // 1000)
    return policy.Item(
        item_id=message.item_id,
        source_organization_id=message.source_organization_id,
        class_code=message.class_code,
        type_code=message.type_code,
        security_labels=frozenset(message.security_labels) if message.security_labels else _NO_LABELS,
        data_time=data_time,
    )


def decision_message(verdict: policy.Verdict) -> consent_pb2.ItemDecision:
    return consent_pb2.ItemDecision(
        item_id=verdict.item_id,
        decision=DECISIONS[verdict.decision],
        basis=verdict.basis,
        reference=verdict.reference,
        break_glass=verdict.break_glass,
        obligations=[
            consent_pb2.Obligation(code=o.code, masked_fields=list(o.masked_fields), display=o.display)
            for o in verdict.obligations
        ],
    )
