"""Referrals gRPC servicer: create, read, and the transitions the consent grant follows (accept,
reject, complete, cancel); scheduling, arrival and worklists come with the referral issue."""

from __future__ import annotations

import json
import uuid

from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from hie.common.v1 import common_pb2
from hie.referral.v1 import referral_pb2, referral_pb2_grpc
from services.referral import workflow
from services.referral.store import ReferralRecord, ReferralStateChangeRecord, idempotent_answers
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


def _same_request(existing: ReferralRecord, fields: dict[str, object], reason: str) -> ReferralRecord:
    """A retry must repeat the request it retries; the same key with another request is a conflict
    (the reason compared as opened: it is stored encrypted)."""
    if reason != fields["reason"] or any(
        getattr(existing, name) != value for name, value in fields.items() if name != "reason"
    ):
        raise AlreadyExists("idempotency key already used for a different request", reason="idempotency-key-reused")
    return existing


def _ts(value: object) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value)  # type: ignore[arg-type]
    return ts


def _message(
    record: ReferralRecord, history: list[ReferralStateChangeRecord] | None = None, *, reason: str = ""
) -> referral_pb2.Referral:
    created = Timestamp()
    created.FromDatetime(record.created_at)
    return referral_pb2.Referral(
        history=[
            referral_pb2.ReferralStateChange(
                from_state=h.from_state,  # type: ignore[arg-type]
                to_state=h.to_state,  # type: ignore[arg-type]
                organization_id=h.organization_id,
                practitioner_id=h.practitioner_id,
                reason=h.reason,
                changed=_ts(h.changed_at),
            )
            for h in history or ()
        ],
        referral_id=record.id,
        patient=common_pb2.PatientRef(domain=record.patient_domain, local_id=record.patient_local_id),
        requester_organization_id=record.requester_organization_id,
        target_organization_id=record.target_organization_id,
        direction=record.direction,  # type: ignore[arg-type]
        reason=reason,
        state=record.state,  # type: ignore[arg-type]
        document_ids=json.loads(record.document_ids),
        created=created,
    )


_CREATE_OPERATION = "referral.create"
_MoveRequest = (
    referral_pb2.AcceptReferralRequest
    | referral_pb2.RejectReferralRequest
    | referral_pb2.CompleteReferralRequest
    | referral_pb2.CancelReferralRequest
)
# Transitions' answers share one layout (referral, audit event ids): kept and read as this one.
_Moved = referral_pb2.AcceptReferralResponse


class ReferralsServicer(referral_pb2_grpc.ReferralsServicer):
    def __init__(self, runtime: ServiceRuntime) -> None:
        self._rt = runtime
        self._answers = FirstAnswers(idempotent_answers)
        assert runtime.protection is not None  # the SPEC protects clinical free text
        self._fields = runtime.protection.fields

    # Clinical free text is stored encrypted with the field cipher the mpi uses, bound to its row.
    def _seal(self, text: str, record_id: str) -> str:
        return self._fields.encrypt(text, context=f"referral.reason:{record_id}") if text else ""

    def _open(self, record: ReferralRecord) -> str:
        try:
            return self._fields.open_text(record.reason, context=f"referral.reason:{record.id}")
        except (TamperedCiphertextError, UnknownKeyError):
            raise DataCorruption("stored clinical text failed its integrity check", reason="content-corrupt") from None

    def _msg(
        self, record: ReferralRecord, history: list[ReferralStateChangeRecord] | None = None
    ) -> referral_pb2.Referral:
        return _message(record, history, reason=self._open(record))

    async def CreateReferral(
        self, request: referral_pb2.CreateReferralRequest, context: object
    ) -> referral_pb2.CreateReferralResponse:
        try:
            return await self._createreferral(request)
        except IntegrityError:
            # A concurrent retry with the same idempotency key committed first: answer as that retry.
            return await self._createreferral(request)

    async def _createreferral(self, request: referral_pb2.CreateReferralRequest) -> referral_pb2.CreateReferralResponse:
        who = caller()
        who.require_scope("ServiceRequest", "c")
        who.require_role("doctor")
        ref = request.referral
        if not ref.patient.local_id or not ref.target_organization_id:
            raise InvalidArgument("a referral needs a patient and a target organisation", reason="referral-invalid")
        if ref.target_organization_id == who.organization_id:
            raise InvalidArgument("a referral goes to another organisation", reason="self-referral")
        patient = common_pb2.PatientRef(domain=who.organization_id, local_id=ref.patient.local_id)
        enterprise_id = await identity.registered_person(self._rt, patient)
        await identity.require_own_documents(self._rt, who.organization_id, patient, list(ref.document_ids))
        given_key = check_key(request.idempotency_key)
        key = given_key or str(uuid.uuid4())
        request_fingerprint = fingerprint(_CREATE_OPERATION, request)
        record_fields = {
            "target_organization_id": ref.target_organization_id,
            "patient_local_id": ref.patient.local_id,
            "direction": int(ref.direction),
            "reason": ref.reason[:2000],
            "document_ids": json.dumps(list(ref.document_ids)),
        }
        async with self._rt.sessions() as session, session.begin():
            existing = await session.scalar(
                select(ReferralRecord).where(
                    ReferralRecord.requester_organization_id == who.organization_id,
                    ReferralRecord.idempotency_key == key,
                )
            )
            if existing is not None:
                _same_request(existing, record_fields, self._open(existing))
                first = await self._answers.first(
                    session,
                    organization_id=who.organization_id,
                    key=key,
                    operation=_CREATE_OPERATION,
                    request_fingerprint=request_fingerprint,
                    response_type=referral_pb2.CreateReferralResponse,
                )
                # The first answer; created before answers were kept: the referral as it is now.
                return first if first is not None else referral_pb2.CreateReferralResponse(referral=self._msg(existing))
            record_id = str(uuid.uuid4())
            record = ReferralRecord(
                id=record_id,
                patient_domain=who.organization_id,
                patient_local_id=ref.patient.local_id,
                requester_organization_id=who.organization_id,
                target_organization_id=ref.target_organization_id,
                direction=int(ref.direction),
                reason=self._seal(ref.reason[:2000], record_id),
                state=referral_pb2.REFERRAL_STATE_REQUESTED,
                document_ids=json.dumps(list(ref.document_ids)),
                idempotency_key=key,
                created_at=utcnow(),
            )
            session.add(record)
            await self._rt.audit.record(
                session,
                caller=who,
                type="referral.create",
                action=Action.ACTION_CREATE,
                patient_enterprise_id=enterprise_id,
                entities=[("ServiceRequest", record.id)],
            )
            answer = referral_pb2.CreateReferralResponse(referral=self._msg(record))
            if given_key:
                await self._answers.keep(
                    session,
                    organization_id=who.organization_id,
                    key=key,
                    operation=_CREATE_OPERATION,
                    request_fingerprint=request_fingerprint,
                    response=answer,
                )
        self._rt.outbox.notify()
        return answer

    async def GetReferral(
        self, request: referral_pb2.GetReferralRequest, context: object
    ) -> referral_pb2.GetReferralResponse:
        who = caller()
        who.require_scope("ServiceRequest", "r")
        who.require_role("doctor", "nurse", "admin")
        async with self._rt.sessions() as session:
            record = await session.get(ReferralRecord, request.referral_id)
            history = await _history(session, request.referral_id)
        # A referral is visible to its two parties only; to anyone else it does not exist.
        if record is None or who.organization_id not in {
            record.requester_organization_id,
            record.target_organization_id,
        }:
            raise NotFound("no such referral", reason="referral-not-found")
        person = await identity.cross_reference(
            self._rt, common_pb2.PatientRef(domain=record.patient_domain, local_id=record.patient_local_id)
        )
        async with self._rt.sessions() as session, session.begin():
            await self._rt.audit.record(
                session,
                caller=who,
                type="referral.read",
                action=Action.ACTION_READ,
                patient_enterprise_id=person.enterprise_id,
                entities=[("ServiceRequest", record.id)],
            )
        self._rt.outbox.notify()
        return referral_pb2.GetReferralResponse(referral=self._msg(record, history))

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

    async def _transition(self, name: str, request: _MoveRequest) -> tuple[referral_pb2.Referral, list[str]]:
        """Move a referral as `name` says; the state change, its history row, the grant message
        for consent, the audit event and (with an idempotency key) the answer commit in one
        transaction. A keyed retry gets the first answer."""
        who = caller()
        who.require_scope("ServiceRequest", "u")
        who.require_role("doctor")
        referral_id, reason = request.referral_id, request.reason
        key = check_key(request.idempotency_key)
        operation = f"referral.{name}"
        request_fingerprint = fingerprint(operation, request)
        if (first := await self._first_move(who, key, operation, request_fingerprint)) is not None:
            return first.referral, list(first.audit_event_ids)
        async with self._rt.sessions() as session:
            record = await session.get(ReferralRecord, referral_id[:36])
        if record is None or who.organization_id not in {
            record.requester_organization_id,
            record.target_organization_id,
        }:
            raise NotFound("no such referral", reason="referral-not-found")
        party = (
            workflow.Party.TARGET if who.organization_id == record.target_organization_id else workflow.Party.REQUESTER
        )
        decided = workflow.move(name, state=record.state, caller_party=party)
        if decided.repeated:
            async with self._rt.sessions() as session:
                return self._msg(record, await _history(session, record.id)), []
        person = await identity.cross_reference(
            self._rt, common_pb2.PatientRef(domain=record.patient_domain, local_id=record.patient_local_id)
        )
        async with self._rt.sessions() as session, session.begin():
            # Only from the state the move was checked against: a concurrent move wins, this one fails.
            moved = await session.execute(
                update(ReferralRecord)
                .where(ReferralRecord.id == record.id, ReferralRecord.state == record.state)
                .values(state=decided.to_state)
            )
            if moved.rowcount != 1:  # type: ignore[attr-defined]
                raise FailedPrecondition("the referral changed meanwhile; read it again", reason="referral-state")
            session.add(
                ReferralStateChangeRecord(
                    id=str(uuid.uuid4()),
                    referral_id=record.id,
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
                        organization_id=record.target_organization_id,
                        purpose_of_use="referral",
                        patient=common_pb2.PatientRef(domain=record.patient_domain, local_id=record.patient_local_id),
                        document_ids=json.loads(record.document_ids),
                    ),
                )
            event_id = await self._rt.audit.record(
                session,
                caller=who,
                type=f"referral.{name}",
                action=Action.ACTION_UPDATE,
                patient_enterprise_id=person.enterprise_id,
                entities=[("ServiceRequest", record.id)],
            )
            record.state = decided.to_state
            history = await _history(session, record.id)
            answer = _Moved(referral=self._msg(record, history), audit_event_ids=[event_id])
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
        return answer.referral, list(answer.audit_event_ids)

    async def AcceptReferral(
        self, request: referral_pb2.AcceptReferralRequest, context: object
    ) -> referral_pb2.AcceptReferralResponse:
        referral, events = await self._transition("accept", request)
        return referral_pb2.AcceptReferralResponse(referral=referral, audit_event_ids=events)

    async def RejectReferral(
        self, request: referral_pb2.RejectReferralRequest, context: object
    ) -> referral_pb2.RejectReferralResponse:
        referral, events = await self._transition("reject", request)
        return referral_pb2.RejectReferralResponse(referral=referral, audit_event_ids=events)

    async def CompleteReferral(
        self, request: referral_pb2.CompleteReferralRequest, context: object
    ) -> referral_pb2.CompleteReferralResponse:
        referral, events = await self._transition("complete", request)
        return referral_pb2.CompleteReferralResponse(referral=referral, audit_event_ids=events)

    async def CancelReferral(
        self, request: referral_pb2.CancelReferralRequest, context: object
    ) -> referral_pb2.CancelReferralResponse:
        referral, events = await self._transition("cancel", request)
        return referral_pb2.CancelReferralResponse(referral=referral, audit_event_ids=events)


async def _history(session: AsyncSession, referral_id: str) -> list[ReferralStateChangeRecord]:
    rows = await session.scalars(
        select(ReferralStateChangeRecord)
        .where(ReferralStateChangeRecord.referral_id == referral_id)
        .order_by(ReferralStateChangeRecord.changed_at, ReferralStateChangeRecord.id)
    )
    return list(rows.all())
