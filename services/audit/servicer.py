"""AuditLog gRPC servicer: appends to the chain, answers queries, verifies."""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import uuid

from hie.audit.v1 import audit_pb2, audit_pb2_grpc
from hie.common.v1 import common_pb2
from services.audit import chain, store
from services.shared import mpi_client
from services.shared.auth import Caller, caller
from services.shared.db import utcnow
from services.shared.errors import InvalidArgument, NotFound, PermissionDenied
from services.shared.process import ServiceRuntime
from services.shared.protection.sm2 import Sm2VerifyingKey, load_or_create_signing_key
from services.shared.timestamps import to_datetime, to_timestamp
from services.shared.tracing import current_trace_ids

_log = logging.getLogger(__name__)
_MAX_BATCH = 1000
# The head is signed every CHECKPOINT_EVERY records, and at least every CHECKPOINT_SECONDS
# while records arrive, so records removed from the end of the chain are detected.
CHECKPOINT_EVERY = 1000
CHECKPOINT_SECONDS = 60.0
CHECKPOINT_TYPE = "hie-audit-checkpoint+jwt"
_MAX_PAGE = 500


def _fields(event: audit_pb2.AuditEvent, recorded: datetime.datetime) -> dict[str, object]:
    if not event.event_id or len(event.event_id) > 36 or not event.type:
        raise InvalidArgument("audit event needs an event id and a type", reason="audit-event-invalid")
    actor = event.actor
    return {
        "event_id": event.event_id,
        "occurred": to_datetime(event.occurred) if event.HasField("occurred") else recorded,
        "recorded": recorded,
        "type": event.type[:64],
        "action": int(event.action),
        "outcome": int(event.outcome),
        "organization_id": actor.organization_id[:64],
        "organization_type": actor.organization_type[:16],
        "client_id": actor.client_id[:128],
        "practitioner_id": actor.practitioner_id[:64],
        "practitioner_name": actor.practitioner_name[:64],
        "role": actor.role[:32],
        "department": actor.department[:64],
        "purpose_of_use": actor.purpose_of_use[:32],
        "patient_enterprise_id": event.patient_enterprise_id[:36],
        "entities": store.entities_json([(e.type, e.id) for e in event.entities]),
        "source_address": event.source_address[:64],
        "trace_id": event.trace_id[:32],
        "span_id": event.span_id[:16],
        "source_service": event.source_service[:32],
    }


def event_message(record: store.AuditRecord) -> audit_pb2.AuditEvent:
    return audit_pb2.AuditEvent(
        event_id=record.event_id,
        occurred=to_timestamp(record.occurred),
        type=record.type,
        action=record.action,  # type: ignore[arg-type]
        outcome=record.outcome,  # type: ignore[arg-type]
        actor=common_pb2.CallerContext(
            organization_id=record.organization_id,
            organization_type=record.organization_type,
            client_id=record.client_id,
            practitioner_id=record.practitioner_id,
            practitioner_name=record.practitioner_name,
            role=record.role,
            department=record.department,
            purpose_of_use=record.purpose_of_use,
        ),
        patient_enterprise_id=record.patient_enterprise_id,
        entities=[audit_pb2.EntityRef(type=e["type"], id=e["id"]) for e in json.loads(record.entities)],
        source_address=record.source_address,
        trace_id=record.trace_id,
        span_id=record.span_id,
        source_service=record.source_service,
        sequence=record.sequence,
        previous_hash=record.previous_hash,
        hash=record.hash,
        recorded=to_timestamp(record.recorded),
    )


def _sm2_valid(key: Sm2VerifyingKey, jws: str, signature_hex: str | None) -> bool:
    try:
        return bool(signature_hex) and key.verify(jws.encode("ascii"), bytes.fromhex(signature_hex or ""))
    except ValueError:
        return False


class AuditLogServicer(audit_pb2_grpc.AuditLogServicer):
    def __init__(self, runtime: ServiceRuntime) -> None:
        self._rt = runtime
        # One chain: appends in this process are serialised; PostgreSQL also takes an advisory lock.
        self._append_lock = asyncio.Lock()
        # Under the national-algorithms option checkpoints are co-signed with SM2 (密评: SM2 for
        # signatures); the ES384 JWS stays, so existing verifiers and held checkpoints keep working.
        settings = runtime.settings
        self._sm2 = load_or_create_signing_key(settings.sm2_signing_key_file) if settings.crypto_suite == "sm" else None
        runtime.background(self._checkpoint_periodically(), name="audit-checkpoints")

    async def Append(self, request: audit_pb2.AppendRequest, context: object) -> audit_pb2.AppendResponse:
        who = caller()
        if not who.is_platform:
            raise PermissionDenied("only exchange services append audit events", reason="platform-only")
        if len(request.events) > _MAX_BATCH:
            raise InvalidArgument(f"at most {_MAX_BATCH} events per append", reason="batch-too-large")
        recorded = utcnow()
        return audit_pb2.AppendResponse(appended=await self._append([_fields(e, recorded) for e in request.events]))

    async def _append(self, fields: list[dict[str, object]]) -> int:
        """Append to the chain, skipping event ids already stored; returns how many were new.
        Every CHECKPOINT_EVERY records the new head is signed in the same transaction."""
        appended = 0
        async with self._append_lock, self._rt.sessions() as session, session.begin():
            await store.lock_chain(session)
            seen = await store.existing_event_ids(session, [str(f["event_id"]) for f in fields])
            head = await store.chain_head(session)
            for item in fields:
                if item["event_id"] in seen:
                    continue
                seen.add(str(item["event_id"]))
                record = await store.append(session, item, head)
                head = (record.sequence, record.hash)
                appended += 1
            if appended:
                latest = await store.latest_checkpoint(session)
                if head[0] - (latest.sequence if latest else 0) >= CHECKPOINT_EVERY:
                    session.add(self._checkpoint(head))
        return appended

    def _checkpoint(self, head: tuple[int, str]) -> store.Checkpoint:
        signed_at = utcnow()
        jws = self._rt.credentials.sign_statement(
            {"sequence": head[0], "hash": head[1], "signed_at": signed_at.isoformat()}, typ=CHECKPOINT_TYPE
        )
        sm2 = self._sm2.sign(jws.encode("ascii")).hex() if self._sm2 else None
        return store.Checkpoint(sequence=head[0], hash=head[1], signed_at=signed_at, jws=jws, sm2_signature=sm2)

    async def checkpoint_now(self) -> None:
        """Sign the head if records arrived since the last checkpoint (called periodically)."""
        async with self._append_lock, self._rt.sessions() as session, session.begin():
            await store.lock_chain(session)
            head = await store.chain_head(session)
            latest = await store.latest_checkpoint(session)
            if head[0] > (latest.sequence if latest else 0):
                session.add(self._checkpoint(head))

    async def _checkpoint_periodically(self) -> None:
        while True:
            await asyncio.sleep(CHECKPOINT_SECONDS)
            try:
                await self.checkpoint_now()
            except Exception as exc:  # the loop must outlive one failed pass
                _log.warning("audit checkpoint failed: %s", type(exc).__name__)

    async def _patient_enterprise_id(self, who: Caller, ref: common_pb2.PatientRef) -> str:
        """The person a patient access report is about; a hospital may ask only about its own patients."""
        if who.organization_type == "hospital" or not ref.domain:
            ref = common_pb2.PatientRef(domain=who.organization_id, local_id=ref.local_id)
        return (await mpi_client.cross_reference(self._rt, ref)).enterprise_id

    def _require_auditor(self, who: Caller) -> bool:
        """Checks the caller may read the log; True when it reads the whole region's."""
        who.require_scope("AuditEvent", "r")
        # The platform operator's admins see the log as the authority does.
        regional = who.organization_type in {"authority", "platform-admin", "platform"}
        if not regional and who.organization_type != "hospital":
            raise PermissionDenied("not permitted to read the audit log", reason="audit-scope")
        if who.organization_type == "authority":
            who.require_role("auditor")
        else:
            who.require_role("auditor", "admin")
        return regional

    async def _search(self, who: Caller, request: audit_pb2.QueryRequest) -> store.AuditSearch:
        regional = self._require_auditor(who)
        organization_id = request.organization_id
        patient_enterprise_id = request.patient_enterprise_id
        if request.patient.local_id:
            # A patient access report: every access to the person's records, by anyone.
            patient_enterprise_id = await self._patient_enterprise_id(who, request.patient)
        elif not regional:
            # Otherwise a hospital reads only the records of its own requests.
            if organization_id and organization_id != who.organization_id:
                raise PermissionDenied("hospitals read only their own audit records", reason="audit-scope")
            if patient_enterprise_id:
                raise PermissionDenied("name the patient by your own local id", reason="audit-scope")
            organization_id = who.organization_id
        return store.AuditSearch(
            trace_id=request.trace_id,
            organization_id=organization_id,
            patient_enterprise_id=patient_enterprise_id,
            type=request.type,
            practitioner_id=request.practitioner_id,
            purpose_of_use=request.purpose_of_use,
            outcome=int(request.outcome),
            failures_only=request.failures_only,
            since=to_datetime(request.since) if request.HasField("since") else None,
            until=to_datetime(request.until) if request.HasField("until") else None,
        )

    async def Query(self, request: audit_pb2.QueryRequest, context: object) -> audit_pb2.QueryResponse:
        who = caller()
        search = await self._search(who, request)
        size = min(request.page.page_size or 100, _MAX_PAGE)
        try:
            after = int(request.page.page_token or 0)
        except ValueError:
            raise InvalidArgument("bad page token", reason="page-token") from None
        if not 0 <= after < 2**63:
            # A sequence is a signed 64-bit integer in the database: anything else is no position.
            raise InvalidArgument("bad page token", reason="page-token")
        async with self._rt.sessions() as session:
            rows = await store.query(session, search, after_sequence=after, limit=size + 1)
        more = len(rows) > size
        rows = rows[:size]
        if not who.is_platform:
            # Auditors' own searches are part of the record.
            await self._append([self._own_event(who, "audit.query", search.patient_enterprise_id)])
        return audit_pb2.QueryResponse(
            events=[event_message(r) for r in rows],
            page=common_pb2.PageResponse(next_page_token=str(rows[-1].sequence) if more and rows else ""),
        )

    async def Report(self, request: audit_pb2.ReportRequest, context: object) -> audit_pb2.ReportResponse:
        who = caller()
        regional = self._require_auditor(who)
        organization_id = request.organization_id if regional else who.organization_id
        search = store.AuditSearch(
            organization_id=organization_id,
            since=to_datetime(request.since) if request.HasField("since") else None,
            until=to_datetime(request.until) if request.HasField("until") else None,
        )
        async with self._rt.sessions() as session:
            rows = await store.volumes(session, search)
        if not who.is_platform:
            await self._append([self._own_event(who, "audit.report")])
        return audit_pb2.ReportResponse(
            rows=[
                audit_pb2.VolumeRow(day=day, organization_id=org, type=type, outcome=outcome, count=count)  # type: ignore[arg-type]
                for day, org, type, outcome, count in rows
            ]
        )

    async def LatestCheckpoint(
        self, request: audit_pb2.LatestCheckpointRequest, context: object
    ) -> audit_pb2.LatestCheckpointResponse:
        if not self._require_auditor(caller()):
            # The head's sequence reveals the whole region's volume: the authority's to see.
            raise PermissionDenied("checkpoints are for the regional authority", reason="audit-scope")
        await self.checkpoint_now()
        async with self._rt.sessions() as session:
            latest = await store.latest_checkpoint(session)
        if latest is None:
            raise NotFound("the audit log is empty", reason="no-checkpoint")
        return audit_pb2.LatestCheckpointResponse(
            sequence=latest.sequence,
            hash=latest.hash,
            signed_at=to_timestamp(latest.signed_at),
            jws=latest.jws,
            sm2_signature=latest.sm2_signature or "",
            sm2_public_key=self._sm2.public.hex() if self._sm2 else "",
        )

    def _own_event(self, who: Caller, type: str, patient_enterprise_id: str = "") -> dict[str, object]:
        trace_id, span_id = current_trace_ids()
        now = utcnow()
        event = audit_pb2.AuditEvent(
            event_id=str(uuid.uuid4()),
            type=type,
            action=audit_pb2.ACTION_EXECUTE,
            outcome=audit_pb2.OUTCOME_SUCCESS,
            actor=who.to_proto(),
            patient_enterprise_id=patient_enterprise_id,
            source_address=who.client_address,
            trace_id=trace_id,
            span_id=span_id,
            source_service="audit",
        )
        return _fields(event, now)

    def _anchor(self, jws: str) -> tuple[int, str]:
        """(sequence, hash) of a checkpoint whose platform signature verifies."""
        assert self._rt.verifier is not None
        try:
            claims = self._rt.verifier.verify_platform_statement(jws)
            return int(claims["sequence"]), str(claims["hash"])
        except (ValueError, KeyError, TypeError):
            raise InvalidArgument("the checkpoint's signature does not verify", reason="checkpoint-invalid") from None

    async def VerifyChain(
        self, request: audit_pb2.VerifyChainRequest, context: object
    ) -> audit_pb2.VerifyChainResponse:
        who = caller()
        if who.organization_type not in {"authority", "platform"}:
            raise PermissionDenied("only the authority verifies the audit chain", reason="audit-scope")
        anchors: dict[int, str] = {}
        held = self._anchor(request.expected_checkpoint) if request.expected_checkpoint else None
        sm2_seen = False
        async with self._rt.sessions() as session:
            for checkpoint in await store.all_checkpoints(session):
                sequence, hash = self._anchor(checkpoint.jws)
                if (sequence, hash) != (checkpoint.sequence, checkpoint.hash):
                    return _broken(0, checkpoint.sequence, "a stored checkpoint was altered")
                if self._sm2 is not None and (checkpoint.sm2_signature or sm2_seen):
                    # Once checkpoints are SM2-signed, every later one must be: a missing
                    # co-signature is a downgrade, not an older checkpoint.
                    sm2_seen = True
                    if not _sm2_valid(self._sm2.public, checkpoint.jws, checkpoint.sm2_signature):
                        return _broken(0, checkpoint.sequence, "a stored checkpoint's SM2 signature does not verify")
                anchors[sequence] = hash
        if held is not None and anchors.setdefault(held[0], held[1]) != held[1]:
            return _broken(0, held[0], "the chain disagrees with the checkpoint you hold")
        ranged = request.HasField("since") or request.HasField("until")
        last = None
        if ranged:
            async with self._rt.sessions() as session:
                bounds = await store.sequence_range(
                    session,
                    to_datetime(request.since) if request.HasField("since") else None,
                    to_datetime(request.until) if request.HasField("until") else None,
                )
            if bounds is None:
                return audit_pb2.VerifyChainResponse(intact=True, records_checked=0)
            first, last, previous = bounds
            walk = chain.ChainWalk(first_sequence=first, previous_hash=previous)
            anchors = {s: h for s, h in anchors.items() if first <= s <= last}
        else:
            first, walk = 1, chain.ChainWalk()
        async with self._rt.sessions() as session:
            async for record in store.all_records(session, after_sequence=first - 1):
                if last is not None and record["sequence"] > last:
                    break
                if not walk.step(record):
                    break
                anchored = anchors.get(record["sequence"])
                if anchored is not None and anchored != record["hash"]:
                    return _broken(walk.checked, record["sequence"], "record differs from its signed checkpoint")
        verdict = walk.verdict()
        if not ranged and verdict.intact and anchors and max(anchors) > verdict.records_checked:
            return _broken(
                verdict.records_checked,
                verdict.records_checked + 1,
                f"records removed from the end: a checkpoint signed sequence {max(anchors)}",
            )
        return audit_pb2.VerifyChainResponse(
            intact=verdict.intact,
            records_checked=verdict.records_checked,
            first_break_sequence=verdict.first_break_sequence,
            detail=verdict.detail,
        )


def _broken(checked: int, sequence: int, detail: str) -> audit_pb2.VerifyChainResponse:
    return audit_pb2.VerifyChainResponse(
        intact=False, records_checked=checked, first_break_sequence=sequence, detail=detail
    )
