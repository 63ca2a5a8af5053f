"""Registry records and protobuf messages: document entries, submission sets, codings and
timestamps, both ways."""

from __future__ import annotations

from collections.abc import Iterable

from hie.common.v1 import common_pb2
from hie.registry.v1 import registry_pb2
from services.registry import document_types, domain, store
from services.shared.timestamps import to_timestamp_or_none

IMAGING = registry_pb2.CONTENT_KIND_IMAGING_STUDY
INLINE = registry_pb2.CONTENT_KIND_INLINE


def coding_of(record: store.EntryLike, name: str) -> registry_pb2.Coding | None:
    """One of the XDS metadata codings kept in three columns (None when not given)."""
    code = getattr(record, f"{name}_code", "")
    if not code:
        return None
    return registry_pb2.Coding(
        system=getattr(record, f"{name}_system"), code=code, display=getattr(record, f"{name}_display")
    )


def coding_columns(coding: registry_pb2.Coding, name: str) -> dict[str, str]:
    """A coding as its three columns (none when it has no code)."""
    if not coding.code:
        return {}
    return {
        f"{name}_system": coding.system[:128],
        f"{name}_code": coding.code[:64],
        f"{name}_display": domain.clean_text(coding.display, what=name.replace("_", "-"), limit=128),
    }


def submission_set_message(record: store.SubmissionSetRecord) -> registry_pb2.SubmissionSet:
    """A stored submission set as its message."""
    return registry_pb2.SubmissionSet(
        submission_set_id=record.id,
        source_id=record.source_id,
        source_organization_id=record.source_organization_id,
        patient=common_pb2.PatientRef(domain=record.patient_domain, local_id=record.patient_local_id),
        enterprise_id=record.enterprise_id,
        title=record.title,
        content_type=(
            registry_pb2.Coding(
                system=record.content_type_system,
                code=record.content_type_code,
                display=record.content_type_display,
            )
            if record.content_type_code
            else None
        ),
        submitted=to_timestamp_or_none(record.submitted),
        document_ids=record.document_ids.split(),
    )


def entry_message(
    record: store.EntryLike, related_by: Iterable[store.DocumentEntryRecord] = ()
) -> registry_pb2.DocumentEntry:
    """A stored entry (and the entries relating to it) as its message."""
    shared = document_types.BY_SHARED_CODE.get(record.shared_type)
    return registry_pb2.DocumentEntry(
        document_id=record.id,
        source_organization_id=record.source_organization_id,
        source_document_id=record.source_document_id,
        patient=common_pb2.PatientRef(domain=record.patient_domain, local_id=record.patient_local_id),
        enterprise_id=record.enterprise_id,
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
        security_labels=store.labels_of(record.security_labels),
        created=to_timestamp_or_none(record.created),
        title=record.title,
        language=record.language,
        mime_type=record.mime_type,
        size=record.size,
        sha256=record.sha256,
        status=record.status,  # type: ignore[arg-type]
        service_start=to_timestamp_or_none(record.service_start),
        service_end=to_timestamp_or_none(record.service_end),
        relations=(
            [registry_pb2.DocumentRelation(type=record.relation_type, target_document_id=record.related_document_id)]  # type: ignore[arg-type]
            if record.relation_type
            else []
        ),
        content_kind=record.content_kind,  # type: ignore[arg-type]
        imaging_study=(
            registry_pb2.ImagingStudyReference(
                study_instance_uid=record.study_instance_uid, wado_rs_url=record.wado_rs_url
            )
            if record.content_kind == IMAGING
            else None
        ),
        shared_type=(
            registry_pb2.Coding(system=document_types.SHARED_TYPE_SYSTEM, code=shared.code, display=shared.display)
            if shared
            else None
        ),
        format_code=coding_of(record, "format"),
        facility_type=coding_of(record, "facility_type"),
        practice_setting=coding_of(record, "practice_setting"),
        related_by=[
            registry_pb2.DocumentRelation(type=r.relation_type, target_document_id=r.id)  # type: ignore[arg-type]
            for r in related_by
        ],
    )
