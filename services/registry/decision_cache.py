"""The registry's copy of consent's decisions, for the document query and read hot path.

Consent is still checked on every read: a kept decision is consent's own answer to the same
question — the same patient, the same requester (organisation and its type, practitioner, role,
department, purpose of use, whether the organisation holds a record of the person) and the same
document attributes (id, source, class, type, labels, care time) — applied and audited by the
registry exactly as a fresh answer. Only what may be kept is kept, and only while it holds:

1. Consent says what may be kept. A Decide answer is `cacheable` unless an item was permitted
   only by break-the-glass (every such access must reach consent, which audits it), and carries
   `valid_until`, the first moment the patient's records decide differently on their own (a
   directive's or provision's period, a grant's start or end, a break-the-glass's start or expiry:
   `policy.next_change`). A kept decision is used only before that moment and before `max_age`
   (HIE_REGISTRY_CONSENT_CACHE_SECONDS) has passed since it was asked.
2. Consent pushes every change. Each consent write that may change a decision about a patient
   (record, revise, revoke a directive; grant or revoke a grant; declare break-the-glass) commits,
   then calls InvalidateConsentDecisions for that patient and returns to its caller only after the
   registry acknowledged (services/consent/invalidation.py). So any read that starts after such a
   change returned finds no decision about the patient kept from before it.
3. A decision asked *before* such an invalidation must not be kept after it. The version is the
   registry's own monotonic `generation`, moved on by every invalidation: an answer is kept only
   if the generation did not move while it was in flight. (Consent commits before it pushes, so an
   answer asked after an invalidation arrived already reflects the change.)

The care relationship (does the requesting organisation hold a record of the person) is part of
the question, taken from the mpi's cross-reference, which the mpi invalidates in turn
(xref_cache.py). Consent pushes to every registry replica (HIE_REGISTRY_REPLICAS), each with its
own generation. What the acknowledged push cannot cover — a consent service that stops between
its commit and its push, a replica that could not be reached, a consent restarted with another
regional policy — is bounded by `max_age`; `0` turns the cache off.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

from hie.consent.v1 import consent_pb2

# Who asks, as far as a decision depends on it: organisation, organisation type, practitioner,
# role, department, purpose of use, and whether the organisation holds a record of the person.
Requester = tuple[str, str, str, str, str, str, bool]
# What is asked about: the DecisionItem's fields (id, source organisation, class, type, labels,
# care time), as the registry holds them.
ItemKey = tuple[object, ...]


class ConsentDecisionCache:
    """Consent's decisions by patient, requester and document, kept until consent invalidates the
    patient, the decision's `valid_until` or `max_age` passes (whichever comes first)."""

    def __init__(
        self,
        *,
        max_age: float = 10.0,
        max_patients: int = 20_000,
        max_per_patient: int = 2_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._max_age = max(0.0, max_age)
        self._max_patients = max_patients
        self._max_per_patient = max_per_patient
        # Wall-clock seconds: consent's `valid_until` is a moment, not a duration.
        self._clock = clock
        self._patients: OrderedDict[str, dict[tuple[Requester, ItemKey], tuple[float, consent_pb2.ItemDecision]]] = (
            OrderedDict()
        )
        self.generation = 0

    @property
    def enabled(self) -> bool:
        return self._max_age > 0

    def now(self) -> float:
        """The cache's clock (asked before a decision is requested: `put`'s `asked_at`)."""
        return self._clock()

    def __len__(self) -> int:
        return sum(len(kept) for kept in self._patients.values())

    def kept_for(self, enterprise_id: str) -> int:
        """How many decisions about the patient are kept (expired ones included)."""
        return len(self._patients.get(enterprise_id, ()))

    def invalidate(self, enterprise_id: str = "") -> int:
        """Drop the patient's decisions (every patient's when empty) and move the generation on,
        so that no answer in flight is kept."""
        self.generation += 1
        if enterprise_id:
            self._patients.pop(enterprise_id, None)
        else:
            self._patients.clear()
        return self.generation

    def get(self, enterprise_id: str, requester: Requester, item: ItemKey) -> consent_pb2.ItemDecision | None:
        """The kept decision, while it is valid."""
        kept = self._patients.get(enterprise_id)
        if kept is None:
            return None
        hit = kept.get((requester, item))
        if hit is None:
            return None
        if hit[0] <= self._clock():
            del kept[(requester, item)]
            return None
        self._patients.move_to_end(enterprise_id)
        return hit[1]

    def put(
        self,
        enterprise_id: str,
        requester: Requester,
        decisions: Iterable[tuple[ItemKey, consent_pb2.ItemDecision]],
        *,
        answer: consent_pb2.DecideResponse,
        generation: int,
        asked_at: float,
    ) -> None:
        """Keep consent's answer, asked at `asked_at` when the generation was `generation`, if
        consent allows it and no invalidation arrived while it was in flight."""
        if not self.enabled or not answer.cacheable or generation != self.generation:
            return
        until = asked_at + self._max_age
        if answer.HasField("valid_until"):
            until = min(until, answer.valid_until.ToMicroseconds() / 1_000_000)
        if until <= self._clock():
            return
        kept = self._patients.get(enterprise_id)
        if kept is None:
            kept = self._patients[enterprise_id] = {}
        self._patients.move_to_end(enterprise_id)
        for item, decision in decisions:
            kept[(requester, item)] = (until, decision)
        if len(kept) > self._max_per_patient:
            kept.clear()
        while len(self._patients) > self._max_patients:
            self._patients.popitem(last=False)
