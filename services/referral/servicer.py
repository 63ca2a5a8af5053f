"""Referrals gRPC servicer: translates messages, checks who may see what, maps a referral onto the
shared workflow engine and runs the referral's own writes (slots, beds, follow-ups) inside a move's
transaction. The rules are in workflow.py (transitions), domain.py (validation, statistics) and
deadlines.py (clocks)."""

from __future__ import annotations

import dataclasses
import functools
import json
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import grpc
from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from hie.common.v1 import common_pb2
from hie.referral.v1 import referral_pb2, referral_pb2_grpc
from hie.registry.v1 import registry_pb2, registry_pb2_grpc
from services.referral import directory, domain, messages, store, workflow
from services.referral.deadlines import RESPONSIBLE, DeadlinePolicy
from services.referral.store import (
    TABLES,
    BedCountRecord,
    FollowUpRecord,
    ReferralRecord,
    SlotRecord,
    follow_up_context,
    history_context,
    idempotent_answers,
    sealed_context,
)
from services.shared import mpi_client, transactions
from services.shared.audit_trail import Action
from services.shared.auth import Caller, TokenVerifier, caller
from services.shared.errors import (
    DataCorruption,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    error_from_rpc,
)
from services.shared.idempotency import FirstAnswers, check_key, fingerprint
from services.shared.process import ServiceRuntime
from services.shared.protection import DataProtection, TamperedCiphertextError
from services.shared.timestamps import to_datetime, to_timestamp_or_none
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

_DIRECTION = {
    "up": referral_pb2.REFERRAL_DIRECTION_UP,
    "down": referral_pb2.REFERRAL_DIRECTION_DOWN,
    "lateral": referral_pb2.REFERRAL_DIRECTION_LATERAL,
}
_DIRECTION_NAME = {v: k for k, v in _DIRECTION.items()}
_URGENCY = {
    referral_pb2.REFERRAL_URGENCY_ROUTINE: "routine",
    referral_pb2.REFERRAL_URGENCY_URGENT: "urgent",
    referral_pb2.REFERRAL_URGENCY_EMERGENCY: "emergency",
}
_URGENCY_CODE = {v: k for k, v in _URGENCY.items()}
_SERVICE = {
    referral_pb2.REFERRAL_SERVICE_OUTPATIENT: "outpatient",
    referral_pb2.REFERRAL_SERVICE_ADMISSION: "admission",
    referral_pb2.REFERRAL_SERVICE_EXAMINATION: "examination",
    referral_pb2.REFERRAL_SERVICE_REHABILITATION: "rehabilitation",
}
_SERVICE_CODE = {v: k for k, v in _SERVICE.items()}
# Moves a nurse may record besides a doctor (the front desk records arrivals and no-shows).
_NURSE_MOVES = frozenset({"arrive", "no-show", "start", "note"})
_PAGE = 50
_CREATE_OPERATION = "referral.create"
_one_move = functools.partial(
    one_move_rpc, move_request=referral_pb2.MoveReferralRequest, item_id="referral_id", item="referral"
)


class ReferralsServicer(referral_pb2_grpc.ReferralsServicer):
    def __init__(self, runtime: ServiceRuntime, *, deadlines: DeadlinePolicy) -> None:
        self._rt = runtime
        if runtime.protection is None:
            raise RuntimeError("the referral service seals free text: it needs the data keys")
        self._protection: DataProtection = runtime.protection
        self._answers = FirstAnswers(idempotent_answers)
        self._writes = KeyedWrites(self._answers, runtime)
        self._directory = TokenVerifier(runtime.settings.trusted_jwks_file, audience=directory.DIRECTORY_AUDIENCE)
        self.engine = WorkflowEngine(
            runtime,
            workflow.MACHINE,
            TABLES,
            deadlines=deadlines,
            seal_reason=lambda history_id, text: self._protection.fields.encrypt(
                text, context=history_context(history_id)
            ),
        )
        self.scanner = DeadlineScanner(
            runtime,
            self.engine,
            describe=self._describe,
            responsible=lambda clock, subject: (
                subject.target_organization_ids
                if RESPONSIBLE.get(clock) == "target" and subject.target_organization_ids
                else (subject.origin_organization_id,)
            ),
        )

    # --- sealing ------------------------------------------------------------------------------

    def _seal(self, referral_id: str, document: Mapping[str, Any]) -> str:
        return self._protection.fields.encrypt(
            json.dumps(document, ensure_ascii=False, separators=(",", ":")), context=sealed_context(referral_id)
        )

    def _open(self, record: ReferralRecord) -> dict[str, Any]:
        if record.sealed is None:
            return {"reason": record.reason}
        try:
            return dict(json.loads(self._protection.fields.decrypt(record.sealed, context=sealed_context(record.id))))
        except TamperedCiphertextError:
            raise DataCorruption("a referral failed its integrity check", reason="referral-corrupt") from None

    def _open_reason(self, history_id: str, value: str) -> str:
        try:
            return self._protection.fields.decrypt(value, context=history_context(history_id))
        except TamperedCiphertextError:
            return ""

    # --- messages -----------------------------------------------------------------------------

    async def _message(
        self, session: AsyncSession, record: ReferralRecord, *, who: Caller, full: bool = True
    ) -> referral_pb2.Referral:
        opened = self._open(record)
        history = await self.engine.history(session, record.id) if full else []
        clocks = await self.engine.clocks(session, record.id)
        follow_ups = list(
            await session.scalars(
                select(FollowUpRecord).where(FollowUpRecord.referral_id == record.id).order_by(FollowUpRecord.seq)
            )
        )
        candidates = json.loads(record.candidates)
        side = self._side(record, who.organization_id)
        message = referral_pb2.Referral(
            referral_id=record.id,
            patient=common_pb2.PatientRef(domain=record.patient_domain, local_id=record.patient_local_id),
            requester_organization_id=record.requester_organization_id,
            target_organization_id=record.target_organization_id,
            direction=record.direction,  # type: ignore[arg-type]
            reason=opened.get("reason", ""),
            state=record.state,  # type: ignore[arg-type]
            document_ids=json.loads(record.document_ids),
            created=to_timestamp_or_none(record.created_at),
            history=[
                referral_pb2.ReferralStateChange(
                    from_state=h["from_state"],
                    to_state=h["to_state"],
                    organization_id=h["organization_id"],
                    practitioner_id=h["practitioner_id"],
                    reason=self._open_reason(h["id"], h["reason"]),
                    changed=to_timestamp_or_none(h["changed_at"]),
                    move=h["move"],
                    role=h["role"],
                )
                for h in history
            ],
            referral_number=record.referral_number or "",
            urgency=_URGENCY_CODE.get(record.urgency, 0),  # type: ignore[arg-type]
            service=_SERVICE_CODE.get(record.service, 0),  # type: ignore[arg-type]
            diagnosis=referral_pb2.Diagnosis(code=record.diagnosis_code, text=opened.get("diagnosis_text", "")),
            target_department=record.target_department,
            target_practitioner_id=record.target_practitioner_id,
            candidate_organization_ids=[c["org"] for c in candidates],
            clinical_summary=opened.get("clinical_summary", ""),
            contact=opened.get("contact", ""),
            business_status=record.business_status,
            rejection_code=record.rejection_code,
            advice=opened.get("advice", ""),
            slot_id=record.slot_id,
            appointment_start=to_timestamp_or_none(record.appointment_start),
            bed_department=record.bed_department,
            outcome_document_id=record.outcome_document_id,
            care_plan=referral_pb2.CarePlan(
                medication=opened.get("medication", ""),
                warning_signs=opened.get("warning_signs", ""),
                follow_ups=[self._follow_up_message(f) for f in follow_ups],
            ),
            episode_id=record.episode_id,
            parent_referral_id=record.parent_referral_id,
            origin_tier=record.origin_tier,
            target_tier=record.target_tier,
            version=record.version,
            clocks=[
                referral_pb2.Clock(
                    name=c["name"],
                    due=to_timestamp_or_none(c["due_at"]),
                    paused=c["paused_at"] is not None,
                    fired=c["fired_at"] is not None,
                    stopped=c["stopped_at"] is not None,
                )
                for c in clocks
            ],
            overdue=any(c["fired_at"] is not None for c in clocks),
            allowed_moves=workflow.MACHINE.moves_from(record.state, side) if side else [],
        )
        return message

    def _follow_up_message(self, f: FollowUpRecord) -> referral_pb2.FollowUp:
        try:
            opened = json.loads(self._protection.fields.decrypt(f.sealed, context=follow_up_context(f.id)))
        except TamperedCiphertextError:
            opened = {}
        return referral_pb2.FollowUp(
            follow_up_id=f.id,
            description=opened.get("description", ""),
            due=to_timestamp_or_none(f.due_at),
            done=to_timestamp_or_none(f.done_at),
            note=opened.get("note", ""),
        )

    # --- who is who -----------------------------------------------------------------------------

    @staticmethod
    def _candidates(record: ReferralRecord) -> list[dict[str, Any]]:
        return list(json.loads(record.candidates))

    def _side(self, record: ReferralRecord, organization_id: str) -> str:
        if organization_id == record.requester_organization_id:
            return workflow.Party.REQUESTER
        if organization_id == record.target_organization_id:
            return workflow.Party.TARGET
        if not record.target_organization_id and any(
            c["org"] == organization_id and not c.get("declined") for c in self._candidates(record)
        ):
            return workflow.Party.TARGET
        return ""

    def _visible(self, record: ReferralRecord | None, organization_id: str) -> ReferralRecord:
        # A referral is visible to its parties only; to anyone else it does not exist.
        if record is None or not (
            self._side(record, organization_id) or any(c["org"] == organization_id for c in self._candidates(record))
        ):
            raise NotFound("no such referral", reason="referral-not-found")
        return record

    def _subject(self, record: ReferralRecord, *, target: str = "") -> Subject:
        target = target or record.target_organization_id
        patient = common_pb2.PatientRef(domain=record.patient_domain, local_id=record.patient_local_id)
        targets = (target,) if target else tuple(c["org"] for c in self._candidates(record) if not c.get("declined"))
        return Subject(
            item_id=record.id,
            state=record.state,
            version=record.version,
            resource_type="ServiceRequest",
            enterprise_id=record.enterprise_id,
            origin_organization_id=record.requester_organization_id,
            target_organization_ids=targets,
            grant=GrantSpec(
                organization_id=target,
                purpose_of_use="referral",
                patient=patient,
                document_ids=json.loads(record.document_ids),
            )
            if target
            else None,
            facts={
                "urgency": record.urgency,
                "service": record.service,
                "direction": _DIRECTION_NAME.get(record.direction, ""),
            },
        )

    async def _describe(self, session: AsyncSession, referral_id: str) -> Subject | None:
        record = await session.get(ReferralRecord, referral_id)
        return self._subject(record) if record is not None else None

    # --- create ---------------------------------------------------------------------------------

    async def CreateReferral(
        self, request: referral_pb2.CreateReferralRequest, context: grpc.aio.ServicerContext
    ) -> referral_pb2.CreateReferralResponse:
        try:
            return await self._create(request, context)
        except IntegrityError:
            # A concurrent retry with the same idempotency key committed first: answer as that retry.
            return await self._create(request, context)

    async def _create(
        self, request: referral_pb2.CreateReferralRequest, context: grpc.aio.ServicerContext
    ) -> referral_pb2.CreateReferralResponse:
        who = caller()
        who.require_scope("ServiceRequest", "c")
        who.require_role("doctor")
        ref = request.referral
        if not ref.patient.local_id or len(ref.patient.local_id) > 64:
            raise InvalidArgument(
                "a referral needs the patient's local id: patient.local_id", reason="referral-invalid"
            )
        target = ref.target_organization_id[:64]
        candidates = list(dict.fromkeys(c[:64] for c in ref.candidate_organization_ids if c))
        if bool(target) == bool(candidates):
            raise InvalidArgument(
                "a referral names a target_organization_id or candidate_organization_ids (not both)",
                reason="referral-invalid",
            )
        if len(candidates) > domain.MAX_CANDIDATES:
            raise InvalidArgument(
                f"at most {domain.MAX_CANDIDATES} candidate_organization_ids", reason="referral-invalid"
            )
        if who.organization_id in (target, *candidates):
            raise InvalidArgument(
                "an organisation does not refer to itself: target_organization_id", reason="self-referral"
            )
        tiers = directory.tiers_from_metadata(
            self._directory, list(context.invocation_metadata() or ()), client_id=who.client_id
        )
        origin_tier = tiers.get(who.organization_id, "")
        first = target or candidates[0]
        derived = directory.direction(origin_tier, tiers.get(first, ""))
        stated = _DIRECTION_NAME.get(ref.direction, "")
        if derived and stated and derived != stated:
            raise InvalidArgument(
                f"direction {stated} contradicts the organisations' tiers ({derived}): direction",
                reason="referral-direction",
            )
        direction_name = derived or stated
        if not direction_name:
            raise InvalidArgument(
                "the organisations' tiers are unknown: state the direction", reason="referral-direction"
            )
        if candidates and len({directory.direction(origin_tier, tiers.get(c, "")) for c in candidates}) > 1:
            raise InvalidArgument(
                "the candidates lie in different directions: candidate_organization_ids", reason="referral-direction"
            )
        urgency = _URGENCY.get(ref.urgency, "routine")
        service = _SERVICE.get(ref.service, "outpatient")
        code = domain.check_icd10(ref.diagnosis.code) if ref.diagnosis.code else ""
        if ref.diagnosis.text and not code:
            raise InvalidArgument("a diagnosis text needs its ICD-10 code: diagnosis.code", reason="referral-diagnosis")
        texts = {
            "reason": domain.check_text(ref.reason, field="reason", limit=2000),
            "diagnosis_text": domain.check_text(ref.diagnosis.text, field="diagnosis.text", limit=200),
            "clinical_summary": domain.check_text(ref.clinical_summary, field="clinical_summary"),
            "contact": domain.check_text(ref.contact, field="contact", limit=200),
            "medication": domain.check_text(ref.care_plan.medication, field="care_plan.medication"),
            "warning_signs": domain.check_text(ref.care_plan.warning_signs, field="care_plan.warning_signs"),
        }
        now = self.engine.now()
        plans = [
            domain.FollowUpPlan(
                description=domain.check_text(f.description, field="care_plan.follow_ups", limit=500),
                due=to_datetime(f.due),
            )
            for f in ref.care_plan.follow_ups
        ]
        domain.check_care_plan(plans, direction=direction_name, now=now)
        if ref.book_slot_id and (candidates or urgency == "routine"):
            raise InvalidArgument(
                "only an urgent or emergency referral to one target books a slot at creation: book_slot_id",
                reason="referral-slot",
            )
        document_ids = list(dict.fromkeys(d[:64] for d in ref.document_ids if d))
        given_key = check_key(request.idempotency_key)
        key = given_key or str(uuid.uuid4())
        keep = (key, _CREATE_OPERATION, fingerprint(_CREATE_OPERATION, request))
        retry_fields = {
            "target_organization_id": target,
            "patient_local_id": ref.patient.local_id,
            "direction": _DIRECTION[direction_name],
        }
        async with self._rt.sessions() as session:
            existing, first = await self._writes.earlier_create(
                session, who, ReferralRecord, keep, retry_fields, referral_pb2.CreateReferralResponse
            )
            if existing is not None:
                # The first answer; created before answers were kept: the referral as it is now.
                if first is not None:
                    return first
                return referral_pb2.CreateReferralResponse(referral=await self._message(session, existing, who=who))
        enterprise_id = await mpi_client.registered_person(
            self._rt, common_pb2.PatientRef(domain=who.organization_id, local_id=ref.patient.local_id)
        )
        await self._check_documents(document_ids, enterprise_id, who.organization_id)
        referral_id = str(uuid.uuid4())
        episode_id = referral_id
        if ref.parent_referral_id:
            episode_id = await self._parent_episode(ref.parent_referral_id[:36], who, enterprise_id, direction_name)
        record = ReferralRecord(
            id=referral_id,
            patient_domain=who.organization_id,
            patient_local_id=ref.patient.local_id,
            requester_organization_id=who.organization_id,
            target_organization_id=target,
            direction=_DIRECTION[direction_name],
            reason="",
            state=workflow.REQUESTED,
            version=0,
            document_ids=json.dumps(document_ids),
            idempotency_key=key,
            created_at=now,
            referral_number=domain.referral_number(now),
            enterprise_id=enterprise_id,
            origin_tier=origin_tier,
            target_tier=tiers.get(target, "") if target else "",
            urgency=urgency,
            service=service,
            diagnosis_code=code,
            target_department=ref.target_department[:64],
            target_practitioner_id=ref.target_practitioner_id[:64],
            candidates=json.dumps([{"org": c, "tier": tiers.get(c, "")} for c in candidates]),
            sealed=self._seal(referral_id, texts),
            business_status="2.0",
            episode_id=episode_id,
            parent_referral_id=ref.parent_referral_id[:36] if ref.parent_referral_id else "",
        )
        async with transactions.change(self._rt) as session:
            session.add(record)
            await session.flush()
            for seq, plan in enumerate(plans):
                follow_up_id = str(uuid.uuid4())
                session.add(
                    FollowUpRecord(
                        id=follow_up_id,
                        referral_id=referral_id,
                        organization_id=target or "",
                        seq=seq,
                        due_at=plan.due,
                        sealed=self._protection.fields.encrypt(
                            json.dumps({"description": plan.description, "note": ""}, ensure_ascii=False),
                            context=follow_up_context(follow_up_id),
                        ),
                    )
                )
            if ref.book_slot_id:
                booked = await store.book_slot(session, ref.book_slot_id[:36], target, referral_id)
                record.slot_id = booked.id
                record.appointment_start = booked.start_at
            subject = self._subject(record)
            await self.engine.apply_clocks(session, referral_id, ClockEffect(start=("accept",)), subject.facts)
            await self._rt.audit.record(
                session,
                caller=who,
                type="referral.create",
                action=Action.ACTION_CREATE,
                patient_enterprise_id=enterprise_id,
                entities=[("ServiceRequest", referral_id)],
            )
            await self.engine.notify(
                session,
                event_type="referral.create",
                organization_ids=subject.other_side(who.organization_id),
                resource_type="ServiceRequest",
                resource_id=referral_id,
                status="2.0",
            )
            await session.flush()
            answer = referral_pb2.CreateReferralResponse(referral=await self._message(session, record, who=who))
            if given_key:
                await self._writes.keep(session, who, keep, answer)
        return answer

    async def _check_documents(self, document_ids: Sequence[str], enterprise_id: str, requester: str) -> None:
        """Only the requester's own documents of this patient (an accepted referral grants the
        target access to them, so they must be the requester's to share), readable by the caller
        (the registry checks consent and audits the read), within the stated size limits."""
        if not document_ids:
            return
        if len(document_ids) > domain.MAX_DOCUMENTS:
            domain.check_attachments([0] * len(document_ids))
        sizes = await check_attachments(
            self._rt,
            document_ids,
            enterprise_id=enterprise_id,
            requester=requester,
            reason="referral-documents",
            name=lambda index: f"document_ids[{index}]",
        )
        domain.check_attachments(sizes)

    async def _parent_episode(self, parent_id: str, who: Caller, enterprise_id: str, direction_name: str) -> str:
        """A down-referral follows an up-referral the caller received, for the same person."""
        async with self._rt.sessions() as session:
            parent = await session.get(ReferralRecord, parent_id)
        if parent is None or who.organization_id != parent.target_organization_id:
            raise InvalidArgument(
                "parent_referral_id is not a referral this organisation received", reason="referral-parent"
            )
        if parent.enterprise_id and parent.enterprise_id != enterprise_id:
            raise InvalidArgument("parent_referral_id is about another patient", reason="referral-parent")
        if direction_name != "down" or parent.state not in (workflow.COMPLETED, workflow.CLOSED):
            raise InvalidArgument(
                "a down-referral follows a completed up-referral: parent_referral_id", reason="referral-parent"
            )
        return parent.episode_id or parent.id

    # --- moves ----------------------------------------------------------------------------------

    async def MoveReferral(
        self, request: referral_pb2.MoveReferralRequest, context: object
    ) -> referral_pb2.MoveReferralResponse:
        referral, events = await self._move(request)
        return referral_pb2.MoveReferralResponse(referral=referral, audit_event_ids=events)

    async def _move(self, request: referral_pb2.MoveReferralRequest) -> tuple[referral_pb2.Referral, list[str]]:
        """One move through the engine. With an idempotency key the answer is kept in the move's
        transaction and a retry (same key, same request) gets it again, audit event ids included."""
        who = caller()
        who.require_scope("ServiceRequest", "u")
        name = request.move
        if name not in workflow.MOVES or name == "decline":
            raise InvalidArgument(f"move must be one of {', '.join(workflow.MOVES[:-1])}", reason="referral-move")
        if name in _NURSE_MOVES:
            who.require_role("doctor", "nurse")
        else:
            who.require_role("doctor")
        moved = await self._writes.run(
            who,
            check_key(request.idempotency_key),
            f"referral.{name}",
            request,
            referral_pb2.MoveReferralResponse,
            lambda keep: self._apply_move(request, who, keep=keep),
        )
        return moved.referral, list(moved.audit_event_ids)

    async def _apply_move(
        self,
        request: referral_pb2.MoveReferralRequest,
        who: Caller,
        *,
        keep: Keep | None = None,
    ) -> referral_pb2.MoveReferralResponse:
        name = request.move
        async with self._rt.sessions() as session:
            record = self._visible(await session.get(ReferralRecord, request.referral_id[:36]), who.organization_id)
        side = self._side(record, who.organization_id)
        if not side and record.target_organization_id:
            # A candidate that lost the race to accept.
            raise FailedPrecondition(
                f"another organisation accepted this referral (state {workflow.state_name(record.state)})",
                reason="referral-state",
            )
        if not side:
            raise PermissionDenied("a candidate that declined makes no more moves", reason="referral-party")
        if request.HasField("expected_version") and request.expected_version != record.version:
            raise FailedPrecondition(
                f"the referral is at version {record.version} (state {workflow.state_name(record.state)}), "
                f"not {request.expected_version}",
                reason="referral-version",
            )
        # The origin's cancel of a scheduled referral asks the target to confirm (360X).
        if name == "cancel" and side == workflow.Party.REQUESTER and record.state == workflow.SCHEDULED:
            name = "request-cancel"
        candidates = self._candidates(record)
        open_candidates = [c for c in candidates if not c.get("declined")]
        if (
            name == "reject"
            and side == workflow.Party.TARGET
            and not record.target_organization_id
            and len(open_candidates) > 1
        ):
            name = "decline"
        reason = domain.check_text(request.reason, field="reason", limit=2000)
        advice = domain.check_text(request.advice, field="advice", limit=2000)
        now = self.engine.now()
        opened = self._open(record)
        changes: dict[str, object] = {}
        target = record.target_organization_id
        facts: dict[str, object] = {
            "rejection_code": request.rejection_code,
            "slot_id": request.slot_id or record.slot_id,
            "bed_department": request.bed_department,
            "outcome_document_id": request.outcome_document_id,
            "reason": reason,
        }
        if name == "accept" and not target:
            target = who.organization_id
            tier = next((c.get("tier", "") for c in candidates if c["org"] == target), "")
            changes |= {"target_organization_id": target, "target_tier": tier}
            derived = directory.direction(record.origin_tier, tier)
            if derived:
                changes["direction"] = _DIRECTION[derived]
        if name == "accept":
            changes["accepted_at"] = now
        if name in ("reject", "hold"):
            if name == "reject":
                changes["rejection_code"] = request.rejection_code
                advice = advice or workflow.REJECTION_CODES.get(request.rejection_code, "")
            changes["sealed"] = self._seal(record.id, {**opened, "advice": advice})
        if name == "decline":
            changes["candidates"] = json.dumps(
                [{**c, "declined": True} if c["org"] == who.organization_id else c for c in candidates]
            )
        if name == "schedule":
            changes["scheduled_at"] = now
        if name == "complete":
            facts |= await self._follow_up_facts(record)
            if request.outcome_document_id:
                await self._check_outcome(request.outcome_document_id[:64], record)
                changes |= {"outcome_document_id": request.outcome_document_id[:64], "completed_at": now}
        if name == "acknowledge":
            changes["closed_at"] = now

        async def within(session: AsyncSession, decision: Decision) -> None:
            if name == "accept" and not record.target_organization_id:
                # Follow-ups of a down-referral to candidates belong to whoever accepts.
                await session.execute(
                    update(FollowUpRecord).where(FollowUpRecord.referral_id == record.id).values(organization_id=target)
                )
            if name == "schedule":
                if record.service == "admission":
                    await store.reserve_bed(session, target, request.bed_department[:64])
                    await session.execute(
                        update(ReferralRecord)
                        .where(ReferralRecord.id == record.id)
                        .values(bed_department=request.bed_department[:64])
                    )
                else:
                    slot_id = request.slot_id[:36] or record.slot_id
                    if record.slot_id and record.slot_id != slot_id and record.state != workflow.NO_SHOW:
                        await store.free_slot(session, record)
                    slot = await store.book_slot(session, slot_id, target, record.id)
                    await session.execute(
                        update(ReferralRecord)
                        .where(ReferralRecord.id == record.id)
                        .values(slot_id=slot.id, appointment_start=slot.start_at)
                    )
            if decision.to_state in (workflow.CANCELLED, workflow.REJECTED):
                await store.free_slot(session, record)
                await store.release_bed(session, record)
            if decision.to_state == workflow.COMPLETED:
                await store.release_bed(session, record)

        patient = common_pb2.PatientRef(domain=record.patient_domain, local_id=record.patient_local_id)

        async def enterprise_id() -> str:
            return (await mpi_client.cross_reference(self._rt, patient)).enterprise_id

        subject = self._subject(record, target=target if name == "accept" else "")
        if name == "accept" and not record.target_organization_id:
            # The other candidates hear that the referral is taken.
            others = tuple(c["org"] for c in open_candidates if c["org"] != target)
            subject = dataclasses.replace(subject, target_organization_ids=(target, *others))

        async def build(session: AsyncSession, audit_event_ids: list[str]) -> referral_pb2.MoveReferralResponse:
            fresh = await session.get(ReferralRecord, record.id, populate_existing=True) or record
            return referral_pb2.MoveReferralResponse(
                referral=await self._message(session, fresh, who=who), audit_event_ids=audit_event_ids
            )

        answer = MoveAnswer(self._writes, who, keep, build)
        applied = await self.engine.apply(
            name,
            subject=subject,
            who=who,
            side=side,
            reason=reason,
            request_key=request.request_key or request.idempotency_key,
            changes=changes,
            facts=facts,
            within=within,
            resolve_enterprise_id=enterprise_id,
            answer=answer,
        )
        return await answer.result(applied.audit_event_ids)

    async def _follow_up_facts(self, record: ReferralRecord) -> dict[str, object]:
        async with self._rt.sessions() as session:
            rows = (
                await session.execute(select(FollowUpRecord.done_at).where(FollowUpRecord.referral_id == record.id))
            ).all()
        return {"follow_ups_pending": bool(rows), "follow_up_done": any(r.done_at for r in rows)}

    async def _check_outcome(self, document_id: str, record: ReferralRecord) -> None:
        """The outcome is a document the target registered for this patient (read as the caller)."""
        stub = registry_pb2_grpc.DocumentRegistryStub(self._rt.channel("registry"))
        try:
            entry = (await stub.GetDocumentEntry(registry_pb2.GetDocumentEntryRequest(document_id=document_id))).entry
        except grpc.aio.AioRpcError as exc:
            error = error_from_rpc(exc)
            if isinstance(error, (NotFound, PermissionDenied, InvalidArgument)):
                raise InvalidArgument(
                    "outcome_document_id is not a document in the registry", reason="referral-outcome"
                ) from None
            raise error from None
        if entry.source_organization_id != caller().organization_id or (
            record.enterprise_id and entry.enterprise_id != record.enterprise_id
        ):
            raise InvalidArgument(
                "outcome_document_id must be this patient's document registered by the receiving organisation",
                reason="referral-outcome",
            )

    # The one-move RPCs of the first API: the general move with the move named.
    AcceptReferral = _one_move("accept", referral_pb2.AcceptReferralResponse)
    RejectReferral = _one_move("reject", referral_pb2.RejectReferralResponse)
    CompleteReferral = _one_move("complete", referral_pb2.CompleteReferralResponse)
    CancelReferral = _one_move("cancel", referral_pb2.CancelReferralResponse)

    # --- reads ----------------------------------------------------------------------------------

    async def GetReferral(
        self, request: referral_pb2.GetReferralRequest, context: object
    ) -> referral_pb2.GetReferralResponse:
        who = caller()
        who.require_scope("ServiceRequest", "r")
        who.require_role("doctor", "nurse", "admin")
        async with self._rt.sessions() as session:
            record = self._visible(await session.get(ReferralRecord, request.referral_id[:36]), who.organization_id)
            message = await self._message(session, record, who=who)
        person = await mpi_client.cross_reference(
            self._rt, common_pb2.PatientRef(domain=record.patient_domain, local_id=record.patient_local_id)
        )
        await self._rt.audit.record_now(
            caller=who,
            type="referral.read",
            action=Action.ACTION_READ,
            patient_enterprise_id=person.enterprise_id,
            entities=[("ServiceRequest", record.id)],
        )
        return referral_pb2.GetReferralResponse(referral=message)

    async def ListReferrals(
        self, request: referral_pb2.ListReferralsRequest, context: object
    ) -> referral_pb2.ListReferralsResponse:
        who = caller()
        who.require_scope("ServiceRequest", "r")
        who.require_role("doctor", "nurse", "admin")
        org = who.organization_id
        r = ReferralRecord
        if request.box == "outgoing":
            query = select(r).where(r.requester_organization_id == org)
        elif request.box == "incoming":
            query = select(r).where(
                or_(
                    r.target_organization_id == org,
                    and_(r.target_organization_id == "", r.candidates.contains(f'"org": "{org}"', autoescape=True)),
                )
            )
        else:
            raise InvalidArgument("box must be incoming or outgoing", reason="referral-box")
        if request.states:
            query = query.where(r.state.in_([int(s) for s in request.states]))
        if request.urgency:
            query = query.where(r.urgency == _URGENCY.get(request.urgency, ""))
        if request.direction:
            query = query.where(r.direction == int(request.direction))
        if request.department:
            query = query.where(r.target_department == request.department[:64])
        if request.patient_local_id:
            query = query.where(r.patient_domain == org, r.patient_local_id == request.patient_local_id[:64])
        if request.overdue_only:
            clocks = TABLES.clocks
            query = query.where(r.id.in_(select(clocks.c.item_id).where(clocks.c.fired_at.is_not(None))))
        size = min(request.page_size or _PAGE, 200)
        offset = int(request.page_token) if request.page_token.isdigit() else 0
        async with self._rt.sessions() as session:
            records = list(
                await session.scalars(query.order_by(r.created_at.desc(), r.id).offset(offset).limit(size + 1))
            )
            messages = [await self._message(session, rec, who=who, full=False) for rec in records[:size]]
        await self._rt.audit.record_now(
            caller=who,
            type="referral.list",
            action=Action.ACTION_READ,
            entities=[("ServiceRequest", m.referral_id) for m in messages],
        )
        return referral_pb2.ListReferralsResponse(
            referrals=messages, next_page_token=str(offset + size) if len(records) > size else ""
        )

    async def GetEpisode(
        self, request: referral_pb2.GetEpisodeRequest, context: object
    ) -> referral_pb2.GetEpisodeResponse:
        who = caller()
        who.require_scope("ServiceRequest", "r")
        who.require_role("doctor", "nurse", "admin")
        async with self._rt.sessions() as session:
            records = list(
                await session.scalars(
                    select(ReferralRecord)
                    .where(ReferralRecord.episode_id == request.episode_id[:36])
                    .order_by(ReferralRecord.created_at)
                )
            )
            mine = [rec for rec in records if self._side(rec, who.organization_id)]
            if not mine:
                raise NotFound("no such episode", reason="referral-episode-not-found")
            messages = [await self._message(session, rec, who=who, full=False) for rec in mine]
        closed = all(rec.state in workflow.TERMINAL for rec in records) and any(
            rec.state == workflow.CLOSED for rec in records
        )
        await self._rt.audit.record_now(
            caller=who,
            type="referral.episode.read",
            action=Action.ACTION_READ,
            patient_enterprise_id=mine[0].enterprise_id,
            entities=[("EpisodeOfCare", request.episode_id[:36])],
        )
        return referral_pb2.GetEpisodeResponse(
            episode_id=request.episode_id[:36], status="closed" if closed else "open", referrals=messages
        )

    async def CompleteFollowUp(
        self, request: referral_pb2.CompleteFollowUpRequest, context: object
    ) -> referral_pb2.CompleteFollowUpResponse:
        """The community records a follow-up done; the first one stops the follow-up clock."""
        who = caller()
        who.require_scope("ServiceRequest", "u")
        who.require_role("doctor", "nurse")
        key = check_key(request.idempotency_key)
        return await self._writes.run(
            who,
            key,
            "referral.follow-up",
            request,
            referral_pb2.CompleteFollowUpResponse,
            lambda keep: self._complete_follow_up(request, who, keep),
        )

    async def _complete_follow_up(
        self, request: referral_pb2.CompleteFollowUpRequest, who: Caller, keep: Keep | None
    ) -> referral_pb2.CompleteFollowUpResponse:
        note = domain.check_text(request.note, field="note", limit=2000)
        async with self._rt.sessions() as session:
            record = self._visible(await session.get(ReferralRecord, request.referral_id[:36]), who.organization_id)
        if who.organization_id != record.target_organization_id:
            raise PermissionDenied("only the receiving organisation records follow-ups", reason="referral-party")
        if record.state not in workflow.GRANTED:
            raise FailedPrecondition(
                f"a referral in state {workflow.state_name(record.state)} takes no follow-ups", reason="referral-state"
            )
        events: list[str] = []
        async with transactions.change(self._rt) as session:
            follow_up = await session.get(FollowUpRecord, request.follow_up_id[:36])
            if follow_up is None or follow_up.referral_id != record.id:
                raise NotFound("no such follow-up", reason="referral-follow-up-not-found")
            if follow_up.done_at is None:
                first = not (
                    await session.scalar(
                        select(func.count())
                        .select_from(FollowUpRecord)
                        .where(FollowUpRecord.referral_id == record.id, FollowUpRecord.done_at.is_not(None))
                    )
                )
                opened = json.loads(
                    self._protection.fields.decrypt(follow_up.sealed, context=follow_up_context(follow_up.id))
                )
                follow_up.sealed = self._protection.fields.encrypt(
                    json.dumps({**opened, "note": note}, ensure_ascii=False), context=follow_up_context(follow_up.id)
                )
                follow_up.done_at = self.engine.now()
                follow_up.done_by = who.practitioner_id
                if first:
                    await self.engine.apply_clocks(session, record.id, ClockEffect(stop=("follow-up",)), {})
                events.append(
                    await self._rt.audit.record(
                        session,
                        caller=who,
                        type="referral.follow-up",
                        action=Action.ACTION_UPDATE,
                        patient_enterprise_id=record.enterprise_id,
                        entities=[("ServiceRequest", record.id), ("Task", follow_up.id)],
                    )
                )
                await self.engine.notify(
                    session,
                    event_type="referral.follow-up",
                    organization_ids=[record.requester_organization_id],
                    resource_type="ServiceRequest",
                    resource_id=record.id,
                    status="follow-up-done",
                )
            await session.flush()
            answer = referral_pb2.CompleteFollowUpResponse(
                referral=await self._message(session, record, who=who), audit_event_ids=events
            )
            await self._writes.keep(session, who, keep, answer)
        return answer

    # --- slots, beds --------------------------------------------------------------------------

    async def PublishSlots(
        self, request: referral_pb2.PublishSlotsRequest, context: object
    ) -> referral_pb2.PublishSlotsResponse:
        who = caller()
        who.require_scope("ServiceRequest", "u")
        who.require_role("doctor", "admin")
        key = check_key(request.idempotency_key)
        return await self._writes.run(
            who,
            key,
            "referral.slots.publish",
            request,
            referral_pb2.PublishSlotsResponse,
            lambda keep: self._publish_slots(request, who, keep),
        )

    async def _publish_slots(
        self, request: referral_pb2.PublishSlotsRequest, who: Caller, keep: Keep | None
    ) -> referral_pb2.PublishSlotsResponse:
        if not request.slots or len(request.slots) > 200:
            raise InvalidArgument("publish 1 to 200 slots at a time", reason="referral-slot")
        now = self.engine.now()
        records = []
        for index, slot in enumerate(request.slots):
            start, end = to_datetime(slot.start), to_datetime(slot.end)
            if not slot.department or len(slot.department) > 64 or end <= start:
                raise InvalidArgument(
                    f"slots[{index}] needs a department and an end after its start", reason="referral-slot"
                )
            records.append(
                SlotRecord(
                    id=str(uuid.uuid4()),
                    organization_id=who.organization_id,
                    department=slot.department,
                    start_at=start,
                    end_at=end,
                    referral_id=None,
                    created_at=now,
                )
            )
        async with transactions.change(self._rt) as session:
            session.add_all(records)
            await self._rt.audit.record(
                session,
                caller=who,
                type="referral.slots.publish",
                action=Action.ACTION_CREATE,
                entities=[("Slot", r.id) for r in records],
            )
            answer = referral_pb2.PublishSlotsResponse(slots=[messages.slot(r) for r in records])
            await self._writes.keep(session, who, keep, answer)
        return answer

    async def ListSlots(
        self, request: referral_pb2.ListSlotsRequest, context: object
    ) -> referral_pb2.ListSlotsResponse:
        """Availability is no patient data: any member sees another's slots (never who holds them)."""
        who = caller()
        who.require_scope("ServiceRequest", "r")
        query = select(SlotRecord).where(
            SlotRecord.organization_id == (request.organization_id or who.organization_id)[:64]
        )
        if request.department:
            query = query.where(SlotRecord.department == request.department[:64])
        if request.free_only:
            query = query.where(SlotRecord.referral_id.is_(None))
        if request.HasField("since"):
            query = query.where(SlotRecord.start_at >= to_datetime(request.since))
        async with self._rt.sessions() as session:
            records = list(await session.scalars(query.order_by(SlotRecord.start_at, SlotRecord.id).limit(500)))
        return referral_pb2.ListSlotsResponse(slots=[messages.slot(r) for r in records])

    async def SetBedCount(
        self, request: referral_pb2.SetBedCountRequest, context: object
    ) -> referral_pb2.SetBedCountResponse:
        who = caller()
        who.require_scope("ServiceRequest", "u")
        who.require_role("doctor", "admin")
        if not request.department or len(request.department) > 64 or not 0 <= request.total <= 10000:
            raise InvalidArgument("a department and a total of 0 to 10000 beds", reason="referral-bed")

        async def change(session: AsyncSession) -> referral_pb2.SetBedCountResponse:
            record = await session.get(BedCountRecord, (who.organization_id, request.department), with_for_update=True)
            if record is None:
                record = BedCountRecord(
                    organization_id=who.organization_id, department=request.department, total=0, reserved=0
                )
                session.add(record)
            if request.total < record.reserved:
                raise FailedPrecondition(
                    f"{record.reserved} beds are reserved: total cannot go below", reason="referral-bed"
                )
            record.total = request.total
            await self._rt.audit.record(
                session,
                caller=who,
                type="referral.beds.set",
                action=Action.ACTION_UPDATE,
                entities=[("Location", f"{who.organization_id}/{request.department}")],
            )
            await session.flush()
            return referral_pb2.SetBedCountResponse(bed_count=messages.bed_count(record))

        # Idempotency-Key: a retry gets the first answer (the total it set then, not the
        # current one) and records no second audit event.
        answer = await self._writes.once(
            who, request.idempotency_key, "referral.beds", request, referral_pb2.SetBedCountResponse, change
        )
        return answer

    async def ListBedCounts(
        self, request: referral_pb2.ListBedCountsRequest, context: object
    ) -> referral_pb2.ListBedCountsResponse:
        who = caller()
        who.require_scope("ServiceRequest", "r")
        org = (request.organization_id or who.organization_id)[:64]
        async with self._rt.sessions() as session:
            records = list(
                await session.scalars(
                    select(BedCountRecord)
                    .where(BedCountRecord.organization_id == org)
                    .order_by(BedCountRecord.department)
                )
            )
        return referral_pb2.ListBedCountsResponse(bed_counts=[messages.bed_count(r) for r in records])

    # --- statistics ---------------------------------------------------------------------------

    async def ReferralStatistics(
        self, request: referral_pb2.ReferralStatisticsRequest, context: object
    ) -> referral_pb2.ReferralStatisticsResponse:
        """The authority's regional view (any organisation or all); a hospital's own only."""
        who = caller()
        org = statistics_scope(who, request.organization_id, reason="referral-statistics")
        r = ReferralRecord
        query = select(r)
        if request.HasField("since"):
            query = query.where(r.created_at >= to_datetime(request.since))
        if request.HasField("until"):
            query = query.where(r.created_at < to_datetime(request.until))
        if org:
            query = query.where(or_(r.requester_organization_id == org, r.target_organization_id == org))
        clocks = TABLES.clocks
        async with self._rt.sessions() as session:
            records = list(await session.scalars(query))
            fired: dict[str, list[str]] = {}
            ids = [rec.id for rec in records]
            for start in range(0, len(ids), 500):
                rows = await session.execute(
                    select(clocks.c.item_id, clocks.c.name).where(
                        clocks.c.item_id.in_(ids[start : start + 500]), clocks.c.fired_at.is_not(None)
                    )
                )
                for item_id, clock in rows.all():
                    fired.setdefault(item_id, []).append(clock)
        facts = [
            domain.ReferralFacts(
                origin=rec.requester_organization_id,
                target=rec.target_organization_id,
                direction=_DIRECTION_NAME.get(rec.direction, ""),
                tier_pair=f"{rec.origin_tier}->{rec.target_tier}" if rec.origin_tier and rec.target_tier else "",
                state=workflow.state_name(rec.state),
                created=rec.created_at,
                accepted=rec.accepted_at,
                scheduled=rec.scheduled_at,
                completed=rec.completed_at,
                closed=rec.state == workflow.CLOSED,
                decided=rec.accepted_at is not None or rec.state == workflow.REJECTED,
                breaches=fired.get(rec.id, []),
            )
            for rec in records
        ]
        stats = domain.statistics_of(facts)
        await self._rt.audit.record_now(caller=who, type="referral.statistics", action=Action.ACTION_READ)

        def rows(counts: Mapping[str, int]) -> list[referral_pb2.CountRow]:
            return [referral_pb2.CountRow(key=k, count=v) for k, v in sorted(counts.items())]

        return referral_pb2.ReferralStatisticsResponse(
            total=stats.total,
            by_direction=rows(stats.by_direction),
            by_tier_pair=rows(stats.by_tier_pair),
            by_state=rows(stats.by_state),
            acceptance_rate=stats.acceptance_rate,
            durations=[
                referral_pb2.DurationStats(name=name, samples=n, median_hours=median, p90_hours=p90)
                for name, (n, median, p90) in stats.durations.items()
            ],
            loop_closure_rate=stats.loop_closure_rate,
            breaches=stats.breaches,
            breaches_by_clock=rows(stats.breaches_by_clock),
            by_organization_month=[
                referral_pb2.OrganizationMonthRow(
                    organization_id=o,
                    month=month,
                    sent=c.get("sent", 0),
                    received=c.get("received", 0),
                    accepted=c.get("accepted", 0),
                    closed=c.get("closed", 0),
                    breaches=c.get("breaches", 0),
                )
                for (o, month), c in sorted(stats.by_organization_month.items())
                if not org or o == org
            ],
        )
