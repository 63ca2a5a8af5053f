"""The consent decision table (services.consent.policy): each case in
consent_decision_table.json states its inputs, the expected decision and the rule that decides."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import pytest

from services.consent import provisions
from services.consent.bppc import Directive, DirectiveStatus
from services.consent.policy import (
    AccessGrant,
    BreakGlass,
    ConsentDecision,
    Item,
    PatientConsent,
    RegionalPolicy,
    Requester,
    decide,
    explain,
)
from services.shared.errors import InvalidArgument
from services.shared.user_assertion import PURPOSES_OF_USE

_TABLE = json.loads((Path(__file__).parent / "consent_decision_table.json").read_text(encoding="utf-8"))
_DEFAULTS = _TABLE["defaults"]
CASES: list[dict[str, Any]] = _TABLE["cases"]


def _time(value: str | None) -> datetime.datetime | None:
    return datetime.datetime.fromisoformat(value) if value else None


def _directive(data: dict[str, Any], order: int) -> Directive:
    return Directive(
        directive_id=data["id"],
        enterprise_id="E-1",
        recorded_by_organization_id="org-a",
        provision=provisions.provision_from_json(data["provision"], purposes=PURPOSES_OF_USE),
        policy_ids=("urn:oid:2.16.840.1.113883.3.1",),
        evidence_document_id="consent-form-1",
        period=provisions.period_from_json(data.get("period"), "period") or provisions.Period(),
        status=DirectiveStatus(data.get("status", "active")),
        # Recorded in table order, a minute apart.
        recorded_at=datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC) + datetime.timedelta(minutes=order),
    )


def _grant(data: dict[str, Any]) -> AccessGrant:
    return AccessGrant(
        grant_id=data["id"],
        organization_id=data["organization_id"],
        purpose_of_use=data["purpose_of_use"],
        document_ids=frozenset(data.get("document_ids", [])),
        include_summary=data.get("include_summary", True),
        start=_time(data.get("start")),
        end=_time(data.get("end")),
        revoked=data.get("revoked", False),
        reference=f"ServiceRequest/{data['id']}",
    )


def _break_glass(data: dict[str, Any]) -> BreakGlass:
    return BreakGlass(
        break_glass_id=data["id"],
        organization_id=data["organization_id"],
        practitioner_id=data["practitioner_id"],
        department=data.get("department", _DEFAULTS["request"]["department"]),
        starts=_time(data["starts"]),  # type: ignore[arg-type]
        expires=_time(data["expires"]),  # type: ignore[arg-type]
    )


def _inputs(case: dict[str, Any]) -> tuple[RegionalPolicy, PatientConsent, Requester, Item, datetime.datetime]:
    request = {**_DEFAULTS["request"], **case.get("request", {})}
    item = {**_DEFAULTS["item"], **case.get("item", {})}
    consent = PatientConsent(
        directives=tuple(_directive(d, i) for i, d in enumerate(case.get("directives", []))),
        grants=tuple(_grant(g) for g in case.get("grants", [])),
        break_glass=tuple(_break_glass(b) for b in case.get("break_glass", [])),
    )
    return (
        RegionalPolicy.from_mapping(case.get("policy", {})),
        consent,
        Requester(**request),
        Item(
            item_id=item["item_id"],
            source_organization_id=item["source_organization_id"],
            class_code=item["class_code"],
            type_code=item["type_code"],
            security_labels=frozenset(item["security_labels"]),
            data_time=_time(item["data_time"]),
        ),
        _time(case.get("now", _DEFAULTS["now"])),  # type: ignore[return-value]
    )


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_decision_table(case: dict[str, Any]) -> None:
    policy, consent, requester, item, now = _inputs(case)
    verdict = decide(policy, consent, requester, item, now)
    expect = case["expect"]
    assert (verdict.decision.value, verdict.basis) == (expect["decision"], expect["basis"]), case["why"]
    if "reference" in expect:
        assert verdict.reference == expect["reference"]
    if "obligations" in expect:
        assert [o.code for o in verdict.obligations] == expect["obligations"]
    if "break_glass" in expect:
        assert verdict.break_glass is expect["break_glass"]
    if verdict.decision is ConsentDecision.DENY:
        assert verdict.obligations == ()
    # The explanation names the decision and its rule, and never a patient's data.
    words = explain(verdict, requester, item)
    assert words.startswith(verdict.decision.value.upper())
    assert item.item_id in words


def test_table_covers_every_dimension_and_rule() -> None:
    ids = " ".join(c["id"] for c in CASES)
    assert len(CASES) >= 40
    assert len({c["id"] for c in CASES}) == len(CASES)
    for topic in (
        "actor-organization",
        "actor-region",
        "actor-department",
        "action-",
        "purpose-",
        "class-",
        "type-",
        "security-label",
        "data-period",
        "provision-period",
        "directive-effective-period",
        "nested-",
        "precedence-deny-beats-permit",
        "restricted-",
        "grant-",
        "break-glass-expired",
        "break-glass-never-overridable",
        "revoked",
        "opt-in",
        "opt-out",
        "own-document",
    ):
        assert topic in ids, topic
    bases = {c["expect"]["basis"] for c in CASES}
    assert {
        "own-document",
        "directive-permit",
        "directive-deny",
        "grant",
        "restricted-sensitivity",
        "regional-default:treatment",
        "regional-default:purpose-not-permitted",
        "regional-default:opt-in",
        "break-glass",
    } <= bases


def test_research_obligation_masks_identifiers() -> None:
    policy, consent, requester, item, now = _inputs(
        {"request": {"purpose_of_use": "research"}, "directives": [{"id": "D", "provision": {"type": "permit"}}]}
    )
    verdict = decide(policy, consent, requester, item, now)
    assert verdict.obligations[0].masked_fields == ("name", "national-id", "phone", "address-below-city")
    assert "de-identified" in explain(verdict, requester, item)


def test_explain_states_break_glass_and_what_it_overrode() -> None:
    case = next(c for c in CASES if c["id"] == "break-glass-overrides-patient-deny")
    policy, consent, requester, item, now = _inputs(case)
    words = explain(decide(policy, consent, requester, item, now), requester, item)
    assert "break-the-glass" in words
    assert "directive-deny would have denied it" in words


@pytest.mark.parametrize(
    "bad",
    [
        {"type": "maybe"},
        {"type": "deny", "actors": [{"kind": "planet"}]},
        {"type": "deny", "actors": [{"kind": "organization"}]},
        {"type": "deny", "actors": [{"kind": "department", "organization_id": "o"}]},
        {"type": "deny", "purposes": ["marketing"]},
        {"type": "deny", "actions": ["delete"]},
        {"type": "deny", "period": {"start": "2026-02-01T00:00:00+00:00", "end": "2026-01-01T00:00:00+00:00"}},
        {"type": "deny", "period": {"start": "2026-02-01T00:00:00"}},
        {"type": "deny", "classes": "imaging"},
        {"provisions": [{"provisions": [{"provisions": [{"provisions": [{"provisions": [{"provisions": [{}]}]}]}]}]}]},
    ],
)
def test_bad_provisions_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgument) as refused:
        provisions.provision_from_json(bad, purposes=PURPOSES_OF_USE)
    assert refused.value.reason == "provision-invalid"


def test_provision_json_round_trips() -> None:
    source = {
        "type": "deny",
        "actors": [{"kind": "department", "organization_id": "org-b", "department": "心内科"}],
        "purposes": ["research", "treatment"],
        "data_period": {"start": "2026-01-01T00:00:00+00:00"},
        "provisions": [{"type": "permit", "documents": ["doc-1"], "obligations": ["deidentify"]}],
    }
    parsed = provisions.provision_from_json(source, purposes=PURPOSES_OF_USE)
    assert provisions.provision_to_json(parsed) == source


def test_policy_from_env() -> None:
    policy = RegionalPolicy.from_env(
        {
            "HIE_CONSENT_REGION_MODE": "opt-in",
            "HIE_CONSENT_BREAK_GLASS_SECONDS": "60",
            "HIE_CONSENT_NEVER_OVERRIDABLE": "HIV,GDIS",
        }
    )
    assert policy.mode.value == "opt-in"
    assert policy.break_glass_seconds == 60
    assert policy.never_overridable == {"HIV", "GDIS"}
    with pytest.raises(ValueError, match="sometimes"):
        RegionalPolicy.from_env({"HIE_CONSENT_REGION_MODE": "sometimes"})
