"""IHE BPPC (Basic Patient Privacy Consents) as the exchange records it: a patient directive
acknowledges one or more privacy policies, points at the signed consent form as evidence, and is
in force for an effective period (pure: no I/O).

BPPC (ITI TF-1 §19): "the patient acknowledges one or more Privacy Policies ... the
acknowledgement is captured as a document" and "the effective time ... indicates the time
during which the consent is in effect". The document itself is registered in the registry like
any other; the directive keeps its id (`evidence_document_id`). The rules the directive states
are FHIR Consent provisions (`provisions.Provision`).
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass, field
from enum import StrEnum

from services.consent.provisions import Period, Provision, iter_provisions
from services.shared.errors import InvalidArgument

# A policy id is an OID or a URI (BPPC: "Privacy Policy Identifier").
_POLICY_ID = re.compile(r"^(urn:oid:)?[0-2](\.\d+)+$|^[a-z][a-z0-9+.\-]*:[^\s]{1,200}$")
MAX_POLICIES = 10


class DirectiveStatus(StrEnum):
    ACTIVE = "active"
    REVOKED = "revoked"


@dataclass(frozen=True)
class Directive:
    """One patient's recorded consent directive (a FHIR Consent with BPPC evidence)."""

    directive_id: str
    enterprise_id: str
    recorded_by_organization_id: str
    provision: Provision
    policy_ids: tuple[str, ...] = ()
    evidence_document_id: str = ""
    period: Period = field(default_factory=Period)
    status: DirectiveStatus = DirectiveStatus.ACTIVE
    revision: int = 1
    recorded_at: datetime.datetime | None = None
    revoked_at: datetime.datetime | None = None

    def in_force(self, now: datetime.datetime) -> bool:
        """Active and inside its effective period. A revoked directive stops at once (it was in
        force before its revocation, which is what explaining a past decision needs)."""
        if not self.period.contains(now):
            return False
        if self.status is DirectiveStatus.ACTIVE:
            return True
        return self.revoked_at is not None and now < self.revoked_at


def check_policy_ids(values: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    if len(values) > MAX_POLICIES:
        raise InvalidArgument(f"at most {MAX_POLICIES} policy ids", reason="policy-id-invalid")
    for value in values:
        if not _POLICY_ID.fullmatch(value):
            raise InvalidArgument("a policy id must be an OID or a URI", reason="policy-id-invalid")
    return tuple(values)


def check_directive(provision: Provision, *, evidence_document_id: str) -> None:
    """A directive states at least one rule, and a signed form backs it (BPPC evidence)."""
    if not any(p.type is not None for p in iter_provisions(provision)):
        raise InvalidArgument("a directive needs at least one permit or deny provision", reason="provision-invalid")
    if not evidence_document_id:
        raise InvalidArgument(
            "a directive needs its evidence: the id of the signed consent form document", reason="evidence-missing"
        )
    if len(evidence_document_id) > 64:
        raise InvalidArgument("evidence document id is too long", reason="evidence-missing")
