"""The registry's copy of consent's decisions (services/registry/decision_cache.py) and the moment
consent says a decision stops holding (`policy.next_change`), with the clock injected."""

from __future__ import annotations

import datetime

from hie.consent.v1 import consent_pb2
from services.consent import policy, provisions
from services.consent.bppc import Directive, DirectiveStatus
from services.registry.decision_cache import ConsentDecisionCache
from services.shared.timestamps import to_timestamp

NOW = datetime.datetime(2026, 12, 6, 8, 0, tzinfo=datetime.UTC)
REQUESTER = ("org-b", "hospital", "dr-1", "doctor", "内科", "treatment", True)
ITEM = ("doc-1", "org-a", "11490-0", "18842-5", "", NOW)
PERMIT = consent_pb2.ItemDecision(
    item_id="doc-1", decision=consent_pb2.DECISION_PERMIT, basis="regional-default:treatment"
)


class Clock:
    def __init__(self) -> None:
        self.at = NOW.timestamp()

    def __call__(self) -> float:
        return self.at


def _answer(*, cacheable: bool = True, until: datetime.datetime | None = None) -> consent_pb2.DecideResponse:
    answer = consent_pb2.DecideResponse(decisions=[PERMIT], cacheable=cacheable)
    if until is not None:
        answer.valid_until.CopyFrom(to_timestamp(until))
    return answer


def _cache(clock: Clock, max_age: float = 10.0) -> ConsentDecisionCache:
    return ConsentDecisionCache(max_age=max_age, clock=clock)


def _put(cache: ConsentDecisionCache, answer: consent_pb2.DecideResponse, *, generation: int | None = None) -> None:
    cache.put(
        "E1",
        REQUESTER,
        [(ITEM, PERMIT)],
        answer=answer,
        generation=cache.generation if generation is None else generation,
        asked_at=cache.now(),
    )


def test_a_kept_permit_is_not_used_from_its_valid_until_on() -> None:
    clock = Clock()
    cache = _cache(clock)
    _put(cache, _answer(until=NOW + datetime.timedelta(seconds=3)))
    clock.at += 2.999
    assert cache.get("E1", REQUESTER, ITEM) == PERMIT
    clock.at += 0.001  # the boundary itself: periods are half-open, the decision may differ now
    assert cache.get("E1", REQUESTER, ITEM) is None


def test_a_kept_permit_is_not_used_past_the_maximum_age() -> None:
    clock = Clock()
    cache = _cache(clock, max_age=5)
    _put(cache, _answer(until=NOW + datetime.timedelta(hours=1)))
    clock.at += 4.9
    assert cache.get("E1", REQUESTER, ITEM) == PERMIT
    clock.at += 0.1
    assert cache.get("E1", REQUESTER, ITEM) is None
    # No boundary ahead at all: the maximum age still ends it.
    _put(cache, _answer())
    clock.at += 5
    assert cache.get("E1", REQUESTER, ITEM) is None


def test_what_consent_does_not_allow_is_never_kept() -> None:
    clock = Clock()
    cache = _cache(clock)
    _put(cache, _answer(cacheable=False))  # break-the-glass in the batch
    assert cache.get("E1", REQUESTER, ITEM) is None
    _put(cache, _answer(until=NOW))  # already past
    assert cache.get("E1", REQUESTER, ITEM) is None
    off = _cache(clock, max_age=0)
    _put(off, _answer())
    assert not off.enabled
    assert off.get("E1", REQUESTER, ITEM) is None


def test_another_requester_or_another_document_is_another_question() -> None:
    cache = _cache(Clock())
    _put(cache, _answer())
    assert cache.get("E1", REQUESTER, ITEM) == PERMIT
    for changed in range(len(REQUESTER)):
        other = tuple(
            ("x" if not isinstance(v, bool) else not v) if i == changed else v for i, v in enumerate(REQUESTER)
        )
        assert cache.get("E1", other, ITEM) is None  # type: ignore[arg-type]
    relabelled = (*ITEM[:4], "PSY", ITEM[5])
    assert cache.get("E1", REQUESTER, relabelled) is None
    assert cache.get("E2", REQUESTER, ITEM) is None


def test_an_invalidation_drops_the_patient_and_an_answer_in_flight() -> None:
    cache = _cache(Clock())
    _put(cache, _answer())
    cache.put("E2", REQUESTER, [(ITEM, PERMIT)], answer=_answer(), generation=cache.generation, asked_at=cache.now())
    asked = cache.generation
    cache.invalidate("E1")
    assert cache.get("E1", REQUESTER, ITEM) is None
    assert cache.get("E2", REQUESTER, ITEM) == PERMIT  # another patient is untouched
    # Asked before the invalidation, answered after it: returned to its caller, never kept.
    _put(cache, _answer(), generation=asked)
    assert cache.get("E1", REQUESTER, ITEM) is None
    cache.invalidate()
    assert len(cache) == 0


def _directive(provision: provisions.Provision, period: provisions.Period | None = None) -> Directive:
    return Directive(
        directive_id="d-1",
        enterprise_id="E1",
        recorded_by_organization_id="org-a",
        provision=provision,
        policy_ids=(),
        evidence_document_id="form-1",
        period=period or provisions.Period(),
        status=DirectiveStatus.ACTIVE,
        revision=1,
        recorded_at=NOW - datetime.timedelta(days=1),
    )


def test_next_change_is_the_first_boundary_of_any_record_ahead() -> None:
    hours = [NOW + datetime.timedelta(hours=h) for h in range(8)]
    assert policy.next_change(policy.PatientConsent(), NOW) is None
    nested = provisions.Provision(
        type=provisions.ProvisionType.DENY,
        provisions=(
            provisions.Provision(type=provisions.ProvisionType.PERMIT, period=provisions.Period(hours[5], hours[6])),
        ),
    )
    consent = policy.PatientConsent(
        directives=(_directive(nested, provisions.Period(NOW - datetime.timedelta(days=2), hours[7])),),
        grants=(policy.AccessGrant("g-1", "org-b", "referral", start=NOW - datetime.timedelta(days=1), end=hours[4]),),
        break_glass=(policy.BreakGlass("bg-1", "org-b", "dr-1", NOW - datetime.timedelta(hours=1), hours[3]),),
    )
    assert policy.next_change(consent, NOW) == hours[3]  # the break-the-glass expiry
    assert policy.next_change(consent, hours[3]) == hours[4]  # a boundary is not ahead of itself
    assert policy.next_change(consent, hours[4]) == hours[5]  # a nested provision's period
    assert policy.next_change(consent, hours[6]) == hours[7]  # the directive's own period
    assert policy.next_change(consent, hours[7]) is None
