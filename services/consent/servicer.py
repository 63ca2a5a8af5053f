"""ConsentDecisionPoint gRPC servicer: caller checks, message translation, transactions and audit.
The decision itself is `policy.decide` (pure)."""

from __future__ import annotations

import asyncio
import datetime
import functools
import hashlib
import json
import logging
import unicodedata
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from hie.common.v1 import common_pb2
from hie.consent.v1 import consent_pb2, consent_pb2_grpc
from hie.registry.v1 import notifications_pb2, notifications_pb2_grpc
from services.consent import bppc, invalidation, messages, policy, provisions, store
from services.consent.cache import PatientConsentCache
from services.shared import mpi_client, transactions
from services.shared.audit_trail import Action
from services.shared.auth import Caller, PlatformCredentials, caller
from services.shared.db import utcnow
from services.shared.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from services.shared.idempotency import FirstAnswers, check_key, fingerprint
from services.shared.metrics import BREAK_GLASS_DECLARATIONS, record_decisions
from services.shared.outbox import Sender
from services.shared.process import ServiceRuntime
from services.shared.text import has_control_characters
from services.shared.timestamps import to_datetime, to_datetime_or_none, to_timestamp, to_timestamp_or_none
from services.shared.user_assertion import PURPOSES_OF_USE

_log = logging.getLogger(__name__)
_MAX_ITEMS = 1000
# Who records, revises and revokes directives on the patient's behalf, and who reads them.
_DIRECTIVE_WRITERS = ("doctor", "nurse", "admin")
_DIRECTIVE_READERS = ("doctor", "nurse", "admin", "auditor")
_GRANT_PURPOSES = frozenset({"referral", "consultation"})
# Outbox topic of the notice to the patient's home hospital(s) that break-the-glass was declared.
BREAK_GLASS_TOPIC = "consent.break-glass"
BREAK_GLASS_AUDIT_TYPE = "consent.break-glass"


def break_glass_notice_sender(
    broker: Callable[[], notifications_pb2_grpc.NotificationBrokerStub], credentials: PlatformCredentials
) -> Sender:
    """Delivers the notice (ids only) through the registry's notification broker to the workflow
    subscribers of the patient's other hospitals, under the consent service's platform identity;
    the outbox retries until the broker has taken it."""

    async def send(payloads: Sequence[bytes]) -> None:
        for payload in payloads:
            notice = json.loads(payload)
            if not notice["notify_organization_ids"]:
                continue
            await broker().PublishEvent(
                notifications_pb2.PublishEventRequest(
                    event_type=BREAK_GLASS_TOPIC,
                    organization_ids=notice["notify_organization_ids"],
                    resource_type="Consent",
                    resource_id=notice["break_glass_id"],
                    status="break-the-glass",
                ),
                metadata=credentials.metadata(),
                timeout=10,
            )

    return send


def _clean(value: str, *, what: str, limit: int, reason: str) -> str:
    text = unicodedata.normalize("NFC", value).strip()
    if len(text) > limit or has_control_characters(text):
        raise InvalidArgument(f"{what} is too long or holds control characters", reason=reason)
    return text


def _workflow_entity(reference: str) -> tuple[str, str]:
    """`ServiceRequest/<id>` as an audit entity (type, id)."""
    kind, _, identifier = reference.partition("/")
    return (kind, identifier) if identifier else ("ServiceRequest", reference)


# The operation a kept first answer belongs to (services/shared/idempotency.py).
_RECORD_OPERATION = "consent.directive.record"
_BREAK_GLASS_OPERATION = "consent.break-glass"
_REVISE_OPERATION = "consent.directive.revise"
_REVOKE_OPERATION = "consent.directive.revoke"


def _digest(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


_R = TypeVar("_R")


def _invalidates(
    enterprise_id_of: Callable[[Any], str],
) -> Callable[[Callable[..., Awaitable[_R]]], Callable[..., Awaitable[_R]]]:
    """For an RPC that changes a patient's consent: it returns only after the registry dropped
    the decisions it keeps about the patient (services/consent/invalidation.py). A retry that
    changed nothing pushes again too: cheap, and it repairs a push lost after the first commit."""

    def wrap(method: Callable[..., Awaitable[_R]]) -> Callable[..., Awaitable[_R]]:
        @functools.wraps(method)
        async def rpc(self: ConsentDecisionPointServicer, request: Any, context: object) -> _R:
            answer = await method(self, request, context)
            await invalidation.invalidate_registry(self._rt, enterprise_id_of(answer))
            return answer

        return rpc

    return wrap


class ConsentDecisionPointServicer(consent_pb2_grpc.ConsentDecisionPointServicer):
    def __init__(self, runtime: ServiceRuntime, regional_policy: policy.RegionalPolicy | None = None) -> None:
        self._rt = runtime
        self._answers = FirstAnswers(store.idempotent_answers)
        self.regional_policy = regional_policy or policy.RegionalPolicy.from_env(runtime.options.environ())
        self.cache = PatientConsentCache(runtime.engine, runtime.sessions)
        runtime.background(self._close_on_stop(), name="consent-cache")

    async def _close_on_stop(self) -> None:
        """Held until the service stops, then returns the cache's connection before the engine goes."""
        try:
            await asyncio.Event().wait()
        finally:
            await self.cache.close()

    # --- decisions -----------------------------------------------------------------------

    async def Decide(self, request: consent_pb2.DecideRequest, context: object) -> consent_pb2.DecideResponse:
        who = caller()
        purpose = who.require_purpose()
        who.require_scope("DocumentReference", "r")
        if len(request.items) > _MAX_ITEMS:
            raise InvalidArgument(f"at most {_MAX_ITEMS} items per decision", reason="batch-too-large")
        if not request.items:
            return consent_pb2.DecideResponse()
        if not request.enterprise_id:
            # Without the person the patient's directives cannot be found: never decide without them.
            raise InvalidArgument("the patient's enterprise id is required", reason="enterprise-id-missing")
        requester = provisions.Requester(
            organization_id=who.organization_id,
            purpose_of_use=purpose,
            department=who.department,
            practitioner_id=who.practitioner_id,
            action=request.action or "access",
            role=who.role,
            holds_record=request.requester_holds_record,
        )
        now = utcnow()
        consent = await self.cache.get(request.enterprise_id)
        verdicts = policy.decide_batch(
            self.regional_policy, consent, requester, [messages.item_of(item) for item in request.items], now
        )
        record_decisions(verdicts)
        glass = [v for v in verdicts if v.break_glass]
        if glass:
            # Every access break-the-glass opened is on the record as such.
            async with transactions.change(self._rt) as session:
                await self._rt.audit.record(
                    session,
                    caller=who,
                    type=BREAK_GLASS_AUDIT_TYPE,
                    action=Action.ACTION_READ,
                    patient_enterprise_id=request.enterprise_id,
                    entities=[("DocumentReference", v.item_id) for v in glass]
                    + [("BreakGlass", v.reference.removeprefix("break-glass/")) for v in glass[:1]],
                )
        # The registry may keep these decisions (its decision cache) until the first moment the
        # records decide differently on their own, or until this service invalidates them after a
        # change (`_decisions_changed`); never a break-the-glass access, which must be audited here.
        answer = consent_pb2.DecideResponse(
            decisions=[messages.decision_message(v) for v in verdicts], cacheable=not glass
        )
        if not glass and (until := policy.next_change(consent, now)) is not None:
            answer.valid_until.CopyFrom(to_timestamp(until))
        return answer

    async def Explain(self, request: consent_pb2.ExplainRequest, context: object) -> consent_pb2.ExplainResponse:
        who = caller()
        who.require_role("auditor")
        try:
            who.require_scope("Consent", "r")
        except PermissionDenied:
            who.require_scope("AuditEvent", "r")
        if not request.enterprise_id or not request.item.item_id or not request.organization_id:
            raise InvalidArgument(
                "an enterprise id, an item and a requesting organisation are required", reason="explain-invalid"
            )
        if who.organization_type != "authority" and request.organization_id != who.organization_id:
            # A hospital's auditors explain their own organisation's decisions; the region's, anyone's.
            raise PermissionDenied(
                "a hospital explains decisions for its own organisation's requests", reason="explain-own-only"
            )
        if request.purpose_of_use and request.purpose_of_use not in PURPOSES_OF_USE:
            raise InvalidArgument("unknown purpose of use", reason="purpose-invalid")
        # The person's records decide two things: a hospital's auditor explains decisions about
        # people its own domain registered only (another hospital's patient, and whether a
        # directive of theirs exists, are not its business), and whether the requester holds a
        # record of the person (the care relationship).
        try:
            person = await mpi_client.cross_reference_by_enterprise_id(self._rt, request.enterprise_id)
        except NotFound:
            raise NotFound("no such patient", reason="patient-not-found") from None
        domains = {r.domain for r in person.refs}
        if who.organization_type == "hospital" and who.organization_id not in domains:
            raise NotFound("no such patient", reason="patient-not-found")
        requester = provisions.Requester(
            organization_id=request.organization_id[:64],
            purpose_of_use=request.purpose_of_use,
            department=request.department[:64],
            practitioner_id=request.practitioner_id[:64],
            action=request.action or "access",
            role=request.role[:32] or policy.BREAK_GLASS_ROLE,
            holds_record=request.organization_id in domains,
        )
        at = to_datetime_or_none(request.at, request.HasField("at")) or utcnow()
        item = messages.item_of(request.item)
        consent = await self.cache.get(request.enterprise_id)
        verdict = policy.decide(self.regional_policy, consent, requester, item, at)
        await self._rt.audit.record_now(
            caller=who,
            type="consent.explain",
            action=Action.ACTION_EXECUTE,
            patient_enterprise_id=request.enterprise_id,
            entities=[("DocumentReference", item.item_id)],
        )
        return consent_pb2.ExplainResponse(
            decision=messages.decision_message(verdict), explanation=policy.explain(verdict, requester, item)
        )

    # --- directives ----------------------------------------------------------------------

    async def _own_patient(self, who: Caller, ref: common_pb2.PatientRef) -> str:
        """The enterprise id of a patient the caller's own domain registered."""
        if not ref.local_id:
            raise InvalidArgument("the patient's local id is required", reason="patient-ref-missing")
        if ref.domain and ref.domain != who.organization_id:
            raise NotFound("no patient with that local id in your domain", reason="patient-not-found")
        return await mpi_client.registered_person(
            self._rt, common_pb2.PatientRef(domain=who.organization_id, local_id=ref.local_id)
        )

    async def _visible_directive(self, who: Caller, directive_id: str) -> store.DirectiveRecord:
        """A directive of a patient the caller's organisation has registered; NotFound otherwise."""
        try:
            key = str(uuid.UUID(directive_id))
        except ValueError:
            raise NotFound("no such directive", reason="directive-not-found") from None
        async with self._rt.sessions() as session:
            record = await session.get(store.DirectiveRecord, key)
        if record is None:
            raise NotFound("no such directive", reason="directive-not-found")
        if record.recorded_by_organization_id != who.organization_id:
            person = await mpi_client.cross_reference(
                self._rt, common_pb2.PatientRef(domain=record.patient_domain, local_id=record.patient_local_id)
            )
            if who.organization_id not in {r.domain for r in person.refs}:
                raise NotFound("no such directive", reason="directive-not-found")
        return record

    async def _own_evidence(self, who: Caller, evidence: str) -> None:
        """A directive's evidence is the signed form the recording organisation holds: an id that
        names another organisation's registered document is refused (a reference to a local form,
        not registered at the exchange, is the hospital's own)."""
        entry = await mpi_client.document_source(self._rt, evidence) if evidence else None
        if entry is not None and entry.source_organization_id != who.organization_id:
            raise FailedPrecondition(
                "the evidence must be a document your organisation registered", reason="evidence-not-own"
            )

    def _directive_content(
        self, message: consent_pb2.Directive
    ) -> tuple[provisions.Provision, tuple[str, ...], str, provisions.Period]:
        provision = provisions.provision_from_json(messages.provision_json(message.provision), purposes=PURPOSES_OF_USE)
        evidence = message.evidence_document_id.strip()
        bppc.check_directive(provision, evidence_document_id=evidence)
        named = {code for p in provisions.iter_provisions(provision) for code in p.obligations}
        if named - policy.OBLIGATIONS.keys():
            # A receiver cannot honour an obligation nobody defined.
            raise InvalidArgument(
                f"obligations must be among {', '.join(sorted(policy.OBLIGATIONS))}", reason="obligation-unknown"
            )
        policy_ids = bppc.check_policy_ids(tuple(message.policy_ids))
        period = provisions.Period(
            to_datetime_or_none(message.period.start, message.period.HasField("start")),
            to_datetime_or_none(message.period.end, message.period.HasField("end")),
        )
        if period.start and period.end and period.end <= period.start:
            raise InvalidArgument("the directive's period ends before it starts", reason="period-invalid")
        return provision, policy_ids, evidence, period

    def _revision(self, who: Caller, record: store.DirectiveRecord, change: str) -> store.DirectiveRevisionRecord:
        return store.DirectiveRevisionRecord(
            directive_id=record.id,
            revision=record.revision,
            change=change,
            body=json.dumps(
                {
                    "provision": json.loads(record.provision),
                    "policy_ids": json.loads(record.policy_ids),
                    "evidence_document_id": record.evidence_document_id,
                    "period": [
                        record.period_start.isoformat() if record.period_start else None,
                        record.period_end.isoformat() if record.period_end else None,
                    ],
                    "status": record.status,
                },
                ensure_ascii=False,
            ),
            organization_id=who.organization_id,
            practitioner_id=who.practitioner_id,
            changed_at=record.updated_at,
        )

    @_invalidates(lambda a: a.directive.enterprise_id)
    async def RecordDirective(
        self, request: consent_pb2.RecordDirectiveRequest, context: object
    ) -> consent_pb2.RecordDirectiveResponse:
        who = caller()
        who.require_scope("Consent", "c")
        who.require_role(*_DIRECTIVE_WRITERS)
        provision, policy_ids, evidence, period = self._directive_content(request.directive)
        enterprise_id = await self._own_patient(who, request.directive.patient)
        await self._own_evidence(who, evidence)
        stored = json.dumps(provisions.provision_to_json(provision), ensure_ascii=False, sort_keys=True)
        digest = _digest(request.directive.patient.local_id, stored, policy_ids, evidence, period)
        key = request.idempotency_key[:128] or str(uuid.uuid4())
        for attempt in range(2):
            try:
                return await self._record(
                    who, request, enterprise_id, stored, digest, key, policy_ids, evidence, period
                )
            except IntegrityError:
                # A concurrent retry (same key) or first change of the patient committed first.
                if attempt:
                    raise
        raise AssertionError("unreachable")

    async def _record(
        self,
        who: Caller,
        request: consent_pb2.RecordDirectiveRequest,
        enterprise_id: str,
        stored: str,
        digest: str,
        key: str,
        policy_ids: tuple[str, ...],
        evidence: str,
        period: provisions.Period,
    ) -> consent_pb2.RecordDirectiveResponse:
        async with transactions.change(self._rt) as session:
            existing = await session.scalar(
                select(store.DirectiveRecord).where(
                    store.DirectiveRecord.recorded_by_organization_id == who.organization_id,
                    store.DirectiveRecord.idempotency_key == key,
                )
            )
            if existing is not None:
                if existing.request_digest != digest:
                    raise AlreadyExists(
                        "idempotency key already used for a different directive", reason="idempotency-key-reused"
                    )
                # A retry: the first answer (created, its audit event), kept with the directive.
                first = await self._answers.first(
                    session,
                    organization_id=who.organization_id,
                    key=key,
                    operation=_RECORD_OPERATION,
                    request_fingerprint=digest,
                    response_type=consent_pb2.RecordDirectiveResponse,
                )
                if first is not None:
                    return first
                return consent_pb2.RecordDirectiveResponse(
                    directive=messages.directive_message(existing), created=False
                )
            now = utcnow()
            record = store.DirectiveRecord(
                id=str(uuid.uuid4()),
                enterprise_id=enterprise_id,
                patient_domain=who.organization_id,
                patient_local_id=request.directive.patient.local_id,
                recorded_by_organization_id=who.organization_id,
                recorded_by_practitioner_id=who.practitioner_id,
                policy_ids=json.dumps(list(policy_ids)),
                evidence_document_id=evidence,
                period_start=period.start,
                period_end=period.end,
                provision=stored,
                status=bppc.DirectiveStatus.ACTIVE.value,
                revision=1,
                recorded_at=now,
                updated_at=now,
                idempotency_key=key,
                request_digest=digest,
            )
            session.add(record)
            session.add(self._revision(who, record, "record"))
            await store.bump_version(session, enterprise_id)
            event_id = await self._rt.audit.record(
                session,
                caller=who,
                type="consent.directive.record",
                action=Action.ACTION_CREATE,
                patient_enterprise_id=enterprise_id,
                entities=[("Consent", record.id)],
            )
            answer = consent_pb2.RecordDirectiveResponse(
                directive=messages.directive_message(record), created=True, audit_event_ids=[event_id]
            )
            if request.idempotency_key:
                await self._answers.keep(
                    session,
                    organization_id=who.organization_id,
                    key=key,
                    operation=_RECORD_OPERATION,
                    request_fingerprint=digest,
                    response=answer,
                )
        return answer

    @_invalidates(lambda a: a.directive.enterprise_id)
    async def ReviseDirective(
        self, request: consent_pb2.ReviseDirectiveRequest, context: object
    ) -> consent_pb2.ReviseDirectiveResponse:
        who = caller()
        who.require_scope("Consent", "u")
        who.require_role(*_DIRECTIVE_WRITERS)
        provision, policy_ids, evidence, period = self._directive_content(request.directive)
        found = await self._visible_directive(who, request.directive.directive_id)
        await self._own_evidence(who, evidence)

        async def change(session: AsyncSession) -> consent_pb2.ReviseDirectiveResponse:
            record = await session.get(store.DirectiveRecord, found.id, with_for_update=True)
            assert record is not None  # directives are never deleted
            if record.status != bppc.DirectiveStatus.ACTIVE.value:
                raise FailedPrecondition("a revoked directive cannot be revised", reason="directive-revoked")
            if request.expected_revision and request.expected_revision != record.revision:
                raise FailedPrecondition("the directive was changed since it was read", reason="revision-conflict")
            record.provision = json.dumps(provisions.provision_to_json(provision), ensure_ascii=False, sort_keys=True)
            record.policy_ids = json.dumps(list(policy_ids))
            record.evidence_document_id = evidence
            record.period_start, record.period_end = period.start, period.end
            record.revision += 1
            record.updated_at = utcnow()
            session.add(self._revision(who, record, "revise"))
            await store.bump_version(session, record.enterprise_id)
            event_id = await self._rt.audit.record(
                session,
                caller=who,
                type="consent.directive.revise",
                action=Action.ACTION_UPDATE,
                patient_enterprise_id=record.enterprise_id,
                entities=[("Consent", record.id)],
            )
            return consent_pb2.ReviseDirectiveResponse(
                directive=messages.directive_message(record), audit_event_ids=[event_id]
            )

        # A keyed retry gets the first answer: one revision, not a second one (or a conflict).
        answer, replayed = await self._answers.once(
            self._rt.sessions,
            organization_id=who.organization_id,
            key=request.idempotency_key,
            operation=_REVISE_OPERATION,
            request=request,
            response_type=consent_pb2.ReviseDirectiveResponse,
            change=change,
            context=(who.practitioner_id,),
        )
        if not replayed:
            self._rt.outbox.notify()
        return answer

    @_invalidates(lambda a: a.directive.enterprise_id)
    async def RevokeDirective(
        self, request: consent_pb2.RevokeDirectiveRequest, context: object
    ) -> consent_pb2.RevokeDirectiveResponse:
        who = caller()
        who.require_scope("Consent", "d")
        who.require_role(*_DIRECTIVE_WRITERS)
        found = await self._visible_directive(who, request.directive_id)

        async def change(session: AsyncSession) -> consent_pb2.RevokeDirectiveResponse:
            record = await session.get(store.DirectiveRecord, found.id, with_for_update=True)
            assert record is not None
            if record.status == bppc.DirectiveStatus.REVOKED.value:
                # Revoking twice is a retry: the first revocation stands, nothing new is recorded.
                return consent_pb2.RevokeDirectiveResponse(directive=messages.directive_message(record))
            now = utcnow()
            record.status = bppc.DirectiveStatus.REVOKED.value
            record.revoked_at = now
            record.updated_at = now
            record.revision += 1
            session.add(self._revision(who, record, "revoke"))
            await store.bump_version(session, record.enterprise_id)
            event_id = await self._rt.audit.record(
                session,
                caller=who,
                type="consent.directive.revoke",
                action=Action.ACTION_DELETE,
                patient_enterprise_id=record.enterprise_id,
                entities=[("Consent", record.id)],
            )
            return consent_pb2.RevokeDirectiveResponse(
                directive=messages.directive_message(record), audit_event_ids=[event_id]
            )

        # A keyed retry gets the first answer, its audit event id included.
        answer, replayed = await self._answers.once(
            self._rt.sessions,
            organization_id=who.organization_id,
            key=request.idempotency_key,
            operation=_REVOKE_OPERATION,
            request=request,
            response_type=consent_pb2.RevokeDirectiveResponse,
            change=change,
            context=(who.practitioner_id,),
        )
        if not replayed:
            self._rt.outbox.notify()
        return answer

    async def ListDirectives(
        self, request: consent_pb2.ListDirectivesRequest, context: object
    ) -> consent_pb2.ListDirectivesResponse:
        who = caller()
        who.require_scope("Consent", "r")
        who.require_role(*_DIRECTIVE_READERS)
        enterprise_id = await self._own_patient(who, request.patient)
        async with self._rt.sessions() as session:
            query = select(store.DirectiveRecord).where(store.DirectiveRecord.enterprise_id == enterprise_id)
            if not request.include_revoked:
                query = query.where(store.DirectiveRecord.status == bppc.DirectiveStatus.ACTIVE.value)
            records = (await session.scalars(query.order_by(store.DirectiveRecord.recorded_at))).all()
        await self._rt.audit.record_now(
            caller=who,
            type="consent.directive.list",
            action=Action.ACTION_EXECUTE,
            patient_enterprise_id=enterprise_id,
            entities=[("Consent", r.id) for r in records],
        )
        return consent_pb2.ListDirectivesResponse(
            enterprise_id=enterprise_id, directives=[messages.directive_message(r) for r in records]
        )

    async def GetDirective(
        self, request: consent_pb2.GetDirectiveRequest, context: object
    ) -> consent_pb2.GetDirectiveResponse:
        who = caller()
        who.require_scope("Consent", "r")
        who.require_role(*_DIRECTIVE_READERS)
        record = await self._visible_directive(who, request.directive_id)
        await self._rt.audit.record_now(
            caller=who,
            type="consent.directive.read",
            action=Action.ACTION_READ,
            patient_enterprise_id=record.enterprise_id,
            entities=[("Consent", record.id)],
        )
        return consent_pb2.GetDirectiveResponse(directive=messages.directive_message(record))

    # --- grants --------------------------------------------------------------------------

    @staticmethod
    def _platform_only(who: Caller) -> None:
        if not who.is_platform:
            raise PermissionDenied(
                "grants are made by the exchange's referral and consultation workflows", reason="platform-only"
            )

    @_invalidates(lambda a: a.grant.enterprise_id)
    async def GrantAccess(
        self, request: consent_pb2.GrantAccessRequest, context: object
    ) -> consent_pb2.GrantAccessResponse:
        """Create or update the grant of a referral / consultation. Merges are monotonic, so
        messages that arrive out of order converge: a revocation is final, an end once set stays."""
        who = caller()
        self._platform_only(who)
        grant = request.grant
        if grant.purpose_of_use not in _GRANT_PURPOSES:
            raise InvalidArgument("a grant is for referral or consultation", reason="grant-invalid")
        if not grant.reference or not grant.organization_id or len(grant.document_ids) > _MAX_ITEMS:
            raise InvalidArgument("a grant needs its reference and receiving organisation", reason="grant-invalid")
        enterprise_id = grant.enterprise_id or (await mpi_client.cross_reference(self._rt, grant.patient)).enterprise_id
        closed = to_datetime_or_none(request.closed, request.HasField("closed"))
        end = closed + datetime.timedelta(seconds=self.regional_policy.grant_grace_seconds) if closed else None
        if end is None and grant.HasField("end"):
            end = to_datetime(grant.end)
        for attempt in range(2):
            try:
                async with transactions.change(self._rt) as session:
                    record = await session.scalar(
                        select(store.GrantRecord).where(store.GrantRecord.reference == grant.reference[:128])
                    )
                    now = utcnow()
                    created = record is None
                    if record is None:
                        record = store.GrantRecord(
                            id=str(uuid.uuid4()),
                            reference=grant.reference[:128],
                            enterprise_id=enterprise_id,
                            organization_id=grant.organization_id[:64],
                            purpose_of_use=grant.purpose_of_use,
                            document_ids=json.dumps(sorted(set(grant.document_ids))),
                            include_summary=grant.include_summary,
                            start=now,
                            end=end,
                            revoked_at=None,
                            created_at=now,
                        )
                        session.add(record)
                    else:
                        ids = json.dumps(sorted(set(json.loads(record.document_ids)) | set(grant.document_ids)))
                        new_end = end if end is not None and (record.end is None or end < record.end) else record.end
                        if ids == record.document_ids and new_end == record.end:
                            # A redelivered message: nothing changes, nothing is recorded.
                            return consent_pb2.GrantAccessResponse(grant=messages.grant_message(record))
                        record.document_ids, record.end = ids, new_end
                    await session.flush()
                    await store.bump_version(session, record.enterprise_id)
                    await self._rt.audit.record(
                        session,
                        caller=who,
                        type="consent.grant",
                        action=Action.ACTION_CREATE if created else Action.ACTION_UPDATE,
                        patient_enterprise_id=record.enterprise_id,
                        entities=[("AccessGrant", record.id), _workflow_entity(record.reference)],
                    )
                return consent_pb2.GrantAccessResponse(grant=messages.grant_message(record))
            except IntegrityError:
                if attempt:
                    raise
        raise AssertionError("unreachable")

    @_invalidates(lambda a: a.grant.enterprise_id)
    async def RevokeGrant(
        self, request: consent_pb2.RevokeGrantRequest, context: object
    ) -> consent_pb2.RevokeGrantResponse:
        who = caller()
        self._platform_only(who)
        if not request.grant_id and not request.reference:
            raise InvalidArgument("name the grant or its reference", reason="grant-invalid")
        async with transactions.change(self._rt) as session:
            if request.grant_id:
                record = await session.get(store.GrantRecord, request.grant_id[:36])
            else:
                record = await session.scalar(
                    select(store.GrantRecord).where(store.GrantRecord.reference == request.reference[:128])
                )
            if record is None:
                raise NotFound("no such grant", reason="grant-not-found")
            if record.revoked_at is None:
                record.revoked_at = utcnow()
                await store.bump_version(session, record.enterprise_id)
                await self._rt.audit.record(
                    session,
                    caller=who,
                    type="consent.grant.revoke",
                    action=Action.ACTION_DELETE,
                    patient_enterprise_id=record.enterprise_id,
                    entities=[("AccessGrant", record.id), _workflow_entity(record.reference)],
                )
        return consent_pb2.RevokeGrantResponse(grant=messages.grant_message(record))

    # --- break-the-glass -----------------------------------------------------------------

    @_invalidates(lambda a: a.enterprise_id)
    async def DeclareBreakGlass(
        self, request: consent_pb2.DeclareBreakGlassRequest, context: object
    ) -> consent_pb2.DeclareBreakGlassResponse:
        who = caller()
        who.require_scope("Consent", "c")
        who.require_role("doctor")
        if who.require_purpose() != policy.EMERGENCY or not who.practitioner_id:
            raise PermissionDenied(
                "break-the-glass is declared by a clinician for the purpose emergency", reason="purpose"
            )
        reason = _clean(request.reason, what="reason", limit=500, reason="reason-invalid")
        if len(reason) < 4:
            raise InvalidArgument("break-the-glass needs a reason", reason="reason-missing")
        if request.duration_seconds < 0:
            raise InvalidArgument("duration must not be negative", reason="duration-invalid")
        ref = request.patient
        if not ref.local_id:
            raise InvalidArgument("the patient's local id is required", reason="patient-ref-missing")
        if ref.domain and ref.domain != who.organization_id:
            raise NotFound("no patient with that local id in your domain", reason="patient-not-found")
        try:
            person = await mpi_client.cross_reference(
                self._rt, common_pb2.PatientRef(domain=who.organization_id, local_id=ref.local_id)
            )
        except NotFound:
            raise FailedPrecondition("register the patient first", reason="patient-not-registered") from None
        bound = self.regional_policy.break_glass_seconds
        seconds = min(request.duration_seconds or bound, bound)
        starts = utcnow()
        record = store.BreakGlassRecord(
            id=str(uuid.uuid4()),
            enterprise_id=person.enterprise_id,
            organization_id=who.organization_id,
            practitioner_id=who.practitioner_id,
            department=who.department[:64],
            reason=reason,
            starts=starts,
            expires=starts + datetime.timedelta(seconds=seconds),
        )
        # The patient's home hospitals: every other domain that registered the person.
        notify = sorted({r.domain for r in person.refs} - {who.organization_id})
        key = check_key(request.idempotency_key.strip())
        request_fingerprint = fingerprint(_BREAK_GLASS_OPERATION, request, who.practitioner_id)
        for attempt in range(2):
            try:
                async with self._rt.sessions() as session, session.begin():
                    first = (
                        await self._answers.first(
                            session,
                            organization_id=who.organization_id,
                            key=key,
                            operation=_BREAK_GLASS_OPERATION,
                            request_fingerprint=request_fingerprint,
                            response_type=consent_pb2.DeclareBreakGlassResponse,
                        )
                        if key
                        else None
                    )
                    if first is not None:
                        # A retry: the one declaration (not a second grant and notification).
                        return first
                    session.add(record)
                    await store.bump_version(session, person.enterprise_id)
                    event_id = await self._rt.audit.record(
                        session,
                        caller=who,
                        type=BREAK_GLASS_AUDIT_TYPE,
                        action=Action.ACTION_CREATE,
                        patient_enterprise_id=person.enterprise_id,
                        entities=[("BreakGlass", record.id)],
                    )
                    await self._rt.outbox.add(
                        session,
                        BREAK_GLASS_TOPIC,
                        json.dumps(
                            {
                                "break_glass_id": record.id,
                                "enterprise_id": person.enterprise_id,
                                "declared_by_organization_id": who.organization_id,
                                "practitioner_id": who.practitioner_id,
                                "starts": record.starts.isoformat(),
                                "expires": record.expires.isoformat(),
                                "notify_organization_ids": notify,
                            }
                        ).encode(),
                    )
                    answer = consent_pb2.DeclareBreakGlassResponse(
                        break_glass_id=record.id,
                        enterprise_id=person.enterprise_id,
                        starts=to_timestamp_or_none(record.starts),
                        expires=to_timestamp_or_none(record.expires),
                        audit_event_ids=[event_id],
                    )
                    if key:
                        await self._answers.keep(
                            session,
                            organization_id=who.organization_id,
                            key=key,
                            operation=_BREAK_GLASS_OPERATION,
                            request_fingerprint=request_fingerprint,
                            response=answer,
                        )
                BREAK_GLASS_DECLARATIONS.add(1, {"organization": who.organization_id})
                break
            except IntegrityError:
                # A concurrent first change of the patient, or a concurrent retry of this key
                # (answered from its first answer on the second attempt).
                if attempt:
                    raise
        self._rt.outbox.notify()
        return answer
