"""Properties of the consent decision over generated directives (hypothesis): what must hold
whatever the patient recorded."""

from __future__ import annotations

import dataclasses
import datetime

from hypothesis import given, settings
from hypothesis import strategies as st

from services.consent.bppc import Directive, DirectiveStatus
from services.consent.policy import (
    RESTRICTED_SENSITIVITY,
    ConsentDecision,
    PatientConsent,
    RegionalPolicy,
    RegionMode,
    decide,
    decide_batch,
)
from services.consent.provisions import Actor, ActorKind, Item, Period, Provision, ProvisionType, Requester

NOW = datetime.datetime(2026, 11, 22, 8, tzinfo=datetime.UTC)
ORGS = ("org-a", "org-b", "org-c")
LABELS = ("PSY", "HIV", "N", "R")
times = st.sampled_from(
    [None, NOW - datetime.timedelta(days=30), NOW - datetime.timedelta(hours=1), NOW + datetime.timedelta(days=1)]
)


@st.composite
def periods(draw: st.DrawFn) -> Period | None:
    start, end = draw(times), draw(times)
    if start and end and end <= start:
        return None
    return Period(start, end) if (start or end) else None


actors = st.one_of(
    st.just(Actor(ActorKind.REGION)),
    st.builds(Actor, st.just(ActorKind.ORGANIZATION), st.sampled_from(ORGS)),
    st.builds(Actor, st.just(ActorKind.DEPARTMENT), st.sampled_from(ORGS), st.sampled_from(["心内科", "急诊科"])),
    st.builds(
        Actor, st.just(ActorKind.PRACTITIONER), st.sampled_from(ORGS), st.just(""), st.sampled_from(["D1", "D2"])
    ),
)
codes = st.frozensets


def provisions(depth: int = 2) -> st.SearchStrategy[Provision]:
    children = st.lists(provisions(depth - 1), max_size=2) if depth else st.just([])
    return st.builds(
        Provision,
        type=st.sampled_from([None, ProvisionType.PERMIT, ProvisionType.DENY]),
        period=periods(),
        actors=st.lists(actors, max_size=2).map(tuple),
        actions=codes(st.sampled_from(["access", "disclose"]), max_size=1),
        purposes=codes(st.sampled_from(["treatment", "research", "referral", "emergency"]), max_size=2),
        classes=codes(st.sampled_from(["clinical-note", "imaging"]), max_size=1),
        types=codes(st.sampled_from(["18842-5", "11502-2"]), max_size=1),
        security_labels=codes(st.sampled_from(LABELS), max_size=2),
        data_period=periods(),
        documents=codes(st.sampled_from(["doc-1", "doc-2"]), max_size=1),
        provisions=children.map(tuple),
    )


directives = st.lists(
    st.builds(
        Directive,
        directive_id=st.uuids().map(str),
        enterprise_id=st.just("E-1"),
        recorded_by_organization_id=st.just("org-a"),
        provision=provisions(),
        status=st.sampled_from(list(DirectiveStatus)),
        recorded_at=st.just(NOW - datetime.timedelta(days=1)),
    ),
    max_size=4,
)
requesters = st.builds(
    Requester,
    organization_id=st.sampled_from(ORGS),
    purpose_of_use=st.sampled_from(["treatment", "research", "referral", "emergency"]),
    department=st.sampled_from(["心内科", "急诊科"]),
    practitioner_id=st.sampled_from(["D1", "D2"]),
    action=st.sampled_from(["access", "disclose"]),
)
items = st.builds(
    Item,
    item_id=st.sampled_from(["doc-1", "doc-2", "doc-3"]),
    source_organization_id=st.sampled_from(ORGS),
    class_code=st.sampled_from(["clinical-note", "imaging"]),
    type_code=st.sampled_from(["18842-5", "11502-2"]),
    security_labels=codes(st.sampled_from(LABELS), max_size=2),
    data_time=times,
)
policies = st.builds(RegionalPolicy, mode=st.sampled_from(list(RegionMode)))


@settings(max_examples=50, deadline=None)
@given(policies, directives, requesters, items)
def test_own_documents_are_always_permitted(
    policy: RegionalPolicy, recorded: list[Directive], requester: Requester, item: Item
) -> None:
    own = dataclasses.replace(item, source_organization_id=requester.organization_id)
    verdict = decide(policy, PatientConsent(directives=tuple(recorded)), requester, own, NOW)
    assert (verdict.decision, verdict.basis) == (ConsentDecision.PERMIT, "own-document")


@settings(max_examples=50, deadline=None)
@given(policies, directives, requesters, items)
def test_restricted_classes_need_a_permit_naming_them(
    policy: RegionalPolicy, recorded: list[Directive], requester: Requester, item: Item
) -> None:
    verdict = decide(policy, PatientConsent(directives=tuple(recorded)), requester, item, NOW)
    restricted = item.security_labels & RESTRICTED_SENSITIVITY
    if verdict.decision is ConsentDecision.PERMIT and restricted and verdict.basis != "own-document":
        # No break-the-glass here: only a directive permit can share it, and it names the labels.
        assert verdict.basis == "directive-permit"
        directive_id, _, path = verdict.reference.removeprefix("Consent/").partition("#")
        named: set[str] = set()
        node = next(d for d in recorded if d.directive_id == directive_id).provision
        named |= node.security_labels
        for step in path.split(".")[1:]:
            node = node.provisions[int(step.removeprefix("provision[").removesuffix("]"))]
            named |= node.security_labels
        assert restricted <= named


@settings(max_examples=50, deadline=None)
@given(policies, directives, requesters, items)
def test_a_revoked_directive_is_as_if_never_recorded(
    policy: RegionalPolicy, recorded: list[Directive], requester: Requester, item: Item
) -> None:
    active = tuple(d for d in recorded if d.status is DirectiveStatus.ACTIVE)
    revoked = tuple(dataclasses.replace(d, status=DirectiveStatus.REVOKED) for d in recorded if d not in active)
    with_revoked = decide(policy, PatientConsent(directives=active + revoked), requester, item, NOW)
    without = decide(policy, PatientConsent(directives=active), requester, item, NOW)
    assert (with_revoked.decision, with_revoked.basis, with_revoked.reference) == (
        without.decision,
        without.basis,
        without.reference,
    )


@settings(max_examples=50, deadline=None)
@given(policies, directives, requesters, st.lists(items, max_size=6))
def test_a_batch_decides_each_document_as_alone(
    policy: RegionalPolicy, recorded: list[Directive], requester: Requester, batch: list[Item]
) -> None:
    consent = PatientConsent(directives=tuple(recorded))
    assert decide_batch(policy, consent, requester, batch, NOW) == [
        decide(policy, consent, requester, item, NOW) for item in batch
    ]
