"""Teleconsultations gRPC servicer: request, read, and the transitions the consent grant follows
(accept, cancel); scheduling, sessions and reports come with the teleconsultation issue."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from hie.common.v1 import common_pb2
from hie.teleconsult.v1 import teleconsult_pb2, teleconsult_pb2_grpc
from services.shared import identity
from services.shared.audit_trail import Action
from services.shared.auth import Caller, caller
from services.shared.db import utcnow
from services.shared.errors import AlreadyExists, InvalidArgument, NotFound
from services.shared.idempotency import FirstAnswers, check_key, fingerprint
from services.shared.process import ServiceRuntime
from services.shared.workflow.engine import GrantSpec, Subject, WorkflowEngine
from services.teleconsult import workflow
from services.teleconsult.store import TABLES, ConsultationRecord, idempotent_answers


def _same_request(existing: ConsultationRecord, fields: dict[str, object]) -> ConsultationRecord:
    """A retry must repeat the request it retries; the same key with another request is a conflict."""
    if any(getattr(existing, name) != value for name, value in fields.items()):
        raise AlreadyExists("idempotency key already used for a different request", reason="idempotency-key-reused")
    return existing


def _ts(value: object) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value)  # type: ignore[arg-type]
    return ts


def _message(
    record: ConsultationRecord, history: Sequence[Mapping[str, Any]] | None = None
) -> teleconsult_pb2.Consultation:
    created = Timestamp()
    created.FromDatetime(record.created_at)
    return teleconsult_pb2.Consultation(
        history=[
            teleconsult_pb2.ConsultationStateChange(
                from_state=h["from_state"],
                to_state=h["to_state"],
                organization_id=h["organization_id"],
                practitioner_id=h["practitioner_id"],
                reason=h["reason"],
                changed=_ts(h["changed_at"]),
            )
            for h in history or ()
        ],
        consultation_id=record.id,
        patient=common_pb2.PatientRef(domain=record.patient_domain, local_id=record.patient_local_id),
        requester_organization_id=record.requester_organization_id,
        consultant_organization_id=record.consultant_organization_id,
        kind=record.kind,  # type: ignore[arg-type]
        mode=record.mode,  # type: ignore[arg-type]
        question=record.question,
        state=record.state,  # type: ignore[arg-type]
        document_ids=json.loads(record.document_ids),
        created=created,
    )


_REQUEST_OPERATION = "consultation.request"
_MoveRequest = teleconsult_pb2.AcceptConsultationRequest | teleconsult_pb2.CancelConsultationRequest
# Moves' answers share one layout (consultation, audit event ids): kept and read as this one.
_Moved = teleconsult_pb2.AcceptConsultationResponse


class TeleconsultationsServicer(teleconsult_pb2_grpc.TeleconsultationsServicer):
    def __init__(self, runtime: ServiceRuntime) -> None:
        self._rt = runtime
        self.engine = WorkflowEngine(runtime, workflow.MACHINE, TABLES)
        self._answers = FirstAnswers(idempotent_answers)

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
        enterprise_id = await identity.registered_person(
            self._rt, common_pb2.PatientRef(domain=who.organization_id, local_id=c.patient.local_id)
        )
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
                _same_request(existing, record_fields)
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
                return teleconsult_pb2.RequestConsultationResponse(consultation=_message(existing))
            record = ConsultationRecord(
                id=str(uuid.uuid4()),
                patient_domain=who.organization_id,
                patient_local_id=c.patient.local_id,
                requester_organization_id=who.organization_id,
                consultant_organization_id=c.consultant_organization_id,
                kind=int(c.kind),
                mode=int(c.mode or teleconsult_pb2.CONSULTATION_MODE_ASYNCHRONOUS),
                question=c.question[:4000],
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
            answer = teleconsult_pb2.RequestConsultationResponse(consultation=_message(record))
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
            history = await self.engine.history(session, request.consultation_id)
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
        return teleconsult_pb2.GetConsultationResponse(consultation=_message(record, history))

    async def _first_move(self, who: Caller, key: str, operation: str, request_fingerprint: str) -> _Moved | None:
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
        """Move a consultation through the shared workflow engine (state, history row, consent
        grant message, audit event, the other side's notification and, with an idempotency key,
        the answer in one transaction). A keyed retry gets the first answer."""
        who = caller()
        who.require_scope("ServiceRequest", "u")
        who.require_role("doctor")
        key = check_key(request.idempotency_key)
        operation = f"consultation.{name}"
        request_fingerprint = fingerprint(operation, request)
        if key:
            if (first := await self._first_move(who, key, operation, request_fingerprint)) is not None:
                return first.consultation, list(first.audit_event_ids)
            try:
                return await self._apply_move(name, request, who, keep=(key, operation, request_fingerprint))
            except IntegrityError:
                # A concurrent first use of the key committed first: answer as its retry.
                first = await self._first_move(who, key, operation, request_fingerprint)
                if first is None:
                    raise
                return first.consultation, list(first.audit_event_ids)
        return await self._apply_move(name, request, who)

    async def _apply_move(
        self, name: str, request: _MoveRequest, who: Caller, *, keep: tuple[str, str, str] | None = None
    ) -> tuple[teleconsult_pb2.Consultation, list[str]]:
        consultation_id, reason = request.consultation_id, request.reason
        async with self._rt.sessions() as session:
            record = await session.get(ConsultationRecord, consultation_id[:36])
        if record is None or who.organization_id not in {
            record.requester_organization_id,
            record.consultant_organization_id,
        }:
            raise NotFound("no such consultation", reason="consultation-not-found")
        side = (
            workflow.Party.CONSULTANT
            if who.organization_id == record.consultant_organization_id
            else workflow.Party.REQUESTER
        )
        patient = common_pb2.PatientRef(domain=record.patient_domain, local_id=record.patient_local_id)

        async def enterprise_id() -> str:
            return (await identity.cross_reference(self._rt, patient)).enterprise_id

        kept: list[_Moved] = []

        async def answer(session: AsyncSession, audit_event_ids: list[str]) -> None:
            # Read in the move's transaction: the answer kept is the one the caller gets.
            fresh = await session.get(ConsultationRecord, consultation_id[:36], populate_existing=True)
            assert fresh is not None
            moved = _Moved(
                consultation=_message(fresh, await self.engine.history(session, fresh.id)),
                audit_event_ids=audit_event_ids,
            )
            if keep is not None:
                key, operation, request_fingerprint = keep
                await self._answers.keep(
                    session,
                    organization_id=who.organization_id,
                    key=key,
                    operation=operation,
                    request_fingerprint=request_fingerprint,
                    response=moved,
                )
            kept.append(moved)

        applied = await self.engine.apply(
            name,
            subject=Subject(
                item_id=record.id,
                state=record.state,
                version=record.version,
                resource_type="ServiceRequest",
                enterprise_id="",
                origin_organization_id=record.requester_organization_id,
                target_organization_ids=(record.consultant_organization_id,),
                grant=GrantSpec(
                    organization_id=record.consultant_organization_id,
                    purpose_of_use="consultation",
                    patient=patient,
                    document_ids=json.loads(record.document_ids),
                ),
            ),
            who=who,
            side=side,
            reason=reason[:2000],
            resolve_enterprise_id=enterprise_id,
            answer=answer,
        )
        if kept:
            return kept[0].consultation, list(kept[0].audit_event_ids)
        async with self._rt.sessions() as session:
            record = await session.get(ConsultationRecord, record.id, populate_existing=True) or record
            history = await self.engine.history(session, record.id)
        return _message(record, history), applied.audit_event_ids

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
