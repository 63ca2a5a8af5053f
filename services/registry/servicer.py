"""DocumentRegistry gRPC servicer: registration (unary and streamed), the entry life cycle,
consent-filtered query, checked retrieval (unary and streamed)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

import grpc
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from hie.common.v1 import common_pb2
from hie.consent.v1 import consent_pb2, consent_pb2_grpc
from hie.mpi.v1 import mpi_pb2
from hie.registry.v1 import registry_pb2, registry_pb2_grpc
from services.registry import domain, store
from services.registry.broker import Notifier
from services.registry.content import ChunkWriter, read_chunks, sealed_chunks
from services.registry.decision_cache import ConsentDecisionCache
from services.registry.messages import entry_message, submission_set_message
from services.registry.submission import Submission, as_retry, check_submission
from services.registry.xref_cache import CrossReferenceCache
from services.shared import transactions
from services.shared.audit_trail import Action, Outcome
from services.shared.auth import Caller, caller
from services.shared.db import utcnow
from services.shared.errors import (
    AlreadyExists,
    DataCorruption,
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    error_from_rpc,
)
from services.shared.idempotency import FirstAnswers, check_key, fingerprint
from services.shared.metrics import CONSENT_DENIALS
from services.shared.process import ServiceRuntime
from services.shared.protection.fields import TamperedCiphertextError
from services.shared.protection.keyring import UnknownKeyError
from services.shared.timestamps import to_datetime_or_none as from_timestamp
from services.shared.timestamps import to_timestamp_or_none as to_timestamp

_MAX_PAGE = 200
# Documents per submission set (their content also fits in one gRPC message, at most 64 MiB).
MAX_SET_DOCUMENTS = 500
# Consent decides at most this many items per call; a query examines one batch per round and
# at most _MAX_ROUNDS rounds per page (a page can come back short, never empty with a next token
# unless that many documents in a row were denied).
_CONSENT_BATCH = 1000
_MAX_ROUNDS = 5
# Role per operation (from the hospital's verified user assertion).
_AUTHORS = ("doctor", "nurse", "technician")
# The operation a kept first answer belongs to (one key, one operation).
_REGISTER_OPERATION = "document.register"
_ENTERED_IN_ERROR_OPERATION = "document.entered-in-error"
_SUBMISSION_SET_OPERATION = "document.submission-set"
_READERS = ("doctor", "nurse", "pharmacist", "technician")
_CURRENT = registry_pb2.DOCUMENT_STATUS_CURRENT
_IMAGING = registry_pb2.CONTENT_KIND_IMAGING_STUDY
_INLINE = registry_pb2.CONTENT_KIND_INLINE


async def _single(content: bytes) -> AsyncIterator[bytes]:
    if content:
        yield content


class DocumentRegistryServicer(registry_pb2_grpc.DocumentRegistryServicer):
    def __init__(self, runtime: ServiceRuntime, notifier: Notifier) -> None:
        self._rt = runtime
        self._notifier = notifier
        self._answers = FirstAnswers(store.idempotent_answers)
        # Cross-references for the query/read hot path, invalidated by the mpi (xref_cache.py).
        self._xrefs = CrossReferenceCache(ttl=runtime.options.value("HIE_REGISTRY_XREF_CACHE_SECONDS"))
        # Consent's decisions for the same hot path, invalidated by consent (decision_cache.py).
        self._decisions = ConsentDecisionCache(max_age=runtime.options.value("HIE_REGISTRY_CONSENT_CACHE_SECONDS"))

    @property
    def _consent(self) -> consent_pb2_grpc.ConsentDecisionPointStub:
        return consent_pb2_grpc.ConsentDecisionPointStub(self._rt.channel("consent"))

    async def _decide(
        self, xref: mpi_pb2.CrossReferenceResponse, entries: list[store.EntryLike]
    ) -> dict[str, consent_pb2.ItemDecision]:
        """Consent's decision for each entry, for the caller: kept decisions where consent's
        answer to the very same question is still valid (decision_cache.py), the rest asked in
        one batch. Either way the caller acts on and audits consent's answer."""
        if not entries:
            return {}
        who = caller()
        # The care relationship: the caller's organisation registered the person itself.
        holds_record = who.organization_id in {r.domain for r in xref.refs}
        requester = (
            who.organization_id,
            who.organization_type,
            who.practitioner_id,
            who.role,
            who.department,
            who.purpose_of_use,
            holds_record,
        )
        decided: dict[str, consent_pb2.ItemDecision] = {}
        missing: list[tuple[store.EntryLike, tuple[object, ...]]] = []
        for e in entries:
            # Every attribute the DecisionItem below carries, as the registry holds it.
            care = e.service_start or e.created
            key = (e.id, e.source_organization_id, e.class_code, e.type_code, e.security_labels, care)
            kept = self._decisions.get(xref.enterprise_id, requester, key) if self._decisions.enabled else None
            if kept is None:
                missing.append((e, key))
            else:
                decided[e.id] = kept
                if kept.decision == consent_pb2.DECISION_DENY:
                    CONSENT_DENIALS.add(1, {"basis": kept.basis})
        if not missing:
            return decided
        request = consent_pb2.DecideRequest(
            enterprise_id=xref.enterprise_id,
            requester_holds_record=holds_record,
            items=[
                consent_pb2.DecisionItem(
                    item_id=e.id,
                    source_organization_id=e.source_organization_id,
                    class_code=e.class_code,
                    type_code=e.type_code,
                    security_labels=store.labels_of(e.security_labels),
                    # When the care happened, for directives limited to a data period.
                    data_time=to_timestamp(e.service_start or e.created),
                )
                for e, _key in missing
            ],
        )
        generation, asked_at = self._decisions.generation, self._decisions.now()
        try:
            response = await self._consent.Decide(request)
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc) from None
        keys = {e.id: key for e, key in missing}
        answered = [(d.item_id, d) for d in response.decisions if d.item_id in keys]
        self._decisions.put(
            xref.enterprise_id,
            requester,
            [(keys[item_id], d) for item_id, d in answered],
            answer=response,
            generation=generation,
            asked_at=asked_at,
        )
        decided.update(answered)
        return decided

    async def _record(
        self,
        who: Caller,
        *,
        type: str,
        action: int,
        enterprise_id: str,
        document_id: str,
        outcome: int = Outcome.OUTCOME_SUCCESS,
        source_organization_id: str = "",
    ) -> str:
        """An audit event in its own transaction (reads, and denied or failed accesses). A read of
        another organisation's document names that organisation too: the authority's report of
        registrations followed by cross-domain reads is built from it."""
        entities = [("DocumentReference", document_id)]
        if source_organization_id and source_organization_id != who.organization_id:
            entities.append(("Organization", source_organization_id))
        return await self._rt.audit.record_now(
            caller=who,
            type=type,
            action=action,  # type: ignore[arg-type]
            outcome=outcome,  # type: ignore[arg-type]
            patient_enterprise_id=enterprise_id,
            entities=entities,
        )

    # --- register ---------------------------------------------------------------------------

    async def _earlier(self, sub: Submission, session: AsyncSession | None = None) -> store.DocumentEntryRecord | None:
        """The entry an earlier attempt of this submission registered (by source document id,
        then by idempotency key); a reused id or key with other content is refused. In the
        registering transaction when one is given (no connection of its own)."""
        if session is None:
            async with self._rt.sessions() as own:
                return await self._earlier(sub, own)
        existing = (
            await store.find_by_source_ids(
                session,
                source_organization_id=sub.record.source_organization_id,
                source_document_ids=[sub.source_document_id],
            )
        ).get(sub.source_document_id)
        if existing is None and sub.record.idempotency_key:
            existing = await store.find_by_idempotency_key(
                session,
                source_organization_id=sub.record.source_organization_id,
                idempotency_key=sub.record.idempotency_key,
            )
            if existing is not None and existing.source_document_id != sub.source_document_id:
                raise AlreadyExists(
                    "that idempotency key was used for another document", reason="idempotency-key-reused"
                )
        return as_retry(existing, sub) if existing is not None else None

    async def _first_answer(
        self, session: AsyncSession, who: Caller, key: str, request_fingerprint: str
    ) -> registry_pb2.RegisterDocumentResponse | None:
        if not key:
            return None
        return await self._answers.first(
            session,
            organization_id=who.organization_id,
            key=key,
            operation=_REGISTER_OPERATION,
            request_fingerprint=request_fingerprint,
            response_type=registry_pb2.RegisterDocumentResponse,
        )

    async def _register(
        self, header: registry_pb2.RegisterDocumentRequest, pieces: AsyncIterator[bytes]
    ) -> registry_pb2.RegisterDocumentResponse:
        """Register one document. With an idempotency key the answer is kept with the
        registration, and a retry of the same request gets that first answer again (201 and its
        audit event ids, even if the first answer was lost to a crash after the commit)."""
        who = caller()
        who.require_scope("DocumentReference", "c")
        who.require_role(*_AUTHORS)
        if not header.entry.patient.local_id:
            raise InvalidArgument("a patient local id is required", reason="patient-ref-missing")
        key = check_key(header.idempotency_key.strip())
        # The request without its content (streamed or inline): the declared SHA-256 and size,
        # checked against the content, stand for it.
        bare = registry_pb2.RegisterDocumentRequest()
        bare.CopyFrom(header)
        bare.ClearField("content")
        request_fingerprint = fingerprint(_REGISTER_OPERATION, bare)
        sub = check_submission(who, header)
        record = sub.record
        patient_ref = common_pb2.PatientRef(domain=record.patient_domain, local_id=header.entry.patient.local_id)
        try:
            async with self._rt.sessions() as session, session.begin():
                if (first := await self._first_answer(session, who, key, request_fingerprint)) is not None:
                    return first
                # mpi resolves the person while this transaction looks for an earlier attempt (a
                # retry is answered from it; a concurrent duplicate is caught by the unique
                # constraints below): the two are independent. The person comes from the
                # cross-reference cache when it holds them (as fresh as asking: the mpi's link
                # changes invalidate it before they return; an unknown patient is never kept),
                # so a hospital registering a patient's documents one by one asks the mpi once.
                person, existing = await asyncio.gather(
                    self._xrefs.cross_reference(self._rt, patient_ref),
                    self._earlier(sub, session),
                    return_exceptions=True,
                )
                if isinstance(person, NotFound):
                    raise FailedPrecondition("register the patient first", reason="patient-not-registered")
                if isinstance(person, BaseException):
                    raise person
                if isinstance(existing, BaseException):
                    raise existing
                if existing is not None:
                    return registry_pb2.RegisterDocumentResponse(entry=entry_message(existing), created=False)
                enterprise_id = person.enterprise_id
                record.enterprise_id = enterprise_id
                if sub.relation:
                    await self._relate(session, sub, enterprise_id)
                content_key = None
                if record.content_kind == _INLINE and self._rt.protection is not None:
                    content_key = self._rt.protection.new_content_key(record.id)
                    record.content_key = content_key.wrapped
                session.add(record)
                await session.flush()
                writer = ChunkWriter(session, record.id, content_key)
                async for piece in pieces:
                    if record.content_kind == _IMAGING:
                        raise InvalidArgument(
                            "an imaging study reference carries no content", reason="content-not-allowed"
                        )
                    await writer.write(piece)
                await writer.close()
                hasher = writer.hasher
                if record.content_kind == _INLINE:
                    digest = domain.check_received(
                        hasher, declared_sha256=sub.declared_sha256, declared_size=sub.declared_size
                    )
                    record.size = digest.size
                action = Action.ACTION_CREATE
                event_ids = [
                    await self._rt.audit.record(
                        session,
                        caller=who,
                        type="document.register",
                        action=action,
                        patient_enterprise_id=enterprise_id,
                        entities=[("DocumentReference", record.id)],
                    )
                ]
                # Subscribers hear of it only if it commits: staged in the same transaction.
                await self._notifier.stage_document(session, record, person.refs)
                if sub.relation == domain.REPLACES:
                    event_ids.append(
                        await self._rt.audit.record(
                            session,
                            caller=who,
                            type="document.supersede",
                            action=Action.ACTION_UPDATE,
                            patient_enterprise_id=enterprise_id,
                            entities=[("DocumentReference", sub.target_id)],
                        )
                    )
                answer = registry_pb2.RegisterDocumentResponse(
                    entry=entry_message(record), created=True, audit_event_ids=event_ids
                )
                if key:
                    await self._answers.keep(
                        session,
                        organization_id=who.organization_id,
                        key=key,
                        operation=_REGISTER_OPERATION,
                        request_fingerprint=request_fingerprint,
                        response=answer,
                    )
        except IntegrityError:
            # A concurrent submission of the same document committed first: answer as its retry.
            async with self._rt.sessions() as session:
                if (first := await self._first_answer(session, who, key, request_fingerprint)) is not None:
                    return first
            existing = await self._earlier(sub)
            if existing is None:
                raise AlreadyExists(
                    "that source document id is registered with different content", reason="document-id-reused"
                ) from None
            return registry_pb2.RegisterDocumentResponse(entry=entry_message(existing), created=False)
        self._rt.outbox.notify()
        return answer

    async def _relate(self, session: AsyncSession, sub: Submission, enterprise_id: str) -> None:
        """Checks a replace / append / transform against its target (same source organisation,
        same person, still current) and supersedes a replaced target, in the registering transaction."""
        target = await session.get(store.DocumentEntryRecord, sub.target_id)
        if target is None:
            raise NotFound("no such document", reason="document-not-found")
        target_person = (
            await self._xrefs.cross_reference(
                self._rt, common_pb2.PatientRef(domain=target.patient_domain, local_id=target.patient_local_id)
            )
        ).enterprise_id
        domain.check_relation(
            sub.relation,
            target_status=target.status,
            target_source_organization_id=target.source_organization_id,
            target_enterprise_id=target_person,
            organization_id=sub.record.source_organization_id,
            enterprise_id=enterprise_id,
        )
        if sub.relation == domain.REPLACES and not await store.supersede(session, target.id):
            raise FailedPrecondition("only a current document can be replaced or amended", reason="target-not-current")

    async def RegisterSubmissionSet(
        self, request: registry_pb2.RegisterSubmissionSetRequest, context: object
    ) -> registry_pb2.RegisterSubmissionSetResponse:
        """Several documents about one patient in one transaction (XDS.b / MHD submission set).

        The cost of a registration is mostly per transaction and per call (the mpi lookup, the
        commit, the audit delivery), so a hospital sending its documents in sets pays it once per
        set: rows go in with one multi-row insert per table, and the set is one audit event naming
        every document it registered."""
        who = caller()
        who.require_scope("DocumentReference", "c")
        who.require_role(*_AUTHORS)
        documents = list(request.documents)
        if not documents:
            raise InvalidArgument("a submission set needs at least one document", reason="submission-set-empty")
        if len(documents) > MAX_SET_DOCUMENTS:
            raise InvalidArgument(
                f"at most {MAX_SET_DOCUMENTS} documents per submission set", reason="submission-set-too-large"
            )
        local_ids = {d.entry.patient.local_id for d in documents}
        if len(local_ids) != 1 or "" in local_ids:
            # XDS: XDSPatientIdDoesNotMatch.
            raise InvalidArgument(
                "every document of a submission set names the same patient", reason="submission-set-patient-mismatch"
            )
        subs = [check_submission(who, d) for d in documents]
        if len({s.source_document_id for s in subs}) != len(subs):
            raise InvalidArgument("a document appears twice in the submission set", reason="submission-set-duplicate")
        patient_ref = common_pb2.PatientRef(domain=who.organization_id, local_id=local_ids.pop())
        key = check_key(request.idempotency_key.strip())
        request_fingerprint = fingerprint(_SUBMISSION_SET_OPERATION, request)

        async def first_answer(session: AsyncSession) -> registry_pb2.RegisterSubmissionSetResponse | None:
            if not key:
                return None
            return await self._answers.first(
                session,
                organization_id=who.organization_id,
                key=key,
                operation=_SUBMISSION_SET_OPERATION,
                request_fingerprint=request_fingerprint,
                response_type=registry_pb2.RegisterSubmissionSetResponse,
            )

        try:
            async with self._rt.sessions() as session, session.begin():
                if (first := await first_answer(session)) is not None:
                    # A retry of the keyed set: its first answer (created, audit ids), not
                    # `created: false` per document.
                    return first
                person, earlier = await asyncio.gather(
                    self._xrefs.cross_reference(self._rt, patient_ref),
                    self._earlier_of_set(subs, session),
                    return_exceptions=True,
                )
                if isinstance(person, NotFound):
                    raise FailedPrecondition("register the patient first", reason="patient-not-registered")
                if isinstance(person, BaseException):
                    raise person
                if isinstance(earlier, BaseException):
                    raise earlier
                enterprise_id = person.enterprise_id
                new = [s for s in subs if s.source_document_id not in earlier]
                chunks: list[dict[str, object]] = []
                for position, sub in enumerate(subs):
                    if sub.source_document_id in earlier:
                        continue
                    sub.record.enterprise_id = enterprise_id
                    if sub.relation:
                        await self._relate(session, sub, enterprise_id)
                    chunks.extend(sealed_chunks(sub, position, self._rt.protection))
                session.add_all([s.record for s in new])
                await session.flush()
                await store.insert_chunks(session, chunks)
                event_ids: list[str] = []
                superseded = [s.target_id for s in new if s.relation == domain.REPLACES]
                for event_type, action, targets in (
                    ("document.register", Action.ACTION_CREATE, [s.record.id for s in new]),
                    ("document.supersede", Action.ACTION_UPDATE, superseded),
                ):
                    if targets:
                        event_ids.append(
                            await self._rt.audit.record(
                                session,
                                caller=who,
                                type=event_type,
                                action=action,
                                patient_enterprise_id=enterprise_id,
                                entities=[("DocumentReference", target) for target in targets],
                            )
                        )
                await self._notifier.stage_documents(session, [s.record for s in new], person.refs)
                stored_set = None
                if request.HasField("submission_set"):
                    members = [earlier.get(s.source_document_id, s.record).id for s in subs]
                    stored_set = await self._store_submission_set(
                        session, who, request.submission_set, patient_ref, enterprise_id, members
                    )
                answer = registry_pb2.RegisterSubmissionSetResponse(
                    submission_set=submission_set_message(stored_set) if stored_set is not None else None,
                    enterprise_id=enterprise_id,
                    documents=[
                        registry_pb2.RegisterDocumentResponse(
                            entry=entry_message(earlier.get(s.source_document_id, s.record)),
                            created=s.source_document_id not in earlier,
                            audit_event_ids=event_ids if s.source_document_id not in earlier else [],
                        )
                        for s in subs
                    ],
                )
                if key:
                    await self._answers.keep(
                        session,
                        organization_id=who.organization_id,
                        key=key,
                        operation=_SUBMISSION_SET_OPERATION,
                        request_fingerprint=request_fingerprint,
                        response=answer,
                    )
        except IntegrityError:
            # A concurrent retry of the keyed set committed first: answer as that retry.
            async with self._rt.sessions() as session:
                if (first := await first_answer(session)) is not None:
                    return first
            # A concurrent submission of some of these documents committed first.
            raise AlreadyExists(
                "a document of the set was registered concurrently; resubmit the set", reason="submission-set-conflict"
            ) from None
        if new:
            self._rt.outbox.notify()
        return answer

    async def _store_submission_set(
        self,
        session: AsyncSession,
        who: Caller,
        given: registry_pb2.SubmissionSet,
        patient: common_pb2.PatientRef,
        enterprise_id: str,
        members: list[str],
    ) -> store.SubmissionSetRecord:
        """The SubmissionSet as the source sent it (XDS: its uniqueId identifies it; a set
        submitted again under the same uniqueId is the earlier one)."""
        # Without a uniqueId (MHD requires one) the set is named by its members, so a retry of the
        # same submission finds the earlier set instead of storing a second one.
        source_id = domain.check_source_document_id(
            given.source_id or f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, ' '.join(members))}"
        )
        earlier = await store.submission_set_by_source(
            session, source_organization_id=who.organization_id, source_id=source_id
        )
        if earlier is not None:
            return earlier
        record = store.SubmissionSetRecord(
            id=str(uuid.uuid4()),
            source_id=source_id,
            source_organization_id=who.organization_id,
            patient_domain=patient.domain,
            patient_local_id=patient.local_id,
            enterprise_id=enterprise_id,
            title=domain.clean_text(given.title, what="title", limit=256),
            content_type_system=given.content_type.system[:128],
            content_type_code=given.content_type.code[:64],
            content_type_display=domain.clean_text(given.content_type.display, what="content-type", limit=128),
            submitted=from_timestamp(given.submitted, given.HasField("submitted")) or utcnow(),
            document_ids=" ".join(members),
        )
        session.add(record)
        await session.flush()
        return record

    async def FindSubmissionSets(
        self, request: registry_pb2.FindSubmissionSetsRequest, context: object
    ) -> registry_pb2.FindSubmissionSetsResponse:
        """A person's submission sets (MHD ITI-66), newest first; each lists the members consent
        lets the caller see, and a set with none visible is left out (it would disclose that
        documents exist). Audited as one query naming the sets returned."""
        who = caller()
        who.require_scope("DocumentReference", "r")
        who.require_role(*_READERS)
        who.require_purpose()
        ref = common_pb2.PatientRef(
            domain=request.patient.domain or who.organization_id, local_id=request.patient.local_id
        )
        if not ref.local_id:
            raise InvalidArgument("a patient local id is required", reason="patient-ref-missing")
        if ref.domain != who.organization_id and not who.is_platform:
            raise NotFound("no patient with that local id in your domain", reason="patient-not-found")
        size = min(request.page.page_size or 20, _MAX_PAGE)
        cursor = domain.QueryCursor.decode(request.page.page_token)
        async with transactions.change(self._rt) as session:
            xref = await self._xrefs.cross_reference(self._rt, ref)
            sets = await store.submission_sets_of_patient(
                session,
                refs=[(r.domain, r.local_id) for r in xref.refs],
                after=(cursor.service_time, cursor.document_id) if cursor else None,
                limit=size + 1,
            )
            more, sets = len(sets) > size, sets[:size]
            members = await store.entries_by_ids(session, [d for s in sets for d in s.document_ids.split()])
            decisions = await self._decide(xref, members)
            visible = {d for d, decision in decisions.items() if decision.decision == consent_pb2.DECISION_PERMIT}
            found = []
            for s in sets:
                message = submission_set_message(s)
                message.ClearField("document_ids")
                message.document_ids.extend(d for d in s.document_ids.split() if d in visible)
                if message.document_ids:
                    found.append(message)
            event_id = await self._rt.audit.record(
                session,
                caller=who,
                type="submission-set.query",
                action=Action.ACTION_EXECUTE,
                patient_enterprise_id=xref.enterprise_id,
                entities=[("List", s.submission_set_id) for s in found],
            )
        next_token = domain.QueryCursor(sets[-1].submitted, sets[-1].id).encode() if more and sets else ""
        return registry_pb2.FindSubmissionSetsResponse(
            submission_sets=found,
            page=common_pb2.PageResponse(next_page_token=next_token),
            audit_event_ids=[event_id],
        )

    async def _earlier_of_set(
        self, subs: list[Submission], session: AsyncSession
    ) -> dict[str, store.DocumentEntryRecord]:
        """The documents of the set an earlier submission registered, by source document id (one
        query; a document also carrying an idempotency key is looked up by it as well)."""
        found = await store.find_by_source_ids(
            session,
            source_organization_id=subs[0].who.organization_id,
            source_document_ids=[s.source_document_id for s in subs],
        )
        earlier: dict[str, store.DocumentEntryRecord] = {}
        for sub in subs:
            existing = found.get(sub.source_document_id)
            if existing is not None:
                earlier[sub.source_document_id] = as_retry(existing, sub)
            elif sub.record.idempotency_key and (by_key := await self._earlier(sub, session)) is not None:
                earlier[sub.source_document_id] = by_key
        return earlier

    async def RegisterDocument(
        self, request: registry_pb2.RegisterDocumentRequest, context: object
    ) -> registry_pb2.RegisterDocumentResponse:
        return await self._register(request, _single(request.content))

    async def RegisterDocumentStream(
        self, request_iterator: AsyncIterator[registry_pb2.RegisterDocumentStreamRequest], context: object
    ) -> registry_pb2.RegisterDocumentStreamResponse:
        first = await anext(aiter(request_iterator), None)
        if first is None or not first.HasField("header"):
            raise InvalidArgument("the first message must carry the header", reason="stream-header-missing")
        if first.header.content:
            raise InvalidArgument("content goes in chunks after the header", reason="stream-content-in-header")

        async def pieces() -> AsyncIterator[bytes]:
            async for message in request_iterator:
                if not message.HasField("chunk"):
                    raise InvalidArgument("only chunks may follow the header", reason="stream-header-repeated")
                if message.chunk:
                    yield message.chunk

        answer = await self._register(first.header, pieces())
        return registry_pb2.RegisterDocumentStreamResponse(
            entry=answer.entry, created=answer.created, audit_event_ids=answer.audit_event_ids
        )

    async def MarkEnteredInError(
        self, request: registry_pb2.MarkEnteredInErrorRequest, context: object
    ) -> registry_pb2.MarkEnteredInErrorResponse:
        who = caller()
        who.require_scope("DocumentReference", "c")
        who.require_role(*_AUTHORS)
        document_id = _document_id(request.document_id)
        key = check_key(request.idempotency_key.strip())
        request_fingerprint = fingerprint(_ENTERED_IN_ERROR_OPERATION, request)
        async with self._rt.sessions() as session, session.begin():
            if (
                key
                and (
                    first := await self._answers.first(
                        session,
                        organization_id=who.organization_id,
                        key=key,
                        operation=_ENTERED_IN_ERROR_OPERATION,
                        request_fingerprint=request_fingerprint,
                        response_type=registry_pb2.MarkEnteredInErrorResponse,
                    )
                )
                is not None
            ):
                return first
            record = await session.get(store.DocumentEntryRecord, document_id)
            if record is None:
                raise NotFound("no such document", reason="document-not-found")
            domain.check_entered_in_error(
                status=record.status,
                source_organization_id=record.source_organization_id,
                organization_id=who.organization_id,
            )
            record.status = domain.ENTERED_IN_ERROR
            event_id = await self._rt.audit.record(
                session,
                caller=who,
                type="document.entered-in-error",
                action=Action.ACTION_UPDATE,
                patient_enterprise_id=record.enterprise_id,
                entities=[("DocumentReference", record.id)],
            )
            answer = registry_pb2.MarkEnteredInErrorResponse(entry=entry_message(record), audit_event_ids=[event_id])
            if key:
                await self._answers.keep(
                    session,
                    organization_id=who.organization_id,
                    key=key,
                    operation=_ENTERED_IN_ERROR_OPERATION,
                    request_fingerprint=request_fingerprint,
                    response=answer,
                )
        self._rt.outbox.notify()
        return answer

    # --- query ------------------------------------------------------------------------------

    async def FindDocuments(
        self, request: registry_pb2.FindDocumentsRequest, context: object
    ) -> registry_pb2.FindDocumentsResponse:
        who = caller()
        who.require_scope("DocumentReference", "r")
        who.require_role(*_READERS)
        who.require_purpose()
        ref = common_pb2.PatientRef(
            domain=request.patient.domain or who.organization_id, local_id=request.patient.local_id
        )
        if not ref.local_id:
            raise InvalidArgument("a patient local id is required", reason="patient-ref-missing")
        if ref.domain != who.organization_id and not who.is_platform:
            # A hospital finds a person through its own record of them, never by probing another's ids.
            raise NotFound("no patient with that local id in your domain", reason="patient-not-found")
        size = min(request.page.page_size or 50, _MAX_PAGE)
        cursor = domain.QueryCursor.decode(request.page.page_token)
        # The rows on a connection checked out while mpi answers, in autocommit: the reads need
        # no transaction (each statement has its own snapshot under PostgreSQL's read committed
        # anyway). No BEGIN and COMMIT round trips: they were about 6 % of the registry's samples
        # per document query (issue 21's `hie bench load`).
        async with self._rt.sessions() as session:
            xref, _connection = await _together(
                self._xrefs.cross_reference(self._rt, ref),
                session.connection(execution_options={"isolation_level": "AUTOCOMMIT"}),
            )
            visible, next_cursor = await self._visible_page(session, request, xref, size=size, cursor=cursor)
        # The audit event, the only write, commits before any entry is returned, in one multi-row
        # insert with the events of the queries answered meanwhile (`Outbox.add_now`).
        event_id = await self._rt.audit.record_now(
            caller=who,
            type="document.query",
            action=Action.ACTION_EXECUTE,
            patient_enterprise_id=xref.enterprise_id,
            entities=[("DocumentReference", r.id) for r in visible],
        )
        return registry_pb2.FindDocumentsResponse(
            enterprise_id=xref.enterprise_id,
            entries=[entry_message(r) for r in visible],
            page=common_pb2.PageResponse(next_page_token=next_cursor.encode() if next_cursor else ""),
            audit_event_ids=[event_id],
        )

    async def _visible_page(
        self,
        session: AsyncSession,
        request: registry_pb2.FindDocumentsRequest,
        xref: mpi_pb2.CrossReferenceResponse,
        *,
        size: int,
        cursor: domain.QueryCursor | None,
    ) -> tuple[list[store.EntryLike], domain.QueryCursor | None]:
        """A full page of entries consent permits: consent is asked in one batched decision per
        round of rows read, and rows are read until the page is full (pages have no holes)."""
        statuses = [int(s) for s in request.statuses] or [_CURRENT]
        after = (cursor.service_time, cursor.document_id) if cursor else None
        visible: list[store.EntryLike] = []
        for _round in range(_MAX_ROUNDS):
            # Twice what is missing, so one round usually suffices even with some denials.
            limit = min(_CONSENT_BATCH, max(2 * (size + 1 - len(visible)), 20))
            rows = await store.entries_of_patient(
                session,
                refs=[(r.domain, r.local_id) for r in xref.refs],
                type_codes=list(request.type_codes),
                class_codes=list(request.class_codes),
                statuses=statuses,
                source_organization_ids=list(request.source_organization_ids),
                service_from=from_timestamp(request.service_from, request.HasField("service_from")),
                service_to=from_timestamp(request.service_to, request.HasField("service_to")),
                after=after,
                limit=limit,
            )
            decisions = await self._decide(xref, rows)
            for row in rows:
                decision = decisions.get(row.id)
                # A document consent denies is absent from the result, not an error.
                if decision is not None and decision.decision == consent_pb2.DECISION_PERMIT:
                    visible.append(row)
                    if len(visible) > size:
                        page = visible[:size]
                        return page, domain.QueryCursor(page[-1].service_time, page[-1].id)
            if len(rows) < limit:
                return visible, None
            after = (rows[-1].service_time, rows[-1].id)
        # Bounded work per page: a short page, continuing after the last row examined.
        return visible, domain.QueryCursor(*after) if after else None

    # --- read and retrieve ------------------------------------------------------------------------

    async def _readable(
        self, who: Caller, document_id: str, *, audit_type: str
    ) -> tuple[store.DocumentEntryRecord, str, list[store.DocumentEntryRecord]]:
        """The entry, its person's current enterprise id and its later relations, if consent
        permits the caller; a denial is audited and answered PERMISSION_DENIED."""
        who.require_scope("DocumentReference", "r")
        who.require_role(*_READERS)
        if not who.is_platform:
            who.require_purpose()
        document_id = _document_id(document_id)
        async with self._rt.sessions() as session:
            record = await session.get(store.DocumentEntryRecord, document_id)
            if record is None:
                raise NotFound("no such document", reason="document-not-found")
            # The person's current identity, so consent follows links made since registration;
            # the later relations are read meanwhile.
            xref, related = await _together(
                self._xrefs.cross_reference(
                    self._rt, common_pb2.PatientRef(domain=record.patient_domain, local_id=record.patient_local_id)
                ),
                store.related_to(session, document_id),
            )
        if who.is_platform:
            # An exchange service checking, for an operation whose caller it already checked, whose
            # document an id names (referral attachments, a directive's evidence): no clinical read.
            return record, xref.enterprise_id, related
        decision = (await self._decide(xref, [record])).get(record.id)
        if decision is None or decision.decision != consent_pb2.DECISION_PERMIT:
            await self._record(
                who,
                type=audit_type,
                action=Action.ACTION_READ,
                outcome=Outcome.OUTCOME_MINOR_FAILURE,
                enterprise_id=xref.enterprise_id,
                document_id=record.id,
                source_organization_id=record.source_organization_id,
            )
            raise PermissionDenied("consent does not permit this access", reason="consent-denied")
        return record, xref.enterprise_id, related

    async def InvalidateCrossReferences(
        self, request: registry_pb2.InvalidateCrossReferencesRequest, context: object
    ) -> registry_pb2.InvalidateCrossReferencesResponse:
        who = caller()
        if not who.is_platform or who.client_id != "service:mpi":
            raise PermissionDenied("only the mpi invalidates cross-references", reason="role")
        return registry_pb2.InvalidateCrossReferencesResponse(generation=self._xrefs.invalidate())

    async def InvalidateConsentDecisions(
        self, request: registry_pb2.InvalidateConsentDecisionsRequest, context: object
    ) -> registry_pb2.InvalidateConsentDecisionsResponse:
        who = caller()
        if not who.is_platform or who.client_id != "service:consent":
            raise PermissionDenied("only the consent service invalidates consent decisions", reason="role")
        return registry_pb2.InvalidateConsentDecisionsResponse(
            generation=self._decisions.invalidate(request.enterprise_id[:64])
        )

    async def GetDocumentEntry(
        self, request: registry_pb2.GetDocumentEntryRequest, context: object
    ) -> registry_pb2.GetDocumentEntryResponse:
        who = caller()
        record, enterprise_id, related = await self._readable(who, request.document_id, audit_type="document.read")
        event_id = await self._record(
            who,
            type="document.read",
            action=Action.ACTION_READ,
            enterprise_id=enterprise_id,
            document_id=record.id,
            source_organization_id=record.source_organization_id,
        )
        return registry_pb2.GetDocumentEntryResponse(entry=entry_message(record, related), audit_event_ids=[event_id])

    async def RetrieveDocumentStream(
        self, request: registry_pb2.RetrieveDocumentStreamRequest, context: object
    ) -> AsyncIterator[registry_pb2.RetrieveDocumentStreamResponse]:
        """Entry first, then content chunks; the last chunk only after the hash matched."""
        who = caller()
        record, enterprise_id, related = await self._readable(who, request.document_id, audit_type="document.retrieve")
        entry = entry_message(record, related)

        async def corrupt() -> DataCorruption:
            await self._record(
                who,
                type="document.retrieve",
                action=Action.ACTION_READ,
                outcome=Outcome.OUTCOME_SERIOUS_FAILURE,
                enterprise_id=enterprise_id,
                document_id=record.id,
                source_organization_id=record.source_organization_id,
            )
            return DataCorruption("stored document content failed its integrity check", reason="content-corrupt")

        if record.content_kind == _IMAGING:
            event_id = await self._record(
                who,
                type="document.retrieve",
                action=Action.ACTION_READ,
                enterprise_id=enterprise_id,
                document_id=record.id,
                source_organization_id=record.source_organization_id,
            )
            yield registry_pb2.RetrieveDocumentStreamResponse(entry=entry, audit_event_ids=[event_id])
            return
        hasher = domain.ContentHasher(limit=2**62)
        started = False
        chunks = read_chunks(self._rt.sessions, self._rt.protection, record)
        while True:
            try:
                _seq, data, last = await anext(chunks)
            except StopAsyncIteration:
                break
            except (TamperedCiphertextError, UnknownKeyError):
                raise await corrupt() from None
            hasher.update(data)
            if last:
                try:
                    domain.check_retrieved(hasher, sha256=record.sha256, size=record.size)
                except DomainError:
                    raise await corrupt() from None
            if not started:
                # Recorded once the first chunk is in hand (and, for one-chunk content, verified).
                event_id = await self._record(
                    who,
                    type="document.retrieve",
                    action=Action.ACTION_READ,
                    enterprise_id=enterprise_id,
                    document_id=record.id,
                    source_organization_id=record.source_organization_id,
                )
                yield registry_pb2.RetrieveDocumentStreamResponse(entry=entry, audit_event_ids=[event_id])
                started = True
            yield registry_pb2.RetrieveDocumentStreamResponse(chunk=data)
        if not started:
            # No content at all where some was registered.
            raise await corrupt()

    async def RetrieveDocument(
        self, request: registry_pb2.RetrieveDocumentRequest, context: object
    ) -> registry_pb2.RetrieveDocumentResponse:
        """The whole content in one message (the streamed retrieval, gathered)."""
        response = registry_pb2.RetrieveDocumentResponse()
        parts: list[bytes] = []
        async for message in self.RetrieveDocumentStream(
            registry_pb2.RetrieveDocumentStreamRequest(document_id=request.document_id), context
        ):
            if message.HasField("entry"):
                response.entry.CopyFrom(message.entry)
                response.audit_event_ids.extend(message.audit_event_ids)
            else:
                parts.append(message.chunk)
        response.content = b"".join(parts)
        return response


_A = TypeVar("_A")
_B = TypeVar("_B")


async def _together(first: Awaitable[_A], second: Awaitable[_B]) -> tuple[_A, _B]:
    """Both results, run concurrently; both have finished before either's error is raised (so
    a session one of them uses is idle again when the caller's `async with` closes it)."""
    one, two = await asyncio.gather(first, second, return_exceptions=True)
    for result in (one, two):
        if isinstance(result, BaseException):
            raise result
    return one, two  # type: ignore[return-value]


def _document_id(value: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise NotFound("no such document", reason="document-not-found") from None
