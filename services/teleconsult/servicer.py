"""Teleconsultations gRPC servicer: translates messages and maps rows onto the shared workflow
engine; the transition table is workflow.py, the rules of the directory, slots and consent
directory.py, the report and its signature report.py, the turnaround clocks deadlines.py."""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from hie.common.v1 import common_pb2
from hie.mpi.v1 import mpi_pb2, mpi_pb2_grpc
from hie.registry.v1 import registry_pb2, registry_pb2_grpc
from hie.teleconsult.v1 import teleconsult_pb2, teleconsult_pb2_grpc
from services.shared import mpi_client, transactions
from services.shared.audit_trail import Action
from services.shared.auth import Caller, caller
from services.shared.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    error_from_rpc,
)
from services.shared.idempotency import FirstAnswers, check_key, fingerprint
from services.shared.process import ServiceRuntime
from services.shared.protection import DataProtection
from services.shared.protection.sm2 import load_or_create_signing_key
from services.shared.timestamps import to_datetime
from services.shared.timestamps import to_timestamp_or_none as timestamp
from services.shared.workflow.clocks import DeadlineScanner
from services.shared.workflow.engine import GrantSpec, Subject, WorkflowEngine
from services.shared.workflow.machine import ClockEffect, Decision
from services.shared.workflow.service import (
    Keep,
    KeyedWrites,
    MoveAnswer,
    check_attachments,
    one_move_rpc,
    statistics_scope,
)
from services.teleconsult import directory, report, workflow
from services.teleconsult.deadlines import DeadlinePolicy
from services.teleconsult.store import (
    TABLES,
    ConsultationRecord,
    MessageRecord,
    ParticipantRecord,
    ReportRecord,
    RosterShiftRecord,
    SlotRecord,
    SpecialistRecord,
    history_context,
    idempotent_answers,
    message_context,
    report_context,
    sealed_context,
)

_FINAL_STATUSES = ("final", "amended")
_REQUEST_OPERATION = "consultation.request"
_one_move = functools.partial(
    one_move_rpc, move_request=teleconsult_pb2.MoveConsultationRequest, item_id="consultation_id", item="consultation"
)
_MAX_PAGE = 200


def _time(ts: Timestamp) -> datetime.datetime | None:
    if not ts.seconds and not ts.nanos:
        return None
    return to_datetime(ts)


def _not_found() -> NotFound:
    return NotFound("no such consultation", reason="consultation-not-found")


class TeleconsultationsServicer(teleconsult_pb2_grpc.TeleconsultationsServicer):
    def __init__(
        self,
        runtime: ServiceRuntime,
        *,
        deadlines: DeadlinePolicy | None = None,
        rules: directory.QualificationRules | None = None,
        join_url_template: str = "",
    ) -> None:
        self._rt = runtime
        if runtime.protection is None:
            raise RuntimeError("the teleconsult service seals free text: it needs data protection")
        self._protection: DataProtection = runtime.protection
        self.deadlines = deadlines or DeadlinePolicy()
        self.rules = rules or directory.QualificationRules()
        # The configurable video provider's join link; no video is built here.
        # National-algorithms option: the platform's SM2 key co-signs each signed report.
        self._sm2 = (
            load_or_create_signing_key(runtime.settings.sm2_signing_key_file)
            if runtime.settings.crypto_suite == "sm"
            else None
        )
        self.join_url_template = join_url_template or "https://meet.example.invalid/hie/{consultation_id}"
        self.engine = WorkflowEngine(
            runtime,
            workflow.MACHINE,
            TABLES,
            deadlines=self.deadlines,
            # Why a move was made is free text: sealed like the rest (consultation.history:<id>).
            seal_reason=lambda history_id, text: self._protection.fields.encrypt(
                text, context=history_context(history_id)
            ),
        )
        # The first answers to keyed requests and moves (Idempotency-Key), kept in the write's transaction.
        self._answers = FirstAnswers(idempotent_answers)
        self._writes = KeyedWrites(self._answers, runtime)
        self.scanner = DeadlineScanner(
            runtime,
            self.engine,
            describe=self._describe,
            # The turnaround clock waits for the consultant's report.
            responsible=lambda _clock, subject: subject.target_organization_ids[:1],
        )

    # --- sealing ------------------------------------------------------------------------------

    def _seal(self, context: str, value: Mapping[str, Any]) -> str:
        return self._protection.fields.encrypt(
            json.dumps(value, ensure_ascii=False, separators=(",", ":")), context=context
        )

    def _open(self, context: str, sealed: str | None) -> dict[str, Any]:
        if not sealed:
            return {}
        return dict(json.loads(self._protection.fields.decrypt(sealed, context=context)))

    def _form(self, record: ConsultationRecord) -> dict[str, Any]:
        return self._open(sealed_context(record.id), record.sealed)

    # --- mapping ------------------------------------------------------------------------------

    async def _load(self, session: AsyncSession, consultation_id: str) -> ConsultationRecord | None:
        return await session.get(ConsultationRecord, consultation_id[:36], populate_existing=True)

    async def _participants(self, session: AsyncSession, consultation_id: str) -> list[str]:
        rows = await session.scalars(
            select(ParticipantRecord.practitioner_id)
            .where(ParticipantRecord.consultation_id == consultation_id)
            .order_by(ParticipantRecord.practitioner_id)
        )
        return list(rows)

    async def _message(
        self, session: AsyncSession, record: ConsultationRecord, *, full: bool = True
    ) -> teleconsult_pb2.Consultation:
        form = self._form(record)
        consent = json.loads(record.informed_consent) if record.informed_consent else None
        participants = await self._participants(session, record.id)
        slots = list(
            await session.scalars(
                select(SlotRecord.id).where(SlotRecord.consultation_id == record.id).order_by(SlotRecord.id)
            )
        )
        message = teleconsult_pb2.Consultation(
            consultation_id=record.id,
            patient=common_pb2.PatientRef(domain=record.patient_domain, local_id=record.patient_local_id),
            requester_organization_id=record.requester_organization_id,
            consultant_organization_id=record.consultant_organization_id,
            kind=record.kind,  # type: ignore[arg-type]
            mode=record.mode,  # type: ignore[arg-type]
            question=form.get("question", ""),
            purpose=form.get("purpose", ""),
            summary=form.get("summary", ""),
            state=record.state,  # type: ignore[arg-type]
            document_ids=json.loads(record.document_ids),
            created=timestamp(record.created_at),
            urgency=record.urgency,  # type: ignore[arg-type]
            department=record.department,
            specialty=record.specialty,
            professional_title=record.professional_title,
            invited_practitioner_id=record.invited_practitioner_id,
            any_available=record.any_available,
            imaging_studies=[teleconsult_pb2.ImagingStudy(**s) for s in json.loads(record.imaging_studies)],
            informed_consent=(
                teleconsult_pb2.InformedConsent(
                    evidence_document_id=consent["evidence_document_id"],
                    signer=consent["signer"],
                    guardian_name=consent.get("guardian_name", ""),
                    guardian_relationship=consent.get("guardian_relationship", ""),
                    signed=timestamp(datetime.datetime.fromisoformat(consent["signed"])),
                )
                if consent
                else None
            ),
            assignee_ids=participants,
            appointment=(
                teleconsult_pb2.Appointment(
                    start=timestamp(record.appointment_start),
                    end=timestamp(record.appointment_end),
                    join_url=record.join_url,
                    slot_ids=slots,
                )
                if record.appointment_start
                else None
            ),
            business_status=record.business_status,
            decline_code=record.decline_code,
            report_version=record.report_version,
        )
        if not full:
            return message
        for h in await self.engine.history(session, record.id):
            message.history.append(
                teleconsult_pb2.ConsultationStateChange(
                    from_state=h["from_state"],
                    to_state=h["to_state"],
                    organization_id=h["organization_id"],
                    practitioner_id=h["practitioner_id"],
                    reason=(
                        self._protection.fields.decrypt(h["reason"], context=history_context(h["id"]))
                        if h["reason"]
                        else ""
                    ),
                    changed=timestamp(h["changed_at"]),
                    move=h["move"],
                    role=h["role"],
                )
            )
        for m in await session.scalars(
            select(MessageRecord).where(MessageRecord.consultation_id == record.id).order_by(MessageRecord.sent_at)
        ):
            opened = self._open(message_context(m.id), m.sealed)
            message.messages.append(
                teleconsult_pb2.Message(
                    message_id=m.id,
                    organization_id=m.organization_id,
                    practitioner_id=m.practitioner_id,
                    move=m.move,
                    text=opened.get("text", ""),
                    document_ids=opened.get("document_ids", []),
                    sent=timestamp(m.sent_at),
                )
            )
        for c in await self.engine.clocks(session, record.id):
            message.clocks.append(
                teleconsult_pb2.Clock(
                    name=c["name"],
                    due=timestamp(c["due_at"]),
                    paused=c["paused_at"] is not None,
                    fired=c["fired_at"] is not None,
                    stopped=c["stopped_at"] is not None,
                )
            )
        return message

    def _subject(self, record: ConsultationRecord, document_ids: Sequence[str] | None = None) -> Subject:
        return Subject(
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
                patient=common_pb2.PatientRef(domain=record.patient_domain, local_id=record.patient_local_id),
                document_ids=list(document_ids if document_ids is not None else _granted_documents(record)),
            ),
            facts={
                "kind": record.kind,
                "urgency": record.urgency,
                "mode": record.mode,
                "informed_consent": bool(record.informed_consent),
            },
        )

    async def _describe(self, session: AsyncSession, item_id: str) -> Subject | None:
        record = await session.get(ConsultationRecord, item_id)
        if record is None:
            return None
        person = await mpi_client.cross_reference(
            self._rt, common_pb2.PatientRef(domain=record.patient_domain, local_id=record.patient_local_id)
        )
        subject = self._subject(record)
        return Subject(**{**subject.__dict__, "enterprise_id": person.enterprise_id})

    async def _visible(self, who: Caller, consultation_id: str) -> ConsultationRecord:
        async with self._rt.sessions() as session:
            record = await self._load(session, consultation_id)
        if record is None or who.organization_id not in {
            record.requester_organization_id,
            record.consultant_organization_id,
        }:
            raise _not_found()
        return record

    async def _enterprise_id(self, record: ConsultationRecord) -> str:
        ref = common_pb2.PatientRef(domain=record.patient_domain, local_id=record.patient_local_id)
        return (await mpi_client.cross_reference(self._rt, ref)).enterprise_id

    # --- request and read -----------------------------------------------------------------------

    async def RequestConsultation(
        self, request: teleconsult_pb2.RequestConsultationRequest, context: object
    ) -> teleconsult_pb2.RequestConsultationResponse:
        try:
            return await self._request_consultation(request)
        except IntegrityError:
            # A concurrent retry with the same idempotency key committed first: answer as that retry.
            return await self._request_consultation(request)

    async def _request_consultation(
        self, request: teleconsult_pb2.RequestConsultationRequest
    ) -> teleconsult_pb2.RequestConsultationResponse:
        who = caller()
        who.require_scope("ServiceRequest", "c")
        who.require_role("doctor")
        c = request.consultation
        form = directory.check_form(c, requester_organization_id=who.organization_id)
        enterprise_id = await mpi_client.registered_person(
            self._rt, common_pb2.PatientRef(domain=who.organization_id, local_id=c.patient.local_id)
        )
        await self._check_documents(
            [*c.document_ids, *(s["document_id"] for s in form.imaging_studies if s["document_id"])],
            enterprise_id,
            who.organization_id,
        )
        given_key = check_key(request.idempotency_key)
        key = given_key or str(uuid.uuid4())
        keep = (key, _REQUEST_OPERATION, fingerprint(_REQUEST_OPERATION, request))
        compared = {
            "consultant_organization_id": c.consultant_organization_id,
            "patient_local_id": c.patient.local_id,
            "kind": int(c.kind),
            "mode": form.mode,
            "urgency": form.urgency,
        }
        async with transactions.change(self._rt) as session:
            existing, first = await self._writes.earlier_create(
                session, who, ConsultationRecord, keep, compared, teleconsult_pb2.RequestConsultationResponse
            )
            if existing is not None:
                # The first answer, byte for byte; requested before answers were kept: as it is now.
                if first is not None:
                    return first
                return teleconsult_pb2.RequestConsultationResponse(consultation=await self._message(session, existing))
            consultation_id = str(uuid.uuid4())
            record = ConsultationRecord(
                id=consultation_id,
                patient_domain=who.organization_id,
                patient_local_id=c.patient.local_id,
                requester_organization_id=who.organization_id,
                consultant_organization_id=c.consultant_organization_id,
                kind=int(c.kind),
                mode=form.mode,
                urgency=form.urgency,
                question="",
                sealed=self._seal(sealed_context(consultation_id), form.texts),
                state=workflow.REQUESTED,
                business_status="requested",
                document_ids=json.dumps(list(c.document_ids)),
                imaging_studies=json.dumps(form.imaging_studies),
                department=c.department[:64],
                specialty=c.specialty[:64],
                professional_title=c.professional_title[:32],
                invited_practitioner_id=c.invited_practitioner_id[:64],
                any_available=c.any_available,
                idempotency_key=key,
                created_at=self.engine.now(),
            )
            session.add(record)
            await session.flush()
            # The turnaround clock runs from the request (emergency reads are timed from the call).
            await self.engine.apply_clocks(
                session,
                record.id,
                ClockEffect(start=(workflow.TURNAROUND,)),
                {"kind": record.kind, "urgency": record.urgency},
            )
            await self._rt.audit.record(
                session,
                caller=who,
                type="consultation.request",
                action=Action.ACTION_CREATE,
                patient_enterprise_id=enterprise_id,
                entities=[("ServiceRequest", record.id)],
            )
            await self.engine.notify(
                session,
                event_type="consultation.request",
                organization_ids=[record.consultant_organization_id],
                resource_type="ServiceRequest",
                resource_id=record.id,
                status="requested",
            )
            answer = teleconsult_pb2.RequestConsultationResponse(consultation=await self._message(session, record))
            if given_key:
                await self._writes.keep(session, who, keep, answer)
        return answer

    async def _check_documents(self, document_ids: Sequence[str], enterprise_id: str, requester: str) -> None:
        """Only the requester's own documents of this patient (the consultant is granted them, so
        they must be the requester's to share), readable by the caller: the registry is asked
        under the caller's identity (it checks consent and audits the read), as referral does."""
        if not document_ids:
            return
        await check_attachments(
            self._rt,
            [document_id[:64] for document_id in dict.fromkeys(document_ids)],
            enterprise_id=enterprise_id,
            requester=requester,
            reason="consultation-documents",
            name=lambda index: f"document {index + 1}",
        )

    async def GetConsultation(
        self, request: teleconsult_pb2.GetConsultationRequest, context: object
    ) -> teleconsult_pb2.GetConsultationResponse:
        who = caller()
        who.require_scope("ServiceRequest", "r")
        who.require_role("doctor", "nurse", "admin")
        record = await self._visible(who, request.consultation_id)
        enterprise_id = await self._enterprise_id(record)
        async with transactions.change(self._rt) as session:
            message = await self._message(session, record)
            side = _side(who, record)
            message.allowed_moves.extend(workflow.MACHINE.moves_from(record.state, side))
            await self._rt.audit.record(
                session,
                caller=who,
                type="consultation.read",
                action=Action.ACTION_READ,
                patient_enterprise_id=enterprise_id,
                entities=[("ServiceRequest", record.id)],
            )
        return teleconsult_pb2.GetConsultationResponse(consultation=message)

    # --- moves ----------------------------------------------------------------------------------

    # The one-move RPCs of the first API: the general move with the move named.
    AcceptConsultation = _one_move("accept", teleconsult_pb2.AcceptConsultationResponse)
    CancelConsultation = _one_move("cancel", teleconsult_pb2.CancelConsultationResponse)

    async def MoveConsultation(
        self, request: teleconsult_pb2.MoveConsultationRequest, context: object
    ) -> teleconsult_pb2.MoveConsultationResponse:
        consultation, events = await self._move(request)
        return teleconsult_pb2.MoveConsultationResponse(consultation=consultation, audit_event_ids=events)

    async def _move(
        self, request: teleconsult_pb2.MoveConsultationRequest
    ) -> tuple[teleconsult_pb2.Consultation, list[str]]:
        """One move through the shared workflow engine: state, history row, consent grant message,
        clocks, audit event, the other side's notification, the move's own rows (participants,
        slots, messages, report versions) and, with an Idempotency-Key, its answer in one
        transaction. A keyed retry (same key, same request) gets the first answer, byte for byte."""
        who = caller()
        who.require_scope("ServiceRequest", "u")
        who.require_role("doctor")
        name = request.move
        if name not in workflow.MOVES:
            raise InvalidArgument(
                f"unknown move; one of {', '.join(sorted(workflow.MOVES))}", reason="consultation-move"
            )
        moved = await self._writes.run(
            who,
            check_key(request.idempotency_key),
            f"consultation.{name}",
            request,
            teleconsult_pb2.MoveConsultationResponse,
            lambda keep: self._apply_move(request, who, keep=keep),
        )
        return moved.consultation, list(moved.audit_event_ids)

    async def _apply_move(
        self, request: teleconsult_pb2.MoveConsultationRequest, who: Caller, *, keep: Keep | None
    ) -> teleconsult_pb2.MoveConsultationResponse:
        name = request.move
        record = await self._visible(who, request.consultation_id)
        side = _side(who, record)
        # The party and state are checked before any other work (a wrong side learns nothing more).
        transition = workflow.MACHINE.transition(name)
        if side != transition.side or record.state not in transition.sources:
            # The wrong side or state is refused before any other work (filing, lookups); the
            # same move again (the state it went to) is a retry, answered with what is there.
            workflow.MACHINE.decide(name, state=record.state, side=side)
            return teleconsult_pb2.MoveConsultationResponse(consultation=await self._current(record, side))
        if request.request_key and await self._already_made(record.id, name, request.request_key[:128]):
            # A retried self-loop (an amendment) must not file a second version.
            return teleconsult_pb2.MoveConsultationResponse(consultation=await self._current(record, side))
        prepare = _PREPARE.get(name)
        plan = Plan()
        if prepare is not None:
            await prepare(self, plan, who, record, request)

        async def build(session: AsyncSession, audit_event_ids: list[str]) -> teleconsult_pb2.MoveConsultationResponse:
            fresh = await self._load(session, record.id) or record
            moved = teleconsult_pb2.MoveConsultationResponse(
                consultation=await self._message(session, fresh), audit_event_ids=audit_event_ids
            )
            moved.consultation.allowed_moves.extend(workflow.MACHINE.moves_from(fresh.state, side))
            return moved

        answer = MoveAnswer(self._writes, who, keep, build)
        applied = await self.engine.apply(
            name,
            subject=self._subject(record, plan.document_ids),
            who=who,
            side=side,
            # A decline's code is kept in its own column; the reason is the free text.
            reason=request.reason[:2000],
            request_key=request.request_key[:128],
            changes=plan.changes,
            facts=plan.facts,
            within=plan.within(),
            resolve_enterprise_id=lambda: self._enterprise_id(record),
            answer=answer,
        )
        return await answer.result(applied.audit_event_ids)

    async def _current(self, record: ConsultationRecord, side: workflow.Party) -> teleconsult_pb2.Consultation:
        async with self._rt.sessions() as session:
            message = await self._message(session, record)
        message.allowed_moves.extend(workflow.MACHINE.moves_from(record.state, side))
        return message

    async def _already_made(self, consultation_id: str, name: str, request_key: str) -> bool:
        h = TABLES.history
        async with self._rt.sessions() as session:
            found = await session.scalar(
                select(h.c.id).where(
                    h.c.consultation_id == consultation_id, h.c.move == name, h.c.request_key == request_key
                )
            )
        return found is not None

    # each preparation fills a Plan: row changes, guard facts and writes in the move's transaction

    async def _prepare_record_consent(
        self, plan: Plan, who: Caller, record: ConsultationRecord, request: teleconsult_pb2.MoveConsultationRequest
    ) -> None:
        birth_date = await self._birth_date(record)
        consent = directory.check_informed_consent(
            request.informed_consent, birth_date=birth_date, today=self.engine.now().date(), now=self.engine.now()
        )
        plan.changes["informed_consent"] = json.dumps(consent, ensure_ascii=False)
        plan.document_ids = [*_granted_documents(record), consent["evidence_document_id"]]

    async def _prepare_accept(
        self, plan: Plan, who: Caller, record: ConsultationRecord, request: teleconsult_pb2.MoveConsultationRequest
    ) -> None:
        chosen = [p[:64] for p in request.assignee_ids] or (
            [record.invited_practitioner_id] if record.invited_practitioner_id else []
        )
        async with self._rt.sessions() as session:
            if not chosen:
                # "Any available on the roster": whoever is on call for this type now.
                chosen = await directory.on_call(
                    session, record.consultant_organization_id, record.kind, self.engine.now()
                )
                if not chosen:
                    raise FailedPrecondition(
                        "no specialist is named and none is on call for this type now",
                        reason="consultation-no-specialist",
                    )
                chosen = chosen[:1]
            specialists = {
                s.practitioner_id: s
                for s in await session.scalars(
                    select(SpecialistRecord).where(
                        SpecialistRecord.organization_id == record.consultant_organization_id,
                        SpecialistRecord.practitioner_id.in_(chosen),
                    )
                )
            }
        self.rules.check_assignees(chosen, specialists, kind=record.kind)

        async def add(session: AsyncSession, decision: Decision) -> None:
            for practitioner_id in sorted(set(chosen)):
                session.add(ParticipantRecord(consultation_id=record.id, practitioner_id=practitioner_id))
            await session.flush()

        plan.writes.append(add)

    async def _prepare_decline(
        self, plan: Plan, who: Caller, record: ConsultationRecord, request: teleconsult_pb2.MoveConsultationRequest
    ) -> None:
        plan.facts["decline_code"] = request.decline_code
        plan.changes["decline_code"] = request.decline_code[:32]

    async def _prepare_schedule(
        self, plan: Plan, who: Caller, record: ConsultationRecord, request: teleconsult_pb2.MoveConsultationRequest
    ) -> None:
        slot_ids = sorted({s[:36] for s in request.slot_ids})
        async with self._rt.sessions() as session:
            participants = await self._participants(session, record.id)
            slots = list(
                await session.scalars(
                    select(SlotRecord).where(
                        SlotRecord.id.in_(slot_ids), SlotRecord.organization_id == record.consultant_organization_id
                    )
                )
            )
        start, end = directory.check_booking(slots, slot_ids=slot_ids, participants=participants)
        plan.changes.update(
            appointment_start=start,
            appointment_end=end,
            join_url=self.join_url_template.format(consultation_id=record.id)[:512],
        )

        async def book(session: AsyncSession, decision: Decision) -> None:
            # Every participant's slot at once, each only if still free: a concurrent booking of
            # any one of them leaves fewer rows updated and the whole move rolls back. The rows
            # are locked in id order first, so two bookings of overlapping sets cannot deadlock.
            if session.bind.dialect.name == "postgresql":
                await session.execute(
                    select(SlotRecord.id).where(SlotRecord.id.in_(slot_ids)).order_by(SlotRecord.id).with_for_update()
                )
            taken = await session.execute(
                update(SlotRecord)
                .where(SlotRecord.id.in_(slot_ids), SlotRecord.consultation_id.is_(None))
                .values(consultation_id=record.id)
            )
            if taken.rowcount != len(slot_ids):  # type: ignore[attr-defined]
                raise FailedPrecondition(
                    "a slot was booked meanwhile; choose another", reason="consultation-slot-taken"
                )

        plan.writes.append(book)

    async def _prepare_message(
        self, plan: Plan, who: Caller, record: ConsultationRecord, request: teleconsult_pb2.MoveConsultationRequest
    ) -> None:
        text = request.text.strip()[:8000]
        if not text:
            raise InvalidArgument("a message needs its text", reason="consultation-message-invalid")
        added = [d[:64] for d in request.document_ids][:50]
        studies = directory.check_imaging_studies(request.imaging_studies)
        if request.move == "provide-information":
            await self._check_documents(
                [*added, *(s["document_id"] for s in studies if s["document_id"])],
                await self._enterprise_id(record),
                who.organization_id,
            )
            plan.document_ids = [
                *_granted_documents(record),
                *added,
                *(s["document_id"] for s in studies if s["document_id"]),
            ]
            plan.changes["document_ids"] = json.dumps(list(dict.fromkeys([*json.loads(record.document_ids), *added])))
            if studies:
                plan.changes["imaging_studies"] = json.dumps([*json.loads(record.imaging_studies), *studies])
        message_id = str(uuid.uuid4())
        sealed = self._seal(message_context(message_id), {"text": text, "document_ids": added})
        now = self.engine.now()

        async def add(session: AsyncSession, decision: Decision) -> None:
            session.add(
                MessageRecord(
                    id=message_id,
                    consultation_id=record.id,
                    organization_id=who.organization_id,
                    practitioner_id=who.practitioner_id,
                    move=request.move,
                    sealed=sealed,
                    sent_at=now,
                )
            )
            await session.flush()

        plan.writes.append(add)

    async def _prepare_preliminary(
        self, plan: Plan, who: Caller, record: ConsultationRecord, request: teleconsult_pb2.MoveConsultationRequest
    ) -> None:
        content = report.content_dict(request.report)
        plan.facts["report"] = report.has_content(content)
        version = record.report_version + 1
        async with self._rt.sessions() as session:
            interpreters = await self._participants(session, record.id)
        resource = self._render(record, version, "preliminary", content, interpreters, self.engine.now())
        plan.changes["report_version"] = version
        plan.writes.append(self._store_report(record, version, "preliminary", content, resource, who=who))

    async def _prepare_sign(
        self, plan: Plan, who: Caller, record: ConsultationRecord, request: teleconsult_pb2.MoveConsultationRequest
    ) -> None:
        try:
            submitted = json.loads(request.report_json or "{}")
        except ValueError:
            raise InvalidArgument("the DiagnosticReport is not JSON", reason="consultation-report-invalid") from None
        if not isinstance(submitted, dict) or submitted.get("resourceType") != "DiagnosticReport":
            raise InvalidArgument("a DiagnosticReport is required", reason="consultation-report-invalid")
        amend = request.move == "amend"
        version = record.report_version + 1
        content = report.content_of(submitted)
        plan.facts["report"] = report.has_content(content)
        try:
            issued = datetime.datetime.fromisoformat(str(submitted.get("issued", "")).replace("Z", "+00:00"))
        except ValueError:
            raise InvalidArgument(
                "the DiagnosticReport needs its issued time", reason="consultation-report-invalid"
            ) from None
        async with self._rt.sessions() as session:
            interpreters = await self._participants(session, record.id)
            previous = await session.scalar(
                select(ReportRecord)
                .where(ReportRecord.consultation_id == record.id, ReportRecord.status.in_(_FINAL_STATUSES))
                .order_by(ReportRecord.version.desc())
            )
        status = "amended" if amend else "final"
        expected = self._render(record, version, status, content, interpreters, issued)
        report.check_submitted(submitted, expected=expected)
        signer_jwk = report.verify(expected, request.signature_jws, registered=who.key_thumbprints)
        now = self.engine.now()
        sm2_signature = self._sm2.sign(report.canonical(expected)).hex() if self._sm2 is not None else ""
        provenance = report.provenance(
            resource=expected,
            jws=request.signature_jws,
            organization_id=record.consultant_organization_id,
            practitioner_id=who.practitioner_id,
            signed=now,
            sm2_signature=sm2_signature,
        )
        document = await self._file(
            record,
            version,
            report.record_bundle(expected, provenance),
            replaces=previous.document_id if previous else "",
        )
        plan.changes["report_version"] = version
        if record.reported_at is None:
            plan.changes["reported_at"] = now
        plan.writes.append(
            self._store_report(
                record,
                version,
                status,
                content,
                expected,
                who=who,
                jws=request.signature_jws,
                signer_jwk=signer_jwk,
                signed=now,
                document=document,
                supersedes=previous.id if previous else "",
                sm2_signature=sm2_signature,
            )
        )

    async def _prepare_cancel(
        self, plan: Plan, who: Caller, record: ConsultationRecord, request: teleconsult_pb2.MoveConsultationRequest
    ) -> None:
        async def free(session: AsyncSession, decision: Decision) -> None:
            await session.execute(
                update(SlotRecord).where(SlotRecord.consultation_id == record.id).values(consultation_id=None)
            )

        plan.writes.append(free)

    def _render(
        self,
        record: ConsultationRecord,
        version: int,
        status: str,
        content: Mapping[str, Any],
        interpreters: Sequence[str],
        issued: datetime.datetime,
    ) -> dict[str, Any]:
        try:
            return report.render(
                consultation_id=record.id,
                version=version,
                status=status,
                kind=record.kind,
                patient_domain=record.patient_domain,
                patient_local_id=record.patient_local_id,
                consultant_organization_id=record.consultant_organization_id,
                interpreters=interpreters,
                content=content,
                issued=issued,
                imaging_study_uids=[s["study_instance_uid"] for s in json.loads(record.imaging_studies)],
            )
        except ValueError:
            raise InvalidArgument(
                "the report is not a valid DiagnosticReport", reason="consultation-report-invalid"
            ) from None

    def _store_report(
        self,
        record: ConsultationRecord,
        version: int,
        status: str,
        content: Mapping[str, Any],
        resource: Mapping[str, Any],
        *,
        who: Caller,
        jws: str = "",
        signer_jwk: Mapping[str, Any] | None = None,
        signed: datetime.datetime | None = None,
        document: registry_pb2.DocumentEntry | None = None,
        supersedes: str = "",
        sm2_signature: str = "",
    ) -> Any:
        report_id = str(uuid.uuid4())
        sealed = self._seal(report_context(report_id), {"content": dict(content), "diagnostic_report": dict(resource)})
        now = self.engine.now()

        async def add(session: AsyncSession, decision: Decision) -> None:
            if supersedes:
                await session.execute(
                    update(ReportRecord).where(ReportRecord.id == supersedes).values(status="superseded")
                )
            session.add(
                ReportRecord(
                    id=report_id,
                    consultation_id=record.id,
                    version=version,
                    status=status,
                    sealed=sealed,
                    signature_jws=jws,
                    signer_jwk=json.dumps(signer_jwk) if signer_jwk else "",
                    signer_practitioner_id=who.practitioner_id,
                    signed_at=signed,
                    document_id=document.document_id if document else "",
                    sha256=document.sha256 if document else "",
                    sm2_signature=sm2_signature,
                    created_at=now,
                )
            )
            await session.flush()

        return add

    async def _file(
        self, record: ConsultationRecord, version: int, content: bytes, *, replaces: str
    ) -> registry_pb2.DocumentEntry:
        """File the signed record in the registry, on behalf of the consulting organisation, into
        the patient's record at the requesting hospital (the registry checks hash and size). A
        retry files nothing twice: the source document id names the consultation and version."""
        entry = registry_pb2.DocumentEntry(
            source_document_id=f"consultation-{record.id}-v{version}",
            source_organization_id=record.consultant_organization_id,
            patient=common_pb2.PatientRef(domain=record.patient_domain, local_id=record.patient_local_id),
            type_code=registry_pb2.Coding(system="urn:hie:shared-document-type", code="consultation-record"),
            title="远程会诊报告",
            mime_type="application/fhir+json",
            size=len(content),
            sha256=hashlib.sha256(content).hexdigest(),
            confidentiality="N",
        )
        relation = (
            registry_pb2.DocumentRelation(type=registry_pb2.RELATION_TYPE_REPLACES, target_document_id=replaces)
            if replaces
            else None
        )
        try:
            response = await registry_pb2_grpc.DocumentRegistryStub(self._rt.channel("registry")).RegisterDocument(
                registry_pb2.RegisterDocumentRequest(
                    entry=entry,
                    content=content,
                    relation=relation,
                    idempotency_key=f"consultation-{record.id}-v{version}",
                ),
                metadata=self._rt.credentials.metadata(),
                timeout=30,
            )
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc) from None
        return response.entry

    async def _birth_date(self, record: ConsultationRecord) -> str:
        try:
            response = await mpi_pb2_grpc.PatientIndexStub(self._rt.channel("mpi")).GetPatient(
                mpi_pb2.GetPatientRequest(
                    ref=common_pb2.PatientRef(domain=record.patient_domain, local_id=record.patient_local_id)
                ),
                metadata=self._rt.credentials.metadata(),
                timeout=10,
            )
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc) from None
        return response.patient.birth_date

    # --- report ---------------------------------------------------------------------------------

    async def GetReport(
        self, request: teleconsult_pb2.GetReportRequest, context: object
    ) -> teleconsult_pb2.GetReportResponse:
        who = caller()
        who.require_scope("ServiceRequest", "r")
        who.require_role("doctor", "nurse", "admin")
        record = await self._visible(who, request.consultation_id)
        enterprise_id = await self._enterprise_id(record)
        async with transactions.change(self._rt) as session:
            rows = list(
                await session.scalars(
                    select(ReportRecord)
                    .where(ReportRecord.consultation_id == record.id)
                    .order_by(ReportRecord.version.desc())
                )
            )
            event_id = await self._rt.audit.record(
                session,
                caller=who,
                type="consultation.report-read",
                action=Action.ACTION_READ,
                patient_enterprise_id=enterprise_id,
                entities=[
                    ("ServiceRequest", record.id),
                    *(("DiagnosticReport", f"{record.id}-v{r.version}") for r in rows),
                ],
            )
        versions = []
        for r in rows:
            opened = self._open(report_context(r.id), r.sealed)
            c = opened.get("content", {})
            versions.append(
                teleconsult_pb2.Report(
                    version=r.version,
                    status=r.status,
                    content=teleconsult_pb2.ReportContent(
                        findings=c.get("findings", ""),
                        impression=c.get("impression", ""),
                        recommendations=c.get("recommendations", ""),
                        conclusion=c.get("conclusion", ""),
                        opinions=[teleconsult_pb2.Opinion(**o) for o in c.get("opinions", [])],
                    ),
                    diagnostic_report_json=json.dumps(opened.get("diagnostic_report", {}), ensure_ascii=False),
                    signature_jws=r.signature_jws,
                    signer_jwk_json=r.signer_jwk,
                    signer_practitioner_id=r.signer_practitioner_id,
                    signed=timestamp(r.signed_at),
                    document_id=r.document_id,
                    sha256=r.sha256,
                    sm2_signature=r.sm2_signature,
                )
            )
        return teleconsult_pb2.GetReportResponse(versions=versions, audit_event_ids=[event_id])

    # --- worklists and statistics ---------------------------------------------------------------

    async def ListConsultations(
        self, request: teleconsult_pb2.ListConsultationsRequest, context: object
    ) -> teleconsult_pb2.ListConsultationsResponse:
        who = caller()
        who.require_scope("ServiceRequest", "r")
        who.require_role("doctor", "nurse", "admin")
        if request.box not in {"incoming", "outgoing"}:
            raise InvalidArgument("box is incoming or outgoing", reason="consultation-box")
        size = min(max(request.page_size or 50, 1), _MAX_PAGE)
        offset = int(request.page_token) if request.page_token.isdigit() else 0
        c = ConsultationRecord
        query = select(c).where(
            (c.consultant_organization_id if request.box == "incoming" else c.requester_organization_id)
            == who.organization_id
        )
        if request.states:
            query = query.where(c.state.in_([int(s) for s in request.states]))
        if request.on_call and request.box == "incoming":
            practitioner = request.practitioner_id[:64] or who.practitioner_id
            now = self.engine.now()
            r = RosterShiftRecord
            kinds = select(r.kind).where(
                r.organization_id == who.organization_id,
                r.practitioner_id == practitioner,
                r.start_at <= now,
                r.end_at > now,
            )
            query = query.where(
                c.state == workflow.REQUESTED,
                c.kind.in_(kinds),
                c.invited_practitioner_id.in_(["", practitioner]),
            )
        elif request.practitioner_id and request.box == "incoming":
            query = query.where(
                c.id.in_(
                    select(ParticipantRecord.consultation_id).where(
                        ParticipantRecord.practitioner_id == request.practitioner_id[:64]
                    )
                )
            )
        if request.overdue_only:
            clocks = TABLES.clocks
            query = query.where(c.id.in_(select(clocks.c.item_id).where(clocks.c.fired_at.is_not(None))))
        # Most urgent first, then oldest.
        query = query.order_by(c.urgency.desc(), c.created_at, c.id).offset(offset).limit(size + 1)
        async with transactions.change(self._rt) as session:
            rows = list(await session.scalars(query))
            messages = [await self._message(session, r, full=False) for r in rows[:size]]
            await self._rt.audit.record(
                session,
                caller=who,
                type="consultation.list",
                action=Action.ACTION_READ,
                patient_enterprise_id="",
                entities=[("ServiceRequest", r.id) for r in rows[:size]],
            )
        return teleconsult_pb2.ListConsultationsResponse(
            consultations=messages, next_page_token=str(offset + size) if len(rows) > size else ""
        )

    async def ConsultationStatistics(
        self, request: teleconsult_pb2.ConsultationStatisticsRequest, context: object
    ) -> teleconsult_pb2.ConsultationStatisticsResponse:
        who = caller()
        org = statistics_scope(who, request.organization_id, reason="consultation-statistics")
        c = ConsultationRecord
        query = select(c)
        since, until = _time(request.since), _time(request.until)
        if since:
            query = query.where(c.created_at >= since)
        if until:
            query = query.where(c.created_at < until)
        if org:
            query = query.where((c.requester_organization_id == org) | (c.consultant_organization_id == org))
        clocks = TABLES.clocks
        async with transactions.change(self._rt) as session:
            rows = list(await session.scalars(query))
            fired = {
                item
                for (item,) in (
                    await session.execute(
                        select(clocks.c.item_id).where(
                            clocks.c.fired_at.is_not(None), clocks.c.item_id.in_([r.id for r in rows] or [""])
                        )
                    )
                ).all()
            }
            await self._rt.audit.record(
                session,
                caller=who,
                type="consultation.statistics",
                action=Action.ACTION_READ,
                patient_enterprise_id="",
                entities=[],
            )
        return directory.statistics(rows, fired)

    # --- directory, rosters, slots --------------------------------------------------------------

    async def SetSpecialist(
        self, request: teleconsult_pb2.SetSpecialistRequest, context: object
    ) -> teleconsult_pb2.SetSpecialistResponse:
        who = caller()
        who.require_scope("ServiceRequest", "u")
        who.require_role("admin")
        s = directory.check_specialist(request.specialist)

        async def change(session: AsyncSession) -> teleconsult_pb2.SetSpecialistResponse:
            row = await session.get(SpecialistRecord, (who.organization_id, s["practitioner_id"]))
            if row is None:
                row = SpecialistRecord(organization_id=who.organization_id, practitioner_id=s["practitioner_id"])
                session.add(row)
            for key, value in s.items():
                setattr(row, key, value)
            await self._rt.audit.record(
                session,
                caller=who,
                type="consultation.specialist-set",
                action=Action.ACTION_UPDATE,
                patient_enterprise_id="",
                entities=[("PractitionerRole", s["practitioner_id"])],
            )
            await session.flush()
            return teleconsult_pb2.SetSpecialistResponse(
                specialist=directory.specialist_message(row),
                qualified=self.rules.qualified(row, kind=directory.ANY_KIND),
            )

        # Idempotency-Key: a retry gets the first answer and records no second audit event.
        answer = await self._writes.once(
            who,
            request.idempotency_key,
            "consultation.specialist",
            request,
            teleconsult_pb2.SetSpecialistResponse,
            change,
        )
        return answer

    async def ListSpecialists(
        self, request: teleconsult_pb2.ListSpecialistsRequest, context: object
    ) -> teleconsult_pb2.ListSpecialistsResponse:
        who = caller()
        who.require_scope("ServiceRequest", "r")
        org = request.organization_id[:64] or who.organization_id
        async with self._rt.sessions() as session:
            rows = list(
                await session.scalars(
                    select(SpecialistRecord)
                    .where(SpecialistRecord.organization_id == org, SpecialistRecord.active.is_(True))
                    .order_by(SpecialistRecord.practitioner_id)
                )
            )
        return teleconsult_pb2.ListSpecialistsResponse(
            specialists=[
                directory.specialist_message(r)
                for r in rows
                if not request.kind or int(request.kind) in json.loads(r.kinds)
            ]
        )

    async def AddRosterShift(
        self, request: teleconsult_pb2.AddRosterShiftRequest, context: object
    ) -> teleconsult_pb2.AddRosterShiftResponse:
        who = caller()
        who.require_scope("ServiceRequest", "u")
        who.require_role("admin")
        shift = request.shift
        start, end = _time(shift.start), _time(shift.end)
        if not shift.practitioner_id or not shift.kind or start is None or end is None or end <= start:
            raise InvalidArgument(
                "a shift needs a practitioner, a type and a period", reason="consultation-roster-invalid"
            )
        row = RosterShiftRecord(
            id=str(uuid.uuid4()),
            organization_id=who.organization_id,
            practitioner_id=shift.practitioner_id[:64],
            kind=int(shift.kind),
            start_at=start,
            end_at=end,
        )

        async def change(session: AsyncSession) -> teleconsult_pb2.AddRosterShiftResponse:
            session.add(row)
            await session.flush()
            return teleconsult_pb2.AddRosterShiftResponse(shift=directory.shift_message(row))

        # Idempotency-Key: a retry gets the first shift, not a second one.
        answer = await self._writes.once(
            who,
            request.idempotency_key,
            "consultation.roster-shift",
            request,
            teleconsult_pb2.AddRosterShiftResponse,
            change,
        )
        return answer

    async def ListOnCall(
        self, request: teleconsult_pb2.ListOnCallRequest, context: object
    ) -> teleconsult_pb2.ListOnCallResponse:
        who = caller()
        who.require_scope("ServiceRequest", "r")
        at = _time(request.at) or self.engine.now()
        r = RosterShiftRecord
        query = select(r).where(
            r.organization_id == (request.organization_id[:64] or who.organization_id), r.start_at <= at, r.end_at > at
        )
        if request.kind:
            query = query.where(r.kind == int(request.kind))
        async with self._rt.sessions() as session:
            rows = list(await session.scalars(query.order_by(r.start_at)))
        return teleconsult_pb2.ListOnCallResponse(shifts=[directory.shift_message(x) for x in rows])

    async def PublishSlots(
        self, request: teleconsult_pb2.PublishSlotsRequest, context: object
    ) -> teleconsult_pb2.PublishSlotsResponse:
        who = caller()
        who.require_scope("ServiceRequest", "u")
        who.require_role("admin")
        rows = []
        for slot in request.slots[:500]:
            start, end = _time(slot.start), _time(slot.end)
            if not slot.practitioner_id or start is None or end is None or end <= start:
                raise InvalidArgument("a slot needs a practitioner and a period", reason="consultation-slot-invalid")
            rows.append(
                SlotRecord(
                    id=str(uuid.uuid4()),
                    organization_id=who.organization_id,
                    practitioner_id=slot.practitioner_id[:64],
                    start_at=start,
                    end_at=end,
                )
            )

        async def change(session: AsyncSession) -> teleconsult_pb2.PublishSlotsResponse:
            session.add_all(rows)
            await session.flush()
            return teleconsult_pb2.PublishSlotsResponse(slots=[directory.slot_message(r) for r in rows])

        try:
            # Idempotency-Key: a retry gets the first slots, not a slot-exists conflict with them.
            answer = await self._writes.once(
                who,
                request.idempotency_key,
                "consultation.slots",
                request,
                teleconsult_pb2.PublishSlotsResponse,
                change,
            )
        except IntegrityError:
            raise AlreadyExists(
                "a slot of that specialist starts at that time", reason="consultation-slot-exists"
            ) from None
        return answer

    async def ListSlots(
        self, request: teleconsult_pb2.ListSlotsRequest, context: object
    ) -> teleconsult_pb2.ListSlotsResponse:
        who = caller()
        who.require_scope("ServiceRequest", "r")
        s = SlotRecord
        query = select(s).where(s.organization_id == (request.organization_id[:64] or who.organization_id))
        if request.practitioner_id:
            query = query.where(s.practitioner_id == request.practitioner_id[:64])
        if request.free_only:
            query = query.where(s.consultation_id.is_(None))
        async with self._rt.sessions() as session:
            rows = list(await session.scalars(query.order_by(s.start_at, s.practitioner_id).limit(1000)))
        return teleconsult_pb2.ListSlotsResponse(
            slots=[directory.slot_message(r, show_consultation=r.organization_id == who.organization_id) for r in rows]
        )


class Plan:
    """What a move's preparation adds: row changes, guard facts, writes in its transaction and
    the documents of the grant it sends."""

    def __init__(self) -> None:
        self.changes: dict[str, object] = {}
        self.facts: dict[str, object] = {}
        self.writes: list[Any] = []
        self.document_ids: list[str] | None = None

    def within(self) -> Any:
        if not self.writes:
            return None

        async def run(session: AsyncSession, decision: Decision) -> None:
            for write in self.writes:
                await write(session, decision)

        return run


def _side(who: Caller, record: ConsultationRecord) -> workflow.Party:
    return (
        workflow.Party.CONSULTANT
        if who.organization_id == record.consultant_organization_id
        else workflow.Party.REQUESTER
    )


def _granted_documents(record: ConsultationRecord) -> list[str]:
    """The material the consultant is granted: attached documents and imaging-study entries."""
    studies = [s["document_id"] for s in json.loads(record.imaging_studies) if s.get("document_id")]
    return list(dict.fromkeys([*json.loads(record.document_ids), *studies]))


_PREPARE = {
    "record-consent": TeleconsultationsServicer._prepare_record_consent,
    "accept": TeleconsultationsServicer._prepare_accept,
    "decline": TeleconsultationsServicer._prepare_decline,
    "schedule": TeleconsultationsServicer._prepare_schedule,
    "request-information": TeleconsultationsServicer._prepare_message,
    "provide-information": TeleconsultationsServicer._prepare_message,
    "preliminary": TeleconsultationsServicer._prepare_preliminary,
    "sign": TeleconsultationsServicer._prepare_sign,
    "amend": TeleconsultationsServicer._prepare_sign,
    "cancel": TeleconsultationsServicer._prepare_cancel,
}
