"""Submission checks: a register request's header checked and turned into the entry to store,
and an earlier registration of the same submission recognised as its retry."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from hie.registry.v1 import registry_pb2
from services.registry import document_types, domain, store
from services.registry.messages import IMAGING, INLINE, coding_columns
from services.shared.auth import Caller
from services.shared.db import utcnow
from services.shared.errors import AlreadyExists, InvalidArgument, NotFound
from services.shared.timestamps import to_datetime_or_none

CURRENT = registry_pb2.DOCUMENT_STATUS_CURRENT


@dataclass(frozen=True)
class Submission:
    """A register request's header, checked, before any content is read."""

    who: Caller
    header: registry_pb2.RegisterDocumentRequest
    source_document_id: str
    record: store.DocumentEntryRecord
    declared_sha256: str
    declared_size: int
    relation: int
    target_id: str


def as_retry(existing: store.DocumentEntryRecord, sub: Submission) -> store.DocumentEntryRecord:
    """An earlier registration of this submission, answered as its retry; the same source id with
    other content is refused."""
    if existing.sha256 != sub.record.sha256 or existing.study_instance_uid != sub.record.study_instance_uid:
        raise AlreadyExists("that source document id is registered with different content", reason="document-id-reused")
    return existing


def check_submission(who: Caller, header: registry_pb2.RegisterDocumentRequest) -> Submission:
    """A register request's header checked and turned into the entry to store (its content not
    yet read); InvalidArgument / NotFound name the field, never its value."""
    entry = header.entry
    # An exchange service files a document on behalf of a member organisation (the
    # teleconsult service files a signed consultation report, authored by the consulting
    # organisation, into the patient's record at the requesting hospital): it names both.
    # A member organisation always files as itself, about a patient of its own domain.
    on_behalf = who.is_platform and bool(entry.source_organization_id)
    source_organization_id = entry.source_organization_id[:64] if on_behalf else who.organization_id
    patient_domain = (entry.patient.domain[:64] or source_organization_id) if on_behalf else who.organization_id
    source_document_id = domain.check_source_document_id(entry.source_document_id)
    if not entry.type_code.code:
        raise InvalidArgument("a document type code is required", reason="type-code-missing")
    title = domain.clean_text(entry.title, what="title", limit=256, required=True)
    confidentiality = domain.check_confidentiality(entry.confidentiality)
    type_system, type_code = entry.type_code.system[:128], entry.type_code.code[:64]
    type_display = domain.clean_text(entry.type_code.display, what="type", limit=128)
    class_system, class_code = entry.class_code.system[:128], entry.class_code.code[:64]
    class_display = domain.clean_text(entry.class_code.display, what="class", limit=128)
    shared = document_types.shared_type_of(type_system, type_code)
    if shared is None and type_system == document_types.SHARED_TYPE_SYSTEM:
        raise InvalidArgument("unknown shared document type", reason="type-code-unknown")
    if shared is not None:
        # Recorded under LOINC where LOINC has the type, the shared type alongside.
        if shared.loinc:
            type_system, type_code = document_types.LOINC, shared.loinc
        else:
            type_system, type_code = document_types.SHARED_TYPE_SYSTEM, shared.code
        type_display = type_display or shared.display
        if not class_code:
            class_system, class_code = document_types.CLASS_SYSTEM, shared.class_code
            class_display = document_types.CLASS_DISPLAY[shared.class_code]
    imaging = entry.content_kind == IMAGING or entry.HasField("imaging_study")
    study_uid = wado_url = ""
    if imaging:
        study_uid, wado_url = domain.check_imaging_study(
            entry.imaging_study.study_instance_uid, entry.imaging_study.wado_rs_url
        )
        if header.content:
            raise InvalidArgument("an imaging study reference carries no content", reason="content-not-allowed")
        mime_type = domain.check_mime_type(entry.mime_type or "application/dicom")
        declared_sha256 = ""
    else:
        mime_type = domain.check_mime_type(entry.mime_type)
        declared_sha256 = domain.check_declaration(entry.sha256)
    if entry.size < 0 or entry.size > domain.MAX_CONTENT_BYTES:
        raise InvalidArgument("declared size out of range", reason="size-mismatch")
    relation = int(header.relation.type)
    target_id = ""
    if relation:
        try:
            target_id = str(uuid.UUID(header.relation.target_document_id))
        except ValueError:
            raise NotFound("no such document", reason="document-not-found") from None
    created = to_datetime_or_none(entry.created, entry.HasField("created")) or utcnow()
    service_start = to_datetime_or_none(entry.service_start, entry.HasField("service_start"))
    service_end = to_datetime_or_none(entry.service_end, entry.HasField("service_end"))
    if service_start and service_end and service_end < service_start:
        raise InvalidArgument("service period ends before it starts", reason="service-period-invalid")
    idempotency_key = header.idempotency_key.strip()[:128]
    record = store.DocumentEntryRecord(
        id=str(uuid.uuid4()),
        source_document_id=source_document_id,
        source_organization_id=source_organization_id,
        patient_domain=patient_domain,
        patient_local_id=entry.patient.local_id,
        enterprise_id="",
        author_id=entry.author.practitioner_id[:64] or who.practitioner_id,
        author_name=domain.clean_text(entry.author.practitioner_name or who.practitioner_name, what="author", limit=64),
        author_role=entry.author.role[:32] or who.role,
        author_department=domain.clean_text(entry.author.department or who.department, what="department", limit=64),
        class_system=class_system,
        class_code=class_code,
        class_display=class_display,
        type_system=type_system,
        type_code=type_code,
        type_display=type_display,
        confidentiality=confidentiality,
        security_labels=" ".join(sorted({label[:16] for label in entry.security_labels})),
        title=title,
        language=entry.language[:16] or "zh-CN",
        mime_type=mime_type,
        size=0 if imaging else entry.size,
        sha256=declared_sha256,
        status=CURRENT,
        created=created,
        service_start=service_start,
        service_end=service_end,
        service_time=service_start or created,
        registered_at=utcnow(),
        idempotency_key=idempotency_key,
        shared_type=shared.code if shared else "",
        relation_type=relation,
        related_document_id=target_id,
        content_kind=IMAGING if imaging else INLINE,
        study_instance_uid=study_uid,
        wado_rs_url=wado_url,
        **coding_columns(entry.format_code, "format"),
        **coding_columns(entry.facility_type, "facility_type"),
        **coding_columns(entry.practice_setting, "practice_setting"),
    )
    return Submission(
        who=who,
        header=header,
        source_document_id=source_document_id,
        record=record,
        declared_sha256=declared_sha256,
        declared_size=entry.size,
        relation=relation,
        target_id=target_id,
    )
