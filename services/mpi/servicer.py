"""PatientIndex gRPC servicer: translates messages, checks the caller, maps errors."""

from __future__ import annotations

import asyncio
import base64
import datetime
import hmac
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from google.protobuf.message import Message
from sqlalchemy.exc import IntegrityError

from hie.common.v1 import common_pb2
from hie.mpi.v1 import mpi_pb2, mpi_pb2_grpc
from services.mpi import domain, index, link_version, matching, records, review_store, store, tables
from services.mpi.disclosure import Disclosure, capped
from services.mpi.messages import LINK_TO_PROTO, patient_message, registration_of, scored_patient
from services.mpi.search_criteria import NameFilter, rank_key, satisfies, search_query
from services.shared import transactions
from services.shared.audit_trail import Action
from services.shared.auth import Caller, caller
from services.shared.db import utcnow
from services.shared.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from services.shared.idempotency import FirstAnswers
from services.shared.process import ServiceRuntime
from services.shared.protection import DataProtection, TamperedCiphertextError
from services.shared.protection.keyring import UnknownKeyError
from services.shared.timestamps import to_timestamp

# Role per operation (from the hospital's verified user assertion).
_REGISTRARS = ("doctor", "nurse", "data-steward", "admin")
# Auditors resolve a person to build their access report.
_READERS = ("doctor", "nurse", "pharmacist", "technician", "data-steward", "admin", "auditor")
# Data stewards resolve uncertain matches and correct links.
_STEWARDS = ("data-steward",)
# A hospital merges its own records: its data steward or administrator (or its HIS feed).
_MERGERS = ("data-steward", "admin")
# Demographic search and match: clinicians and stewards looking a patient up.
_SEARCHERS = ("doctor", "nurse", "data-steward", "admin")
_MAX_RESULTS = 100
# store.candidates' default cap on the records one search reads: a search that reaches it is too
# broad to count, so no total is given (paging still works over the records read).
_CANDIDATE_CAP = 500
# How long a PDQ page token stays valid: long enough to page through by hand, short enough that a
# leaked link soon stops working.
_CURSOR_SECONDS = 30 * 60
_ASSIGNMENT_FILTERS = {
    mpi_pb2.REVIEW_ASSIGNMENT_FILTER_ANY: review_store.ANY,
    mpi_pb2.REVIEW_ASSIGNMENT_FILTER_MINE: review_store.MINE,
    mpi_pb2.REVIEW_ASSIGNMENT_FILTER_UNASSIGNED: review_store.UNASSIGNED,
}


class _Seal:
    """Seals PDQ page tokens (the shared field cipher, with the caller's organisation and client
    as associated data, so a token is opaque, cannot be forged or altered, and works for its own
    tenant only) and fingerprints idempotent requests (a blind index, so no demographics are
    stored for it). The data keys are the mpi's own: a token issued by one replica opens on any
    other, and keeps opening across a data-key rotation."""

    def __init__(self, protection: DataProtection) -> None:
        self._protection = protection

    @staticmethod
    def _tenant(who: Caller) -> str:
        return f"mpi.pdq-page:{who.organization_id}\x00{who.client_id}"

    def seal(self, who: Caller, payload: dict[str, object]) -> str:
        return self._protection.fields.encrypt(json.dumps(payload, separators=(",", ":")), context=self._tenant(who))

    def open(self, who: Caller, token: str) -> dict[str, object]:
        try:
            payload = json.loads(self._protection.fields.decrypt(token, context=self._tenant(who)))
        except (ValueError, TamperedCiphertextError, UnknownKeyError):
            raise InvalidArgument("page token is not valid", reason="page-token-invalid") from None
        if not isinstance(payload, dict) or not isinstance(payload.get("x"), int) or payload["x"] < time.time():
            raise InvalidArgument("page token is not valid or has expired", reason="page-token-invalid")
        return payload

    def fingerprint(self, data: bytes) -> str:
        return self._protection.index.digest("mpi.idempotent-request", base64.b64encode(data).decode())


class _AnswerSeal:
    """Seals the kept first answers of steward operations (they name patients) with the mpi's
    field cipher, bound to the organisation and key they answer."""

    def __init__(self, protection: DataProtection) -> None:
        self._protection = protection

    def seal(self, answer: bytes, context: str) -> bytes:
        encoded = base64.b64encode(answer).decode()
        return self._protection.fields.encrypt(encoded, context=f"mpi.idempotent-answer:{context}").encode()

    def open(self, sealed: bytes, context: str) -> bytes:
        return base64.b64decode(
            self._protection.fields.decrypt(sealed.decode(), context=f"mpi.idempotent-answer:{context}")
        )


M = TypeVar("M", bound=Message)

# The operation a kept first answer belongs to (services/shared/idempotency.py).
_LINK_OPERATION = "patient.link"
_UNLINK_OPERATION = "patient.unlink"
_MERGE_OPERATION = "patient.merge"
_UNMERGE_OPERATION = "patient.unmerge"
_DECIDE_OPERATION = "patient.review-decide"
_ASSIGN_OPERATION = "patient.review-assign"
_RELEASE_OPERATION = "patient.review-release"


def _page_token(task: tables.ReviewTask) -> str:
    # Keyset position (created, id): the queue is the steward's own view, so no seal is needed.
    return base64.urlsafe_b64encode(json.dumps([task.created_at.isoformat(), task.id]).encode()).decode()


def _after(token: str) -> tuple[datetime.datetime, str] | None:
    if not token:
        return None
    try:
        created, task_id = json.loads(base64.urlsafe_b64decode(token.encode()).decode())
        value = datetime.datetime.fromisoformat(created)
    except (ValueError, TypeError, UnicodeDecodeError):
        raise InvalidArgument("page token is not valid", reason="page-token-invalid") from None
    if value.tzinfo is None or not isinstance(task_id, str):
        raise InvalidArgument("page token is not valid", reason="page-token-invalid")
    return value, task_id


def _steward(who: Caller) -> str:
    """The acting steward within their organisation (the user assertion's practitioner)."""
    return (who.practitioner_id or who.client_id)[:64]


def _holds(held: review_store.ReviewAssignment, who: Caller) -> bool:
    return held.organization_id == who.organization_id and held.assignee == _steward(who)


def _held_by_another(held: review_store.ReviewAssignment, who: Caller) -> FailedPrecondition:
    """The refusal for a steward acting on a task another steward's live claim holds; a steward
    whose own claim lapsed and was then taken is told so."""
    if (held.lapsed_organization_id, held.lapsed_assignee) == (who.organization_id, _steward(who)):
        return FailedPrecondition(
            "your claim on this review task lapsed and another steward has taken it", reason="review-claim-expired"
        )
    return FailedPrecondition("another steward holds this review task", reason="review-task-assigned")


def _valid_assignee(value: str) -> str:
    if not 1 <= len(value) <= 64 or not value.isprintable() or value.strip() != value:
        raise InvalidArgument("assignee must be a practitioner id (1 to 64 characters)", reason="assignee-invalid")
    return value


def _own_domain(who: Caller, domain_id: str) -> None:
    """A hospital acts on its own records only; another domain's record reads as unknown."""
    if who.organization_type == "hospital" and domain_id != who.organization_id:
        raise NotFound("no patient with that local id in that domain", reason="patient-not-found")


def _ref(ref: common_pb2.PatientRef) -> tuple[str, str]:
    if not ref.domain or not ref.local_id:
        raise InvalidArgument("patient domain and local id are required", reason="patient-ref-missing")
    return ref.domain, ref.local_id


class PatientIndexServicer(mpi_pb2_grpc.PatientIndexServicer):
    def __init__(
        self, runtime: ServiceRuntime, master: index.MasterIndex, *, claim_lease: domain.ClaimLease | None = None
    ) -> None:
        self._rt = runtime
        self._index = master
        self._lease = claim_lease or domain.ClaimLease()
        # SQLite has one writer; serialising changes in-process keeps link decisions atomic there.
        # PostgreSQL uses advisory locks per blocking key instead.
        self._sqlite_lock = asyncio.Lock() if runtime.engine.dialect.name == "sqlite" else None
        assert runtime.protection is not None  # the mpi's SPEC protects personal data
        self._masking = runtime.protection.masking
        self._seal = _Seal(runtime.protection)
        self._answers = FirstAnswers(review_store.idempotent_answers, seal=_AnswerSeal(runtime.protection))

    def _disclosure(self, who: Caller) -> Disclosure:
        return Disclosure.to(who, self._masking)

    async def _write(self, operation):
        """Run a change in one transaction (serialised on SQLite), then wake the outbox relay and
        have the registry drop its cross-references before the change's RPC returns."""
        answer = await transactions.run(self._rt, operation, lock=self._sqlite_lock)
        await link_version.invalidate_registry(self._rt)
        return answer

    async def _keyed_write(
        self,
        who: Caller,
        request: Any,
        operation: str,
        response_type: type[M],
        change: Callable[[Any], Awaitable[M]],
    ) -> M:
        """`_write` for a request that may carry an idempotency key: a retry with the key gets
        the first answer (kept sealed in the change's transaction) and changes nothing."""
        if not request.idempotency_key.strip():
            return await self._write(change)
        # Keyed like registrations' fingerprints (a blind index: local ids are not stored); the
        # answer depends on who asks (masking by role and purpose), so they are part of it.
        request_fingerprint = self._seal.fingerprint(
            b"\0".join(
                [
                    operation.encode(),
                    who.practitioner_id.encode(),
                    who.role.encode(),
                    who.purpose_of_use.encode(),
                    request.SerializeToString(deterministic=True),
                ]
            )
        )

        async def run() -> tuple[M, bool]:
            return await self._answers.once(
                self._rt.sessions,
                organization_id=who.organization_id,
                key=request.idempotency_key,
                operation=operation,
                request=request,
                response_type=response_type,
                change=change,
                request_fingerprint=request_fingerprint,
            )

        if self._sqlite_lock is not None:
            async with self._sqlite_lock:
                answer, replayed = await run()
        else:
            answer, replayed = await run()
        if not replayed:
            self._rt.outbox.notify()
            await link_version.invalidate_registry(self._rt)
        return answer

    async def RegisterPatient(
        self, request: mpi_pb2.RegisterPatientRequest, context: object
    ) -> mpi_pb2.RegisterPatientResponse:
        who = caller()
        who.require_scope("Patient", "c")
        who.require_role(*_REGISTRARS)
        registration = registration_of(request.patient, who.organization_id)
        disclosure = self._disclosure(who)
        key = request.idempotency_key
        if len(key) > 128 or not key.isprintable():
            raise InvalidArgument("idempotency key: at most 128 printable characters", reason="idempotency-key-invalid")
        fingerprint = ""
        if key:
            # The request as the domain sees it (ref.domain is ignored), fingerprinted, not stored.
            patient = mpi_pb2.Patient()
            patient.CopyFrom(request.patient)
            patient.ref.domain = ""
            fingerprint = self._seal.fingerprint(patient.SerializeToString(deterministic=True))

        async def register(session: object) -> mpi_pb2.RegisterPatientResponse:
            if key:
                first = await review_store.registration_by_key(session, who.organization_id, key)
                if first is not None:
                    # A retry: the first answer again (created, method, audit event), the record as it is now.
                    if not hmac.compare_digest(first.fingerprint, fingerprint):
                        raise AlreadyExists(
                            "idempotency key already used for a different request", reason="idempotency-key-reused"
                        )
                    record = (await store.records_by_id(session, [first.record_id])).get(first.record_id)
                    if record is None:
                        raise NotFound("no patient with that local id in that domain", reason="patient-not-found")
                    return mpi_pb2.RegisterPatientResponse(
                        patient=patient_message(record, disclosure),
                        created=first.created,
                        link_method=LINK_TO_PROTO.get(
                            domain.LinkMethod(first.link_method), mpi_pb2.LINK_METHOD_UNSPECIFIED
                        ),
                        audit_event_ids=[first.audit_event_id],
                    )
            result = await self._index.register(session, who, registration)
            if key:
                await review_store.add_registration_key(
                    session,
                    organization_id=who.organization_id,
                    key=key,
                    fingerprint=fingerprint,
                    record_id=result.record.id,
                    created=result.created,
                    link_method=str(result.method),
                    audit_event_id=result.audit_event_id,
                    at=utcnow(),
                )
            return mpi_pb2.RegisterPatientResponse(
                patient=patient_message(result.record, disclosure),
                created=result.created,
                link_method=LINK_TO_PROTO.get(result.method, mpi_pb2.LINK_METHOD_UNSPECIFIED),
                audit_event_ids=[result.audit_event_id],
                review_task_ids=result.review_task_ids,
            )

        try:
            return await self._write(register)
        except IntegrityError:
            # A concurrent retry of the same (domain, local id) or idempotency key won the insert:
            # answer as a retry.
            return await self._write(register)

    async def CrossReference(
        self, request: mpi_pb2.CrossReferenceRequest, context: object
    ) -> mpi_pb2.CrossReferenceResponse:
        who = caller()
        who.require_scope("Patient", "r")
        who.require_role(*_READERS)
        ref = request.ref
        if request.enterprise_id:
            return await self._person_by_enterprise_id(who, request.enterprise_id)
        if not ref.domain or not ref.local_id:
            raise InvalidArgument("patient domain and local id are required", reason="patient-ref-missing")
        if who.organization_type == "hospital" and ref.domain != who.organization_id:
            # PIX from the hospital's own record of the person: another hospital's local ids are
            # not a key a hospital may probe with.
            raise NotFound("no patient with that local id in that domain", reason="patient-not-found")
        wanted = set(request.target_domains)

        def answer(record: store.RecordIdentity, records: list[store.RecordIdentity]) -> mpi_pb2.CrossReferenceResponse:
            refs = [
                common_pb2.PatientRef(domain=r.domain, local_id=r.local_id)
                for r in records
                if not wanted or r.domain in wanted
            ]
            return mpi_pb2.CrossReferenceResponse(enterprise_id=record.enterprise_id, refs=refs)

        if who.is_platform:
            # An exchange service resolving identity inside an operation it audits itself: nothing
            # is written, and the common case is one statement, so no transaction is opened
            # around it (BEGIN and COMMIT were two of its four round trips).
            async with self._rt.engine.connect() as conn:
                conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
                found = await store.person_identities(
                    conn, domain=ref.domain, local_id=ref.local_id, follow_merges=request.include_merged
                )
            if found is None:
                raise NotFound("no patient with that local id in that domain", reason="patient-not-found")
            return answer(*found)
        async with transactions.change(self._rt) as session:
            found = await store.person_identities(
                session, domain=ref.domain, local_id=ref.local_id, follow_merges=False
            )
            if found is None:
                raise NotFound("no patient with that local id in that domain", reason="patient-not-found")
            record, _records = found
            response = answer(*found)
            await self._rt.audit.record(
                session,
                caller=who,
                type="patient.pix-query",
                action=Action.ACTION_EXECUTE,
                patient_enterprise_id=record.enterprise_id,
                entities=[("Patient", f"{ref.domain}|{ref.local_id}")],
            )
        return response

    async def _person_by_enterprise_id(self, who: Caller, enterprise_id: str) -> mpi_pb2.CrossReferenceResponse:
        """Every record of the person, for an exchange service (consent checks which domains
        hold one); a hospital never looks a person up by enterprise id here."""
        if not who.is_platform:
            raise PermissionDenied("only exchange services resolve a person by enterprise id", reason="role")
        async with self._rt.sessions() as session:
            records = await store.records_of_person(session, enterprise_id[:64])
        if not records:
            raise NotFound("no such person", reason="patient-not-found")
        return mpi_pb2.CrossReferenceResponse(
            enterprise_id=enterprise_id,
            refs=[common_pb2.PatientRef(domain=r.domain, local_id=r.local_id) for r in records],
        )

    async def GetPatient(self, request: mpi_pb2.GetPatientRequest, context: object) -> mpi_pb2.GetPatientResponse:
        who = caller()
        who.require_scope("Patient", "r")
        if request.record_id:
            # The FHIR read of a record PDQ returned: whoever may search may read what it found
            # (any domain); a record retired by a merge is gone, as it is from search.
            who.require_role(*_SEARCHERS)
            if request.ref.domain or request.ref.local_id:
                raise InvalidArgument(
                    "give a record id or a patient reference, not both", reason="patient-ref-ambiguous"
                )
        else:
            who.require_role(*_READERS)
            if who.organization_type == "hospital" and request.ref.domain != who.organization_id:
                raise NotFound("no patient with that local id in that domain", reason="patient-not-found")
        async with transactions.change(self._rt) as session:
            if request.record_id:
                record = await store.record_by_id(session, request.record_id[:64])
                if record is not None and record.merged_into is not None:
                    record = None
            else:
                record = await store.find_record(session, domain=request.ref.domain, local_id=request.ref.local_id)
            if record is None:
                raise NotFound("no patient with that local id in that domain", reason="patient-not-found")
            await self._rt.audit.record(
                session,
                caller=who,
                type="patient.read",
                action=Action.ACTION_READ,
                patient_enterprise_id=record.enterprise_id,
                entities=[("Patient", f"{record.domain}|{record.local_id}")],
            )
        return mpi_pb2.GetPatientResponse(
            patient=patient_message(record, self._disclosure(who).of_found(record.domain))
        )

    # --- PDQ and $match -------------------------------------------------------------------------

    async def _ranked_response(
        self, who: Caller, query: matching.MatchRecord, *, limit: int, event: str, minimum: float | None = None
    ) -> list[mpi_pb2.ScoredPatient]:
        disclosure = self._disclosure(who)
        async with transactions.change(self._rt) as session:
            ranked = capped(who, await self._index.rank(session, query, limit=limit, minimum=minimum))
            await self._rt.audit.record(
                session,
                caller=who,
                type=event,
                action=Action.ACTION_EXECUTE,
                entities=[("Patient", f"{r.record.domain}|{r.record.local_id}") for r in ranked],
            )
        return [scored_patient(r, disclosure) for r in ranked]

    async def SearchPatients(
        self, request: mpi_pb2.SearchPatientsRequest, context: object
    ) -> mpi_pb2.SearchPatientsResponse:
        who = caller()
        who.require_scope("Patient", "r")
        who.require_role(*_SEARCHERS)
        size = min(max(request.limit, 0) or 20, _MAX_RESULTS)
        search = mpi_pb2.SearchPatientsRequest()
        search.CopyFrom(request)
        search.limit, search.page_token = 0, ""
        after: tuple[float, str, str] | None = None
        if request.page_token:
            payload = self._seal.open(who, request.page_token)
            try:
                first = mpi_pb2.SearchPatientsRequest.FromString(base64.b64decode(str(payload["q"])))
                weight, domain_id, local_id = payload["k"]  # type: ignore[misc]
                after = (-float(weight), str(domain_id), str(local_id))
            except (KeyError, TypeError, ValueError):
                raise InvalidArgument("page token is not valid", reason="page-token-invalid") from None
            # AIP-158: the other fields of a page request must repeat the first page's (or be empty).
            if search.ByteSize() and search.SerializeToString(deterministic=True) != first.SerializeToString(
                deterministic=True
            ):
                raise InvalidArgument("the search differs from the page token's", reason="page-token-invalid")
            search = first
        query, criteria = search_query(search)
        if not who.is_platform:
            criteria.require_enough()
        disclosure = self._disclosure(who)
        async with transactions.change(self._rt) as session:
            # Every candidate is scored anyway to rank them, so filtering all of them gives the
            # total for free; pages are cut by keyset (weight, domain, local id), the ranking's order.
            ranked = await self._index.rank(session, query, limit=_CANDIDATE_CAP)
            names = NameFilter.of(search)
            found = capped(
                who,
                [r for r in ranked if satisfies(r.comparison.levels, criteria) and names.accepts(r, criteria)],
            )
            following = [r for r in found if after is None or rank_key(r) > after]
            page = following[:size]
            await self._rt.audit.record(
                session,
                caller=who,
                type="patient.pdq-query",
                action=Action.ACTION_EXECUTE,
                entities=[("Patient", f"{r.record.domain}|{r.record.local_id}") for r in page],
            )
        response = mpi_pb2.SearchPatientsResponse(results=[scored_patient(r, disclosure) for r in page])
        if len(following) > size:
            last = page[-1]
            response.next_page_token = self._seal.seal(
                who,
                {
                    "q": base64.b64encode(search.SerializeToString(deterministic=True)).decode(),
                    "k": [last.comparison.total, last.record.domain, last.record.local_id],
                    "x": int(time.time()) + _CURSOR_SECONDS,
                },
            )
        if len(ranked) < _CANDIDATE_CAP:
            response.total = len(found)
        return response

    async def MatchPatient(self, request: mpi_pb2.MatchPatientRequest, context: object) -> mpi_pb2.MatchPatientResponse:
        who = caller()
        who.require_scope("Patient", "r")
        who.require_role(*_SEARCHERS)
        patient = mpi_pb2.Patient()
        patient.CopyFrom(request.patient)
        if not patient.ref.local_id:
            patient.ref.local_id = "match"
        registration = registration_of(patient, who.organization_id)
        query = records.match_record_of_registration(registration, record_id="", enterprise_id="")
        minimum = self._index.params.link_threshold if request.only_certain else 0.0
        results = await self._ranked_response(
            who, query, limit=min(request.count or 10, _MAX_RESULTS), event="patient.match", minimum=minimum
        )
        return mpi_pb2.MatchPatientResponse(results=results)

    # --- review queue -------------------------------------------------------------------------

    async def _task_message(
        self,
        session: object,
        task: tables.ReviewTask,
        disclosure: Disclosure,
        *,
        held: review_store.ReviewAssignment | None = None,
        now: datetime.datetime | None = None,
    ) -> mpi_pb2.ReviewTask:
        records = await store.records_by_id(session, [task.patient_id, task.candidate_id])
        comparison = json.loads(task.comparison)
        message = mpi_pb2.ReviewTask(
            id=task.id,
            patient=patient_message(records[task.patient_id], disclosure),
            candidate=patient_message(records[task.candidate_id], disclosure),
            weight=task.score,
            fields=[mpi_pb2.FieldAgreement(field=f, level=lw[0], weight=lw[1]) for f, lw in comparison.items()],
            hold=task.hold,
            status=task.status,
            created=to_timestamp(task.created_at),
        )
        if held is not None:
            message.assignee = held.assignee
            message.assignee_organization_id = held.organization_id
            message.assigned.CopyFrom(to_timestamp(held.assigned_at))
            message.assignment_expires.CopyFrom(to_timestamp(self._lease.expires(held.assigned_at)))
            message.assignment_expired = not self._lease.live(held.assigned_at, now or utcnow())
        return message

    async def _visible_task(self, session: object, who: Caller, task_id: str) -> tables.ReviewTask:
        """The task, locked for this transaction; a hospital's steward sees only tasks with a record
        of its domain (another's reads as unknown)."""
        task = await store.review_task(session, task_id[:64], for_update=True) if task_id else None
        if task is not None and who.organization_type == "hospital":
            records = await store.records_by_id(session, [task.patient_id, task.candidate_id])
            if who.organization_id not in {r.domain for r in records.values()}:
                task = None
        if task is None:
            raise NotFound("no such review task", reason="review-task-not-found")
        return task

    async def ListReviewTasks(
        self, request: mpi_pb2.ListReviewTasksRequest, context: object
    ) -> mpi_pb2.ListReviewTasksResponse:
        who = caller()
        who.require_scope("Patient", "r")
        who.require_role(*_STEWARDS)
        size = min(max(request.page_size or 50, 1), 200)
        after = _after(request.page_token)
        domain_filter = who.organization_id if who.organization_type == "hospital" else None
        now = utcnow()
        async with transactions.change(self._rt) as session:
            rows = await review_store.open_review_tasks(
                session,
                limit=size,
                after=after,
                domain=domain_filter,
                filter=_ASSIGNMENT_FILTERS.get(request.assignment, review_store.ANY),
                organization_id=who.organization_id,
                assignee=_steward(who),
                lapsed_before=self._lease.lapsed_before(now),
            )
            messages = [await self._task_message(session, t, self._disclosure(who), held=h, now=now) for t, h in rows]
            await self._rt.audit.record(
                session,
                caller=who,
                type="patient.review-list",
                action=Action.ACTION_READ,
                entities=[("ReviewTask", t.id) for t, _ in rows],
            )
        token = _page_token(rows[-1][0]) if len(rows) == size else ""
        return mpi_pb2.ListReviewTasksResponse(tasks=messages, next_page_token=token)

    async def DecideReview(self, request: mpi_pb2.DecideReviewRequest, context: object) -> mpi_pb2.DecideReviewResponse:
        who = caller()
        who.require_scope("Patient", "u")
        who.require_role(*_STEWARDS)
        if request.decision not in (mpi_pb2.REVIEW_DECISION_SAME, mpi_pb2.REVIEW_DECISION_DIFFERENT):
            raise InvalidArgument("decision must be same or different", reason="decision-invalid")

        async def decide(session: object) -> mpi_pb2.DecideReviewResponse:
            task = await self._visible_task(session, who, request.task_id)
            held = await review_store.assignment(session, task.id)
            if task.status == "open" and held is not None and not _holds(held, who):
                if self._lease.live(held.assigned_at, utcnow()):
                    # Claimed by another steward: only they decide it (or a steward who takes it over).
                    raise _held_by_another(held, who)
                # That claim lapsed and nobody took the task: it is free, as an unclaimed one is.
                await review_store.release(session, task.id)
                held = None
            task = await self._index.decide_review(
                session, who, task.id, same=request.decision == mpi_pb2.REVIEW_DECISION_SAME
            )
            return mpi_pb2.DecideReviewResponse(
                task=await self._task_message(session, task, self._disclosure(who), held=held)
            )

        return await self._keyed_write(who, request, _DECIDE_OPERATION, mpi_pb2.DecideReviewResponse, decide)

    async def AssignReviewTask(
        self, request: mpi_pb2.AssignReviewTaskRequest, context: object
    ) -> mpi_pb2.AssignReviewTaskResponse:
        who = caller()
        who.require_scope("Patient", "u")
        who.require_role(*_STEWARDS)
        assignee = _valid_assignee(request.assignee or _steward(who))

        async def assign(session: object) -> mpi_pb2.AssignReviewTaskResponse:
            # The task row stays locked to the commit: two claims of one task run one after the other.
            task = await self._visible_task(session, who, request.task_id)
            if task.status != "open":
                raise FailedPrecondition("the review task was already decided", reason="review-task-closed")
            held = await review_store.assignment(session, task.id)
            now = utcnow()
            live = held is not None and self._lease.live(held.assigned_at, now)
            same_holder = held is not None and (held.organization_id, held.assignee) == (who.organization_id, assignee)
            # Free, lapsed, held by the caller, or already the assignee's: no take-over needed.
            if live and not _holds(held, who) and not same_holder and not request.reassign:
                raise _held_by_another(held, who)
            lapsed: tuple[str, str] | None = None
            if held is not None and same_holder and held.lapsed_organization_id and held.lapsed_assignee:
                lapsed = (held.lapsed_organization_id, held.lapsed_assignee)  # a renewal keeps it
            elif held is not None and not live and not same_holder:
                lapsed = (held.organization_id, held.assignee)
            held = await review_store.assign(
                session,
                task_id=task.id,
                organization_id=who.organization_id,
                assignee=assignee,
                assigned_by=_steward(who),
                at=now,
                lapsed=lapsed,
            )
            await self._rt.audit.record(
                session,
                caller=who,
                type="patient.review-assign",
                action=Action.ACTION_UPDATE,
                entities=[("ReviewTask", task.id), ("Practitioner", f"{who.organization_id}|{assignee}")],
            )
            message = await self._task_message(session, task, self._disclosure(who), held=held, now=now)
            return mpi_pb2.AssignReviewTaskResponse(task=message)

        return await self._keyed_write(who, request, _ASSIGN_OPERATION, mpi_pb2.AssignReviewTaskResponse, assign)

    async def ReleaseReviewTask(
        self, request: mpi_pb2.ReleaseReviewTaskRequest, context: object
    ) -> mpi_pb2.ReleaseReviewTaskResponse:
        who = caller()
        who.require_scope("Patient", "u")
        who.require_role(*_STEWARDS)

        async def release(session: object) -> mpi_pb2.ReleaseReviewTaskResponse:
            task = await self._visible_task(session, who, request.task_id)
            if task.status != "open":
                raise FailedPrecondition("the review task was already decided", reason="review-task-closed")
            held = await review_store.assignment(session, task.id)
            if held is not None and not _holds(held, who):
                if self._lease.live(held.assigned_at, utcnow()):
                    raise _held_by_another(held, who)
                # Another steward's lapsed claim: the task is free already, nothing of the caller's to give back.
            elif held is not None:
                await review_store.release(session, task.id)
                await self._rt.audit.record(
                    session,
                    caller=who,
                    type="patient.review-release",
                    action=Action.ACTION_UPDATE,
                    entities=[("ReviewTask", task.id)],
                )
            return mpi_pb2.ReleaseReviewTaskResponse(
                task=await self._task_message(session, task, self._disclosure(who))
            )

        return await self._keyed_write(who, request, _RELEASE_OPERATION, mpi_pb2.ReleaseReviewTaskResponse, release)

    # --- link, unlink, merge, unmerge ---------------------------------------------------------

    async def LinkPatients(self, request: mpi_pb2.LinkPatientsRequest, context: object) -> mpi_pb2.LinkPatientsResponse:
        who = caller()
        who.require_scope("Patient", "u")
        who.require_role(*_STEWARDS)
        source, target = _ref(request.ref), _ref(request.target)
        _own_domain(who, source[0])
        disclosure = self._disclosure(who)

        async def link(session: object) -> mpi_pb2.LinkPatientsResponse:
            record = await self._index.link(session, who, source, target)
            return mpi_pb2.LinkPatientsResponse(patient=patient_message(record, disclosure))

        return await self._keyed_write(who, request, _LINK_OPERATION, mpi_pb2.LinkPatientsResponse, link)

    async def UnlinkPatient(
        self, request: mpi_pb2.UnlinkPatientRequest, context: object
    ) -> mpi_pb2.UnlinkPatientResponse:
        who = caller()
        who.require_scope("Patient", "u")
        who.require_role(*_STEWARDS)
        source = _ref(request.ref)
        _own_domain(who, source[0])
        disclosure = self._disclosure(who)

        async def unlink(session: object) -> mpi_pb2.UnlinkPatientResponse:
            record = await self._index.unlink(session, who, source)
            return mpi_pb2.UnlinkPatientResponse(patient=patient_message(record, disclosure))

        return await self._keyed_write(who, request, _UNLINK_OPERATION, mpi_pb2.UnlinkPatientResponse, unlink)

    async def MergePatients(
        self, request: mpi_pb2.MergePatientsRequest, context: object
    ) -> mpi_pb2.MergePatientsResponse:
        who = caller()
        who.require_scope("Patient", "u")
        who.require_role(*_MERGERS)
        if who.organization_type != "hospital":
            raise PermissionDenied("only a hospital merges its own records", reason="not-a-hospital")
        domain.validate_local_id(request.survivor_local_id)
        domain.validate_local_id(request.subsumed_local_id)
        disclosure = self._disclosure(who)

        async def merge(session: object) -> mpi_pb2.MergePatientsResponse:
            survivor, subsumed = await self._index.merge(
                session, who, who.organization_id, request.survivor_local_id, request.subsumed_local_id
            )
            return mpi_pb2.MergePatientsResponse(
                survivor=patient_message(survivor, disclosure), subsumed=patient_message(subsumed, disclosure)
            )

        return await self._keyed_write(who, request, _MERGE_OPERATION, mpi_pb2.MergePatientsResponse, merge)

    async def UnmergePatient(
        self, request: mpi_pb2.UnmergePatientRequest, context: object
    ) -> mpi_pb2.UnmergePatientResponse:
        who = caller()
        who.require_scope("Patient", "u")
        who.require_role(*_MERGERS)
        if who.organization_type != "hospital":
            raise PermissionDenied("only a hospital unmerges its own records", reason="not-a-hospital")
        domain.validate_local_id(request.subsumed_local_id)
        disclosure = self._disclosure(who)

        async def unmerge(session: object) -> mpi_pb2.UnmergePatientResponse:
            record = await self._index.unmerge(session, who, who.organization_id, request.subsumed_local_id)
            return mpi_pb2.UnmergePatientResponse(patient=patient_message(record, disclosure))

        return await self._keyed_write(who, request, _UNMERGE_OPERATION, mpi_pb2.UnmergePatientResponse, unmerge)

    async def GetLinkHistory(
        self, request: mpi_pb2.GetLinkHistoryRequest, context: object
    ) -> mpi_pb2.GetLinkHistoryResponse:
        who = caller()
        who.require_scope("Patient", "r")
        who.require_role(*_READERS)
        source = _ref(request.ref)
        _own_domain(who, source[0])
        async with transactions.change(self._rt) as session:
            record = await store.find_record(session, domain=source[0], local_id=source[1])
            if record is None:
                raise NotFound("no patient with that local id in that domain", reason="patient-not-found")
            mates = await store.records_of_person(session, record.enterprise_id)
            ids = list(dict.fromkeys([record.id, *(m.id for m in mates)]))
            rows = await store.link_history(session, ids)
            refs = await store.records_by_id(session, ids)
            changes = [
                mpi_pb2.LinkChange(
                    ref=common_pb2.PatientRef(domain=refs[h.patient_id].domain, local_id=refs[h.patient_id].local_id),
                    enterprise_id=h.enterprise_id,
                    previous_enterprise_id=h.previous_enterprise_id or "",
                    method=LINK_TO_PROTO.get(domain.LinkMethod(h.method), mpi_pb2.LINK_METHOD_UNSPECIFIED),
                    reason=h.reason or "register",
                    weight=h.score or 0.0,
                    decided_by=h.decided_by,
                    at=to_timestamp(h.created_at),
                )
                for h in rows
            ]
            await self._rt.audit.record(
                session,
                caller=who,
                type="patient.link-history",
                action=Action.ACTION_READ,
                patient_enterprise_id=record.enterprise_id,
                entities=[("Patient", f"{record.domain}|{record.local_id}")],
            )
        return mpi_pb2.GetLinkHistoryResponse(enterprise_id=record.enterprise_id, changes=changes)
