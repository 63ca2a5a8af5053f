"""Document registration (JSON with base64 content, or the content itself streamed), the entry
life cycle, query and retrieval (streamed) (REST)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextvars
import datetime
import json
import logging
import re
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

import grpc
from fastapi import APIRouter, Header, Path, Query, Request, Response
from fastapi.responses import RedirectResponse, StreamingResponse
from google.protobuf.timestamp_pb2 import Timestamp
from pydantic import BaseModel, Field, ValidationError

from gateway.deps import CallContext, Context, IdempotencyKey
from gateway.errors import ApiError
from gateway.routes import rpc
from hie.common.v1 import common_pb2
from hie.registry.v1 import registry_pb2
from services.shared.timestamps import isoformat, to_timestamp

router = APIRouter(prefix="/api/v1/documents", tags=["documents"])
_log = logging.getLogger(__name__)
METADATA_HEADER = "x-hie-document-metadata"
_RELATIONS = {
    "replaces": registry_pb2.RELATION_TYPE_REPLACES,
    "appends": registry_pb2.RELATION_TYPE_APPENDS,
    "transforms": registry_pb2.RELATION_TYPE_TRANSFORMS,
}
_RELATION_NAMES = {v: k for k, v in _RELATIONS.items()}
_REPR_DIGEST = re.compile(r"(?:^|,)\s*sha-256=:([A-Za-z0-9+/=]{44}):")
_STATUS_NAMES = {
    registry_pb2.DOCUMENT_STATUS_CURRENT: "current",
    registry_pb2.DOCUMENT_STATUS_SUPERSEDED: "superseded",
    registry_pb2.DOCUMENT_STATUS_ENTERED_IN_ERROR: "entered-in-error",
}
_STATUSES = {v: k for k, v in _STATUS_NAMES.items()}
_STATUS_ITEMS = {"items": {"type": "string", "enum": sorted(_STATUSES)}}


class CodingIn(BaseModel):
    system: str = Field(default="", max_length=128)
    code: str = Field(max_length=64)
    display: str = Field(default="", max_length=128)


class TypeCodingIn(CodingIn):
    """The document's type: its code is required (the registry refuses an empty one with
    `type-code-missing`; stated here so the OpenAPI document says so)."""

    code: str = Field(max_length=64, json_schema_extra={"minLength": 1})


class AuthorIn(BaseModel):
    practitioner_id: str = Field(default="", max_length=64)
    practitioner_name: str = Field(default="", max_length=64)
    role: str = Field(default="", max_length=32)
    department: str = Field(default="", max_length=64)


class RelationIn(BaseModel):
    type: Literal["replaces", "appends", "transforms"]
    document_id: str = Field(min_length=1, max_length=64)


class ImagingStudyIn(BaseModel):
    study_instance_uid: str = Field(min_length=1, max_length=64)
    wado_rs_url: str = Field(min_length=1, max_length=512)


class DocumentMetadataIn(BaseModel):
    """The metadata of a document whose content is streamed as the request body."""

    patient_local_id: str = Field(min_length=1, max_length=64)
    type: TypeCodingIn
    class_: CodingIn | None = Field(default=None, alias="class")
    title: str = Field(min_length=1, max_length=256, json_schema_extra={"pattern": r"\S"})
    language: str = Field(default="zh-CN", max_length=16)
    confidentiality: str = Field(default="N", max_length=1)
    security_labels: list[str] = Field(default_factory=list, max_length=10)
    created: datetime.datetime | None = None
    author: AuthorIn = Field(default_factory=AuthorIn)
    service_start: datetime.datetime | None = None
    service_end: datetime.datetime | None = None
    relation: RelationIn | None = None
    imaging_study: ImagingStudyIn | None = None


class DocumentIn(DocumentMetadataIn):
    """Metadata and content of one document, in one atomic submission."""

    source_document_id: str = Field(min_length=1, max_length=128, description="The hospital's unique document id")
    mime_type: str = Field(default="", max_length=100)
    sha256: str = Field(default="", max_length=64, description="Lower-case hex SHA-256 of the content")
    # The registry keeps the size as int64: a larger number is refused here, not overflowed there.
    # The bound is JSON's largest exact integer (2^53 - 1, 8 PiB): a client writing the size as a
    # number like 9223372036854775807.0 (a float that rounds past int64) stays inside the schema.
    size: int = Field(default=0, ge=0, le=2**53 - 1)
    content_base64: str = Field(default="")


def _timestamp(value: datetime.datetime | None, name: str = "created") -> Timestamp | None:
    if value is None:
        return None
    if value.tzinfo is None:
        raise ApiError(400, f"{name}-invalid", f"{name} must carry a time zone")
    return to_timestamp(value.astimezone(datetime.UTC))


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
        "created": isoformat(entry.created) if entry.HasField("created") else None,
        "title": entry.title,
        "language": entry.language,
        "mime_type": entry.mime_type,
        "size": entry.size,
        "sha256": entry.sha256,
        "status": _STATUS_NAMES.get(entry.status, "unknown"),
        "service_start": isoformat(entry.service_start) if entry.HasField("service_start") else None,
        "service_end": isoformat(entry.service_end) if entry.HasField("service_end") else None,
        "shared_type": (
            {"system": entry.shared_type.system, "code": entry.shared_type.code, "display": entry.shared_type.display}
            if entry.HasField("shared_type")
            else None
        ),
        "relations": [
            {"type": _RELATION_NAMES.get(r.type, "unknown"), "document_id": r.target_document_id}
            for r in entry.relations
        ],
        "related_by": [
            {"type": _RELATION_NAMES.get(r.type, "unknown"), "document_id": r.target_document_id}
            for r in entry.related_by
        ],
        "imaging_study": (
            {
                "study_instance_uid": entry.imaging_study.study_instance_uid,
                "wado_rs_url": entry.imaging_study.wado_rs_url,
            }
            if entry.content_kind == registry_pb2.CONTENT_KIND_IMAGING_STUDY
            else None
        ),
    }


def entry_proto(
    body: DocumentMetadataIn, *, source_document_id: str, mime_type: str, sha256: str, size: int
) -> registry_pb2.DocumentEntry:
    """The registry entry a submission describes (patient domain and source organisation come from the token)."""
    return registry_pb2.DocumentEntry(
        source_document_id=source_document_id,
        patient=common_pb2.PatientRef(local_id=body.patient_local_id),
        author=registry_pb2.Author(**body.author.model_dump()),
        class_code=registry_pb2.Coding(**body.class_.model_dump()) if body.class_ else None,
        type_code=registry_pb2.Coding(**body.type.model_dump()),
        confidentiality=body.confidentiality,
        security_labels=body.security_labels,
        created=_timestamp(body.created),
        service_start=_timestamp(body.service_start, "service-start"),
        service_end=_timestamp(body.service_end, "service-end"),
        title=body.title,
        language=body.language,
        mime_type=mime_type,
        size=size,
        sha256=sha256,
        content_kind=registry_pb2.CONTENT_KIND_IMAGING_STUDY
        if body.imaging_study
        else registry_pb2.CONTENT_KIND_INLINE,
        imaging_study=registry_pb2.ImagingStudyReference(**body.imaging_study.model_dump())
        if body.imaging_study
        else None,
    )


def relation_proto(relation: RelationIn | None) -> registry_pb2.DocumentRelation | None:
    if relation is None:
        return None
    return registry_pb2.DocumentRelation(type=_RELATIONS[relation.type], target_document_id=relation.document_id)


def _registered(result: Any, response: Response) -> dict[str, Any]:
    if not result.created:
        response.status_code = 200
    return {**entry_json(result.entry), "created": result.created, "audit_event_ids": list(result.audit_event_ids)}


@router.post("", status_code=201)
async def register_document(
    body: DocumentIn, ctx: Context, request: Request, response: Response, key: IdempotencyKey
) -> dict[str, Any]:
    """Register a document; the content's SHA-256 and size must match the declared ones. An
    imaging study reference (`imaging_study`) carries no content."""
    ctx.require_scope("DocumentReference", "c")
    try:
        content = base64.b64decode(body.content_base64, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "content-invalid", "content_base64 is not valid base64") from None
    entry = entry_proto(
        body, source_document_id=body.source_document_id, mime_type=body.mime_type, sha256=body.sha256, size=body.size
    )
    result = await rpc(
        request.app.state.stubs.registry.RegisterDocument(
            registry_pb2.RegisterDocumentRequest(
                entry=entry,
                content=content,
                idempotency_key=key,
                relation=relation_proto(body.relation),
            ),
            metadata=ctx.metadata,
        )
    )
    return _registered(result, response)


def _declared_sha256(repr_digest: str) -> str:
    """RFC 9530 `Repr-Digest: sha-256=:<base64>:` as lower-case hex."""
    match = _REPR_DIGEST.search(repr_digest)
    if match is None:
        raise ApiError(400, "digest-missing", "Repr-Digest with a sha-256 value is required")
    try:
        return base64.b64decode(match.group(1), validate=True).hex()
    except (binascii.Error, ValueError):
        raise ApiError(400, "digest-invalid", "Repr-Digest sha-256 value is not base64") from None


def _metadata_header(value: str) -> DocumentMetadataIn:
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
        return DocumentMetadataIn.model_validate(json.loads(raw))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise ApiError(400, "metadata-invalid", "X-HIE-Document-Metadata must be base64url JSON") from None
    except ValidationError as exc:
        fields = sorted({".".join(str(p) for p in e.get("loc", ())) for e in exc.errors()})
        raise ApiError(400, "metadata-invalid", "invalid metadata fields: " + ", ".join(fields)) from None


@router.put("/source/{source_document_id}", status_code=201)
async def upload_document(
    ctx: Context,
    request: Request,
    response: Response,
    source_document_id: Annotated[str, Path(min_length=1, max_length=128)],
    metadata: Annotated[str, Header(alias=METADATA_HEADER, max_length=8192)],
    repr_digest: Annotated[str, Header(alias="repr-digest", max_length=512)],
    content_type: Annotated[str, Header(max_length=100)],
    key: IdempotencyKey,
) -> dict[str, Any]:
    """Register a document by the hospital's own id with the content itself as the request body,
    streamed through to the registry (up to 50 MB, never held whole). The metadata travels as
    base64url JSON in `X-HIE-Document-Metadata`, the content's SHA-256 in `Repr-Digest`
    (RFC 9530), its size in `Content-Length` when known; a PUT of the same id and content again
    answers 200 with the entry registered first."""
    ctx.require_scope("DocumentReference", "c")
    body = _metadata_header(metadata)
    declared_size = request.headers.get("content-length", "")
    header = registry_pb2.RegisterDocumentRequest(
        entry=entry_proto(
            body,
            source_document_id=source_document_id,
            mime_type=content_type,
            sha256=_declared_sha256(repr_digest),
            size=int(declared_size) if declared_size.isdigit() else 0,
        ),
        idempotency_key=key,
        relation=relation_proto(body.relation),
    )

    async def messages() -> AsyncIterator[registry_pb2.RegisterDocumentStreamRequest]:
        yield registry_pb2.RegisterDocumentStreamRequest(header=header)
        async for piece in request.stream():
            if piece:
                yield registry_pb2.RegisterDocumentStreamRequest(chunk=piece)

    result = await rpc(request.app.state.stubs.registry.RegisterDocumentStream(messages(), metadata=ctx.metadata))
    return _registered(result, response)


@router.get("/{document_id}")
async def get_document_entry(document_id: str, ctx: Context, request: Request) -> dict[str, Any]:
    """One entry's metadata, with the entries that replaced or amended it (consent-checked)."""
    ctx.require_scope("DocumentReference", "r")
    result = await rpc(
        request.app.state.stubs.registry.GetDocumentEntry(
            registry_pb2.GetDocumentEntryRequest(document_id=document_id[:64]), metadata=ctx.metadata
        )
    )
    return {**entry_json(result.entry), "audit_event_ids": list(result.audit_event_ids)}


@router.post("/{document_id}/entered-in-error")
async def mark_entered_in_error(
    document_id: str, ctx: Context, request: Request, key: IdempotencyKey
) -> dict[str, Any]:
    """Withdraw a document the caller's organisation registered by mistake."""
    ctx.require_scope("DocumentReference", "c")
    result = await rpc(
        request.app.state.stubs.registry.MarkEnteredInError(
            registry_pb2.MarkEnteredInErrorRequest(document_id=document_id[:64], idempotency_key=key),
            metadata=ctx.metadata,
        )
    )
    return {**entry_json(result.entry), "audit_event_ids": list(result.audit_event_ids)}


@router.get("")
async def find_documents(
    ctx: Context,
    request: Request,
    patient_local_id: str = Query(min_length=1, max_length=64),
    patient_domain: str = Query(default="", max_length=64),
    type: list[str] = Query(default=[], max_length=20),
    class_: list[str] = Query(default=[], alias="class", max_length=20),
    status: list[str] = Query(default=[], max_length=3, json_schema_extra=_STATUS_ITEMS),
    source_organization: list[str] = Query(default=[], max_length=20),
    service_from: datetime.datetime | None = None,
    service_to: datetime.datetime | None = None,
    page_size: int = Query(default=50, ge=1, le=200),
    page_token: str = Query(default="", max_length=128),
) -> dict[str, Any]:
    """Documents of a person across every hospital, filtered through consent, newest service
    time first; pages are full (denied documents do not leave holes)."""
    ctx.require_scope("DocumentReference", "r")
    unknown = [s for s in status if s not in _STATUSES]
    if unknown:
        raise ApiError(400, "status-invalid", "status must be current, superseded or entered-in-error")
    result = await rpc(
        request.app.state.stubs.registry.FindDocuments(
            registry_pb2.FindDocumentsRequest(
                patient=common_pb2.PatientRef(domain=patient_domain, local_id=patient_local_id),
                type_codes=type,
                class_codes=class_,
                statuses=[_STATUSES[s] for s in status],
                source_organization_ids=source_organization,
                service_from=_timestamp(service_from, "service-from"),
                service_to=_timestamp(service_to, "service-to"),
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


class ContentStreamBroken(Exception):
    """The registry ended a content stream with an error after the response had started."""


async def open_content(
    request: Request, ctx: CallContext, document_id: str
) -> tuple[registry_pb2.RetrieveDocumentStreamResponse, AsyncIterator[bytes]]:
    """The first message of a streamed retrieval (the entry: errors known before any content is
    sent become HTTP errors) and the content chunks after it.

    A corruption found in the last chunk ends the chunks with an error: the HTTP response then
    stops short of its Content-Length and the connection is closed, so the receiver never takes
    the content as complete (and it can check Repr-Digest)."""
    call = request.app.state.stubs.registry.RetrieveDocumentStream(
        registry_pb2.RetrieveDocumentStreamRequest(document_id=document_id[:64]), metadata=ctx.metadata
    )
    responses = aiter(call)
    first = await rpc(anext(responses, None))
    if first is None:
        raise ApiError(500, "internal", "the exchange could not complete this")
    # The rest of the stream is read by its own task, two chunks ahead at most, in an empty
    # context: reads of a gRPC stream that outlives the route handler register event-loop
    # callbacks in the reading context, and from the request's context the request's trace then
    # leaks into the connection and later requests on it join this trace.
    queue: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue(maxsize=2)

    async def read() -> None:
        try:
            async for message in responses:
                await queue.put(message.chunk)
            await queue.put(None)
        except grpc.aio.AioRpcError as exc:
            _log.error("document content stream ended with %s", exc.code().name)
            await queue.put(ContentStreamBroken(exc.code().name))

    reader = asyncio.create_task(read(), name="document-content-reader", context=contextvars.Context())

    async def chunks() -> AsyncIterator[bytes]:
        try:
            while (item := await queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if not reader.done():
                reader.cancel()
                call.cancel()

    return first, chunks()


def repr_digest(sha256_hex: str) -> str:
    return f"sha-256=:{base64.b64encode(bytes.fromhex(sha256_hex)).decode()}:"


@router.get("/{document_id}/content", response_model=None)
async def retrieve_content(document_id: str, ctx: Context, request: Request) -> Response:
    """The document's content, streamed, checked against its registered SHA-256 as it is read.
    An imaging study reference answers 303 See Other to the study's WADO-RS URL at the source PACS."""
    ctx.require_scope("DocumentReference", "r")
    first, chunks = await open_content(request, ctx, document_id)
    entry = first.entry
    headers = {
        "X-HIE-Document-Id": entry.document_id,
        "X-HIE-Audit-Event-Id": ",".join(first.audit_event_ids),
    }
    if entry.content_kind == registry_pb2.CONTENT_KIND_IMAGING_STUDY:
        return RedirectResponse(entry.imaging_study.wado_rs_url, status_code=303, headers=headers)
    return StreamingResponse(
        chunks,
        media_type=entry.mime_type,
        headers={
            **headers,
            "Content-Length": str(entry.size),
            # RFC 9530 representation digest, so the receiver can check what it got.
            "Repr-Digest": repr_digest(entry.sha256),
        },
    )
