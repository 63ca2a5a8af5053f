"""FHIR R4 Consent provisions: what a rule covers, whether it matches a request, how specific it is
(pure: no I/O).

FHIR R4 Consent.provision: "An exception to the base policy of this consent. An exception can
be an addition or removal of access permissions." Each provision constrains period, actor,
action, securityLabel, purpose, class, code, dataPeriod and data, and nests further provisions
(`provision.provision`: "Rules which provide exceptions to the base rule or subrules"). Here a
nested provision applies only inside its parent's scope: it matches when it and every ancestor
match, and it inherits the nearest ancestor's `type` when it has none.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from services.shared.errors import InvalidArgument


class ProvisionType(StrEnum):
    PERMIT = "permit"
    DENY = "deny"


class ActorKind(StrEnum):
    """Whom a provision is about, from the widest to the narrowest."""

    REGION = "region"
    ORGANIZATION = "organization"
    DEPARTMENT = "department"
    PRACTITIONER = "practitioner"


# A narrower actor is more specific (see `Specificity`).
ACTOR_RANK = {ActorKind.REGION: 0, ActorKind.ORGANIZATION: 1, ActorKind.DEPARTMENT: 2, ActorKind.PRACTITIONER: 3}
# FHIR consentaction codes.
ACTIONS = frozenset({"collect", "access", "use", "disclose", "correct"})
# Nesting deeper than this is refused: no real directive needs it and it bounds evaluation cost.
MAX_DEPTH = 5
_MAX_CODES = 50


@dataclass(frozen=True)
class Period:
    """A half-open interval [start, end); an open side is unbounded."""

    start: datetime.datetime | None = None
    end: datetime.datetime | None = None

    def contains(self, moment: datetime.datetime) -> bool:
        return (self.start is None or self.start <= moment) and (self.end is None or moment < self.end)


@dataclass(frozen=True)
class Actor:
    kind: ActorKind
    organization_id: str = ""
    department: str = ""
    practitioner_id: str = ""

    def matches(self, requester: Requester) -> bool:
        if self.kind is ActorKind.REGION:
            return True
        if self.organization_id != requester.organization_id:
            return False
        if self.kind is ActorKind.DEPARTMENT:
            return bool(self.department) and self.department == requester.department
        if self.kind is ActorKind.PRACTITIONER:
            return bool(self.practitioner_id) and self.practitioner_id == requester.practitioner_id
        return True


@dataclass(frozen=True)
class Requester:
    """Who asks and why: organisation from the token; department, practitioner and purpose
    from the hospital's signed user assertion."""

    organization_id: str
    purpose_of_use: str
    department: str = ""
    practitioner_id: str = ""
    action: str = "access"
    # The acting person's role (break-the-glass is bound to the role that declared it).
    role: str = ""
    # The care relationship the exchange checked: the requesting organisation holds a record of
    # the person in its own domain (the mpi's cross-reference says so).
    holds_record: bool = False


@dataclass(frozen=True)
class Item:
    """The attributes of one document the decision is about."""

    item_id: str
    source_organization_id: str
    class_code: str = ""
    type_code: str = ""
    security_labels: frozenset[str] = field(default_factory=frozenset)
    # When the care the document records happened (FHIR dataPeriod is about this time).
    data_time: datetime.datetime | None = None


@dataclass(frozen=True)
class Provision:
    type: ProvisionType | None = None
    period: Period | None = None
    actors: tuple[Actor, ...] = ()
    actions: frozenset[str] = frozenset()
    purposes: frozenset[str] = frozenset()
    classes: frozenset[str] = frozenset()
    types: frozenset[str] = frozenset()
    security_labels: frozenset[str] = frozenset()
    data_period: Period | None = None
    documents: frozenset[str] = frozenset()
    # Obligations a permit by this provision carries (e.g. "deidentify"); a FHIR extension.
    obligations: tuple[str, ...] = ()
    provisions: tuple[Provision, ...] = ()


@dataclass(frozen=True, order=True)
class Specificity:
    """How narrowly a provision (with its ancestors) is scoped; compared field by field in order:

    1. `documents`: 1 if it names the very documents (FHIR `data`), else 0;
    2. `actor`: the rank of the matching actor: practitioner 3, department 2, organisation 1,
       region or no actor 0;
    3. `dimensions`: how many of purpose, action, class, type, security label and data period
       are constrained on the path from the root to the provision;
    4. `depth`: the nesting depth (root 0), so an exception beats the rule it is nested in.

    The provision period is when a rule is in force, not what it covers: it does not count.
    """

    documents: int
    actor: int
    dimensions: int
    depth: int

    def describe(self) -> str:
        return f"documents={self.documents} actor={self.actor} dimensions={self.dimensions} depth={self.depth}"


@dataclass(frozen=True)
class Match:
    """A provision that applies to a request, with where it sits in its directive."""

    type: ProvisionType
    path: str
    specificity: Specificity
    labels_named: frozenset[str]
    obligations: tuple[str, ...]


@dataclass(frozen=True)
class Rule:
    """One provision with a type, flattened together with its ancestors' constraints: it applies
    where it and every ancestor apply (AND along the path). Flattened once per patient load, so a
    batch of documents is checked against plain sets rather than by walking trees."""

    type: ProvisionType
    path: str
    depth: int
    documents_named: bool
    # How many of purpose, action, class, type, security label, data period the path constrains.
    dimensions: int
    labels_named: frozenset[str]
    obligations: tuple[str, ...]
    periods: tuple[Period, ...] = ()
    actor_levels: tuple[tuple[Actor, ...], ...] = ()
    # None: unconstrained; otherwise the intersection of every level's codes.
    actions: frozenset[str] | None = None
    purposes: frozenset[str] | None = None
    classes: frozenset[str] | None = None
    types: frozenset[str] | None = None
    documents: frozenset[str] | None = None
    # Each level's labels: the document must carry one of every level's.
    label_levels: tuple[frozenset[str], ...] = ()
    data_periods: tuple[Period, ...] = ()

    def rank_for(self, requester: Requester, now: datetime.datetime) -> int | None:
        """The actor rank if the rule applies to this requester now, else None (item aside)."""
        for period in self.periods:
            if not period.contains(now):
                return None
        if self.actions is not None and requester.action not in self.actions:
            return None
        if self.purposes is not None and requester.purpose_of_use not in self.purposes:
            return None
        rank = 0
        for actors in self.actor_levels:
            ranks = [ACTOR_RANK[a.kind] for a in actors if a.matches(requester)]
            if not ranks:
                return None
            rank = max(rank, *ranks)
        return rank

    def covers(self, item: Item) -> bool:
        """Whether the document is inside the rule's class, type, labels, documents and data period."""
        if self.classes is not None and item.class_code not in self.classes:
            return False
        if self.types is not None and item.type_code not in self.types:
            return False
        if self.documents is not None and item.item_id not in self.documents:
            return False
        for labels in self.label_levels:
            if not labels & item.security_labels:
                return False
        for period in self.data_periods:
            if item.data_time is None:
                # A document with no care date cannot be shown to fall inside a data period: a deny
                # scoped by one still covers it (fail closed), a permit does not.
                return self.type is ProvisionType.DENY
            if not period.contains(item.data_time):
                return False
        return True

    def specificity(self, actor_rank: int) -> Specificity:
        return Specificity(int(self.documents_named), actor_rank, self.dimensions, self.depth)


def _narrow(current: frozenset[str] | None, values: frozenset[str]) -> frozenset[str] | None:
    if not values:
        return current
    return values if current is None else current & values


@dataclass(frozen=True)
class _Path:
    type: ProvisionType | None = None
    periods: tuple[Period, ...] = ()
    actor_levels: tuple[tuple[Actor, ...], ...] = ()
    actions: frozenset[str] | None = None
    purposes: frozenset[str] | None = None
    classes: frozenset[str] | None = None
    types: frozenset[str] | None = None
    documents: frozenset[str] | None = None
    label_levels: tuple[frozenset[str], ...] = ()
    data_periods: tuple[Period, ...] = ()
    dimensions: frozenset[str] = frozenset()
    obligations: tuple[str, ...] = ()


def flatten(root: Provision) -> tuple[Rule, ...]:
    """Every provision of a directive's tree that has a type (its own or inherited), parents first."""
    rules: list[Rule] = []

    def walk(p: Provision, path: str, depth: int, up: _Path) -> None:
        here = _Path(
            type=p.type or up.type,
            periods=(*up.periods, p.period) if p.period else up.periods,
            actor_levels=(*up.actor_levels, p.actors) if p.actors else up.actor_levels,
            actions=_narrow(up.actions, p.actions),
            purposes=_narrow(up.purposes, p.purposes),
            classes=_narrow(up.classes, p.classes),
            types=_narrow(up.types, p.types),
            documents=_narrow(up.documents, p.documents),
            label_levels=(*up.label_levels, p.security_labels) if p.security_labels else up.label_levels,
            data_periods=(*up.data_periods, p.data_period) if p.data_period else up.data_periods,
            dimensions=up.dimensions | _dimensions(p),
            obligations=(*up.obligations, *p.obligations),
        )
        if here.type is not None:
            rules.append(
                Rule(
                    type=here.type,
                    path=path,
                    depth=depth,
                    documents_named=here.documents is not None,
                    dimensions=len(here.dimensions),
                    labels_named=frozenset().union(*here.label_levels),
                    obligations=here.obligations,
                    periods=here.periods,
                    actor_levels=here.actor_levels,
                    actions=here.actions,
                    purposes=here.purposes,
                    classes=here.classes,
                    types=here.types,
                    documents=here.documents,
                    label_levels=here.label_levels,
                    data_periods=here.data_periods,
                )
            )
        for index, child in enumerate(p.provisions):
            walk(child, f"{path}.provision[{index}]", depth + 1, here)

    walk(root, "provision", 0, _Path())
    return tuple(rules)


def _dimensions(provision: Provision) -> set[str]:
    named = {
        "purpose": provision.purposes,
        "action": provision.actions,
        "class": provision.classes,
        "type": provision.types,
        "security-label": provision.security_labels,
    }
    found = {name for name, values in named.items() if values}
    if provision.data_period is not None:
        found.add("data-period")
    return found


def matches(root: Provision, requester: Requester, item: Item, now: datetime.datetime) -> list[Match]:
    """Every provision of a directive's tree that applies to the request (parents before children)."""
    found = []
    for rule in flatten(root):
        rank = rule.rank_for(requester, now)
        if rank is not None and rule.covers(item):
            found.append(Match(rule.type, rule.path, rule.specificity(rank), rule.labels_named, rule.obligations))
    return found


def iter_provisions(root: Provision) -> Iterator[Provision]:
    yield root
    for child in root.provisions:
        yield from iter_provisions(child)


# --- the JSON form the exchange stores and its REST API speaks --------------------------------


def _time(value: Any, what: str) -> datetime.datetime | None:
    if value in (None, ""):
        return None
    if isinstance(value, datetime.datetime):
        moment = value
    else:
        try:
            moment = datetime.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        except ValueError:
            raise InvalidArgument(f"{what} is not an ISO 8601 date-time", reason="provision-invalid") from None
    if moment.tzinfo is None:
        raise InvalidArgument(f"{what} must carry a time zone", reason="provision-invalid")
    return moment.astimezone(datetime.UTC)


def period_from_json(value: Any, what: str) -> Period | None:
    if value in (None, {}):
        return None
    if not isinstance(value, Mapping):
        raise InvalidArgument(f"{what} must be an object with start / end", reason="provision-invalid")
    period = Period(_time(value.get("start"), f"{what}.start"), _time(value.get("end"), f"{what}.end"))
    if period.start and period.end and period.end <= period.start:
        raise InvalidArgument(f"{what} ends before it starts", reason="provision-invalid")
    return period


def period_to_json(period: Period | None) -> dict[str, str] | None:
    if period is None:
        return None
    out = {}
    if period.start:
        out["start"] = period.start.isoformat()
    if period.end:
        out["end"] = period.end.isoformat()
    return out


def _codes(value: Any, what: str, allowed: frozenset[str] | None = None) -> frozenset[str]:
    if value in (None, []):
        return frozenset()
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) > _MAX_CODES:
        raise InvalidArgument(f"{what} must be a list of at most {_MAX_CODES} codes", reason="provision-invalid")
    codes = frozenset(str(v).strip() for v in value)
    if any(not c or len(c) > 128 for c in codes):
        raise InvalidArgument(f"{what} holds an empty or over-long code", reason="provision-invalid")
    if allowed is not None and not codes <= allowed:
        raise InvalidArgument(f"{what} must be among {', '.join(sorted(allowed))}", reason="provision-invalid")
    return codes


def _actor_from_json(value: Any) -> Actor:
    if not isinstance(value, Mapping):
        raise InvalidArgument("an actor must be an object", reason="provision-invalid")
    try:
        kind = ActorKind(value.get("kind", ""))
    except ValueError:
        raise InvalidArgument(
            "actor kind must be region, organization, department or practitioner", reason="provision-invalid"
        ) from None
    actor = Actor(
        kind=kind,
        organization_id=str(value.get("organization_id", ""))[:64],
        department=str(value.get("department", ""))[:64],
        practitioner_id=str(value.get("practitioner_id", ""))[:64],
    )
    if kind is not ActorKind.REGION and not actor.organization_id:
        raise InvalidArgument(
            "an organisation, department or practitioner actor names its organisation", reason="provision-invalid"
        )
    if kind is ActorKind.DEPARTMENT and not actor.department:
        raise InvalidArgument("a department actor names the department", reason="provision-invalid")
    if kind is ActorKind.PRACTITIONER and not actor.practitioner_id:
        raise InvalidArgument("a practitioner actor names the practitioner", reason="provision-invalid")
    return actor


def provision_from_json(value: Any, *, purposes: frozenset[str], depth: int = 0) -> Provision:
    """Parse and check a provision tree; InvalidArgument (reason `provision-invalid`) on bad input."""
    if not isinstance(value, Mapping):
        raise InvalidArgument("a provision must be an object", reason="provision-invalid")
    if depth > MAX_DEPTH:
        raise InvalidArgument(f"provisions nest at most {MAX_DEPTH} deep", reason="provision-invalid")
    raw_type = value.get("type")
    try:
        type_ = ProvisionType(raw_type) if raw_type not in (None, "") else None
    except ValueError:
        raise InvalidArgument("provision type must be permit or deny", reason="provision-invalid") from None
    actors = value.get("actors") or []
    if not isinstance(actors, Sequence) or isinstance(actors, str) or len(actors) > _MAX_CODES:
        raise InvalidArgument("actors must be a list", reason="provision-invalid")
    children = value.get("provisions") or []
    if not isinstance(children, Sequence) or isinstance(children, str) or len(children) > _MAX_CODES:
        raise InvalidArgument("provisions must be a list", reason="provision-invalid")
    return Provision(
        type=type_,
        period=period_from_json(value.get("period"), "period"),
        actors=tuple(_actor_from_json(a) for a in actors),
        actions=_codes(value.get("actions"), "actions", ACTIONS),
        purposes=_codes(value.get("purposes"), "purposes", purposes),
        classes=_codes(value.get("classes"), "classes"),
        types=_codes(value.get("types"), "types"),
        security_labels=_codes(value.get("security_labels"), "security_labels"),
        data_period=period_from_json(value.get("data_period"), "data_period"),
        documents=_codes(value.get("documents"), "documents"),
        obligations=tuple(sorted(_codes(value.get("obligations"), "obligations"))),
        provisions=tuple(provision_from_json(c, purposes=purposes, depth=depth + 1) for c in children),
    )


def provision_to_json(provision: Provision) -> dict[str, Any]:
    """The stored / REST form; empty constraints are left out."""
    out: dict[str, Any] = {}
    if provision.type is not None:
        out["type"] = provision.type.value
    if provision.period is not None:
        out["period"] = period_to_json(provision.period)
    if provision.actors:
        out["actors"] = [
            {
                k: v
                for k, v in {
                    "kind": a.kind.value,
                    "organization_id": a.organization_id,
                    "department": a.department,
                    "practitioner_id": a.practitioner_id,
                }.items()
                if v
            }
            for a in provision.actors
        ]
    for name in ("actions", "purposes", "classes", "types", "security_labels", "documents"):
        values = getattr(provision, name)
        if values:
            out[name] = sorted(values)
    if provision.data_period is not None:
        out["data_period"] = period_to_json(provision.data_period)
    if provision.obligations:
        out["obligations"] = list(provision.obligations)
    if provision.provisions:
        out["provisions"] = [provision_to_json(c) for c in provision.provisions]
    return out
