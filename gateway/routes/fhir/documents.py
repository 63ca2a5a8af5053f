"""The FHIR R4 document facade (IHE MHD): DocumentReference search and read, Binary read, and
the ITI-65 Provide Document Bundle transaction.

Mapping of a registry entry to a DocumentReference:

- `id` the registry's entry id; `masterIdentifier` the source hospital's own document id
  (`urn:hie:document:<organisation>`); `identifier` the entry id as `urn:uuid:`.
- `status` current / superseded / entered-in-error; `docStatus` final.
- `type`: the LOINC (or shared-type) coding and the national shared-document type
  (`urn:hie:shared-document-type`); `category`: the class (`urn:hie:document-class` by default).
- `subject`: the person's enterprise id (`urn:hie:enterprise-id`); the patient's local ids stay in
  their hospitals' domains.
- `date`: creation time; `context.period`: the service period; `author`: the practitioner
  (`urn:hie:practitioner:<organisation>`, department as extension) and the organisation;
  `custodian`: the source organisation.
- `securityLabel`: the v3 Confidentiality code and the v3 ActCode sensitivity labels.
- `relatesTo`: replaces / appends / transforms.
- `content.attachment`: MIME type, language, size, title, creation and the URL of its Binary;
  the SHA-256 in the extension `urn:hie:sha256` (R4 `attachment.hash` is SHA-1, which the
  registry does not keep). An imaging study reference has the WADO-RS URL as attachment URL
  (`application/dicom`) and the study in `context.related` (`urn:dicom:uid`).
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import json
import re
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from google.protobuf.timestamp_pb2 import Timestamp

from gateway.deps import Context, IdempotencyKey
from gateway.errors import ApiError
from gateway.routes import rpc
from gateway.routes.documents import open_content, repr_digest
from gateway.routes.fhir.models import validate_resource
from gateway.routes.fhir.negotiation import FHIR_JSON
from gateway.routes.fhir.patient.resource import (
    own_local_id_of_identifier,
    own_local_id_of_patient,
    patient_id_of_reference,
)
from gateway.routes.fhir.search import date_range, token_code
from hie.common.v1 import common_pb2
from hie.registry.v1 import registry_pb2
from services.shared.timestamps import isoformat, to_timestamp

router = APIRouter(prefix="/fhir/R4", tags=["fhir"])

LOINC = "http://loinc.org"
SHARED_TYPE_SYSTEM = "urn:hie:shared-document-type"
CLASS_SYSTEM = "urn:hie:document-class"
CONFIDENTIALITY_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
ACT_CODE_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
ENTERPRISE_ID_SYSTEM = "urn:hie:enterprise-id"
SHA256_EXTENSION = "urn:hie:sha256"
DEPARTMENT_EXTENSION = "urn:hie:author-department"
DICOM_UID_SYSTEM = "urn:dicom:uid"
_STATUS = {
    registry_pb2.DOCUMENT_STATUS_CURRENT: "current",
    registry_pb2.DOCUMENT_STATUS_SUPERSEDED: "superseded",
    registry_pb2.DOCUMENT_STATUS_ENTERED_IN_ERROR: "entered-in-error",
}
_STATUS_CODES = {v: k for k, v in _STATUS.items()}
_RELATION = {
    registry_pb2.RELATION_TYPE_REPLACES: "replaces",
    registry_pb2.RELATION_TYPE_APPENDS: "appends",
    registry_pb2.RELATION_TYPE_TRANSFORMS: "transforms",
}
_RELATION_CODES = {v: k for k, v in _RELATION.items()}
_DEFAULT_COUNT = 20
_MAX_COUNT = 200
_SEARCH_PARAMS = {
    "patient",
    "patient.identifier",
    "type",
    "category",
    "date",
    "status",
    "_count",
    "_summary",
    "_total",
    "_totalMethod",
    "page",
}
# A total (`_summary=count`, `_count=0`) is counted over consent-filtered pages: at most this many.
_MAX_COUNTED_PAGES = 25
_LOCAL_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")

DOCUMENT_REFERENCE_SEARCH_PARAMS: list[dict[str, str]] = [
    {
        "name": "patient",
        "type": "reference",
        "documentation": "`Patient/<id>` (or its absolute URL on this base): the id of the caller's own "
        "record of the person as the exchange gives it (PDQm search, ITI-104 Location). Results cover every "
        "hospital the person has records in.",
    },
    {
        "name": "patient.identifier",
        "type": "token",
        "documentation": "`urn:hie:patient-id:<your organisation>|<local id>` (or the local id alone); the "
        "older system urn:hie:patient:<organisation> is still accepted.",
    },
    {"name": "type", "type": "token", "documentation": "LOINC or urn:hie:shared-document-type code; either matches."},
    {"name": "category", "type": "token", "documentation": "The class code (urn:hie:document-class)."},
    {
        "name": "date",
        "type": "date",
        "documentation": "The service time (service start, or creation when none): eq, ge, gt, le, lt; "
        "repeat for a range.",
    },
    {"name": "status", "type": "token", "documentation": "current (default), superseded, entered-in-error."},
    {
        "name": "_count",
        "type": "number",
        "documentation": f"Page size (default {_DEFAULT_COUNT}, at most {_MAX_COUNT}); 0: the total only.",
    },
    {
        "name": "_summary",
        "type": "token",
        "documentation": "count: the total only (of the entries consent lets the caller see; "
        f"not given beyond {_MAX_COUNTED_PAGES * _MAX_COUNT}).",
    },
]


def _coding(system: str, code: str, display: str = "") -> dict[str, str]:
    coding = {"system": system, "code": code} if system else {"code": code}
    if display:
        coding["display"] = display
    return coding


def _master_identifier(entry: registry_pb2.DocumentEntry) -> dict[str, str]:
    """The XDS uniqueId as the source gave it: a URI (`urn:oid:…`, `urn:uuid:…`, MHD's form) under
    urn:ietf:rfc:3986; a plain id (REST registrations) under the source's own system."""
    if entry.source_document_id.startswith(("urn:oid:", "urn:uuid:")):
        return {"system": "urn:ietf:rfc:3986", "value": entry.source_document_id}
    return {"system": f"urn:hie:document:{entry.source_organization_id}", "value": entry.source_document_id}


def _concept(coding: registry_pb2.Coding) -> dict[str, Any]:
    return {"coding": [_coding(coding.system, coding.code, coding.display)]}


def document_reference(entry: registry_pb2.DocumentEntry, base: str) -> dict[str, Any]:
    """A registry entry as an R4 DocumentReference (see the module docstring for the mapping)."""
    org = entry.source_organization_id
    resource: dict[str, Any] = {
        "resourceType": "DocumentReference",
        "id": entry.document_id,
        "masterIdentifier": _master_identifier(entry),
        "identifier": [{"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{entry.document_id}"}],
        "status": _STATUS.get(entry.status, "current"),
        "docStatus": "final",
    }
    codings = [_coding(entry.type_code.system, entry.type_code.code, entry.type_code.display)]
    if entry.HasField("shared_type") and entry.shared_type.code != entry.type_code.code:
        codings.append(_coding(SHARED_TYPE_SYSTEM, entry.shared_type.code, entry.shared_type.display))
    resource["type"] = {"coding": codings, "text": entry.type_code.display or entry.title}
    if entry.class_code.code:
        resource["category"] = [
            {"coding": [_coding(entry.class_code.system, entry.class_code.code, entry.class_code.display)]}
        ]
    resource["subject"] = {"identifier": {"system": ENTERPRISE_ID_SYSTEM, "value": entry.enterprise_id}}
    if entry.HasField("created"):
        resource["date"] = isoformat(entry.created)
    author: dict[str, Any] = {
        "identifier": {"system": f"urn:hie:practitioner:{org}", "value": entry.author.practitioner_id}
    }
    if entry.author.practitioner_name:
        author["display"] = entry.author.practitioner_name
    if entry.author.department:
        author["extension"] = [{"url": DEPARTMENT_EXTENSION, "valueString": entry.author.department}]
    organization = {"identifier": {"system": "urn:hie:organization", "value": org}}
    resource["author"] = [author, organization] if entry.author.practitioner_id else [organization]
    resource["custodian"] = organization
    relations = [
        {"code": _RELATION[r.type], "target": {"reference": f"DocumentReference/{r.target_document_id}"}}
        for r in entry.relations
        if r.type in _RELATION
    ]
    if relations:
        resource["relatesTo"] = relations
    resource["description"] = entry.title
    labels = [{"coding": [_coding(CONFIDENTIALITY_SYSTEM, entry.confidentiality)]}]
    labels += [{"coding": [_coding(ACT_CODE_SYSTEM, label)]} for label in entry.security_labels]
    resource["securityLabel"] = labels
    attachment: dict[str, Any] = {"contentType": entry.mime_type, "language": entry.language, "title": entry.title}
    if entry.content_kind == registry_pb2.CONTENT_KIND_IMAGING_STUDY:
        attachment["url"] = entry.imaging_study.wado_rs_url
    else:
        attachment["url"] = f"{base}/fhir/R4/Binary/{entry.document_id}"
        attachment["size"] = entry.size
        attachment["extension"] = [{"url": SHA256_EXTENSION, "valueString": entry.sha256}]
    if entry.HasField("created"):
        attachment["creation"] = isoformat(entry.created)
    content: dict[str, Any] = {"attachment": attachment}
    if entry.format_code.code:
        content["format"] = _coding(entry.format_code.system, entry.format_code.code, entry.format_code.display)
    resource["content"] = [content]
    context: dict[str, Any] = {}
    if entry.facility_type.code:
        context["facilityType"] = _concept(entry.facility_type)
    if entry.practice_setting.code:
        context["practiceSetting"] = _concept(entry.practice_setting)
    if entry.HasField("service_start"):
        context["period"] = {"start": isoformat(entry.service_start)}
        if entry.HasField("service_end"):
            context["period"]["end"] = isoformat(entry.service_end)
    if entry.content_kind == registry_pb2.CONTENT_KIND_IMAGING_STUDY:
        context["related"] = [
            {
                "type": "ImagingStudy",
                "identifier": {
                    "system": DICOM_UID_SYSTEM,
                    "value": f"urn:oid:{entry.imaging_study.study_instance_uid}",
                },
            }
        ]
    if context:
        resource["context"] = context
    return resource


def _fhir(body: dict[str, Any], status: int = 200) -> JSONResponse:
    return JSONResponse(body, status_code=status, media_type=FHIR_JSON)


def _bad(reason: str, message: str) -> ApiError:
    return ApiError(400, reason, message)


async def _patient_local_id(ctx: Context, request: Request, name: str, value: str) -> str:
    """The caller's local id of the patient a search names: `patient` is a reference to a Patient
    of this exchange (`Patient/<id>` or its absolute URL), `patient.identifier` a local id
    (`urn:hie:patient-id:<your organisation>|<local id>`)."""
    if name == "patient":
        patient_id = patient_id_of_reference(value, request.app.state.settings.public_url)
        local = await own_local_id_of_patient(ctx, request, patient_id)
    else:
        system, _, local = value.rpartition("|")
        local = own_local_id_of_identifier(ctx, system, local, name)
    if not _LOCAL_ID.fullmatch(local):
        raise _bad("search-value-invalid", f"{name}: a local patient id")
    return local


@router.get("/DocumentReference", response_class=JSONResponse)
async def search_document_references(
    ctx: Context,
    request: Request,
    patient: str = Query(default="", max_length=80),
    patient_identifier: str = Query(default="", alias="patient.identifier", max_length=160),
    type: str = Query(default="", max_length=128),
    category: str = Query(default="", max_length=128),
    date: list[str] = Query(default=[], max_length=4),
    status: str = Query(default="", max_length=64),
    count: str = Query(default="", alias="_count", max_length=6),
    page: str = Query(default="", max_length=128),
) -> JSONResponse:
    """MHD ITI-67 Find Document References: a searchset Bundle, consent-filtered, newest
    service time first, `_count` per page, next link."""
    ctx.require_scope("DocumentReference", "r")
    items = list(request.query_params.multi_items())
    query = registry_pb2.FindDocumentsRequest()
    local_id = ""
    size = _DEFAULT_COUNT
    total_only = False
    since: datetime.datetime | None = None
    until: datetime.datetime | None = None
    for name, raw in items:
        if name not in _SEARCH_PARAMS:
            raise _bad("search-param-unknown", f"unknown search parameter {name[:64]!r} (strict handling)")
        value = raw.strip()
        if not value:
            raise _bad("search-value-invalid", f"{name}: a value is required")
        if name in {"patient", "patient.identifier"}:
            found = await _patient_local_id(ctx, request, name, value)
            if local_id and found != local_id:
                raise _bad("search-value-invalid", "one patient per search")
            local_id = found
        elif name == "type":
            query.type_codes.extend(
                token_code(name, v, {LOINC, SHARED_TYPE_SYSTEM})[:64] for v in value.split(",") if v
            )
        elif name == "category":
            query.class_codes.extend(token_code(name, v, {CLASS_SYSTEM})[:64] for v in value.split(",") if v)
        elif name == "status":
            for v in value.split(","):
                if v not in _STATUS_CODES:
                    raise _bad("status-invalid", "status: current, superseded or entered-in-error")
                query.statuses.append(_STATUS_CODES[v])
        elif name == "date":
            prefix, start, end = date_range(value)
            low = {"eq": start, "ge": start, "gt": end}.get(prefix)
            high = {"eq": end, "le": end, "lt": start}.get(prefix)
            if low is not None:
                since = low if since is None else max(since, low)
            if high is not None:
                until = high if until is None else min(until, high)
        elif name == "_count":
            if not value.isascii() or not value.isdigit():
                raise _bad("count-invalid", "_count: a number (0: the total only)")
            size = min(int(value), _MAX_COUNT)
            total_only = total_only or size == 0
        elif name == "_summary":
            if value not in ("count", "false"):
                raise _bad("search-value-invalid", "_summary: count (or false)")
            total_only = total_only or value == "count"
        elif name == "page":
            query.page.page_token = value
        # `_total` / `_totalMethod` (fhirpy's count() sends it): the total is counted when asked
        # for by _summary=count or _count=0, whatever they say.
    if not local_id:
        raise _bad("patient-required", "a patient or patient.identifier is required")
    query.patient.CopyFrom(common_pb2.PatientRef(local_id=local_id))
    query.page.page_size = size
    if since is not None:
        query.service_from.CopyFrom(to_timestamp(since.astimezone(datetime.UTC)))
    if until is not None:
        query.service_to.CopyFrom(to_timestamp(until.astimezone(datetime.UTC)))
    base = request.app.state.settings.public_url
    links = [{"relation": "self", "url": f"{base}/fhir/R4/DocumentReference?{urlencode(items)}"}]
    if total_only:
        return _fhir(await _counted(ctx, request, query, links))
    result = await rpc(request.app.state.stubs.registry.FindDocuments(query, metadata=ctx.metadata))
    if result.page.next_page_token:
        following = [(k, v) for k, v in items if k != "page"] + [("page", result.page.next_page_token)]
        links.append({"relation": "next", "url": f"{base}/fhir/R4/DocumentReference?{urlencode(following)}"})
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset", "link": links}
    if result.entries:  # JSON-FHIR has no empty arrays: an empty searchset has no entry
        bundle["entry"] = [
            {
                "fullUrl": f"{base}/fhir/R4/DocumentReference/{e.document_id}",
                "resource": document_reference(e, base),
                "search": {"mode": "match"},
            }
            for e in result.entries
        ]
    return _fhir(bundle)


async def _counted(
    ctx: Context, request: Request, query: registry_pb2.FindDocumentsRequest, links: list[dict[str, str]]
) -> dict[str, Any]:
    """The searchset of `_summary=count` / `_count=0`: the total of what the caller may see. The
    registry filters by consent page by page, so the entries are counted over full pages (each
    query audited as any search is); beyond the cap the total is left out, as FHIR allows."""
    query.page.page_size = _MAX_COUNT
    total = 0
    for _ in range(_MAX_COUNTED_PAGES):
        result = await rpc(request.app.state.stubs.registry.FindDocuments(query, metadata=ctx.metadata))
        total += len(result.entries)
        if not result.page.next_page_token:
            return {"resourceType": "Bundle", "type": "searchset", "total": total, "link": links}
        query.page.page_token = result.page.next_page_token
    return {"resourceType": "Bundle", "type": "searchset", "link": links}


@router.get("/DocumentReference/{document_id}", response_class=JSONResponse)
async def read_document_reference(document_id: str, ctx: Context, request: Request) -> JSONResponse:
    """One DocumentReference (consent-checked, audited as document.read)."""
    ctx.require_scope("DocumentReference", "r")
    result = await rpc(
        request.app.state.stubs.registry.GetDocumentEntry(
            registry_pb2.GetDocumentEntryRequest(document_id=document_id[:64]), metadata=ctx.metadata
        )
    )
    return _fhir(document_reference(result.entry, request.app.state.settings.public_url))


@router.get("/Binary/{document_id}", response_model=None)
async def read_binary(document_id: str, ctx: Context, request: Request) -> Response:
    """MHD ITI-68 Retrieve Document: the content in its own MIME type, streamed and hash-checked
    as it is read; with `Accept: application/fhir+json`, a Binary resource (base64, whole)."""
    ctx.require_scope("DocumentReference", "r")
    first, chunks = await open_content(request, ctx, document_id)
    entry = first.entry
    if entry.content_kind == registry_pb2.CONTENT_KIND_IMAGING_STUDY:
        raise ApiError(404, "content-external", "an imaging study stays at its source PACS: follow the WADO-RS URL")
    if FHIR_JSON in request.headers.get("accept", ""):
        data = b"".join([chunk async for chunk in chunks])
        return _fhir(
            {
                "resourceType": "Binary",
                "id": entry.document_id,
                "contentType": entry.mime_type,
                "data": base64.b64encode(data).decode(),
            }
        )
    return StreamingResponse(
        chunks,
        media_type=entry.mime_type,
        headers={
            "Content-Length": str(entry.size),
            "Repr-Digest": repr_digest(entry.sha256),
            "X-HIE-Audit-Event-Id": ",".join(first.audit_event_ids),
        },
    )


# --- ITI-65 Provide Document Bundle ---------------------------------------------------------------


def _plain_coding(coding: dict[str, Any]) -> registry_pb2.Coding:
    return registry_pb2.Coding(
        system=str(coding.get("system", ""))[:128],
        code=str(coding.get("code", ""))[:64],
        display=str(coding.get("display", ""))[:128],
    )


def _first_coding(concept: Any, what: str) -> registry_pb2.Coding:
    codings = concept.get("coding") if isinstance(concept, dict) else None
    if not codings or not isinstance(codings, list) or not isinstance(codings[0], dict):
        raise ApiError(422, f"{what}-missing", f"DocumentReference.{what} needs a coding")
    coding = codings[0]
    return registry_pb2.Coding(
        system=str(coding.get("system", ""))[:128],
        code=str(coding.get("code", ""))[:64],
        display=str(coding.get("display", ""))[:128],
    )


def _instant(value: Any, what: str) -> Timestamp | None:
    if value is None:
        return None
    try:
        moment = datetime.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        raise _bad(f"{what}-invalid", f"{what}: not a FHIR dateTime") from None
    if moment.tzinfo is None:
        raise _bad(f"{what}-invalid", f"{what}: a time zone is required")
    return to_timestamp(moment.astimezone(datetime.UTC))


async def _subject_local_id(ctx: Context, request: Request, subject: Any) -> str:
    """The caller's local id of DocumentReference.subject: a reference to a Patient of this exchange
    (`Patient/<id>` or its absolute URL), or the hospital's local-id identifier."""
    if not isinstance(subject, dict):
        raise ApiError(422, "subject-missing", "DocumentReference.subject is required")
    if isinstance(subject.get("reference"), str):
        return await _patient_local_id(ctx, request, "patient", subject["reference"])
    identifier = subject.get("identifier")
    if isinstance(identifier, dict) and isinstance(identifier.get("value"), str):
        system = str(identifier.get("system", ""))
        return await _patient_local_id(ctx, request, "patient.identifier", f"{system}|{identifier['value']}")
    raise ApiError(
        422,
        "subject-missing",
        "DocumentReference.subject needs Patient/<id> or the identifier "
        "urn:hie:patient-id:<your organisation>|<local id>",
    )


# Documents per provide-document bundle (the registry's submission set limit).
MAX_BUNDLE_DOCUMENTS = 500


def _provide_request(
    resource: dict[str, Any], binaries: dict[str, dict[str, Any]], patient_local_id: str
) -> registry_pb2.RegisterDocumentRequest:
    """One DocumentReference of a provide-document bundle (with its Binary) as a registration."""
    master = resource.get("masterIdentifier")
    if not isinstance(master, dict) or not isinstance(master.get("value"), str):
        raise ApiError(
            422, "master-identifier-missing", "DocumentReference.masterIdentifier (your document id) is required"
        )
    # Kept as sent (MHD: the XDS uniqueId, `urn:oid:…` or `urn:uuid:…`) and returned the same.
    source_document_id = master["value"]
    content = resource.get("content")
    if not isinstance(content, list) or len(content) != 1 or not isinstance(content[0], dict):
        raise ApiError(422, "content-invalid", "exactly one DocumentReference.content is supported")
    attachment = content[0].get("attachment")
    if not isinstance(attachment, dict):
        raise ApiError(422, "content-invalid", "DocumentReference.content.attachment is required")
    mime_type = str(attachment.get("contentType", ""))[:100]
    entry = registry_pb2.DocumentEntry(
        source_document_id=source_document_id[:128],
        patient=common_pb2.PatientRef(local_id=patient_local_id),
        type_code=_first_coding(resource.get("type"), "type"),
        title=str(resource.get("description") or attachment.get("title") or "")[:256],
        language=str(attachment.get("language", ""))[:16],
        created=_instant(resource.get("date") or attachment.get("creation"), "date"),
    )
    categories = resource.get("category")
    if isinstance(categories, list) and categories:
        entry.class_code.CopyFrom(_first_coding(categories[0], "category"))
    for label in resource.get("securityLabel") or []:
        for coding in (label or {}).get("coding") or []:
            if coding.get("system") == CONFIDENTIALITY_SYSTEM:
                entry.confidentiality = str(coding.get("code", ""))[:1]
            elif coding.get("code"):
                entry.security_labels.append(str(coding["code"])[:16])
    context = resource.get("context") or {}
    format_code = content[0].get("format")
    if isinstance(format_code, dict) and format_code.get("code"):
        entry.format_code.CopyFrom(_plain_coding(format_code))
    for element, field in (("facilityType", entry.facility_type), ("practiceSetting", entry.practice_setting)):
        if context.get(element) is not None:
            field.CopyFrom(_first_coding(context[element], f"context.{element}"))
    period = context.get("period") or {}
    if period.get("start"):
        entry.service_start.CopyFrom(_instant(period["start"], "period"))
    if period.get("end"):
        entry.service_end.CopyFrom(_instant(period["end"], "period"))
    request = registry_pb2.RegisterDocumentRequest()
    for relation in resource.get("relatesTo") or []:
        code = (relation or {}).get("code")
        target = str(((relation or {}).get("target") or {}).get("reference", ""))
        if code not in _RELATION_CODES or not target.startswith("DocumentReference/"):
            raise ApiError(
                422, "relation-invalid", "relatesTo: replaces, appends or transforms a DocumentReference/<id>"
            )
        request.relation.CopyFrom(
            registry_pb2.DocumentRelation(
                type=_RELATION_CODES[code], target_document_id=target.removeprefix("DocumentReference/")[:64]
            )
        )
    url = str(attachment.get("url", ""))
    if mime_type == "application/dicom" and url.startswith(("https://", "http://")):
        related = (resource.get("context") or {}).get("related") or []
        uids = [
            str((r.get("identifier") or {}).get("value", "")).removeprefix("urn:oid:")
            for r in related
            if isinstance(r, dict)
        ]
        entry.content_kind = registry_pb2.CONTENT_KIND_IMAGING_STUDY
        entry.imaging_study.CopyFrom(
            registry_pb2.ImagingStudyReference(study_instance_uid=uids[0] if uids else "", wado_rs_url=url)
        )
        entry.mime_type = mime_type
        request.entry.CopyFrom(entry)
        return request
    binary = binaries.get(url)
    data_b64 = binary.get("data") if binary else attachment.get("data")
    if not isinstance(data_b64, str):
        raise ApiError(422, "binary-missing", "attachment.url must name a Binary in the bundle (or carry data)")
    try:
        data = base64.b64decode(data_b64, validate=True)
    except (binascii.Error, ValueError):
        raise _bad("content-invalid", "Binary.data is not valid base64") from None
    declared_sha1 = attachment.get("hash")
    if declared_sha1 is not None and declared_sha1 != base64.b64encode(hashlib.sha1(data).digest()).decode():  # noqa: S324 - FHIR R4 attachment.hash is SHA-1
        raise _bad("hash-mismatch", "attachment.hash (SHA-1) does not match the content")
    # The registry checks the declared SHA-256 and size; the bytes are in hand here, so the
    # declaration is computed, and attachment.size (if given) must agree.
    entry.sha256 = hashlib.sha256(data).hexdigest()
    entry.size = int(attachment["size"]) if isinstance(attachment.get("size"), int) else len(data)
    entry.mime_type = mime_type or str((binary or {}).get("contentType", ""))[:100]
    request.entry.CopyFrom(entry)
    request.content = data
    return request


@router.post("/", response_class=JSONResponse)
async def provide_document_bundle(ctx: Context, request: Request, idempotency_key: IdempotencyKey) -> JSONResponse:
    """IHE MHD ITI-65 Provide Document Bundle: a transaction Bundle with one or more
    DocumentReferences about one patient, their Binaries and optionally the SubmissionSet List;
    answered with a transaction-response.

    The bundle is atomic: one DocumentReference is one registration, several are one submission
    set, registered together in one transaction or not at all. The List (the SubmissionSet) is
    stored with them (uniqueId, title, date, designationType; its members the bundle's documents)
    and found by ITI-66. Resubmitting the same masterIdentifiers with the same content answers 200 with the
    first registrations. With an Idempotency-Key header a retry gets the first response (status
    and body: each document's first answer, `201 Created` included); the key with another bundle
    is 409 `idempotency-key-reused`."""
    ctx.require_scope("DocumentReference", "c")
    try:
        bundle = await request.json()
    except ValueError:
        raise _bad("bundle-invalid", "the body is not JSON") from None
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle" or bundle.get("type") != "transaction":
        raise _bad("bundle-invalid", "a transaction Bundle is required")
    entries = bundle.get("entry")
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise _bad("bundle-invalid", "Bundle.entry is required")
    validate_resource(bundle, "Bundle")
    for e in entries:
        kind = (e.get("resource") or {}).get("resourceType")
        if kind not in {"DocumentReference", "Binary", "List"}:
            raise ApiError(422, "bundle-resource", "only DocumentReference, Binary and List are accepted")
    references = [e["resource"] for e in entries if e["resource"]["resourceType"] == "DocumentReference"]
    if not references or len(references) > MAX_BUNDLE_DOCUMENTS:
        raise ApiError(422, "bundle-documents", f"from one to {MAX_BUNDLE_DOCUMENTS} DocumentReferences per bundle")
    binaries = {str(e.get("fullUrl", "")): e["resource"] for e in entries if e["resource"]["resourceType"] == "Binary"}
    # Each distinct subject is resolved once (a bundle is about one patient, usually one subject).
    subjects: dict[str, str] = {}
    for r in references:
        subject = json.dumps(r.get("subject"), sort_keys=True)
        if subject not in subjects:
            subjects[subject] = await _subject_local_id(ctx, request, r.get("subject"))
    registrations = [
        _provide_request(r, binaries, subjects[json.dumps(r.get("subject"), sort_keys=True)]) for r in references
    ]
    key = idempotency_key
    registry = request.app.state.stubs.registry
    lists = [e["resource"] for e in entries if e["resource"]["resourceType"] == "List"]
    if len(lists) > 1:
        raise ApiError(422, "bundle-resource", "at most one List (the SubmissionSet) per bundle")
    stored_set: registry_pb2.SubmissionSet | None = None
    if lists:
        for position, registration in enumerate(registrations):
            registration.idempotency_key = f"{key[:120]}#{position}" if key else ""
        submitted = registry_pb2.RegisterSubmissionSetRequest(
            documents=registrations, submission_set=_submission_set(lists[0]), idempotency_key=key
        )
        answer = await rpc(registry.RegisterSubmissionSet(submitted, metadata=ctx.metadata))
        results = list(answer.documents)
        stored_set = answer.submission_set
    elif len(registrations) == 1:
        registrations[0].idempotency_key = key
        results = [await rpc(registry.RegisterDocument(registrations[0], metadata=ctx.metadata))]
    else:
        for position, registration in enumerate(registrations):
            registration.idempotency_key = f"{key[:120]}#{position}" if key else ""
        submitted = registry_pb2.RegisterSubmissionSetRequest(documents=registrations, idempotency_key=key)
        results = list((await rpc(registry.RegisterSubmissionSet(submitted, metadata=ctx.metadata))).documents)
    # Each Binary is answered with the document whose attachment named it.
    by_binary = {
        str(((r.get("content") or [{}])[0].get("attachment") or {}).get("url", "")): result
        for r, result in zip(references, results, strict=True)
    }
    documents = iter(results)
    base = request.app.state.settings.public_url
    answers: list[dict[str, Any]] = []
    for e in entries:
        kind = e["resource"]["resourceType"]
        if kind == "DocumentReference":
            result = next(documents)
            answers.append({"response": _provided(result, f"DocumentReference/{result.entry.document_id}")})
        elif kind == "Binary" and str(e.get("fullUrl", "")) in by_binary:
            result = by_binary[str(e.get("fullUrl", ""))]
            answers.append({"response": _provided(result, f"Binary/{result.entry.document_id}")})
        elif kind == "List" and stored_set is not None:
            # The set is new when any of its documents is (a retry answers the earlier set).
            status = "201 Created" if any(r.created for r in results) else "200 OK"
            answers.append({"response": {"status": status, "location": f"List/{stored_set.submission_set_id}"}})
        else:
            note = "Binary not referenced"
            answers.append(
                {
                    "response": {
                        "status": "200 OK",
                        "outcome": {
                            "resourceType": "OperationOutcome",
                            "issue": [{"severity": "information", "code": "informational", "diagnostics": note}],
                        },
                    }
                }
            )
    return _fhir(
        {
            "resourceType": "Bundle",
            "type": "transaction-response",
            "link": [{"relation": "self", "url": f"{base}/fhir/R4/"}],
            "entry": answers,
        },
        status=200,
    )


# IHE MHD SubmissionSet (List) elements kept: identifier use=usual (the uniqueId), title, date,
# the designationType extension (XDS contentTypeCode).
MHD_LIST_TYPES = "https://profiles.ihe.net/ITI/MHD/CodeSystem/MHDlistTypes"
DESIGNATION_TYPE_EXTENSION = "https://profiles.ihe.net/ITI/MHD/StructureDefinition/ihe-designationType"


def _submission_set(resource: dict[str, Any]) -> registry_pb2.SubmissionSet:
    """The SubmissionSet metadata of an ITI-65 List (the members are the bundle's documents)."""
    identifiers = [i for i in resource.get("identifier") or [] if isinstance(i, dict)]
    unique = next((i for i in identifiers if i.get("use") == "usual"), identifiers[0] if identifiers else {})
    given = registry_pb2.SubmissionSet(
        source_id=str(unique.get("value", ""))[:128],
        title=str(resource.get("title", ""))[:256],
    )
    for extension in resource.get("extension") or []:
        if isinstance(extension, dict) and extension.get("url") == DESIGNATION_TYPE_EXTENSION:
            given.content_type.CopyFrom(_first_coding(extension.get("valueCodeableConcept"), "designationType"))
    if resource.get("date"):
        stamp = _instant(resource["date"], "date")
        if stamp is not None:
            given.submitted.CopyFrom(stamp)
    return given


def submission_set_list(submission_set: registry_pb2.SubmissionSet) -> dict[str, Any]:
    """A stored SubmissionSet as the MHD List (ITI-66), its visible members as entries."""
    resource: dict[str, Any] = {"resourceType": "List", "id": submission_set.submission_set_id}
    if submission_set.content_type.code:
        resource["extension"] = [
            {
                "url": DESIGNATION_TYPE_EXTENSION,
                "valueCodeableConcept": _concept(submission_set.content_type),
            }
        ]
    identifiers = [
        {"use": "official", "system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{submission_set.submission_set_id}"}
    ]
    if submission_set.source_id:
        system = (
            "urn:ietf:rfc:3986"
            if submission_set.source_id.startswith("urn:")
            else (f"urn:hie:submission-set:{submission_set.source_organization_id}")
        )
        identifiers.insert(0, {"use": "usual", "system": system, "value": submission_set.source_id})
    resource["identifier"] = identifiers
    resource["status"] = "current"
    resource["mode"] = "working"
    if submission_set.title:
        resource["title"] = submission_set.title
    resource["code"] = {"coding": [{"system": MHD_LIST_TYPES, "code": "submissionset"}]}
    resource["subject"] = {"identifier": {"system": ENTERPRISE_ID_SYSTEM, "value": submission_set.enterprise_id}}
    if submission_set.HasField("submitted"):
        resource["date"] = isoformat(submission_set.submitted)
    resource["source"] = {
        "identifier": {"system": "urn:hie:organization", "value": submission_set.source_organization_id}
    }
    resource["entry"] = [{"item": {"reference": f"DocumentReference/{d}"}} for d in submission_set.document_ids]
    return resource


_LIST_SEARCH_PARAMS = {"patient", "patient.identifier", "code", "_count", "page"}


@router.get("/List", response_class=JSONResponse)
async def find_document_lists(ctx: Context, request: Request) -> JSONResponse:
    """IHE MHD ITI-66 Find Document Lists: the person's SubmissionSets (newest first), each with
    the documents consent lets the caller see; `code=submissionset` (folders are not kept)."""
    ctx.require_scope("DocumentReference", "r")
    items = list(request.query_params.multi_items())
    local_id, size, page, matches_nothing = "", _DEFAULT_COUNT, "", False
    for name, raw in items:
        if name not in _LIST_SEARCH_PARAMS:
            raise _bad("search-param-unknown", f"unknown search parameter {name[:64]!r} (strict handling)")
        value = raw.strip()
        if not value:
            raise _bad("search-value-invalid", f"{name}: a value is required")
        if name in {"patient", "patient.identifier"}:
            found = await _patient_local_id(ctx, request, name, value)
            if local_id and found != local_id:
                raise _bad("search-value-invalid", "one patient per search")
            local_id = found
        elif name == "code":
            codes = {v.rpartition("|")[2] for v in value.split(",")}
            matches_nothing = "submissionset" not in codes
        elif name == "_count":
            if not value.isascii() or not value.isdigit() or int(value) < 1:
                raise _bad("count-invalid", "_count: a positive number")
            size = min(int(value), _MAX_COUNT)
        elif name == "page":
            page = value[:128]
    if not local_id:
        raise _bad("patient-required", "a patient or patient.identifier is required")
    base = request.app.state.settings.public_url
    links = [{"relation": "self", "url": f"{base}/fhir/R4/List?{urlencode(items)}"}]
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset", "link": links}
    if matches_nothing:
        return _fhir(bundle)
    result = await rpc(
        request.app.state.stubs.registry.FindSubmissionSets(
            registry_pb2.FindSubmissionSetsRequest(
                patient=common_pb2.PatientRef(local_id=local_id),
                page=common_pb2.PageRequest(page_size=size, page_token=page),
            ),
            metadata=ctx.metadata,
        )
    )
    if result.page.next_page_token:
        following = [(k, v) for k, v in items if k != "page"] + [("page", result.page.next_page_token)]
        links.append({"relation": "next", "url": f"{base}/fhir/R4/List?{urlencode(following)}"})
    if result.submission_sets:  # JSON-FHIR has no empty arrays
        bundle["entry"] = [
            {
                "fullUrl": f"{base}/fhir/R4/List/{s.submission_set_id}",
                "resource": submission_set_list(s),
                "search": {"mode": "match"},
            }
            for s in result.submission_sets
        ]
    return _fhir(bundle)


def _provided(result: registry_pb2.RegisterDocumentResponse, location: str) -> dict[str, str]:
    return {"status": "201 Created" if result.created else "200 OK", "location": location}


CAPABILITY_RESOURCES: list[dict[str, Any]] = [
    {
        "type": "DocumentReference",
        "profile": "http://hl7.org/fhir/StructureDefinition/DocumentReference",
        "documentation": "IHE MHD document responder: search (ITI-67) and read; consent-filtered, audited. "
        "Strict search handling; `_count` per page (default 20, at most 200), next link. Create through "
        "the ITI-65 transaction (POST /fhir/R4/): one or more DocumentReferences about one patient, atomic.",
        "interaction": [{"code": "read"}, {"code": "search-type"}],
        "searchParam": DOCUMENT_REFERENCE_SEARCH_PARAMS,
    },
    {
        "type": "List",
        "profile": "http://hl7.org/fhir/StructureDefinition/List",
        "documentation": "IHE MHD ITI-66 Find Document Lists: the SubmissionSets an ITI-65 bundle's List "
        "created, by patient (Patient/<id> or patient.identifier) and code=submissionset; each lists the "
        "documents consent lets the caller see (a set with none is left out). Folders are not kept.",
        "interaction": [{"code": "search-type"}],
        "searchParam": [
            {"name": "patient", "type": "reference", "documentation": "Patient/<id> of the caller's own record"},
            {"name": "patient.identifier", "type": "token", "documentation": "urn:hie:patient-id:<org>|<local id>"},
            {"name": "code", "type": "token", "documentation": "submissionset"},
        ],
    },
    {
        "type": "Binary",
        "profile": "http://hl7.org/fhir/StructureDefinition/Binary",
        "documentation": "ITI-68: the content in its own MIME type (streamed, SHA-256 in Repr-Digest), or a "
        "Binary resource with Accept: application/fhir+json.",
        "interaction": [{"code": "read"}],
    },
]
