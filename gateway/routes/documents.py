"""Document registration, query and retrieval (REST)."""

from __future__ import annotations

import base64
import binascii
import datetime
from typing import Any

from fastapi import APIRouter, Query, Request, Response
from google.protobuf.timestamp_pb2 import Timestamp
from pydantic import BaseModel, Field

from gateway.deps import Context
from gateway.errors import ApiError
from gateway.routes import rpc
from hie.common.v1 import common_pb2
from hie.registry.v1 import registry_pb2

router = APIRouter(prefix="/api/v1/documents", tags=["documents"])
_STATUS_NAMES = {
    registry_pb2.DOCUMENT_STATUS_CURRENT: "current",
    registry_pb2.DOCUMENT_STATUS_SUPERSEDED: "superseded",
    registry_pb2.DOCUMENT_STATUS_ENTERED_IN_ERROR: "entered-in-error",
}
_STATUSES = {v: k for k, v in _STATUS_NAMES.items()}


class CodingIn(BaseModel):
    system: str = Field(default="", max_length=128)
    code: str = Field(max_length=64)
    display: str = Field(default="", max_length=128)


class AuthorIn(BaseModel):
    practitioner_id: str = Field(default="", max_length=64)
    practitioner_name: str = Field(default="", max_length=64)
    role: str = Field(default="", max_length=32)
    department: str = Field(default="", max_length=64)


class DocumentIn(BaseModel):
    """Metadata and content of one document, in one atomic submission."""

    source_document_id: str = Field(min_length=1, max_length=128, description="The hospital's unique document id")
    patient_local_id: str = Field(min_length=1, max_length=64)
    type: CodingIn
    class_: CodingIn | None = Field(default=None, alias="class")
    title: str = Field(min_length=1, max_length=256)
    mime_type: str = Field(max_length=100)
    language: str = Field(default="zh-CN", max_length=16)
    confidentiality: str = Field(default="N", max_length=1)
    security_labels: list[str] = Field(default_factory=list, max_length=10)
    created: datetime.datetime | None = None
    author: AuthorIn = Field(default_factory=AuthorIn)
    sha256: str = Field(min_length=64, max_length=64, description="Lower-case hex SHA-256 of the content")
    size: int = Field(ge=1)
    content_base64: str = Field(min_length=1)


def _timestamp(value: datetime.datetime | None) -> Timestamp | None:
    if value is None:
        return None
    if value.tzinfo is None:
        raise ApiError(400, "created-invalid", "created must carry a time zone")
    ts = Timestamp()
    ts.FromDatetime(value.astimezone(datetime.UTC))
    return ts


def entry_json(entry: registry_pb2.DocumentEntry) -> dict[str, Any]:
    return {
        "document_id": entry.document_id,
        "source_document_id": entry.source_document_id,
        "patient": {"domain": entry.patient.domain, "local_id": entry.patient.local_id},
        "enterprise_id": entry.enterprise_id,
        "source_organization_id": entry.source_organization_id,
        "author": {
            "practitioner_id": entry.author.practitioner_id,
            "practitioner_name": entry.author.practitioner_name,
            "role": entry.author.role,
            "department": entry.author.department,
        },
        "class": {
            "system": entry.class_code.system,
            "code": entry.class_code.code,
            "display": entry.class_code.display,
        },
        "type": {
            "system": entry.type_code.system,
            "code": entry.type_code.code,
            "display": entry.type_code.display,
        },
        "confidentiality": entry.confidentiality,
        "security_labels": list(entry.security_labels),
        "created": entry.created.ToDatetime(tzinfo=datetime.UTC).isoformat() if entry.HasField("created") else None,
        "title": entry.title,
        "language": entry.language,
        "mime_type": entry.mime_type,
        "size": entry.size,
        "sha256": entry.sha256,
        "status": _STATUS_NAMES.get(entry.status, "unknown"),
    }


@router.post("", status_code=201)
async def register_document(body: DocumentIn, ctx: Context, request: Request, response: Response) -> dict[str, Any]:
    """Register a document; the content's SHA-256 and size must match the declared ones."""
    ctx.require_scope("DocumentReference", "c")
    try:
        content = base64.b64decode(body.content_base64, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "content-invalid", "content_base64 is not valid base64") from None
    entry = registry_pb2.DocumentEntry(
        source_document_id=body.source_document_id,
        patient=common_pb2.PatientRef(local_id=body.patient_local_id),
        author=registry_pb2.Author(**body.author.model_dump()),
        class_code=registry_pb2.Coding(**body.class_.model_dump()) if body.class_ else None,
        type_code=registry_pb2.Coding(**body.type.model_dump()),
        confidentiality=body.confidentiality,
        security_labels=body.security_labels,
        created=_timestamp(body.created),
        title=body.title,
        language=body.language,
        mime_type=body.mime_type,
        size=body.size,
        sha256=body.sha256,
    )
    result = await rpc(
        request.app.state.stubs.registry.RegisterDocument(
            registry_pb2.RegisterDocumentRequest(
                entry=entry, content=content, idempotency_key=request.headers.get("idempotency-key", "")[:128]
            ),
            metadata=ctx.metadata,
        )
    )
    if not result.created:
        response.status_code = 200
    return {
        **entry_json(result.entry),
        "created": result.created,
        "audit_event_ids": list(result.audit_event_ids),
    }


@router.get("")
async def find_documents(
    ctx: Context,
    request: Request,
    patient_local_id: str = Query(min_length=1, max_length=64),
    patient_domain: str = Query(default="", max_length=64),
    type: list[str] = Query(default=[], max_length=20),
    status: list[str] = Query(default=[], max_length=3),
    page_size: int = Query(default=50, ge=1, le=200),
    page_token: str = Query(default="", max_length=32),
) -> dict[str, Any]:
    """Documents of a person across every hospital, filtered through consent."""
    ctx.require_scope("DocumentReference", "r")
    unknown = [s for s in status if s not in _STATUSES]
    if unknown:
        raise ApiError(400, "status-invalid", "status must be current, superseded or entered-in-error")
    result = await rpc(
        request.app.state.stubs.registry.FindDocuments(
            registry_pb2.FindDocumentsRequest(
                patient=common_pb2.PatientRef(domain=patient_domain, local_id=patient_local_id),
                type_codes=type,
                statuses=[_STATUSES[s] for s in status],
                page=common_pb2.PageRequest(page_size=page_size, page_token=page_token),
            ),
            metadata=ctx.metadata,
        )
    )
    return {
        "enterprise_id": result.enterprise_id,
        "entries": [entry_json(e) for e in result.entries],
        "next_page_token": result.page.next_page_token,
        "audit_event_ids": list(result.audit_event_ids),
    }


@router.get("/{document_id}/content")
async def retrieve_content(document_id: str, ctx: Context, request: Request) -> Response:
    """The document's content, checked against its registered SHA-256 before it is served."""
    ctx.require_scope("DocumentReference", "r")
    result = await rpc(
        request.app.state.stubs.registry.RetrieveDocument(
            registry_pb2.RetrieveDocumentRequest(document_id=document_id[:64]), metadata=ctx.metadata
        )
    )
    digest = base64.b64encode(bytes.fromhex(result.entry.sha256)).decode()
    return Response(
        content=result.content,
        media_type=result.entry.mime_type,
        headers={
            # RFC 9530 representation digest, so the receiver can check what it got.
            "Repr-Digest": f"sha-256=:{digest}:",
            "X-HIE-Document-Id": result.entry.document_id,
            "X-HIE-Audit-Event-Id": ",".join(result.audit_event_ids),
        },
    )
