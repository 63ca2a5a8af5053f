"""The regional default policy (pure: no I/O).

Rules, in order (the first that applies decides):
1. The registering organisation always sees its own documents.
2. Documents labelled with a restricted sensitivity class are never shared by default.
3. The regional default permits sharing for treatment (opt-out region); any other purpose
   needs an explicit permit, which patient directives will provide.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class ConsentDecision(StrEnum):
    PERMIT = "permit"
    DENY = "deny"


# HL7 v3 ActCode sensitivity classes (InformationSensitivityPolicy) restricted by default:
# mental health, HIV, sexually transmitted disease, substance use, sexuality and
# reproductive health, genetic disease, sexual / domestic violence.
RESTRICTED_SENSITIVITY = frozenset({"PSY", "HIV", "STD", "ETH", "SEX", "GDIS", "SDV"})
DEFAULT_PERMITTED_PURPOSES = frozenset({"treatment"})


@dataclass(frozen=True)
class AccessRequest:
    organization_id: str
    purpose_of_use: str


@dataclass(frozen=True)
class ItemAttributes:
    item_id: str
    source_organization_id: str
    class_code: str = ""
    type_code: str = ""
    security_labels: frozenset[str] = field(default_factory=frozenset)


@dataclass(frozen=True)
class ItemVerdict:
    item_id: str
    decision: ConsentDecision
    basis: str


def decide(request: AccessRequest, item: ItemAttributes) -> ItemVerdict:
    if item.source_organization_id == request.organization_id:
        return ItemVerdict(item.item_id, ConsentDecision.PERMIT, "own-document")
    if item.security_labels & RESTRICTED_SENSITIVITY:
        return ItemVerdict(item.item_id, ConsentDecision.DENY, "restricted-sensitivity")
    if request.purpose_of_use in DEFAULT_PERMITTED_PURPOSES:
        return ItemVerdict(item.item_id, ConsentDecision.PERMIT, f"regional-default:{request.purpose_of_use}")
    return ItemVerdict(item.item_id, ConsentDecision.DENY, "regional-default:purpose-not-permitted")
