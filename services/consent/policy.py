"""The exchange's consent decision (pure: no I/O): the regional policy, the patient's directives,
referral / consultation grants and break-the-glass, combined by the precedence rules below
(also written in services/consent/README.md, which must say exactly this).

For one document and one request, the first rule that applies decides:

1. Own document: the requesting organisation registered the document → PERMIT `own-document`.
1a. Care relationship: the requesting organisation holds no record of the person in its own
   domain and no active referral or consultation grant of it covers the document → DENY
   `no-care-relationship` (a hospital reads another's documents about a person it registered
   itself, or that a referral or consultation sent it; an authority or the platform never reads
   clinical content this way). Linking by national id is evidence of identity; the care
   relationship is the record the hospital registered, which the authority's registration report
   watches.
2. Patient directives: among the provisions of the patient's directives in force that match the
   request, the most specific (`provisions.Specificity`) decides; at equal specificity a deny
   beats a permit. A permit matches a document carrying a restricted sensitivity label only if
   the provision or one of its ancestors names that label (every restricted label the document
   carries). → PERMIT `directive-permit` / DENY `directive-deny`.
3. Grant: an active referral or consultation grant to the requesting organisation, for the
   request's purpose, covering the document (attached to it, or a patient summary when the grant
   includes the summary), and the document carries no restricted label → PERMIT `grant`.
4. Restricted sensitivity: the document carries a restricted label → DENY `restricted-sensitivity`.
5. Regional default: opt-out region and the purpose is one the region permits by default →
   PERMIT `regional-default:<purpose>`; opt-out otherwise → DENY
   `regional-default:purpose-not-permitted`; opt-in region → DENY `regional-default:opt-in`.
6. Break-the-glass: a DENY from rules 1a, 2, 4 or 5 becomes PERMIT `break-glass` when the
   requesting practitioner of the requesting organisation, acting in the role (a doctor) and the
   department that declared it, has declared break-the-glass for this patient, it has not
   expired, the purpose is `emergency`, and the document carries no label the region marks never
   overridable.

A PERMIT carries the obligations of the deciding provision and those the region attaches to the
purpose (research: de-identify).
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from functools import cached_property
from pathlib import Path
from typing import Any

from services.consent.bppc import Directive
from services.consent.provisions import Item, ProvisionType, Requester, Rule, Specificity, flatten
from services.shared.config import ComponentSettings

__all__ = ["Item", "Requester"]


class ConsentDecision(StrEnum):
    PERMIT = "permit"
    DENY = "deny"


class RegionMode(StrEnum):
    # Sharing for the default purposes is permitted unless the patient objects.
    OPT_OUT = "opt-out"
    # Nothing is shared until the patient agrees.
    OPT_IN = "opt-in"


# HL7 v3 ActCode sensitivity classes (InformationSensitivityPolicy) restricted by default:
# mental health (PSY), HIV (HIV), sexually transmitted disease (STD), substance use (ETH),
# sexuality and reproductive health (SEX), genetic disease (GDIS), sexual / domestic violence (SDV).
RESTRICTED_SENSITIVITY = frozenset({"PSY", "HIV", "STD", "ETH", "SEX", "GDIS", "SDV"})
DEFAULT_PERMITTED_PURPOSES = frozenset({"treatment"})
# LOINC 60591-5 Patient summary Document: what "the patient's summary" of a grant means.
PATIENT_SUMMARY_TYPES = frozenset({"60591-5"})
EMERGENCY = "emergency"
# Break-the-glass is declared by a doctor (the consent servicer's DeclareBreakGlass), and serves
# only that role: the same practitioner id asserting another role does not inherit it.
BREAK_GLASS_ROLE = "doctor"


@dataclass(frozen=True)
class Obligation:
    """What the receiver must do with a permitted document (e.g. mask fields)."""

    code: str
    masked_fields: tuple[str, ...] = ()
    display: str = ""


# The obligations the exchange knows; a provision or the region names them by code.
OBLIGATIONS: dict[str, Obligation] = {
    "deidentify": Obligation(
        "deidentify",
        ("name", "national-id", "phone", "address-below-city"),
        "de-identified: no name, national id, phone, or address below city",
    ),
    "no-redisclosure": Obligation("no-redisclosure", (), "do not disclose further"),
}


@dataclass(frozen=True)
class RegionalPolicy:
    """The region's consent policy, from HIE_CONSENT_* settings or a policy file."""

    mode: RegionMode = RegionMode.OPT_OUT
    default_purposes: frozenset[str] = DEFAULT_PERMITTED_PURPOSES
    restricted_labels: frozenset[str] = RESTRICTED_SENSITIVITY
    never_overridable: frozenset[str] = frozenset()
    break_glass_seconds: int = 4 * 3600
    grant_grace_seconds: int = 7 * 24 * 3600
    summary_types: frozenset[str] = PATIENT_SUMMARY_TYPES
    obligations_by_purpose: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: {"research": ("deidentify",)})

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> RegionalPolicy:
        """A policy from a JSON object with the field names above (lists for sets)."""
        policy = cls()
        if "mode" in data:
            policy = replace(policy, mode=RegionMode(data["mode"]))
        for name in ("default_purposes", "restricted_labels", "never_overridable", "summary_types"):
            if name in data:
                policy = replace(policy, **{name: frozenset(str(v) for v in data[name])})
        for name in ("break_glass_seconds", "grant_grace_seconds"):
            if name in data:
                policy = replace(policy, **{name: int(data[name])})
        if "obligations_by_purpose" in data:
            by_purpose = {str(k): tuple(str(c) for c in v) for k, v in data["obligations_by_purpose"].items()}
            unknown = {c for codes in by_purpose.values() for c in codes} - OBLIGATIONS.keys()
            if unknown:
                raise ValueError(f"unknown obligation codes: {sorted(unknown)}")
            policy = replace(policy, obligations_by_purpose=by_purpose)
        if policy.break_glass_seconds <= 0 or policy.grant_grace_seconds < 0:
            raise ValueError("break-glass duration must be positive and the grant grace not negative")
        return policy

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> RegionalPolicy:
        """HIE_CONSENT_POLICY_FILE (JSON) first, then single settings override it:
        HIE_CONSENT_REGION_MODE, HIE_CONSENT_BREAK_GLASS_SECONDS, HIE_CONSENT_GRANT_GRACE_SECONDS,
        HIE_CONSENT_NEVER_OVERRIDABLE (comma-separated labels)."""
        env = ComponentSettings.from_env("consent").environ() if env is None else env
        data: dict[str, Any] = {}
        if env.get("HIE_CONSENT_POLICY_FILE"):
            data.update(json.loads(Path(env["HIE_CONSENT_POLICY_FILE"]).read_text(encoding="utf-8")))
        if env.get("HIE_CONSENT_REGION_MODE"):
            data["mode"] = env["HIE_CONSENT_REGION_MODE"]
        if env.get("HIE_CONSENT_BREAK_GLASS_SECONDS"):
            data["break_glass_seconds"] = env["HIE_CONSENT_BREAK_GLASS_SECONDS"]
        if env.get("HIE_CONSENT_GRANT_GRACE_SECONDS"):
            data["grant_grace_seconds"] = env["HIE_CONSENT_GRANT_GRACE_SECONDS"]
        if "HIE_CONSENT_NEVER_OVERRIDABLE" in env:
            data["never_overridable"] = [v for v in env["HIE_CONSENT_NEVER_OVERRIDABLE"].split(",") if v]
        return cls.from_mapping(data)


@dataclass(frozen=True)
class AccessGrant:
    """Access a referral or consultation gives the receiving organisation for its purpose."""

    grant_id: str
    organization_id: str
    purpose_of_use: str
    document_ids: frozenset[str] = frozenset()
    include_summary: bool = True
    start: datetime.datetime | None = None
    # None while the referral or consultation is open; closing sets it to close + grace.
    end: datetime.datetime | None = None
    revoked: bool = False
    reference: str = ""
    revoked_at: datetime.datetime | None = None

    def active(self, now: datetime.datetime) -> bool:
        # Revoked from its revocation on (before it, for explaining a past decision).
        if self.revoked and (self.revoked_at is None or now >= self.revoked_at):
            return False
        return (self.start is None or self.start <= now) and (self.end is None or now < self.end)


@dataclass(frozen=True)
class BreakGlass:
    """A clinician's declared emergency access to one patient, for a bounded time."""

    break_glass_id: str
    organization_id: str
    practitioner_id: str
    starts: datetime.datetime
    expires: datetime.datetime
    department: str = ""

    def covers(self, requester: Requester, now: datetime.datetime) -> bool:
        return (
            self.organization_id == requester.organization_id
            and self.practitioner_id == requester.practitioner_id
            and requester.role == BREAK_GLASS_ROLE
            and self.department == requester.department
            and self.starts <= now < self.expires
        )


@dataclass(frozen=True)
class PatientConsent:
    """Everything recorded about one patient's consent, as read for a decision."""

    directives: tuple[Directive, ...] = ()
    grants: tuple[AccessGrant, ...] = ()
    break_glass: tuple[BreakGlass, ...] = ()

    @cached_property
    def rules(self) -> tuple[tuple[Directive, Rule], ...]:
        """Every typed provision of every directive, flattened once (a cached patient reuses them)."""
        return tuple((d, rule) for d in self.directives for rule in flatten(d.provision))


@dataclass(frozen=True)
class Verdict:
    item_id: str
    decision: ConsentDecision
    # The rule that decided (see the module docstring).
    basis: str
    # What in particular decided: `Consent/<id>#provision...`, `grant/<id>`, `break-glass/<id>`.
    reference: str = ""
    obligations: tuple[Obligation, ...] = ()
    break_glass: bool = False
    # For explain: the decision the rules gave before break-the-glass, and why the winner won.
    overridden: str = ""
    detail: str = ""


@dataclass(frozen=True)
class _Applicable:
    """A rule in force that applies to the requester, with its (item-independent) specificity."""

    directive: Directive
    rule: Rule
    specificity: Specificity


_EPOCH = datetime.datetime.min.replace(tzinfo=datetime.UTC)


def _applicable(consent: PatientConsent, requester: Requester, now: datetime.datetime) -> list[_Applicable]:
    """The directive rules that apply to this requester now, best first: most specific, then deny
    before permit, then the newest directive. Specificity does not depend on the document, so for
    each document the first rule that covers it is the one that decides."""
    found = []
    for directive, rule in consent.rules:
        if not directive.in_force(now):
            continue
        rank = rule.rank_for(requester, now)
        if rank is not None:
            found.append(_Applicable(directive, rule, rule.specificity(rank)))
    found.sort(
        key=lambda a: (
            a.specificity,
            a.rule.type is ProvisionType.DENY,
            a.directive.recorded_at or _EPOCH,
            a.directive.directive_id,
        ),
        reverse=True,
    )
    return found


def _obligations(policy: RegionalPolicy, requester: Requester, codes: tuple[str, ...]) -> tuple[Obligation, ...]:
    wanted = [*codes, *policy.obligations_by_purpose.get(requester.purpose_of_use, ())]
    seen: dict[str, Obligation] = {}
    for code in wanted:
        if code not in seen:
            seen[code] = OBLIGATIONS.get(code, Obligation(code))
    return tuple(seen.values())


def _grant_covers(policy: RegionalPolicy, grant: AccessGrant, item: Item) -> bool:
    return item.item_id in grant.document_ids or (grant.include_summary and item.type_code in policy.summary_types)


@dataclass(frozen=True)
class _Context:
    policy: RegionalPolicy
    requester: Requester
    now: datetime.datetime
    rules: list[_Applicable]
    grants: list[AccessGrant]
    break_glass: BreakGlass | None


def _without_break_glass(ctx: _Context, item: Item) -> Verdict:
    policy, requester = ctx.policy, ctx.requester
    if item.source_organization_id == requester.organization_id:
        return Verdict(item.item_id, ConsentDecision.PERMIT, "own-document")
    if not requester.holds_record and not any(_grant_covers(policy, g, item) for g in ctx.grants):
        return Verdict(item.item_id, ConsentDecision.DENY, "no-care-relationship")
    restricted = item.security_labels & policy.restricted_labels
    covering = [
        a
        for a in ctx.rules
        # A restricted class is never shared without a permit that names it.
        if a.rule.covers(item) and (a.rule.type is ProvisionType.DENY or restricted <= a.rule.labels_named)
    ]
    if covering:
        best = covering[0]
        reference = f"Consent/{best.directive.directive_id}#{best.rule.path}"
        detail = f"most specific of {len(covering)} matching provision(s): {best.specificity.describe()}"
        if best.rule.type is ProvisionType.PERMIT:
            return Verdict(
                item.item_id,
                ConsentDecision.PERMIT,
                "directive-permit",
                reference,
                _obligations(policy, requester, best.rule.obligations),
                detail=detail,
            )
        return Verdict(item.item_id, ConsentDecision.DENY, "directive-deny", reference, detail=detail)
    if restricted:
        return Verdict(
            item.item_id, ConsentDecision.DENY, "restricted-sensitivity", detail=",".join(sorted(restricted))
        )
    for grant in ctx.grants:
        if _grant_covers(policy, grant, item):
            return Verdict(
                item.item_id,
                ConsentDecision.PERMIT,
                "grant",
                f"grant/{grant.grant_id}",
                _obligations(policy, requester, ()),
                detail=grant.reference,
            )
    if policy.mode is RegionMode.OPT_IN:
        return Verdict(item.item_id, ConsentDecision.DENY, "regional-default:opt-in")
    if requester.purpose_of_use in policy.default_purposes:
        return Verdict(
            item.item_id,
            ConsentDecision.PERMIT,
            f"regional-default:{requester.purpose_of_use}",
            obligations=_obligations(policy, requester, ()),
        )
    return Verdict(item.item_id, ConsentDecision.DENY, "regional-default:purpose-not-permitted")


def _decide(ctx: _Context, item: Item) -> Verdict:
    verdict = _without_break_glass(ctx, item)
    glass = ctx.break_glass
    if verdict.decision is ConsentDecision.PERMIT or glass is None:
        return verdict
    if item.security_labels & ctx.policy.never_overridable:
        return verdict
    return Verdict(
        item.item_id,
        ConsentDecision.PERMIT,
        "break-glass",
        f"break-glass/{glass.break_glass_id}",
        _obligations(ctx.policy, ctx.requester, ()),
        break_glass=True,
        overridden=verdict.basis,
        detail=f"expires {glass.expires.isoformat()}",
    )


def decide_batch(
    policy: RegionalPolicy,
    consent: PatientConsent,
    requester: Requester,
    items: Sequence[Item],
    now: datetime.datetime,
) -> list[Verdict]:
    """The decision for each document of one patient, for one requester, at one moment."""
    ctx = _Context(
        policy=policy,
        requester=requester,
        now=now,
        rules=_applicable(consent, requester, now),
        grants=[
            g
            for g in consent.grants
            if g.active(now)
            and g.organization_id == requester.organization_id
            and g.purpose_of_use == requester.purpose_of_use
        ],
        # Break-the-glass serves requests for the purpose emergency only.
        break_glass=next((g for g in consent.break_glass if g.covers(requester, now)), None)
        if requester.purpose_of_use == EMERGENCY
        else None,
    )
    return [_decide(ctx, item) for item in items]


def next_change(consent: PatientConsent, now: datetime.datetime) -> datetime.datetime | None:
    """The first moment after `now` at which the patient's records may decide differently on
    their own, with nothing recorded: a directive's effective period or one of its provisions'
    periods starts or ends, a revocation takes effect, a grant starts or ends, a break-the-glass
    starts or expires. None when no such moment lies ahead.

    Conservative: every boundary of every record counts, whether or not it decided anything for
    the request at hand, so a decision kept until this moment (the registry's decision cache) is
    the decision the rules would give at any moment before it. A data period is not a boundary:
    it is compared with the document's care time, not with now."""
    moments: list[datetime.datetime | None] = []
    for directive in consent.directives:
        moments += (directive.period.start, directive.period.end, directive.revoked_at)
    for _directive, rule in consent.rules:
        for period in rule.periods:
            moments += (period.start, period.end)
    for grant in consent.grants:
        moments += (grant.start, grant.end, grant.revoked_at)
    for glass in consent.break_glass:
        moments += (glass.starts, glass.expires)
    ahead = [m for m in moments if m is not None and m > now]
    return min(ahead, default=None)


def decide(
    policy: RegionalPolicy,
    consent: PatientConsent,
    requester: Requester,
    item: Item,
    now: datetime.datetime,
) -> Verdict:
    """The decision for one document (rules in the module docstring, first applicable wins)."""
    return decide_batch(policy, consent, requester, [item], now)[0]


_BASIS_WORDS = {
    "own-document": "the requesting organisation registered this document and always sees its own documents",
    "directive-permit": "a provision of the patient's consent directive permits this access",
    "directive-deny": "a provision of the patient's consent directive denies this access",
    "grant": "an accepted referral or consultation grants the requesting organisation access for this purpose",
    "no-care-relationship": "the requesting organisation holds no record of this person in its own domain and "
    "no referral or consultation grants it access",
    "restricted-sensitivity": "the document is in a restricted sensitivity class and no provision of the "
    "patient's directives explicitly permits it",
    "regional-default:opt-in": "the region is opt-in and the patient has not permitted this access",
    "regional-default:purpose-not-permitted": "no directive or grant applies and the regional default does "
    "not permit this purpose of use",
    "break-glass": "the practitioner declared break-the-glass for this patient; the access is audited as "
    "break-glass and the patient's home hospital is notified",
}


def explain(verdict: Verdict, requester: Requester, item: Item) -> str:
    """The decision in words, for auditors (ids and codes only: no patient data)."""
    who = f"organisation {requester.organization_id}"
    if requester.department:
        who += f", department {requester.department}"
    if requester.practitioner_id:
        who += f", practitioner {requester.practitioner_id}"
    words = _BASIS_WORDS.get(verdict.basis)
    if words is None and verdict.basis.startswith("regional-default:"):
        words = f"no directive or grant applies and the regional default permits the purpose {requester.purpose_of_use}"
    parts = [
        f"{verdict.decision.value.upper()}: document {item.item_id} (from organisation {item.source_organization_id})"
        f" for {who}, purpose of use {requester.purpose_of_use or 'none'}, action {requester.action}.",
        f"Rule: {words or verdict.basis}.",
    ]
    if verdict.reference:
        parts.append(f"Decided by {verdict.reference}.")
    if verdict.basis == "restricted-sensitivity":
        parts.append(f"Restricted labels on the document: {verdict.detail}.")
    elif verdict.basis.startswith("directive-"):
        parts.append(
            f"It was the {verdict.detail}; a more specific provision wins, and a deny wins over a permit "
            "of equal specificity."
        )
    elif verdict.basis == "grant" and verdict.detail:
        parts.append(f"Granted by {verdict.detail}.")
    if verdict.break_glass:
        parts.append(f"Without break-the-glass the rule {verdict.overridden} would have denied it; {verdict.detail}.")
    for obligation in verdict.obligations:
        parts.append(f"Obligation {obligation.code}: {obligation.display or obligation.code}.")
    return " ".join(parts)
