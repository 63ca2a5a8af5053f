"""What a caller may see of a patient's personal data: the masking policy for the caller's role and
purpose of use, the cross-domain floor for records a search found in other domains, and the cap on
how many of those one search shows."""

from __future__ import annotations

import dataclasses

from services.mpi import index
from services.shared.auth import Caller
from services.shared.protection.masking import CROSS_DOMAIN_FLOOR, MaskingPolicy, mask_name

# A cross-domain search is for picking the right person, not a directory: at most this many
# records of other domains per search (over all its pages); the caller's own records are not capped.
CROSS_DOMAIN_RESULT_CAP = 10


@dataclasses.dataclass(frozen=True)
class Disclosure:
    """What a caller may see of a patient's personal data: the masking policy applied for the
    caller's role and purpose of use (stewards resolve matches on full identifiers; research gets
    de-identified records; everyone else sees national ids and phones partly hidden)."""

    policy: MaskingPolicy
    role: str
    purpose: str
    # The caller's own domain ("" for an organisation that registers no patients); records of any
    # other domain found by a search are shown at most as CROSS_DOMAIN_FLOOR allows.
    domain: str = ""
    platform: bool = False
    floor: dict[str, str] | None = None

    @classmethod
    def to(cls, who: Caller, policy: MaskingPolicy) -> Disclosure:
        """The disclosure for the caller under the exchange's masking policy."""
        return cls(
            policy=policy,
            role=who.role,
            purpose=who.purpose_of_use,
            domain=who.organization_id if who.organization_type == "hospital" else "",
            platform=who.is_platform,
        )

    def of_found(self, record_domain: str) -> Disclosure:
        """The disclosure for a record a search or match found: another domain's record (any
        record, for an organisation without a domain) is a candidate to pick, not a directory
        entry."""
        if self.platform or record_domain == self.domain:
            return self
        return dataclasses.replace(self, floor=CROSS_DOMAIN_FLOOR)

    def national_id(self, value: str) -> str | None:
        return self.policy.national_id(value, role=self.role, purpose=self.purpose, floor=self.floor)

    def identifier(self, value: str) -> str | None:
        return self.policy.identifier(value, role=self.role, purpose=self.purpose, floor=self.floor)

    def phone(self, value: str) -> str | None:
        return self.policy.phone(value, role=self.role, purpose=self.purpose, floor=self.floor)

    def name(self, text: str, family: str, given: str) -> tuple[str, str, str]:
        how = self.policy.treatment("name", role=self.role, purpose=self.purpose, floor=self.floor)
        if how == "clear":
            return text, family, given
        if how == "partial":
            # The family name stays (张**), the given name does not.
            return mask_name(text), family, "*" * len(given)
        return "", "", ""

    def birth_date(self, value: str) -> str:
        return (self.policy.birth_date(value, role=self.role, purpose=self.purpose) or "") if value else ""

    def address(self, address: dict[str, str]) -> dict[str, str]:
        return self.policy.address(address, role=self.role, purpose=self.purpose, floor=self.floor) or {}


def capped(who: Caller, ranked: list[index.Ranked]) -> list[index.Ranked]:
    """The results in order, with at most CROSS_DOMAIN_RESULT_CAP records of other domains (an
    exchange service calling for itself is not capped)."""
    if who.is_platform:
        return ranked
    own = who.organization_id if who.organization_type == "hospital" else None
    kept, foreign = [], 0
    for r in ranked:
        if r.record.domain != own:
            foreign += 1
            if foreign > CROSS_DOMAIN_RESULT_CAP:
                continue
        kept.append(r)
    return kept
