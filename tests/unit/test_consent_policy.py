"""Table-driven tests of the regional default consent policy (services.consent.policy)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from services.consent.policy import (
    DEFAULT_PERMITTED_PURPOSES,
    RESTRICTED_SENSITIVITY,
    AccessRequest,
    ConsentDecision,
    ItemAttributes,
    decide,
)

OWN = "org-bj-xicheng-hospital"
OTHER = "org-bj-chaoyang-hospital"

PERMIT = ConsentDecision.PERMIT
DENY = ConsentDecision.DENY


@dataclass(frozen=True)
class Case:
    id: str
    requester: str
    purpose: str
    source: str
    labels: frozenset[str]
    decision: ConsentDecision
    basis: str


def _case(
    id: str, requester: str, purpose: str, source: str, labels: set[str], decision: ConsentDecision, basis: str
) -> Case:
    return Case(id, requester, purpose, source, frozenset(labels), decision, basis)


CASES: list[Case] = [
    # 1. The registering organisation always sees its own documents.
    _case("own-treatment", OWN, "treatment", OWN, set(), PERMIT, "own-document"),
    _case("own-research", OWN, "research", OWN, set(), PERMIT, "own-document"),
    _case("own-no-purpose", OWN, "", OWN, set(), PERMIT, "own-document"),
    _case("own-psy-research", OWN, "research", OWN, {"PSY"}, PERMIT, "own-document"),
    _case("own-all-restricted", OWN, "referral", OWN, set(RESTRICTED_SENSITIVITY), PERMIT, "own-document"),
    # 2. Each restricted sensitivity class is never shared by default, whatever the purpose.
    *[
        _case(f"other-{label}-treatment", OTHER, "treatment", OWN, {label}, DENY, "restricted-sensitivity")
        for label in sorted(RESTRICTED_SENSITIVITY)
    ],
    *[
        _case(f"other-{label}-emergency", OTHER, "emergency", OWN, {label, "N"}, DENY, "restricted-sensitivity")
        for label in sorted(RESTRICTED_SENSITIVITY)
    ],
    # 3. The regional default permits treatment.
    _case("other-treatment", OTHER, "treatment", OWN, set(), PERMIT, "regional-default:treatment"),
    # Non-restricted labels (confidentiality codes, unknown or lower-case codes) do not deny.
    *[
        _case(f"other-{label}-treatment", OTHER, "treatment", OWN, {label}, PERMIT, "regional-default:treatment")
        for label in ("N", "R", "V", "ETHUD", "TBOO", "psy", "")
    ],
    _case(
        "other-mixed-non-restricted",
        OTHER,
        "treatment",
        OWN,
        {"R", "DEMO", "MH"},
        PERMIT,
        "regional-default:treatment",
    ),
    # ... any other purpose needs an explicit permit.
    *[
        _case(f"other-{purpose}", OTHER, purpose, OWN, set(), DENY, "regional-default:purpose-not-permitted")
        for purpose in ("referral", "consultation", "research", "emergency", "public-health", "", "Treatment")
    ],
    _case(
        "other-research-non-restricted-label",
        OTHER,
        "research",
        OWN,
        {"N"},
        DENY,
        "regional-default:purpose-not-permitted",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_decide(case: Case) -> None:
    item = ItemAttributes(
        item_id="urn:uuid:0d6f3c1e-doc",
        source_organization_id=case.source,
        class_code="出院小结",
        type_code="34133-9",
        security_labels=case.labels,
    )
    verdict = decide(AccessRequest(organization_id=case.requester, purpose_of_use=case.purpose), item)
    assert verdict.item_id == "urn:uuid:0d6f3c1e-doc"
    assert verdict.decision is case.decision
    assert verdict.basis == case.basis


def test_table_covers_every_restricted_label_and_purpose() -> None:
    ids = {c.id for c in CASES}
    assert len(ids) == len(CASES)
    assert all(f"other-{label}-treatment" in ids for label in RESTRICTED_SENSITIVITY)
    assert {"treatment"} == DEFAULT_PERMITTED_PURPOSES
    assert {"PSY", "HIV", "STD", "ETH", "SEX", "GDIS", "SDV"} == RESTRICTED_SENSITIVITY
