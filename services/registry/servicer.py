"""DocumentRegistry gRPC servicer: registration, consent-filtered query, checked retrieval."""

from __future__ import annotations

import datetime
import uuid

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy.exc import IntegrityError

from hie.common.v1 import common_pb2
from hie.consent.v1 import consent_pb2, consent_pb2_grpc
from hie.registry.v1 import registry_pb2, registry_pb2_grpc
from services.registry import domain, store
from services.shared import identity
from services.shared.audit_trail import Action, Outcome
from services.shared.auth import Caller, caller
from services.shared.db import utcnow
from services.shared.errors import (
    AlreadyExists,
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    error_from_rpc,
)
from services.shared.process import ServiceRuntime

_MAX_PAGE = 200
# Role per operation (from the hospital's verified user assertion).
_AUTHORS = ("doctor", "nurse", "technician")
_READERS = ("doctor", "nurse", "pharmacist", "technician")
_CURRENT = registry_pb2.DOCUMENT_STATUS_CURRENT


def _ts(value: datetime.datetime | None) -> Timestamp | None:
    if value is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def entry_message(record: store.DocumentEntryRecord) -> registry_pb2.DocumentEntry:
    return registry_pb2.DocumentEntry(
        document_id=record.id,
        source_document_id=record.source_document_id,
        patient=common_pb2.PatientRef(domain=record.patient_domain, local_id=record.patient_local_id),
        enterprise_id=record.enterprise_id,
        source_organization_id=record.source_organization_id,
        author=registry_pb2.Author(
            practitioner_id=record.author_id,
            practitioner_name=record.author_name,
            role=record.author_role,
            department=record.author_department,
        ),
        class_code=registry_pb2.Coding(
            system=record.class_system, code=record.class_code, display=record.class_display
        ),
        type_code=registry_pb2.Coding(system=record.type_system, code=record.type_code, display=record.type_display),
        confidentiality=record.confidentiality,
        security_labels=record.labels,
        created=_ts(record.created),
        title=record.title,
        language=record.language,
        mime_type=record.mime_type,
        size=record.size,
        sha256=record.sha256,
        status=record.status,  # type: ignore[arg-type]
        service_start=_ts(record.service_start),
        service_end=_ts(record.service_end),
    )


class DocumentRegistryServicer(registry_pb2_grpc.DocumentRegistryServicer):
    def __init__(self, runtime: ServiceRuntime) -> None:
        self._rt = runtime

    @property
    def _consent(self) -> consent_pb2_grpc.ConsentDecisionPointStub:
        return consent_pb2_grpc.ConsentDecisionPointStub(self._rt.channel("consent"))

    async def _decide(
        self, enterprise_id: str, entries: list[store.DocumentEntryRecord]
    ) -> dict[str, consent_pb2.ItemDecision]:
        if not entries:
            return {}
        request = consent_pb2.DecideRequest(
            enterprise_id=enterprise_id,
            items=[
                consent_pb2.DecisionItem(
                    item_id=e.id,
                    source_organization_id=e.source_organization_id,
                    class_code=e.class_code,
                    type_code=e.type_code,
                    security_labels=e.labels,
                )
                for e in entries
            ],
        )
        try:
            response = await self._consent.Decide(request)
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc) from None
        return {d.item_id: d for d in response.decisions}

    async def _record_failure(
        self, who: Caller, *, type: str, outcome: int, enterprise_id: str, document_id: str
    ) -> None:
        """Denied and failed accesses are audited too, in their own transaction."""
        async with self._rt.sessions() as session, session.begin():
            await self._rt.audit.record(
                session,
                caller=who,
                type=type,
                action=Action.ACTION_READ,
                outcome=outcome,  # type: ignore[arg-type]
                patient_enterprise_id=enterprise_id,
                entities=[("DocumentReference", document_id)],
            )
        self._rt.outbox.notify()

    async def RegisterDocument(
        self, request: registry_pb2.RegisterDocumentRequest, context: object
    ) -> registry_pb2.RegisterDocumentResponse:
        who = caller()
        who.require_scope("DocumentReference", "c")
        who.require_role(*_AUTHORS)
        entry = request.entry
        source_document_id = domain.check_source_document_id(entry.source_document_id)
        if not entry.type_code.code:
            raise InvalidArgument("a document type code is required", reason="type-code-missing")
        title = domain.clean_text(entry.title, what="title", limit=256, required=True)
        mime_type = domain.check_mime_type(entry.mime_type)
        confidentiality = domain.check_confidentiality(entry.confidentiality)
        digest = domain.check_declared(request.content, declared_sha256=entry.sha256, declared_size=entry.size)
        if not entry.patient.local_id:
            raise InvalidArgument("the patient's local id is required", reason="patient-ref-missing")
        patient_ref = common_pb2.PatientRef(domain=who.organization_id, local_id=entry.patient.local_id)
        try:
            xref = await identity.cross_reference(self._rt, patient_ref)
        except NotFound:
            raise FailedPrecondition(
                "register the patient before their documents", reason="patient-not-registered"
            ) from None

        try:
            async with self._rt.sessions() as session, session.begin():
                existing = await store.find_by_source_id(
                    session, source_organization_id=who.organization_id, source_document_id=source_document_id
                )
                if existing is not None:
                    if existing.sha256 != digest.sha256:
                        raise AlreadyExists(
                            "that source document id is registered with different content",
                            reason="document-id-reused",
                        )
                    return registry_pb2.RegisterDocumentResponse(entry=entry_message(existing), created=False)
                record = store.DocumentEntryRecord(
                    id=str(uuid.uuid4()),
                    source_document_id=source_document_id,
                    source_organization_id=who.organization_id,
                    patient_domain=patient_ref.domain,
                    patient_local_id=patient_ref.local_id,
                    enterprise_id=xref.enterprise_id,
                    author_id=entry.author.practitioner_id[:64] or who.practitioner_id,
                    author_name=domain.clean_text(
                        entry.author.practitioner_name or who.practitioner_name, what="author", limit=64
                    ),
                    author_role=entry.author.role[:32] or who.role,
                    author_department=domain.clean_text(
                        entry.author.department or who.department, what="department", limit=64
                    ),
                    class_system=entry.class_code.system[:128],
                    class_code=entry.class_code.code[:64],
                    class_display=domain.clean_text(entry.class_code.display, what="class", limit=128),
                    type_system=entry.type_code.system[:128],
                    type_code=entry.type_code.code[:64],
                    type_display=domain.clean_text(entry.type_code.display, what="type", limit=128),
                    confidentiality=confidentiality,
                    security_labels=" ".join(sorted({label[:16] for label in entry.security_labels})),
                    title=title,
                    language=entry.language[:16] or "zh-CN",
                    mime_type=mime_type,
                    size=digest.size,
                    sha256=digest.sha256,
                    status=_CURRENT,
                    created=entry.created.ToDatetime(tzinfo=datetime.UTC) if entry.HasField("created") else utcnow(),
                    service_start=(
                        entry.service_start.ToDatetime(tzinfo=datetime.UTC) if entry.HasField("service_start") else None
                    ),
                    service_end=(
                        entry.service_end.ToDatetime(tzinfo=datetime.UTC) if entry.HasField("service_end") else None
                    ),
                    registered_at=utcnow(),
                    idempotency_key=request.idempotency_key[:128],
                )
                session.add(record)
                await session.flush()
                session.add(store.DocumentContent(document_id=record.id, content=request.content))
                event_id = await self._rt.audit.record(
                    session,
                    caller=who,
                    type="document.register",
                    action=Action.ACTION_CREATE,
                    patient_enterprise_id=xref.enterprise_id,
                    entities=[("DocumentReference", record.id)],
                )
        except IntegrityError:
            # A concurrent submission of the same document committed first: answer as its retry.
            async with self._rt.sessions() as session:
                existing = await store.find_by_source_id(
                    session, source_organization_id=who.organization_id, source_document_id=source_document_id
                )
            if existing is None or existing.sha256 != digest.sha256:
                raise AlreadyExists(
                    "that source document id is registered with different content", reason="document-id-reused"
                ) from None
            return registry_pb2.RegisterDocumentResponse(entry=entry_message(existing), created=False)
        self._rt.outbox.notify()
        return registry_pb2.RegisterDocumentResponse(
            entry=entry_message(record), created=True, audit_event_ids=[event_id]
        )

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
        try:
            offset = int(request.page.page_token or 0)
        except ValueError:
            raise InvalidArgument("bad page token", reason="page-token") from None
        xref = await identity.cross_reference(self._rt, ref)
        statuses = [int(s) for s in request.statuses] or [_CURRENT]
        async with self._rt.sessions() as session:
            rows = await store.entries_of_patient(
                session,
                refs=[(r.domain, r.local_id) for r in xref.refs],
                type_codes=list(request.type_codes),
                statuses=statuses,
                offset=offset,
                limit=size + 1,
            )
        more = len(rows) > size
        rows = rows[:size]
        decisions = await self._decide(xref.enterprise_id, rows)
        # A document consent denies is absent from the result, not an error.
        visible = [r for r in rows if decisions.get(r.id) and decisions[r.id].decision == consent_pb2.DECISION_PERMIT]
        async with self._rt.sessions() as session, session.begin():
            event_id = await self._rt.audit.record(
                session,
                caller=who,
                type="document.query",
                action=Action.ACTION_EXECUTE,
                patient_enterprise_id=xref.enterprise_id,
                entities=[("DocumentReference", r.id) for r in visible],
            )
        self._rt.outbox.notify()
        return registry_pb2.FindDocumentsResponse(
            enterprise_id=xref.enterprise_id,
            entries=[entry_message(r) for r in visible],
            page=common_pb2.PageResponse(next_page_token=str(offset + size) if more else ""),
            audit_event_ids=[event_id],
        )

    async def RetrieveDocument(
        self, request: registry_pb2.RetrieveDocumentRequest, context: object
    ) -> registry_pb2.RetrieveDocumentResponse:
        who = caller()
        who.require_scope("DocumentReference", "r")
        who.require_role(*_READERS)
        who.require_purpose()
        try:
            document_id = str(uuid.UUID(request.document_id))
        except ValueError:
            raise NotFound("no such document", reason="document-not-found") from None
        async with self._rt.sessions() as session:
            record = await session.get(store.DocumentEntryRecord, document_id)
            content = await store.content_of(session, document_id) if record else None
        if record is None or content is None:
            raise NotFound("no such document", reason="document-not-found")
        # The person's current identity, so consent follows links made since registration.
        xref = await identity.cross_reference(
            self._rt, common_pb2.PatientRef(domain=record.patient_domain, local_id=record.patient_local_id)
        )
        decision = (await self._decide(xref.enterprise_id, [record])).get(record.id)
        if decision is None or decision.decision != consent_pb2.DECISION_PERMIT:
            await self._record_failure(
                who,
                type="document.retrieve",
                outcome=Outcome.OUTCOME_MINOR_FAILURE,
                enterprise_id=xref.enterprise_id,
                document_id=record.id,
            )
            raise PermissionDenied("consent does not permit this access", reason="consent-denied")
        try:
            domain.check_stored(content, sha256=record.sha256, size=record.size)
        except DomainError:
            await self._record_failure(
                who,
                type="document.retrieve",
                outcome=Outcome.OUTCOME_SERIOUS_FAILURE,
                enterprise_id=xref.enterprise_id,
                document_id=record.id,
            )
            raise
        async with self._rt.sessions() as session, session.begin():
            event_id = await self._rt.audit.record(
                session,
                caller=who,
                type="document.retrieve",
                action=Action.ACTION_READ,
                patient_enterprise_id=xref.enterprise_id,
                entities=[("DocumentReference", record.id)],
            )
        self._rt.outbox.notify()
        return registry_pb2.RetrieveDocumentResponse(
            entry=entry_message(record), content=content, audit_event_ids=[event_id]
        )
