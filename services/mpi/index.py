"""The master patient index's operations over its store: register / update with matching,
steward decisions, link / unlink, merge / unmerge, search. Every change writes its link
history, a `mpi.link.changed` event and an audit event in the caller's transaction.

Used by the gRPC servicer (which the HL7 v2 ingress calls too) and the bulk loader alike, so a
record fed by any of them is matched, linked and audited the same way.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import math
import time
import uuid
import zlib
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from services.mpi import domain, matching, store
from services.mpi.matching import MatchDecision, MatchParameters, MatchRecord, Outcome, Rule, ScoredCandidate
from services.shared.audit_trail import Action, AuditTrail
from services.shared.auth import Caller
from services.shared.db import utcnow
from services.shared.errors import DomainError, FailedPrecondition, InvalidArgument, NotFound
from services.shared.outbox import Outbox

LINK_TOPIC = "mpi.link.changed"
# How often (seconds) an index looks for a newer stored estimate of the match weights.
ESTIMATE_CHECK_SECONDS = 60.0
# Advisory lock ids of the index ("MPI" in the high bytes, apart from other users of advisory locks),
# taken with the schema's hash as the first key: advisory locks are database-wide, and indexes of
# other exchanges (schema prefixes) in the same database must not wait on each other's blocking keys.
_LOCK_SPACE = 0x4D50 << 16
# One bulk load at a time (`bulk.BatchPipeline`): outside the blocking-key lock slots.
BULK_LOAD_LOCK = _LOCK_SPACE + 1024
_NOT_FOUND = "no patient with that local id in that domain"
_EXCLUSIVE_LOCKS = text(
    "SELECT count(pg_advisory_xact_lock(hashtext(current_schema()), k)) "
    "FROM (SELECT unnest(CAST(:ids AS integer[])) AS k ORDER BY k) AS t"
)
_SHARED_LOCKS = text(
    "SELECT count(pg_advisory_xact_lock_shared(hashtext(current_schema()), k)) "
    "FROM (SELECT unnest(CAST(:ids AS integer[])) AS k ORDER BY k) AS t"
)


@dataclass
class Registered:
    record: store.PatientRecord
    created: bool
    method: domain.LinkMethod
    outcome: Outcome
    review_task_ids: list[str] = field(default_factory=list)
    audit_event_id: str = ""


@dataclass(frozen=True)
class BatchLink:
    """How a bulk batch follows the one before it when two are in flight (`bulk.BatchPipeline`).

    It locks its keys shared, not exclusively: the batches of one load do not wait for each other
    (single registrations still wait for both, and one load runs at a time). It scores with the
    records the batch before it decided (`previous`, set once that batch has scored), which it
    may not see in the database yet, and hands its own on (`scored`). It writes nothing the batch
    before it also writes until that one committed (`committed`)."""

    previous: asyncio.Future[dict[str, list[MatchRecord]]] | None
    scored: asyncio.Future[dict[str, list[MatchRecord]]]
    # The batch before's commit: awaited before writing rows it may also write (name counts).
    committed: Awaitable[object] | None = None
    # Comparable records the load's earlier batches built from the rows they read (one per load).
    decoded: store.DecodedRecords | None = None
    # Candidates the load's batches scored and screened out (`matching.decide`; one per load).
    tally: matching.ScreenTally | None = None


@dataclass(frozen=True)
class Ranked:
    """A search or match result: the record, its comparison with the query."""

    record: store.PatientRecord
    comparison: matching.Comparison
    probability: float
    grade: str


def _actor(who: Caller) -> str:
    return (who.practitioner_id or who.client_id or who.organization_id)[:64]


def comparison_json(comparison: matching.Comparison) -> str:
    return json.dumps({f: [comparison.levels[f], comparison.weights[f]] for f in comparison.levels})


class MasterIndex:
    """Operations of the index; each runs inside a session transaction the caller owns."""

    def __init__(
        self, *, audit: AuditTrail, outbox: Outbox, params: MatchParameters, use_estimates: bool = True
    ) -> None:
        self.audit = audit
        self.outbox = outbox
        # The configured parameters (shipped census priors, or an operator's file) and those in
        # force: with `use_estimates` the latest stored EM estimate's m / u over them.
        self.base_params = params
        self.params = params
        self.use_estimates = use_estimates
        # The estimate in force (id, when, source, records, candidate / random pairs), or None.
        self.estimate: dict[str, object] | None = None
        self._estimate_checked = -math.inf

    async def refresh_parameters(self, session: AsyncSession, *, force: bool = False) -> None:
        """Take up the latest stored estimate (looked for at most once a minute, so a load's or an
        operator's estimate reaches a running service without a restart)."""
        if not self.use_estimates:
            return
        now = time.monotonic()
        if not force and now - self._estimate_checked < ESTIMATE_CHECK_SECONDS:
            return
        self._estimate_checked = now
        latest = await store.latest_estimate(session)
        if latest is not None and (self.estimate is None or latest.id != self.estimate["id"]):
            self.params = matching.with_estimate(self.base_params, json.loads(latest.parameters))
            self.estimate = {
                "id": latest.id,
                "estimated_at": latest.estimated_at,
                "source": latest.source,
                "records": latest.records,
                "candidate_pairs": latest.candidate_pairs,
                "random_pairs": latest.random_pairs,
            }

    # --- events ------------------------------------------------------------------------------

    async def _event(
        self,
        session: AsyncSession,
        *,
        change: str,
        record: store.PatientRecord,
        previous: str | None,
        method: str,
        score: float | None,
    ) -> None:
        """A link change for subscribers (the registry): ids only, never demographics."""
        payload = {
            "event_id": str(uuid.uuid4()),
            "change": change,
            "domain": record.domain,
            "local_id": record.local_id,
            "enterprise_id": record.enterprise_id,
            "previous_enterprise_id": previous or "",
            "method": method,
            "score": score,
            "at": utcnow().isoformat(),
        }
        await self.outbox.add(session, LINK_TOPIC, json.dumps(payload).encode())

    async def _move(
        self,
        session: AsyncSession,
        record: store.PatientRecord,
        *,
        enterprise_id: str,
        method: domain.LinkMethod,
        score: float | None,
        decided_by: str,
        reason: str,
    ) -> None:
        previous = await store.move_record(
            session,
            record,
            enterprise_id=enterprise_id,
            method=method.value,
            score=score,
            decided_by=decided_by,
            reason=reason,
        )
        await self._event(session, change=reason, record=record, previous=previous, method=method.value, score=score)

    # --- matching -----------------------------------------------------------------------------

    async def lock(self, session: AsyncSession, keys: Iterable[str], *, shared: bool = False) -> None:
        """Serialise registrations sharing a blocking key (PostgreSQL advisory locks, taken in a
        fixed order so two registrations never wait on each other crosswise). `shared`: the
        batches of one bulk load, which coordinate among themselves (`BatchLink`)."""
        if session.bind.dialect.name != "postgresql":
            return
        # Keys hash into 1,024 lock slots: a bulk batch with thousands of keys takes at most 1,024
        # locks (PostgreSQL's shared lock table is small), at the price of rare false contention.
        ids = sorted({_LOCK_SPACE + zlib.crc32(k.encode()) % 1024 for k in keys})
        if ids:
            # One round trip for all of them (a bulk batch has thousands of keys).
            await session.execute(_SHARED_LOCKS if shared else _EXCLUSIVE_LOCKS, {"ids": ids})

    async def evaluate(
        self,
        session: AsyncSession,
        new: MatchRecord,
        *,
        extra: Sequence[store.PatientRecord] = (),
        different: frozenset[str] = frozenset(),
    ) -> MatchDecision:
        """Candidates by blocking keys (plus `extra`), scored and decided."""
        found = await store.candidates(session, matching.search_keys(new))
        by_id = {r.id: r for r in found}
        by_id.update({r.id: r for r in extra})
        by_id.pop(new.record_id, None)
        frequencies = await store.value_frequencies(session, matching.frequency_values(new))
        records = [store.match_record_of(r) for r in by_id.values()]
        return matching.decide(new, records, self.params, frequencies, different=different)

    async def _open_tasks(self, session: AsyncSession, record_id: str, review: Sequence[ScoredCandidate]) -> list[str]:
        ids = []
        for scored in review:
            task_id = await store.add_review_task(
                session,
                patient_id=record_id,
                candidate_id=scored.record.record_id,
                score=scored.comparison.total,
                comparison=comparison_json(scored.comparison),
                hold=scored.hold,
            )
            if task_id:
                ids.append(task_id)
        return ids

    # --- register / update -----------------------------------------------------------------------

    async def register(
        self, session: AsyncSession, who: Caller, registration: domain.Registration, *, in_batch: bool = False
    ) -> Registered:
        """Insert or update a record of the caller's domain and (re)decide its link. `in_batch`:
        an update within a bulk batch running alongside another of its load (locks shared, as the
        batch's own: the other batch holds its keys shared and waits for this one's commit)."""
        await self.refresh_parameters(session)
        existing = await store.find_record(session, domain=registration.domain, local_id=registration.local_id)
        if existing is not None and existing.merged_into is not None:
            raise FailedPrecondition("that local id was merged into another record", reason="patient-merged")
        record_id = existing.id if existing is not None else str(uuid.uuid4())
        enterprise_id = existing.enterprise_id if existing is not None else domain.new_enterprise_id()
        new = store.match_record_of_registration(registration, record_id=record_id, enterprise_id=enterprise_id)
        keys = matching.blocking_keys(new)
        await self.lock(session, matching.lock_keys(new), shared=in_batch)
        if existing is None:
            result = await self._insert(session, who, registration, new, keys)
        else:
            result = await self._update(session, who, existing, registration, new, keys)
        result.audit_event_id = await self.audit.record(
            session,
            caller=who,
            type="patient.register" if result.created else "patient.update",
            action=Action.ACTION_CREATE if result.created else Action.ACTION_UPDATE,
            patient_enterprise_id=result.record.enterprise_id,
            entities=[("Patient", f"{result.record.domain}|{result.record.local_id}")],
        )
        return result

    async def _insert(
        self,
        session: AsyncSession,
        who: Caller,
        registration: domain.Registration,
        new: MatchRecord,
        keys: set[str],
    ) -> Registered:
        decision = await self.evaluate(session, new)
        if decision.outcome is Outcome.LINK and decision.best is not None:
            method = (
                domain.LinkMethod.NATIONAL_ID if decision.rule is Rule.NATIONAL_ID else domain.LinkMethod.PROBABILISTIC
            )
            enterprise_id, score = decision.enterprise_id, decision.best.comparison.total
        else:
            method, enterprise_id, score = domain.LinkMethod.NEW, new.enterprise_id, None
        record = await store.insert_record(
            session,
            registration,
            record_id=new.record_id,
            enterprise_id=enterprise_id,
            method=method.value,
            score=score,
            decided_by="rule",
        )
        await store.set_blocking_keys(session, record.id, keys, new=True)
        await store.adjust_frequencies(session, matching.frequency_values(new), 1)
        await self._event(session, change="register", record=record, previous=None, method=method.value, score=score)
        tasks = await self._open_tasks(session, record.id, decision.review) if decision.review else []
        return Registered(record=record, created=True, method=method, outcome=decision.outcome, review_task_ids=tasks)

    async def _update(
        self,
        session: AsyncSession,
        who: Caller,
        record: store.PatientRecord,
        registration: domain.Registration,
        new: MatchRecord,
        keys: set[str],
    ) -> Registered:
        old = store.match_record_of(record)
        await store.update_record(session, record, registration)
        await store.set_blocking_keys(session, record.id, keys)
        if matching.frequency_values(old) != matching.frequency_values(new):
            await store.adjust_frequencies(session, matching.frequency_values(old), -1)
            await store.adjust_frequencies(session, matching.frequency_values(new), 1)
        method = domain.LinkMethod(record.link_method)
        if method in (domain.LinkMethod.STEWARD, domain.LinkMethod.MERGE):
            # A person's decision outranks the rule: demographics change, the link stays.
            return Registered(record=record, created=False, method=method, outcome=Outcome.LINK)
        mates = [r for r in await store.records_of_person(session, record.enterprise_id) if r.id != record.id]
        different = await store.different_from(session, record.id)
        decision = await self.evaluate(session, new, extra=mates, different=different)
        tasks: list[str] = []
        if decision.outcome is Outcome.LINK and decision.best is not None:
            score = decision.best.comparison.total
            target_method = (
                domain.LinkMethod.NATIONAL_ID if decision.rule is Rule.NATIONAL_ID else domain.LinkMethod.PROBABILISTIC
            )
            if decision.enterprise_id != record.enterprise_id:
                await self._move(
                    session,
                    record,
                    enterprise_id=decision.enterprise_id,
                    method=target_method,
                    score=score,
                    decided_by="rule",
                    reason="update",
                )
                await store.close_settled_tasks(session, [record.id])
            method = target_method
        elif mates:
            # The changed record no longer matches the person it was linked to: a person of its own.
            await self._move(
                session,
                record,
                enterprise_id=domain.new_enterprise_id(),
                method=domain.LinkMethod.NEW,
                score=None,
                decided_by="rule",
                reason="update",
            )
            method = domain.LinkMethod.NEW
        if decision.review:
            tasks = await self._open_tasks(session, record.id, decision.review)
        return Registered(record=record, created=False, method=method, outcome=decision.outcome, review_task_ids=tasks)

    # --- steward decisions ----------------------------------------------------------------------

    async def record(self, session: AsyncSession, domain_id: str, local_id: str) -> store.PatientRecord:
        record = await store.find_record(session, domain=domain_id, local_id=local_id)
        if record is None or record.merged_into is not None:
            raise NotFound(_NOT_FOUND, reason="patient-not-found")
        return record

    async def _join(
        self,
        session: AsyncSession,
        who: Caller,
        moving_enterprise: str,
        target_enterprise: str,
        *,
        method: domain.LinkMethod,
        score: float | None,
        reason: str,
    ) -> list[store.PatientRecord]:
        """Move every record of one enterprise id to another (two records found to be one person)."""
        moved = await store.records_of_person(session, moving_enterprise)
        for record in moved:
            await self._move(
                session,
                record,
                enterprise_id=target_enterprise,
                method=method,
                score=score,
                decided_by=_actor(who),
                reason=reason,
            )
        return moved

    async def decide_review(self, session: AsyncSession, who: Caller, task_id: str, *, same: bool) -> store.ReviewTask:
        """A steward's decision on a review task. Same person: the two enterprise ids become one
        (the task's record joins the candidate's). Different people: remembered, never proposed again."""
        task = await store.review_task(session, task_id, for_update=True)
        if task is None:
            raise NotFound("no such review task", reason="review-task-not-found")
        if task.status != "open":
            raise FailedPrecondition("the review task was already decided", reason="review-task-closed")
        records = await store.records_by_id(session, [task.patient_id, task.candidate_id])
        subject, candidate = records[task.patient_id], records[task.candidate_id]
        if same:
            if subject.enterprise_id != candidate.enterprise_id:
                await self._join(
                    session,
                    who,
                    subject.enterprise_id,
                    candidate.enterprise_id,
                    method=domain.LinkMethod.STEWARD,
                    score=task.score,
                    reason="review-same",
                )
        else:
            await store.record_non_match(session, subject.id, candidate.id, decided_by=_actor(who))
            if subject.enterprise_id == candidate.enterprise_id:
                # Linked meanwhile by rule: "different people" separates them again.
                await self._move(
                    session,
                    subject,
                    enterprise_id=domain.new_enterprise_id(),
                    method=domain.LinkMethod.STEWARD,
                    score=None,
                    decided_by=_actor(who),
                    reason="review-different",
                )
        task.status = "same" if same else "different"
        task.decided_at = utcnow()
        task.decided_by = _actor(who)
        await store.close_settled_tasks(session, [subject.id, candidate.id])
        await self.audit.record(
            session,
            caller=who,
            type="patient.review-decide",
            action=Action.ACTION_UPDATE,
            patient_enterprise_id=candidate.enterprise_id,
            entities=[
                ("ReviewTask", task.id),
                ("Patient", f"{subject.domain}|{subject.local_id}"),
                ("Patient", f"{candidate.domain}|{candidate.local_id}"),
            ],
        )
        return task

    async def link(
        self, session: AsyncSession, who: Caller, source: tuple[str, str], target: tuple[str, str]
    ) -> store.PatientRecord:
        """A steward links one record to the person of another (only that record moves)."""
        record = await self.record(session, *source)
        other = await self.record(session, *target)
        if record.id == other.id:
            raise InvalidArgument("a record cannot be linked to itself", reason="same-record")
        if record.enterprise_id != other.enterprise_id:
            await self._move(
                session,
                record,
                enterprise_id=other.enterprise_id,
                method=domain.LinkMethod.STEWARD,
                score=None,
                decided_by=_actor(who),
                reason="link",
            )
        await store.close_settled_tasks(session, [record.id])
        await self.audit.record(
            session,
            caller=who,
            type="patient.link",
            action=Action.ACTION_UPDATE,
            patient_enterprise_id=record.enterprise_id,
            entities=[("Patient", f"{r.domain}|{r.local_id}") for r in (record, other)],
        )
        return record

    async def unlink(self, session: AsyncSession, who: Caller, source: tuple[str, str]) -> store.PatientRecord:
        """A steward takes a record out of its person: a new enterprise id, and "different people"
        remembered against every record it leaves, so the matcher does not link it back."""
        record = await self.record(session, *source)
        mates = [r for r in await store.records_of_person(session, record.enterprise_id) if r.id != record.id]
        previous = record.enterprise_id
        if mates:
            for mate in mates:
                await store.record_non_match(session, record.id, mate.id, decided_by=_actor(who))
            await self._move(
                session,
                record,
                enterprise_id=domain.new_enterprise_id(),
                method=domain.LinkMethod.STEWARD,
                score=None,
                decided_by=_actor(who),
                reason="unlink",
            )
        await self.audit.record(
            session,
            caller=who,
            type="patient.unlink",
            action=Action.ACTION_UPDATE,
            patient_enterprise_id=previous,
            entities=[("Patient", f"{record.domain}|{record.local_id}")],
        )
        return record

    async def merge(
        self, session: AsyncSession, who: Caller, domain_id: str, survivor_local: str, subsumed_local: str
    ) -> tuple[store.PatientRecord, store.PatientRecord]:
        """A hospital merges two of its own local records (ADT^A40, PIXm ITI-104 Resolve Duplicate
        Patient): the subsumed record is retired and its person joins the survivor's. Returns the
        survivor and the retired record. The same merge again (a retried feed message) changes
        nothing and answers the same."""
        if survivor_local == subsumed_local:
            raise InvalidArgument("a record cannot be merged into itself", reason="same-record")
        survivor = await self.record(session, domain_id, survivor_local)
        retired = await store.find_record(session, domain=domain_id, local_id=subsumed_local)
        if retired is not None and retired.merged_into == survivor.id:
            return survivor, retired
        subsumed = await self.record(session, domain_id, subsumed_local)
        moved_pairs = [[subsumed.id, subsumed.enterprise_id]]
        if subsumed.enterprise_id != survivor.enterprise_id:
            others = [r for r in await store.records_of_person(session, subsumed.enterprise_id) if r.id != subsumed.id]
            moved_pairs += [[r.id, r.enterprise_id] for r in others]
            for record in [subsumed, *others]:
                await self._move(
                    session,
                    record,
                    enterprise_id=survivor.enterprise_id,
                    method=domain.LinkMethod.MERGE,
                    score=None,
                    decided_by=_actor(who),
                    reason="merge",
                )
        subsumed.merged_into = survivor.id
        await store.set_blocking_keys(session, subsumed.id, set())
        await store.adjust_frequencies(session, matching.frequency_values(store.match_record_of(subsumed)), -1)
        await store.add_merge(
            session,
            domain=domain_id,
            survivor_id=survivor.id,
            subsumed_id=subsumed.id,
            moved=json.dumps(moved_pairs),
            decided_by=_actor(who),
        )
        await store.close_settled_tasks(session, [subsumed.id, survivor.id])
        await self._event(session, change="merge-retired", record=subsumed, previous=None, method="merge", score=None)
        await self.audit.record(
            session,
            caller=who,
            type="patient.merge",
            action=Action.ACTION_UPDATE,
            patient_enterprise_id=survivor.enterprise_id,
            entities=[("Patient", f"{r.domain}|{r.local_id}") for r in (survivor, subsumed)],
        )
        return survivor, subsumed

    async def unmerge(
        self, session: AsyncSession, who: Caller, domain_id: str, subsumed_local: str
    ) -> store.PatientRecord:
        """Undo the last merge of a retired record: it is active again, and every record the merge
        moved returns to its former enterprise id (if it is still where the merge put it)."""
        subsumed = await store.find_record(session, domain=domain_id, local_id=subsumed_local)
        if subsumed is None or subsumed.merged_into is None:
            raise NotFound("no merged record with that local id in that domain", reason="merge-not-found")
        merge = await store.last_merge_of(session, subsumed.id)
        if merge is None:
            raise NotFound("no merged record with that local id in that domain", reason="merge-not-found")
        survivor = (await store.records_by_id(session, [merge.survivor_id]))[merge.survivor_id]
        subsumed.merged_into = None
        pairs = json.loads(merge.moved)
        records = await store.records_by_id(session, [p[0] for p in pairs])
        for record_id, previous in pairs:
            record = records.get(record_id)
            if (
                record is not None
                and record.enterprise_id == survivor.enterprise_id
                and previous != survivor.enterprise_id
            ):
                await self._move(
                    session,
                    record,
                    enterprise_id=previous,
                    method=domain.LinkMethod.MERGE,
                    score=None,
                    decided_by=_actor(who),
                    reason="unmerge",
                )
        if subsumed.enterprise_id == survivor.enterprise_id:
            # Merged within one person: unmerged, it is a person of its own again.
            await self._move(
                session,
                subsumed,
                enterprise_id=domain.new_enterprise_id(),
                method=domain.LinkMethod.MERGE,
                score=None,
                decided_by=_actor(who),
                reason="unmerge",
            )
        new = store.match_record_of(subsumed)
        await store.set_blocking_keys(session, subsumed.id, matching.blocking_keys(new))
        await store.adjust_frequencies(session, matching.frequency_values(new), 1)
        merge.undone_at = utcnow()
        await store.record_non_match(session, subsumed.id, survivor.id, decided_by=_actor(who))
        await self.audit.record(
            session,
            caller=who,
            type="patient.unmerge",
            action=Action.ACTION_UPDATE,
            patient_enterprise_id=subsumed.enterprise_id,
            entities=[("Patient", f"{r.domain}|{r.local_id}") for r in (survivor, subsumed)],
        )
        return subsumed

    # --- search ---------------------------------------------------------------------------------

    def grade(self, comparison: matching.Comparison) -> str:
        """FHIR match-grade: certain (auto-link territory), probable (review), possible."""
        if comparison.total >= self.params.link_threshold:
            return "certain"
        if comparison.total >= self.params.review_threshold:
            return "probable"
        return "possible"

    async def rank(
        self, session: AsyncSession, query: MatchRecord, *, limit: int, minimum: float | None = None
    ) -> list[Ranked]:
        """Records sharing a blocking key with the query, scored against it, best first."""
        await self.refresh_parameters(session)
        found = await store.candidates(session, matching.demographic_keys(query))
        frequencies = await store.value_frequencies(session, matching.frequency_values(query))
        ranked = []
        for record in found:
            comparison = matching.score(query, store.match_record_of(record), self.params, frequencies)
            if minimum is not None and comparison.total < minimum:
                continue
            ranked.append(
                Ranked(
                    record=record,
                    comparison=comparison,
                    probability=comparison.probability(self.params.prior_match),
                    grade=self.grade(comparison),
                )
            )
        ranked.sort(key=lambda r: (-r.comparison.total, r.record.domain, r.record.local_id))
        return ranked[:limit]

    # --- bulk registration -----------------------------------------------------------------

    async def register_batch(
        self,
        session: AsyncSession,
        who: Caller,
        registrations: Sequence[domain.Registration],
        *,
        link: BatchLink | None = None,
    ) -> list[Registered | DomainError]:
        """Register many new records of one domain in a few statements (bulk load): candidates,
        frequencies and existing records are read for the whole batch at once, records earlier in
        the batch are candidates of later ones, and rows are written with executemany. Local ids
        already known (updates) and repeats within the batch go through `register` one by one.
        One audit event covers the batch, naming every record it wrote. A record refused by a
        domain rule is returned as its error (its row is not written)."""
        await self.refresh_parameters(session)
        if not registrations:
            return []
        fresh, later = await _split_batch(session, registrations)
        await self.lock(
            session,
            set().union(*(matching.lock_keys(n) for _, _, n in fresh)) if fresh else set(),
            shared=link is not None,
        )
        context = await _BatchContext.read(session, [n for _, _, n in fresh], link)
        rows = _BatchRows(now=utcnow(), sealing=context.sealing, digests=context.digests)
        results: dict[int, Registered | DomainError] = {}
        for n, (i, registration, new) in enumerate(fresh):
            if link is not None and n % 50 == 49:
                # Let the batch before this one go on writing and committing meanwhile.
                await asyncio.sleep(0)
            decision = matching.decide(
                new,
                context.candidates_of(new),
                self.params,
                context.frequencies,
                tally=link.tally if link is not None else None,
            )
            method = rows.add(registration, new, decision, context.in_batch)
            if link is not None and link.decoded is not None:
                # Known to the load as written: a later batch reading it need not open it.
                written = rows.patients[-1]
                link.decoded.remember(written, replace_enterprise(new, str(written["enterprise_id"])))
            results[i] = Registered(record=None, created=True, method=method, outcome=decision.outcome)  # type: ignore[arg-type]
        if link is not None:
            link.scored.set_result(context.in_batch)
        audit_id = await self._write_batch(session, who, rows)
        for result in results.values():
            if isinstance(result, Registered):
                result.audit_event_id = audit_id
        if link is not None and link.committed is not None:
            # The name counts are rows both batches update: the one before must commit first, or
            # it could wait on this batch's row locks while this batch waits for its commit.
            # A review task may name a record of the batch before (a candidate it handed on):
            # its foreign key needs that record committed.
            await link.committed
        await store.insert_rows(session, store.metadata.tables["review_task"], rows.tasks)
        await store.add_frequency_deltas(session, rows.deltas)
        for i in later:
            try:
                async with session.begin_nested():
                    results[i] = await self.register(session, who, registrations[i], in_batch=link is not None)
            except DomainError as exc:
                results[i] = exc
        return [results[i] for i in range(len(registrations))]

    async def _write_batch(self, session: AsyncSession, who: Caller, rows: _BatchRows) -> str:
        """Insert a batch's rows (executemany per table; review tasks are written later) and its
        one audit event; the event id ("" when the batch wrote no record)."""
        tables = store.metadata.tables
        await store.insert_rows(session, tables["patient"], rows.patients)
        await store.insert_rows(session, tables["patient_identifier"], rows.identifiers)
        await store.insert_rows(session, tables["blocking_key"], rows.keys)
        await store.insert_rows(session, tables["link_history"], rows.history)
        await store.insert_rows(session, tables["outbox"], rows.outbox())
        if not rows.patients:
            return ""
        return await self.audit.record(
            session,
            caller=who,
            type="patient.bulk-register",
            action=Action.ACTION_CREATE,
            entities=[("Patient", f"{p['domain']}|{p['local_id']}") for p in rows.patients],
        )


async def _split_batch(
    session: AsyncSession, registrations: Sequence[domain.Registration]
) -> tuple[list[tuple[int, domain.Registration, MatchRecord]], list[int]]:
    """(new records with their comparable form, positions of the rest): a local id the domain
    already has, or one repeated within the batch, is registered one by one afterwards."""
    domain_id = registrations[0].domain
    existing = await store.known_local_ids(session, domain=domain_id, local_ids=[r.local_id for r in registrations])
    fresh: list[tuple[int, domain.Registration, MatchRecord]] = []
    later: list[int] = []
    seen: set[str] = set()
    for i, registration in enumerate(registrations):
        if registration.local_id in existing or registration.local_id in seen:
            later.append(i)
            continue
        seen.add(registration.local_id)
        new = store.match_record_of_registration(
            registration, record_id=str(uuid.uuid4()), enterprise_id=domain.new_enterprise_id()
        )
        fresh.append((i, registration, new))
    return fresh, later


@dataclass
class _BatchContext:
    """What a batch scores against: stored candidates by key (read once for the batch), the
    records the batch before decided (`carried`), the batch's own records so far (`in_batch`),
    name frequencies, and each key's blind index."""

    sealing: store.RecordSealing
    digests: dict[str, str]
    stored: Mapping[str, Sequence[MatchRecord]]
    carried: Mapping[str, Sequence[MatchRecord]]
    frequencies: matching.ValueFrequencies
    in_batch: dict[str, list[MatchRecord]] = field(default_factory=dict)

    @classmethod
    async def read(cls, session: AsyncSession, fresh: Sequence[MatchRecord], link: BatchLink | None) -> _BatchContext:
        """Read the candidates and frequencies of a batch's new records."""
        all_keys = set().union(*(matching.search_keys(n) for n in fresh)) if fresh else set()
        sealing = store.sealing_of(session)
        # Each key's blind index once per batch: the lookup and the rows written both need it.
        digests = {key: sealing.key(key) for key in all_keys}
        stored = await store.match_candidates_by_key(
            session, all_keys, digests=digests, decoded=link.decoded if link is not None else None
        )
        frequencies = await store.frequencies_of(
            session, {(f, v) for n in fresh for f, v in matching.frequency_values(n).items() if v}
        )
        # The batch before, still committing, is not in the database yet: its records as it
        # decided them (a record it committed meanwhile is read twice: one candidate, by id).
        carried = await link.previous if link is not None and link.previous is not None else {}
        return cls(sealing, digests, stored, carried, frequencies)

    def candidates_of(self, new: MatchRecord) -> list[MatchRecord]:
        """The records sharing a search key with `new`, at most about 500."""
        candidates: dict[str, MatchRecord] = {}
        # Smallest blocks first: past the cap, what is left out is the big name-only block.
        for key in sorted(matching.search_keys(new), key=lambda k: len(self.stored.get(k, ()))):
            for source in (self.stored, self.carried, self.in_batch):
                for record in source.get(key, ()):
                    candidates[record.record_id] = record
            if len(candidates) > 500:
                break
        return list(candidates.values())


@dataclass
class _BatchRows:
    """The rows a batch writes, built record by record."""

    now: datetime.datetime
    sealing: store.RecordSealing
    digests: dict[str, str]
    patients: list[dict[str, object]] = field(default_factory=list)
    identifiers: list[dict[str, object]] = field(default_factory=list)
    keys: list[dict[str, object]] = field(default_factory=list)
    history: list[dict[str, object]] = field(default_factory=list)
    events: list[dict[str, object]] = field(default_factory=list)
    tasks: list[dict[str, object]] = field(default_factory=list)
    deltas: dict[tuple[str, str], int] = field(default_factory=dict)

    def add(
        self,
        registration: domain.Registration,
        new: MatchRecord,
        decision: MatchDecision,
        in_batch: dict[str, list[MatchRecord]],
    ) -> domain.LinkMethod:
        """The rows of one decided record (filed in `in_batch` for the records after it); its
        link method."""
        if decision.outcome is Outcome.LINK and decision.best is not None:
            method = (
                domain.LinkMethod.NATIONAL_ID if decision.rule is Rule.NATIONAL_ID else domain.LinkMethod.PROBABILISTIC
            )
            enterprise_id, score = decision.enterprise_id, decision.best.comparison.total
        else:
            method, enterprise_id, score = domain.LinkMethod.NEW, new.enterprise_id, None
        now, sealing = self.now, self.sealing
        linked = replace_enterprise(new, enterprise_id)
        for key in matching.blocking_keys(new):
            in_batch.setdefault(key, []).append(linked)
            self.keys.append({"key": self.digests.get(key) or sealing.key(key), "patient_id": new.record_id})
        self.patients.append(
            {
                "id": new.record_id,
                "domain": registration.domain,
                "local_id": registration.local_id,
                "enterprise_id": enterprise_id,
                **sealing.row(new.record_id, registration),
                "gender": registration.gender.value,
                "birth_date": registration.birth_date,
                "province": registration.province,
                "city": registration.city,
                "district": registration.district,
                "postal_code": registration.postal_code,
                "link_method": method.value,
                "link_score": score,
                "linked_at": now,
                "merged_into": None,
                "created_at": now,
                "updated_at": now,
            }
        )
        self.identifiers += sealing.identifier_rows(new.record_id, registration)
        self.history.append(
            {
                "patient_id": new.record_id,
                "enterprise_id": enterprise_id,
                "previous_enterprise_id": None,
                "method": method.value,
                "decided_by": "rule",
                "created_at": now,
                "score": score,
                "reason": "register",
            }
        )
        self.events.append(
            {
                "event_id": str(uuid.uuid4()),
                "change": "register",
                "domain": registration.domain,
                "local_id": registration.local_id,
                "enterprise_id": enterprise_id,
                "previous_enterprise_id": "",
                "method": method.value,
                "score": score,
                "at": now.isoformat(),
            }
        )
        for scored in decision.review:
            self.tasks.append(
                {
                    "id": str(uuid.uuid4()),
                    "patient_id": new.record_id,
                    "candidate_id": scored.record.record_id,
                    "score": scored.comparison.total,
                    "comparison": comparison_json(scored.comparison),
                    "hold": scored.hold,
                    "status": "open",
                    "created_at": now,
                    "decided_at": None,
                    "decided_by": "",
                }
            )
        for f, v in matching.frequency_values(new).items():
            if v:
                self.deltas[(f, v)] = self.deltas.get((f, v), 0) + 1
                self.deltas[(f, "")] = self.deltas.get((f, ""), 0) + 1
        return method

    def outbox(self) -> list[dict[str, object]]:
        """The link events as outbox rows."""
        return [
            {
                "id": e["event_id"],
                "topic": LINK_TOPIC,
                "payload": json.dumps(e).encode(),
                "created_at": self.now,
                "attempts": 0,
                "next_attempt_at": self.now,
                "delivered_at": None,
                "last_error": None,
            }
            for e in self.events
        ]


def replace_enterprise(record: MatchRecord, enterprise_id: str) -> MatchRecord:
    """The record as linked to another enterprise id."""
    return dataclasses.replace(record, enterprise_id=enterprise_id)


def method_of(decision: MatchDecision) -> domain.LinkMethod:
    """How a LINK decision was made."""
    return domain.LinkMethod.NATIONAL_ID if decision.rule is Rule.NATIONAL_ID else domain.LinkMethod.PROBABILISTIC
