"""Teleconsultations gRPC servicer: request, read, and the transitions the consent grant follows
(accept, cancel); scheduling, sessions and reports come with the teleconsultation issue."""

from __future__ import annotations

import json
import uuid

from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from hie.common.v1 import common_pb2
from hie.teleconsult.v1 import teleconsult_pb2, teleconsult_pb2_grpc
from services.shared import identity
from services.shared.audit_trail import Action
from services.shared.auth import Caller, caller
from services.shared.consent_grants import GRANT_TOPIC, GrantEffect, grant_message
from services.shared.db import utcnow
from services.shared.errors import AlreadyExists, DataCorruption, FailedPrecondition, InvalidArgument, NotFound
from services.shared.idempotency import FirstAnswers, check_key, fingerprint
from services.shared.process import ServiceRuntime
from services.shared.protection import TamperedCiphertextError
from services.shared.protection.keyring import UnknownKeyError
from services.teleconsult import workflow
from services.teleconsult.store import ConsultationRecord, ConsultationStateChangeRecord, idempotent_answers


def _same_request(existing: ConsultationRecord, fields: dict[str, object], question: str) -> ConsultationRecord:
    """A retry must repeat the request it retries; the same key with another request is a conflict
    (the question compared as opened: it is stored encrypted)."""
    if question != fields["question"] or any(
        getattr(existing, name) != value for name, value in fields.items() if name != "question"
    ):
        raise AlreadyExists("idempotency key already used for a different request", reason="idempotency-key-reused")
    return existing


def _ts(value: object) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value)  # type: ignore[arg-type]
    return ts


def _message(
    record: ConsultationRecord, history: list[ConsultationStateChangeRecord] | None = None, *, question: str = ""
) -> teleconsult_pb2.Consultation:
    created = Timestamp()
    created.FromDatetime(record.created_at)
    return teleconsult_pb2.Consultation(
        history=[
            teleconsult_pb2.ConsultationStateChange(
                from_state=h.from_state,  # type: ignore[arg-type]
                to_state=h.to_state,  # type: ignore[arg-type]
                organization_id=h.organization_id,
                practitioner_id=h.practitioner_id,
                reason=h.reason,
                changed=_ts(h.changed_at),
            )
            for h in history or ()
        ],
        consultation_id=record.id,
        patient=common_pb2.PatientRef(domain=record.patient_domain, local_id=record.patient_local_id),
        requester_organization_id=record.requester_organization_id,
        consultant_organization_id=record.consultant_organization_id,
        kind=record.kind,  # type: ignore[arg-type]
        mode=record.mode,  # type: ignore[arg-type]
        question=question,
        state=record.state,  # type: ignore[arg-type]
        document_ids=json.loads(record.document_ids),
        created=created,
    )


_REQUEST_OPERATION = "consultation.request"
_MoveRequest = teleconsult_pb2.AcceptConsultationRequest | teleconsult_pb2.CancelConsultationRequest
# Transitions' answers share one layout (consultation, audit event ids): kept and read as this one.
_Moved = teleconsult_pb2.AcceptConsultationResponse


class TeleconsultationsServicer(teleconsult_pb2_grpc.TeleconsultationsServicer):
    def __init__(self, runtime: ServiceRuntime) -> None:
        self._rt = runtime
        self._answers = FirstAnswers(idempotent_answers)
        assert runtime.protection is not None  # the SPEC protects clinical free text
        self._fields = runtime.protection.fields

    # Clinical free text is stored encrypted with the field cipher the mpi uses, bound to its row.
    def _seal(self, text: str, record_id: str) -> str:
        return self._fields.encrypt(text, context=f"teleconsult.question:{record_id}") if text else ""

    def _open(self, record: ConsultationRecord) -> str:
        try:
            return self._fields.open_text(record.question, context=f"teleconsult.question:{record.id}")
        except (TamperedCiphertextError, UnknownKeyError):
            raise DataCorruption("stored clinical text failed its integrity check", reason="content-corrupt") from None

    def _msg(
        self, record: ConsultationRecord, history: list[ConsultationStateChangeRecord] | None = None
    ) -> teleconsult_pb2.Consultation:
        return _message(record, history, question=self._open(record))

    async def RequestConsultation(
        self, request: teleconsult_pb2.RequestConsultationRequest, context: object
    ) -> teleconsult_pb2.RequestConsultationResponse:
        try:
            return await self._requestconsultation(request)
        except IntegrityError:
            # A concurrent retry with the same idempotency key committed first: answer as that retry.
            return await self._requestconsultation(request)

    async def _requestconsultation(
        self, request: teleconsult_pb2.RequestConsultationRequest
    ) -> teleconsult_pb2.RequestConsultationResponse:
        who = caller()
        who.require_scope("ServiceRequest", "c")
        who.require_role("doctor")
        c = request.consultation
        if not c.patient.local_id or not c.consultant_organization_id or not c.kind:
            raise InvalidArgument(
                "a consultation needs a patient, a consultant organisation and a kind",
                reason="consultation-invalid",
            )
        if c.consultant_organization_id == who.organization_id:
            raise InvalidArgument("a consultation goes to another organisation", reason="self-consultation")
        patient = common_pb2.PatientRef(domain=who.organization_id, local_id=c.patient.local_id)
        enterprise_id = await identity.registered_person(self._rt, patient)
        await identity.require_own_documents(self._rt, who.organization_id, patient, list(c.document_ids))
        given_key = check_key(request.idempotency_key)
        key = given_key or str(uuid.uuid4())
        request_fingerprint = fingerprint(_REQUEST_OPERATION, request)
        record_fields = {
            "consultant_organization_id": c.consultant_organization_id,
            "patient_local_id": c.patient.local_id,
            "kind": int(c.kind),
            "mode": int(c.mode or teleconsult_pb2.CONSULTATION_MODE_ASYNCHRONOUS),
            "question": c.question[:4000],
            "document_ids": json.dumps(list(c.document_ids)),
        }
        async with self._rt.sessions() as session, session.begin():
            existing = await session.scalar(
                select(ConsultationRecord).where(
                    ConsultationRecord.requester_organization_id == who.organization_id,
                    ConsultationRecord.idempotency_key == key,
                )
            )
            if existing is not None:
                _same_request(existing, record_fields, self._open(existing))
                first = await self._answers.first(
                    session,
                    organization_id=who.organization_id,
                    key=key,
                    operation=_REQUEST_OPERATION,
                    request_fingerprint=request_fingerprint,
                    response_type=teleconsult_pb2.RequestConsultationResponse,
                )
                # The first answer; requested before answers were kept: the consultation as it is now.
                if first is not None:
                    return first
                return teleconsult_pb2.RequestConsultationResponse(consultation=self._msg(existing))
            record_id = str(uuid.uuid4())
            record = ConsultationRecord(
                id=record_id,
                patient_domain=who.organization_id,
                patient_local_id=c.patient.local_id,
                requester_organization_id=who.organization_id,
                consultant_organization_id=c.consultant_organization_id,
                kind=int(c.kind),
                mode=int(c.mode or teleconsult_pb2.CONSULTATION_MODE_ASYNCHRONOUS),
                question=self._seal(c.question[:4000], record_id),
                state=teleconsult_pb2.CONSULTATION_STATE_REQUESTED,
                document_ids=json.dumps(list(c.document_ids)),
                idempotency_key=key,
                created_at=utcnow(),
            )
            session.add(record)
            await self._rt.audit.record(
                session,
                caller=who,
                type="consultation.request",
                action=Action.ACTION_CREATE,
                patient_enterprise_id=enterprise_id,
                entities=[("ServiceRequest", record.id)],
            )
            answer = teleconsult_pb2.RequestConsultationResponse(consultation=self._msg(record))
            if given_key:
                await self._answers.keep(
                    session,
                    organization_id=who.organization_id,
                    key=key,
                    operation=_REQUEST_OPERATION,
                    request_fingerprint=request_fingerprint,
                    response=answer,
                )
        self._rt.outbox.notify()
        return answer

    async def GetConsultation(
        self, request: teleconsult_pb2.GetConsultationRequest, context: object
    ) -> teleconsult_pb2.GetConsultationResponse:
        who = caller()
        who.require_scope("ServiceRequest", "r")
        who.require_role("doctor", "nurse", "admin")
        async with self._rt.sessions() as session:
            record = await session.get(ConsultationRecord, request.consultation_id)
            history = await _history(session, request.consultation_id)
        if record is None or who.organization_id not in {
            record.requester_organization_id,
            record.consultant_organization_id,
        }:
            raise NotFound("no such consultation", reason="consultation-not-found")
        person = await identity.cross_reference(
            self._rt, common_pb2.PatientRef(domain=record.patient_domain, local_id=record.patient_local_id)
        )
        async with self._rt.sessions() as session, session.begin():
            await self._rt.audit.record(
                session,
                caller=who,
                type="consultation.read",
                action=Action.ACTION_READ,
                patient_enterprise_id=person.enterprise_id,
                entities=[("ServiceRequest", record.id)],
            )
        self._rt.outbox.notify()
        return teleconsult_pb2.GetConsultationResponse(consultation=self._msg(record, history))

    async def _first_move(self, who: Caller, key: str, operation: str, request_fingerprint: str) -> _Moved | None:
        if not key:
            return None
        async with self._rt.sessions() as session:
            return await self._answers.first(
                session,
                organization_id=who.organization_id,
                key=key,
                operation=operation,
                request_fingerprint=request_fingerprint,
                response_type=_Moved,
            )

    async def _transition(self, name: str, request: _MoveRequest) -> tuple[teleconsult_pb2.Consultation, list[str]]:
        """Move a consultation; the state, its history row, the consent grant message, the audit
        event and (with an idempotency key) the answer commit in one transaction. A keyed retry
        gets the first answer."""
        who = caller()
        who.require_scope("ServiceRequest", "u")
        who.require_role("doctor")
        consultation_id, reason = request.consultation_id, request.reason
        key = check_key(request.idempotency_key)
        operation = f"consultation.{name}"
        request_fingerprint = fingerprint(operation, request)
        if (first := await self._first_move(who, key, operation, request_fingerprint)) is not None:
            return first.consultation, list(first.audit_event_ids)
        async with self._rt.sessions() as session:
            record = await session.get(ConsultationRecord, consultation_id[:36])
        if record is None or who.organization_id not in {
            record.requester_organization_id,
            record.consultant_organization_id,
        }:
            raise NotFound("no such consultation", reason="consultation-not-found")
        party = (
            workflow.Party.CONSULTANT
            if who.organization_id == record.consultant_organization_id
            else workflow.Party.REQUESTER
        )
        decided = workflow.move(name, state=record.state, caller_party=party)
        if decided.repeated:
            async with self._rt.sessions() as session:
                return self._msg(record, await _history(session, record.id)), []
        person = await identity.cross_reference(
            self._rt, common_pb2.PatientRef(domain=record.patient_domain, local_id=record.patient_local_id)
        )
        async with self._rt.sessions() as session, session.begin():
            moved = await session.execute(
                update(ConsultationRecord)
                .where(ConsultationRecord.id == record.id, ConsultationRecord.state == record.state)
                .values(state=decided.to_state)
            )
            if moved.rowcount != 1:  # type: ignore[attr-defined]
                raise FailedPrecondition(
                    "the consultation changed meanwhile; read it again", reason="consultation-state"
                )
            session.add(
                ConsultationStateChangeRecord(
                    id=str(uuid.uuid4()),
                    consultation_id=record.id,
                    from_state=record.state,
                    to_state=decided.to_state,
                    organization_id=who.organization_id,
                    practitioner_id=who.practitioner_id,
                    reason=reason[:2000],
                    changed_at=utcnow(),
                )
            )
            if decided.grant is not GrantEffect.NONE:
                await self._rt.outbox.add(
                    session,
                    GRANT_TOPIC,
                    grant_message(
                        decided.grant,
                        reference=f"ServiceRequest/{record.id}",
                        organization_id=record.consultant_organization_id,
                        purpose_of_use="consultation",
                        patient=common_pb2.PatientRef(domain=record.patient_domain, local_id=record.patient_local_id),
                        document_ids=json.loads(record.document_ids),
                    ),
                )
            event_id = await self._rt.audit.record(
                session,
                caller=who,
                type=f"consultation.{name}",
                action=Action.ACTION_UPDATE,
                patient_enterprise_id=person.enterprise_id,
                entities=[("ServiceRequest", record.id)],
            )
            record.state = decided.to_state
            history = await _history(session, record.id)
            answer = _Moved(consultation=self._msg(record, history), audit_event_ids=[event_id])
            if key:
                await self._answers.keep(
                    session,
                    organization_id=who.organization_id,
                    key=key,
                    operation=operation,
                    request_fingerprint=request_fingerprint,
                    response=answer,
                )
        self._rt.outbox.notify()
        return answer.consultation, list(answer.audit_event_ids)

    async def AcceptConsultation(
        self, request: teleconsult_pb2.AcceptConsultationRequest, context: object
    ) -> teleconsult_pb2.AcceptConsultationResponse:
        consultation, events = await self._transition("accept", request)
        return teleconsult_pb2.AcceptConsultationResponse(consultation=consultation, audit_event_ids=events)

    async def CancelConsultation(
        self, request: teleconsult_pb2.CancelConsultationRequest, context: object
    ) -> teleconsult_pb2.CancelConsultationResponse:
        consultation, events = await self._transition("cancel", request)
        return teleconsult_pb2.CancelConsultationResponse(consultation=consultation, audit_event_ids=events)


async def _history(session: AsyncSession, consultation_id: str) -> list[ConsultationStateChangeRecord]:
    rows = await session.scalars(
        select(ConsultationStateChangeRecord)
        .where(ConsultationStateChangeRecord.consultation_id == consultation_id)
        .order_by(ConsultationStateChangeRecord.changed_at, ConsultationStateChangeRecord.id)
    )
    return list(rows.all())
