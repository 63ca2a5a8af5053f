"""FHIR R4 Patient on the facade: IHE PDQm search (`GET Patient?...`), `Patient/$match`
(FHIR R4 semantics: a searchset Bundle with `search.score` and the match-grade extension),
IHE PIXm `Patient/$ihe-pix` (ITI-83) and the PIXm Patient Identity Feed FHIR (ITI-104: a
conditional update `PUT Patient?identifier=<system>|<value>` adds, revises or, with a
`replaced-by` link, merges a record of the calling hospital).

- `Patient.id` is the index's record id; the hospital's local id is an identifier with system
  `urn:hie:patient-id:<domain>`, the enterprise id one with system `urn:hie:enterprise-id`, the
  national id (masked unless the caller's role needs it) one with the resident id system.
- `search.score` is the posterior probability that the record is the person sought (0..1).
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any
from urllib.parse import parse_qsl, urlencode

from fastapi import APIRouter, Body, Query, Request
from fastapi.responses import JSONResponse

from gateway.deps import Context, IdempotencyKey
from gateway.errors import ApiError
from gateway.routes import rpc
from gateway.routes.fhir_models import validate_resource
from hie.common.v1 import common_pb2
from hie.mpi.v1 import mpi_pb2
from services.shared import gb11643

router = APIRouter(prefix="/fhir/R4", tags=["fhir"])
FHIR_JSON = "application/fhir+json"
# The one identifier system of a hospital's local patient id, everywhere on the facade (Patient,
# PIXm, ITI-104, DocumentReference, Consent). The older `urn:hie:patient:<domain>` is still
# accepted on input (LEGACY_LOCAL_ID_SYSTEM_PREFIX) and never written.
LOCAL_ID_SYSTEM_PREFIX = "urn:hie:patient-id:"
LEGACY_LOCAL_ID_SYSTEM_PREFIX = "urn:hie:patient:"
ENTERPRISE_ID_SYSTEM = "urn:hie:enterprise-id"
NATIONAL_ID_SYSTEM = "urn:hie:identifier:cn-resident-id"
# Record ids are UUIDs; anything else is not a Patient of this exchange.
_RECORD_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
IDENTIFIER_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/v2-0203"
MATCH_GRADE_EXTENSION = "http://hl7.org/fhir/StructureDefinition/match-grade"
_GENDERS = {
    "male": mpi_pb2.GENDER_MALE,
    "female": mpi_pb2.GENDER_FEMALE,
    "other": mpi_pb2.GENDER_OTHER,
    "unknown": mpi_pb2.GENDER_UNKNOWN,
}
_GENDER_CODES = {v: k for k, v in _GENDERS.items()}
_PDQ_PARAMS = {
    "_id",
    "family",
    "given",
    "name",
    "birthdate",
    "gender",
    "identifier",
    "telecom",
    "_count",
    "_summary",
    "_total",
    "_totalMethod",
    "page",
}
# FHIR string search on the name parameters: no modifier is a prefix (case- and accent-insensitive),
# `:exact` the whole value, `:contains` a substring. Other modifiers are refused as unknown.
_NAME_MATCH = {
    "": mpi_pb2.NAME_MATCH_PREFIX,
    ":exact": mpi_pb2.NAME_MATCH_EXACT,
    ":contains": mpi_pb2.NAME_MATCH_CONTAINS,
}
_NAME_PARAMS = ("family", "given", "name")
_PDQ_PARAMS |= {f"{p}{m}" for p in _NAME_PARAMS for m in _NAME_MATCH if m}
# Asked by clients and answered anyway (Bundle.total is given whenever the search can be counted):
# FHIR `_total` and fhirpy's `_totalMethod`, which its count() sends.
_TOTAL_HINTS = {"_total", "_totalMethod"}
# Ids one `_id` search takes (comma-separated: any of them).
_MAX_IDS = 20
DEFAULT_COUNT, MAX_COUNT = 20, 100


# The IHE actors this facade implements (CapabilityStatement.instantiates), as the profiles publish
# them: PDQm Patient Demographics Supplier (ITI-78) with the Match Operation Option (ITI-119), and
# the PIXm Patient Identifier Cross-reference Manager (ITI-83 query, ITI-104 feed without the Remove
# Patient Option; patients are also fed by REST, HL7 v2 and bulk load).
PDQM_SUPPLIER = "https://profiles.ihe.net/ITI/PDQm/CapabilityStatement/IHE.PDQm.PatientDemographicsSupplier"
PDQM_SUPPLIER_MATCH = "https://profiles.ihe.net/ITI/PDQm/CapabilityStatement/IHE.PDQm.PatientDemographicsSupplierMatch"
PIXM_MANAGER = "https://profiles.ihe.net/ITI/PIXm/CapabilityStatement/IHE.PIXm.Manager"
INSTANTIATES = [PDQM_SUPPLIER, PDQM_SUPPLIER_MATCH, PIXM_MANAGER]
# The Patient profile a PIXm Manager accepts on ITI-104 (ITI TF-2: 3.104.4.1.2.1).
PIXM_PATIENT_PROFILE = "https://profiles.ihe.net/ITI/PIXm/StructureDefinition/IHE.PIXm.Patient"


# FHIR R4 defines these on several resources at once ("individual-*"), the others on Patient.
_SHARED_PARAMS = {"family", "given", "birthdate", "gender", "telecom"}


def _search_param(name: str, type: str, documentation: str) -> dict[str, str]:
    prefix = "individual" if name in _SHARED_PARAMS else "Patient"
    return {
        "name": name,
        "definition": f"http://hl7.org/fhir/SearchParameter/{prefix}-{name}",
        "type": type,
        "documentation": documentation,
    }


PATIENT_SEARCH_PARAMS: list[dict[str, str]] = [
    _search_param(
        "family",
        "string",
        "Family name in characters or pinyin (张 / Zhang). FHIR string search: a prefix, case- and "
        "accent-insensitive, on the characters or the toneless pinyin (司 and si find 司马; zhang finds 张); "
        "homophones (章) and swapped names also match, with a lower score. Modifiers :exact (the whole part "
        "as registered, case-sensitive) and :contains (anywhere, case- and accent-insensitive). Needs a "
        "birthdate, telecom or identifier beside it.",
    ),
    _search_param("given", "string", "Given name in characters or pinyin; prefix, :exact, :contains as family."),
    _search_param(
        "name",
        "string",
        "Any part of the name (family, given, or the whole name as written: 张伟, Zhang Wei); prefix, "
        ":exact, :contains as family.",
    ),
    _search_param("birthdate", "date", "YYYY-MM-DD, exact (prefix eq only)."),
    _search_param("gender", "token", "male | female | other | unknown."),
    _search_param(
        "identifier",
        "token",
        f"[system|]value; no system: the resident id ({NATIONAL_ID_SYSTEM}). A hospital's local id "
        f"({LOCAL_ID_SYSTEM_PREFIX}<domain>) is resolved with $ihe-pix instead.",
    ),
    _search_param("telecom", "token", "A phone number ([phone|]number; the last 8 digits compare)."),
    {
        "name": "_id",
        "definition": "http://hl7.org/fhir/SearchParameter/Resource-id",
        "type": "token",
        "documentation": f"Patient ids (comma-separated, at most {_MAX_IDS}); not combined with demographics.",
    },
    {
        "name": "_count",
        "type": "number",
        "documentation": f"Page size, 1 to {MAX_COUNT} (default {DEFAULT_COUNT}); follow the Bundle's next link. "
        "_count=0 answers the total only.",
    },
    {"name": "_summary", "type": "token", "documentation": "count: the total only (no entries)."},
]

# This facade's entry in the CapabilityStatement (gateway/routes/fhir.py lists it).
PATIENT_CAPABILITY: dict[str, Any] = {
    "type": "Patient",
    "profile": "http://hl7.org/fhir/StructureDefinition/Patient",
    "documentation": "The master patient index (scope system/Patient.r). Patient.id is the id the exchange "
    "gives a hospital's record; `Patient/<id>` means it on every resource of this facade (DocumentReference, "
    f"Consent). A hospital's local id has one identifier system everywhere: {LOCAL_ID_SYSTEM_PREFIX}<organisation>. "
    "IHE PDQm search (ITI-78): every given "
    "parameter must agree, results best first with search.score (probability of being the person sought); "
    "strict handling (unknown or repeated parameters are 400 OperationOutcome); also POST Patient/_search "
    "with a form body. Pages: _count, and the next link's opaque, sealed `page` token (bound to the "
    "calling client, valid 30 minutes; it carries the search, so the link repeats no demographics). "
    "Bundle.total is given unless the search is too broad to count. Patient.id is the index's record id; "
    "read by id (PDQm) for whoever may search, masked by role and purpose like search results (a record "
    "merged away is 404). $match (ITI-119) and $ihe-pix (PIXm ITI-83). PIXm Patient Identity Feed (ITI-104, "
    f"scope system/Patient.c; a merge also system/Patient.u): PUT Patient?identifier={LOCAL_ID_SYSTEM_PREFIX}"
    "<your organisation>|<local id> with the Patient (that identifier in it) adds (201) or revises (200) the "
    "hospital's record; active=false with a link of type replaced-by to the surviving local id (link.other."
    "identifier) merges it into the survivor. Only the calling hospital's own identifier system is accepted "
    "(another domain's: 403). Elements kept: name, gender, birthDate, phone telecom, address, identifiers "
    f"(resident id: {NATIONAL_ID_SYSTEM}); others are not stored. Remove Patient (conditional delete) is not "
    "supported (405).",
    "interaction": [{"code": "read"}, {"code": "search-type"}, {"code": "update"}],
    "supportedProfile": [PIXM_PATIENT_PROFILE],
    "updateCreate": False,
    "conditionalUpdate": True,
    "conditionalDelete": "not-supported",
    "searchParam": PATIENT_SEARCH_PARAMS,
    "operation": [
        {
            "name": "match",
            "definition": "http://hl7.org/fhir/OperationDefinition/Patient-match",
            "documentation": "POST Parameters(resource, count, onlyCertainMatches): a searchset Bundle, "
            "search.score and the match-grade extension (certain / probable / possible).",
        },
        {
            "name": "ihe-pix",
            "definition": "https://profiles.ihe.net/ITI/PIXm/OperationDefinition/IHE.PIXm.pix",
            "documentation": f"sourceIdentifier={LOCAL_ID_SYSTEM_PREFIX}<domain>|<local id>, targetSystem "
            f"(repeatable; {LOCAL_ID_SYSTEM_PREFIX}<domain> or {ENTERPRISE_ID_SYSTEM}).",
        },
    ],
}


def _bad(reason: str, message: str) -> ApiError:
    # Messages name the parameter only, never its value (it may be a patient's name or id).
    return ApiError(400, reason, message)


def local_id_system(domain: str) -> str:
    """The identifier system of a hospital's local patient ids."""
    return f"{LOCAL_ID_SYSTEM_PREFIX}{domain}"


def local_id_domain(system: str) -> str | None:
    """The domain a local-id identifier system names (either spelling), or None."""
    for prefix in (LOCAL_ID_SYSTEM_PREFIX, LEGACY_LOCAL_ID_SYSTEM_PREFIX):
        if system.startswith(prefix) and len(system) > len(prefix):
            return system.removeprefix(prefix)
    return None


_NOT_YOURS = "no Patient with that id among your domain's records"


def patient_id_of_reference(reference: str, base: str) -> str:
    """The Patient id of a reference `Patient/<id>` or `<FHIR base>/Patient/<id>` (the exchange's
    own base only); 404 for anything that cannot name a Patient of this exchange."""
    own = f"{base}/fhir/R4/"
    if reference.startswith(own):
        reference = reference.removeprefix(own)
    patient_id = reference.removeprefix("Patient/") if reference.startswith("Patient/") else ""
    if not _RECORD_ID.fullmatch(patient_id):
        # FHIR: Patient/<id> is the id this exchange gave the Patient (what PDQm and read return);
        # a hospital's local id goes through the identifier (patient.identifier=<system>|<id>).
        raise ApiError(404, "patient-not-found", "no Patient with that id (a local id goes in patient.identifier)")
    return patient_id


async def own_local_id_of_patient(ctx: Context, request: Request, patient_id: str) -> str:
    """The caller's local id of the Patient with that id. A hospital reaches clinical data through
    its own record of the person (the registry and consent services take the caller's local id),
    so the Patient must be one of the caller's own domain; another's is 404, as unknown ids are."""
    try:
        found = await rpc(
            request.app.state.stubs.mpi.GetPatient(
                mpi_pb2.GetPatientRequest(record_id=patient_id), metadata=ctx.metadata
            )
        )
    except ApiError as exc:
        if exc.status in (403, 404):
            raise ApiError(404, "patient-not-found", _NOT_YOURS) from None
        raise
    if found.patient.ref.domain != ctx.caller.organization_id or not found.patient.ref.local_id:
        raise ApiError(404, "patient-not-found", _NOT_YOURS)
    return found.patient.ref.local_id


def own_local_id_of_identifier(ctx: Context, system: str, value: str, element: str) -> str:
    """The local id of an identifier `<system>|<local id>` of the caller's own domain (either
    spelling of the system; a bare value is taken as the caller's). Another domain's is 404:
    a hospital names its own patients."""
    if system and local_id_domain(system) != ctx.caller.organization_id:
        raise ApiError(404, "patient-not-found", f"{element}: use your own domain's patient ids")
    if not value or len(value) > 64:
        raise _bad("search-value-invalid", f"{element}: a local patient id")
    return value


def patient_resource(patient: mpi_pb2.Patient) -> dict[str, Any]:
    """One index record as a FHIR R4 Patient."""
    # (A de-identified view has no local record number, no name and a year for a birth date.)
    identifiers: list[dict[str, Any]] = []
    if patient.ref.local_id:
        identifiers.append(
            {
                "use": "usual",
                "type": {"coding": [{"system": IDENTIFIER_TYPE_SYSTEM, "code": "MR"}]},
                "system": f"{LOCAL_ID_SYSTEM_PREFIX}{patient.ref.domain}",
                "value": patient.ref.local_id,
            }
        )
    identifiers.append({"use": "official", "system": ENTERPRISE_ID_SYSTEM, "value": patient.enterprise_id})
    for ident in patient.identifiers:
        entry: dict[str, Any] = {"system": ident.system, "value": ident.value}
        if ident.type:
            entry["type"] = {"coding": [{"system": IDENTIFIER_TYPE_SYSTEM, "code": ident.type}]}
        identifiers.append(entry)
    name: dict[str, Any] = {"text": patient.name.text} if patient.name.text else {}
    if patient.name.family:
        name["family"] = patient.name.family
    if patient.name.given:
        name["given"] = [patient.name.given]
    resource: dict[str, Any] = {
        "resourceType": "Patient",
        "id": patient.record_id,
        "identifier": identifiers,
        "active": True,
        **({"name": [name]} if name else {}),
        "gender": _GENDER_CODES.get(patient.gender, "unknown"),
    }
    if patient.birth_date:
        resource["birthDate"] = patient.birth_date
    if patient.phones:
        resource["telecom"] = [{"system": "phone", "value": p} for p in patient.phones]
    address = patient.address
    if any((address.province, address.city, address.district, address.line, address.postal_code)):
        resource["address"] = [
            {
                k: v
                for k, v in {
                    "line": [address.line] if address.line else None,
                    "district": address.district,
                    "city": address.city,
                    "state": address.province,
                    "postalCode": address.postal_code,
                }.items()
                if v
            }
        ]
    return resource


def _entry(base: str, result: mpi_pb2.ScoredPatient, *, grade: bool) -> dict[str, Any]:
    search: dict[str, Any] = {"mode": "match", "score": round(result.probability, 4)}
    if grade:
        search["extension"] = [{"url": MATCH_GRADE_EXTENSION, "valueCode": result.grade}]
    return {
        "fullUrl": f"{base}/fhir/R4/Patient/{result.patient.record_id}",
        "resource": patient_resource(result.patient),
        "search": search,
    }


def _masked(items: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The search as echoed in the Bundle's self link: identifier and telecom values masked (a
    national id or phone number never goes back out in clear)."""
    masked = []
    for name, value in items:
        if name in ("identifier", "telecom"):
            system, sep, code = value.rpartition("|")
            value = f"{system}{sep}{gb11643.mask(code)}"
        masked.append((name, value))
    return masked


def _token(value: str) -> tuple[str, str]:
    system, sep, code = value.partition("|")
    if not sep:
        return "", value
    return system, code


@router.get(
    "/Patient",
    response_class=JSONResponse,
    responses={200: {"content": {FHIR_JSON: {}}, "description": "a searchset Bundle of Patient resources"}},
)
async def search_patients(
    ctx: Context,
    request: Request,
    # Declared for the OpenAPI document and length limits; the search itself is read from the raw
    # query string (strict refusal of unknown or repeated parameters).
    family: str = Query(default="", max_length=64),
    given: str = Query(default="", max_length=64),
    name: str = Query(default="", max_length=64),
    birthdate: str = Query(default="", max_length=12),
    gender: str = Query(default="", max_length=8),
    identifier: str = Query(default="", max_length=300),
    telecom: str = Query(default="", max_length=40),
    count: str = Query(default=str(DEFAULT_COUNT), alias="_count", max_length=6),
    page: str = Query(default="", max_length=2048),
) -> JSONResponse:
    """IHE PDQm: Patient search by demographics; results best first with `search.score`,
    `_count` per page, the next page through the Bundle's `next` link (an opaque, sealed `page`
    token carrying the search, so no demographics go into the link)."""
    return await _pdq(ctx, request, list(request.query_params.multi_items()))


@router.post(
    "/Patient/_search",
    response_class=JSONResponse,
    responses={200: {"content": {FHIR_JSON: {}}, "description": "a searchset Bundle of Patient resources"}},
)
async def search_patients_by_post(ctx: Context, request: Request) -> JSONResponse:
    """The same search with its parameters in an application/x-www-form-urlencoded body (FHIR
    `POST [base]/Patient/_search`), so a national id or phone need not appear in a URL."""
    body = await request.body()
    if len(body) > 4096:
        raise _bad("search-too-long", "the search body is too long")
    try:
        items = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=bool(body))
    except (UnicodeDecodeError, ValueError):
        raise _bad("search-value-invalid", "the body must be form-encoded search parameters") from None
    return await _pdq(ctx, request, items)


_LIMITS = {
    "_id": 800,
    "_summary": 8,
    "_total": 10,
    "_totalMethod": 10,
    "family": 64,
    "given": 64,
    "name": 64,
    "birthdate": 12,
    "gender": 8,
    "identifier": 300,
    "telecom": 40,
    "page": 2048,
}


async def _pdq(ctx: Context, request: Request, items: list[tuple[str, str]]) -> JSONResponse:
    ctx.require_scope("Patient", "r")
    unknown = {k for k, _ in items} - _PDQ_PARAMS
    if unknown:
        raise _bad("search-parameter-unknown", "unknown search parameter")
    values: dict[str, str] = {}
    modes: dict[str, int] = {}
    for key, value in items:
        key, _, modifier = key.partition(":")
        if key in values:
            raise _bad("search-parameter-repeated", "a search parameter is given twice")
        if len(value) > _LIMITS.get(key, 6):
            raise _bad("search-value-invalid", f"{key}: value too long")
        values[key] = value
        if key in _NAME_PARAMS:
            modes[key] = _NAME_MATCH[f":{modifier}" if modifier else ""]
    count_text = values.get("_count", str(DEFAULT_COUNT))
    if not count_text.isascii() or not count_text.isdigit() or not 0 <= int(count_text) <= MAX_COUNT:
        raise _bad("search-value-invalid", f"_count: 0 to {MAX_COUNT}")
    count = int(count_text)
    summary = values.get("_summary", "")
    if summary not in ("", "count", "false"):
        raise _bad("search-value-invalid", "_summary: count (or false)")
    # FHIR search: "_summary=count" and "_count=0" both ask for the total only.
    total_only = summary == "count" or count == 0
    for hint in _TOTAL_HINTS:
        values.pop(hint, None)
    if "_id" in values:
        return await _pdq_by_id(ctx, request, items, values, total_only=total_only)
    birthdate, gender = values.get("birthdate", ""), values.get("gender", "")
    if birthdate.startswith(("eq", "ge", "gt", "le", "lt", "ne", "sa", "eb", "ap")):
        birthdate = birthdate[2:] if birthdate.startswith("eq") else "!"
    if birthdate and (len(birthdate) != 10 or birthdate == "!"):
        raise _bad("search-value-invalid", "birthdate: YYYY-MM-DD (eq only)")
    if gender and gender not in _GENDERS:
        raise _bad("search-value-invalid", "gender: male | female | other | unknown")
    search = mpi_pb2.SearchPatientsRequest(
        family=values.get("family", ""),
        given=values.get("given", ""),
        name=values.get("name", ""),
        birth_date=birthdate,
        gender=_GENDERS.get(gender, mpi_pb2.GENDER_UNSPECIFIED),
        phone=values.get("telecom", "").removeprefix("phone|"),
        limit=count or 1,
        page_token=values.get("page", ""),
        family_match=modes.get("family", mpi_pb2.NAME_MATCH_PREFIX),  # type: ignore[arg-type]
        given_match=modes.get("given", mpi_pb2.NAME_MATCH_PREFIX),  # type: ignore[arg-type]
        name_match=modes.get("name", mpi_pb2.NAME_MATCH_PREFIX),  # type: ignore[arg-type]
    )
    if values.get("identifier"):
        system, value = _token(values["identifier"])
        if system.startswith(LOCAL_ID_SYSTEM_PREFIX):
            raise _bad("search-value-invalid", "identifier: use Patient/$ihe-pix for a hospital's local id")
        search.identifier.CopyFrom(
            common_pb2.Identifier(system=system or NATIONAL_ID_SYSTEM, value=value, type="" if system else "NNCHN")
        )
    result = await rpc(request.app.state.stubs.mpi.SearchPatients(search, metadata=ctx.metadata))
    base = request.app.state.settings.public_url
    links = [
        {"relation": "self", "url": f"{base}/fhir/R4/Patient" + (f"?{urlencode(_masked(items))}" if items else "")}
    ]
    if total_only:
        counted: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset"}
        if result.HasField("total"):
            counted["total"] = result.total
        counted["link"] = links
        return JSONResponse(counted, media_type=FHIR_JSON)
    if result.next_page_token:
        # The token carries the search itself: the link repeats no name, id or phone, and works the
        # same after a POST _search.
        following = urlencode([("_count", str(count)), ("page", result.next_page_token)])
        links.append({"relation": "next", "url": f"{base}/fhir/R4/Patient?{following}"})
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset"}
    if result.HasField("total"):
        bundle["total"] = result.total
    bundle["link"] = links
    if result.results:  # JSON-FHIR has no empty arrays: an empty searchset has no entry
        bundle["entry"] = [_entry(base, r, grade=False) for r in result.results]
    return JSONResponse(bundle, media_type=FHIR_JSON)


async def _pdq_by_id(
    ctx: Context, request: Request, items: list[tuple[str, str]], values: dict[str, str], *, total_only: bool
) -> JSONResponse:
    """PDQm `_id` (ITI-78: a Supplier SHALL support it): the Patients with those ids, each read
    as a FHIR read is (masked by role and purpose); an unknown or merged-away id matches nothing."""
    if set(values) - {"_id", "_count", "_summary"}:
        raise _bad("search-parameter-combination", "_id is not combined with other search parameters")
    ids = [i.strip() for i in values["_id"].split(",")]
    if not all(ids) or len(ids) > _MAX_IDS:
        raise _bad("search-value-invalid", f"_id: one to {_MAX_IDS} comma-separated ids")
    found: list[mpi_pb2.Patient] = []
    for patient_id in dict.fromkeys(ids):
        if not _RECORD_ID.fullmatch(patient_id):
            continue
        try:
            result = await rpc(
                request.app.state.stubs.mpi.GetPatient(
                    mpi_pb2.GetPatientRequest(record_id=patient_id), metadata=ctx.metadata
                )
            )
        except ApiError as exc:
            if exc.status != 404:
                raise
            continue
        found.append(result.patient)
    base = request.app.state.settings.public_url
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": len(found),
        "link": [{"relation": "self", "url": f"{base}/fhir/R4/Patient?{urlencode(items)}"}],
    }
    if found and not total_only:
        bundle["entry"] = [
            {
                "fullUrl": f"{base}/fhir/R4/Patient/{p.record_id}",
                "resource": patient_resource(p),
                "search": {"mode": "match"},
            }
            for p in found
        ]
    return JSONResponse(bundle, media_type=FHIR_JSON)


# Han characters (CJK unified ideographs and their extensions): a name written in them has no
# space between family and given name (张伟), one in Latin letters has (Zhang Wei).
_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f]")


# What one record holds at most (as the REST registration): more is refused, not cut.
_MAX_PHONES, _MAX_IDENTIFIERS = 5, 20


def _invalid_resource(element: str, expected: str) -> ApiError:
    # Names the element, never its value (a name, id or phone).
    return _bad("resource-invalid", f"Patient.{element}: {expected}")


def _text(value: object, element: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _invalid_resource(element, "a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (JSON "\ud800"): no text a message can carry
        raise _invalid_resource(element, "valid Unicode text") from None
    return value


def _objects(container: dict[str, Any], key: str, element: str) -> list[dict[str, Any]]:
    value = container.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise _invalid_resource(element, "a list of objects")
    return value


def _texts(container: dict[str, Any], key: str, element: str) -> list[str]:
    value = container.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise _invalid_resource(element, "a list of strings")
    return [_text(item, element) for item in value]


def _name_text(family: str, given: str) -> str:
    separator = "" if _HAN.search(family + given) else " "
    return separator.join(part for part in (family, given) if part)


def _patient_message(resource: object) -> mpi_pb2.Patient:
    """The demographics of a FHIR Patient as the index takes them ($match, the ITI-104 feed): the
    first usual / official name (text, or family and given), gender, birthDate, phone telecoms,
    the first address and identifiers (the resident id as NNCHN). A hospital's local id and the
    enterprise id are not identifiers of the record (they are its reference and the exchange's
    own). A malformed element is 400 naming the element; values are checked by the index."""
    if not isinstance(resource, dict) or resource.get("resourceType") != "Patient":
        raise _bad("resource-invalid", "the resource must be a Patient")
    names = _objects(resource, "name", "name")
    chosen = next((n for n in names if n.get("use") in (None, "usual", "official")), names[0] if names else {})
    family = _text(chosen.get("family"), "name.family")
    given_parts = _texts(chosen, "given", "name.given")
    given = ("" if _HAN.search("".join(given_parts)) else " ").join(given_parts)
    text = _text(chosen.get("text"), "name.text") or _name_text(family, given)
    gender = _text(resource.get("gender"), "gender")
    if gender and gender not in _GENDERS:
        raise _invalid_resource("gender", "male | female | other | unknown")
    identifiers = []
    for ident in _objects(resource, "identifier", "identifier"):
        system, value = _text(ident.get("system"), "identifier.system"), _text(ident.get("value"), "identifier.value")
        type_ = ident.get("type")
        if type_ is not None and not isinstance(type_, dict):
            raise _invalid_resource("identifier.type", "a CodeableConcept")
        codes = {_text(c.get("code"), "identifier.type") for c in _objects(type_ or {}, "coding", "identifier.type")}
        if system == NATIONAL_ID_SYSTEM or "NNCHN" in codes:
            identifiers.append(common_pb2.Identifier(type="NNCHN", value=value))
        elif system.startswith(LOCAL_ID_SYSTEM_PREFIX) or system == ENTERPRISE_ID_SYSTEM:
            continue
        elif system or value:
            identifiers.append(common_pb2.Identifier(system=system, value=value))
    phones = [
        _text(t.get("value"), "telecom.value")
        for t in _objects(resource, "telecom", "telecom")
        if _text(t.get("system"), "telecom.system") == "phone"
    ]
    if len(phones) > _MAX_PHONES or len(identifiers) > _MAX_IDENTIFIERS:
        raise _invalid_resource("telecom" if len(phones) > _MAX_PHONES else "identifier", "too many entries")
    addresses = _objects(resource, "address", "address")
    address = addresses[0] if addresses else {}
    return mpi_pb2.Patient(
        name=mpi_pb2.HumanName(text=text, family=family, given=given),
        gender=_GENDERS.get(gender, mpi_pb2.GENDER_UNKNOWN),
        birth_date=_text(resource.get("birthDate"), "birthDate"),
        identifiers=identifiers,
        phones=phones,
        address=mpi_pb2.Address(
            province=_text(address.get("state"), "address.state"),
            city=_text(address.get("city"), "address.city"),
            district=_text(address.get("district"), "address.district"),
            line=" ".join(_texts(address, "line", "address.line")),
            postal_code=_text(address.get("postalCode"), "address.postalCode"),
        ),
    )


@router.post(
    "/Patient/$match",
    response_class=JSONResponse,
    responses={200: {"content": {FHIR_JSON: {}}, "description": "a searchset Bundle scored and graded"}},
)
async def match_patient(ctx: Context, request: Request, parameters: Annotated[dict[str, Any], Body()]) -> JSONResponse:
    """FHIR Patient/$match: candidates for the given Patient, best first, with `search.score`
    (probability) and the match-grade extension (certain / probable / possible)."""
    ctx.require_scope("Patient", "r")
    if parameters.get("resourceType") != "Parameters":
        raise _bad("parameters-invalid", "the body must be a Parameters resource")
    validate_resource(parameters, "Parameters")
    resource: dict[str, Any] | None = None
    count, only_certain = 10, False
    for parameter in parameters.get("parameter") or []:
        if not isinstance(parameter, dict):
            raise _bad("parameters-invalid", "the body must be a Parameters resource")
        name = parameter.get("name")
        if name == "resource":
            resource = parameter.get("resource")
        elif name == "count":
            count = parameter.get("valueInteger", 10)
        elif name == "onlyCertainMatches":
            only_certain = parameter.get("valueBoolean") is True
    if resource is None:
        raise _bad("parameters-invalid", "the resource parameter is required")
    validate_resource(resource, "Patient", root="Parameters.parameter.resource")
    if not isinstance(count, int) or not 1 <= count <= 100:
        raise _bad("parameters-invalid", "count must be 1 to 100")
    result = await rpc(
        request.app.state.stubs.mpi.MatchPatient(
            mpi_pb2.MatchPatientRequest(patient=_patient_message(resource), count=count, only_certain=only_certain),
            metadata=ctx.metadata,
        )
    )
    base = request.app.state.settings.public_url
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset", "total": len(result.results)}
    if result.results:  # JSON-FHIR has no empty arrays
        bundle["entry"] = [_entry(base, r, grade=True) for r in result.results]
    return JSONResponse(bundle, media_type=FHIR_JSON)


@router.get("/Patient/$ihe-pix", response_class=JSONResponse)
async def ihe_pix(
    ctx: Context,
    request: Request,
    source_identifier: str = Query(alias="sourceIdentifier", max_length=300),
    target_system: list[str] = Query(default=[], alias="targetSystem"),
) -> JSONResponse:
    """IHE PIXm: the person's identifiers in other domains, from one local identifier
    (`sourceIdentifier=urn:hie:patient-id:<domain>|<local id>`). Not found is 404."""
    ctx.require_scope("Patient", "r")
    system, value = _token(source_identifier)
    if not system.startswith(LOCAL_ID_SYSTEM_PREFIX) or not value:
        raise _bad("source-identifier-invalid", f"sourceIdentifier: {LOCAL_ID_SYSTEM_PREFIX}<domain>|<local id>")
    targets = []
    for target in target_system:
        if target == ENTERPRISE_ID_SYSTEM:
            continue
        if not target.startswith(LOCAL_ID_SYSTEM_PREFIX):
            # IHE PIXm: "targetSystem ... not recognized" is a 403 with an OperationOutcome.
            raise ApiError(403, "target-system-unknown", "targetSystem is not a domain of this exchange")
        targets.append(target.removeprefix(LOCAL_ID_SYSTEM_PREFIX))
    result = await rpc(
        request.app.state.stubs.mpi.CrossReference(
            mpi_pb2.CrossReferenceRequest(
                ref=common_pb2.PatientRef(domain=system.removeprefix(LOCAL_ID_SYSTEM_PREFIX), local_id=value),
                target_domains=targets,
            ),
            metadata=ctx.metadata,
        )
    )
    parameter: list[dict[str, Any]] = [
        {
            "name": "targetIdentifier",
            "valueIdentifier": {"system": f"{LOCAL_ID_SYSTEM_PREFIX}{ref.domain}", "value": ref.local_id},
        }
        for ref in result.refs
        if not (ref.domain == system.removeprefix(LOCAL_ID_SYSTEM_PREFIX) and ref.local_id == value)
    ]
    if not target_system or ENTERPRISE_ID_SYSTEM in target_system:
        parameter.append(
            {
                "name": "targetIdentifier",
                "valueIdentifier": {"system": ENTERPRISE_ID_SYSTEM, "value": result.enterprise_id},
            }
        )
    return JSONResponse({"resourceType": "Parameters", "parameter": parameter}, media_type=FHIR_JSON)


# --- PIXm Patient Identity Feed FHIR (ITI-104) ------------------------------------------------

# A Patient resource is small; anything near the facade's document limit is not one.
_FEED_BODY_LIMIT = 64 * 1024


def _own_local_id(ctx: Context, system: str, value: str, element: str) -> str:
    """The local id of an identifier of the calling hospital's own domain."""
    if system != f"{LOCAL_ID_SYSTEM_PREFIX}{ctx.caller.organization_id}":
        # IHE PIXm ITI-104 (2:3.104.5): "The Patient Identifier Cross-reference Manager should check
        # that the Patient Identity Source is only making changes to Patient Identifier Domain for
        # which it is authorized." A hospital feeds its own domain only.
        raise ApiError(
            403,
            "identifier-domain-forbidden",
            f"{element}: only your own domain's system ({LOCAL_ID_SYSTEM_PREFIX}<your organisation>) may be fed",
        )
    if not value:
        raise _bad("identifier-invalid", f"{element}: a local id is required")
    return value


def _survivor(ctx: Context, links: list[dict[str, Any]], active: bool) -> str:
    """The surviving local id of a Resolve Duplicate Patient message (ITI-104 2:3.104.4.2.2: "a link
    of type 'replaced-by' shall be added with the identifier pointing to the surviving patient
    identifier")."""
    if not links:
        raise ApiError(
            422,
            "patient-inactive-unsupported",
            "active=false needs a replaced-by link (a merge); removing a patient is not supported",
        )
    if len(links) != 1 or links[0].get("type") != "replaced-by":
        raise ApiError(422, "link-unsupported", "Patient.link: one link, of type replaced-by (a merge)")
    if active:
        raise _invalid_resource("active", "false on a Patient replaced by another")
    other = links[0].get("other")
    identifier = other.get("identifier") if isinstance(other, dict) else None
    if not isinstance(identifier, dict):
        raise _invalid_resource("link.other.identifier", "the surviving record's identifier")
    return _own_local_id(
        ctx,
        _text(identifier.get("system"), "link.other.identifier.system"),
        _text(identifier.get("value"), "link.other.identifier.value"),
        "Patient.link.other.identifier",
    )


def _retired_resource(subsumed: mpi_pb2.Patient, survivor: mpi_pb2.Patient) -> dict[str, Any]:
    """A record a merge retired, as FHIR has it (Patient.link, "replaced-by")."""
    resource = patient_resource(subsumed)
    resource["active"] = False
    other: dict[str, Any] = {"reference": f"Patient/{survivor.record_id}"}
    if survivor.ref.local_id:
        system = f"{LOCAL_ID_SYSTEM_PREFIX}{survivor.ref.domain}"
        other["identifier"] = {"system": system, "value": survivor.ref.local_id}
    resource["link"] = [{"other": other, "type": "replaced-by"}]
    return resource


async def _check_resource_id(ctx: Context, request: Request, resource_id: object, local_id: str) -> None:
    """FHIR R4 conditional update: an id in the resource must be the id of the record matched;
    the index assigns ids itself (no update-as-create)."""
    if not isinstance(resource_id, str):
        raise _invalid_resource("id", "a string")
    try:
        found = await rpc(
            request.app.state.stubs.mpi.GetPatient(
                mpi_pb2.GetPatientRequest(
                    ref=common_pb2.PatientRef(domain=ctx.caller.organization_id, local_id=local_id)
                ),
                metadata=ctx.metadata,
            )
        )
    except ApiError as exc:
        if exc.status != 404:
            raise
        raise _bad("resource-id-unknown", "Patient.id: the exchange assigns ids; leave it out to add one") from None
    if found.patient.record_id != resource_id:
        raise _bad("resource-id-mismatch", "Patient.id is not the id of the record the identifier names")


@router.put(
    "/Patient",
    response_class=JSONResponse,
    responses={
        200: {"content": {FHIR_JSON: {}}, "description": "the record revised (or, for a merge, retired)"},
        201: {"content": {FHIR_JSON: {}}, "description": "the record added"},
    },
)
async def patient_identity_feed(
    ctx: Context,
    request: Request,
    key: IdempotencyKey,
    identifier: str = Query(max_length=300, description=f"{LOCAL_ID_SYSTEM_PREFIX}<your organisation>|<local id>"),
) -> JSONResponse:
    """IHE PIXm Patient Identity Feed FHIR (ITI-104), a FHIR conditional update on the hospital's
    own identifier: adds (201) or revises (200) the record, whose link the index re-decides; a
    Patient with active=false and a `replaced-by` link to another local id of the hospital merges
    it into that survivor (200, the retired record). Errors are OperationOutcomes naming
    elements, never their values."""
    ctx.require_scope("Patient", "c")
    if ctx.caller.organization_type != "hospital":
        raise ApiError(403, "not-a-hospital", "only a hospital feeds its patients")
    items = list(request.query_params.multi_items())
    if [name for name, _ in items] != ["identifier"]:
        raise _bad("conditional-update-invalid", "PUT Patient takes one parameter: identifier=<system>|<local id>")
    system, bar, value = identifier.partition("|")
    if not bar:
        raise _bad("conditional-update-invalid", "identifier: <system>|<local id>")
    local_id = _own_local_id(ctx, system, value, "identifier")
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type not in ("", "application/fhir+json", "application/json"):
        raise ApiError(415, "media-type-unsupported", "send the Patient as application/fhir+json")
    body = await request.body()
    if len(body) > _FEED_BODY_LIMIT:
        raise ApiError(413, "body-too-large", "a Patient resource is at most 64 KiB")
    try:
        resource = json.loads(body)
    except (ValueError, RecursionError):
        raise _bad("resource-invalid", "the body is not JSON") from None
    patient = _patient_message(validate_resource(resource, "Patient"))
    local_ids = [
        (ident.get("system"), ident.get("value"))
        for ident in resource.get("identifier") or []
        if str(ident.get("system")).startswith(LOCAL_ID_SYSTEM_PREFIX)
    ]
    if (system, local_id) not in local_ids:
        # The conditional update's identifier is the record's; the resource must carry it.
        raise _bad("identifier-mismatch", "Patient.identifier must contain the identifier of the URL")
    for other_system, other_value in local_ids:
        if (other_system, other_value) != (system, local_id):
            _own_local_id(ctx, str(other_system), str(other_value), "Patient.identifier")
            raise _invalid_resource("identifier", "one local id of your domain per Patient")
    active = resource.get("active", True)
    if not isinstance(active, bool):
        raise _invalid_resource("active", "a boolean")
    links = _objects(resource, "link", "link")
    if "id" in resource:
        await _check_resource_id(ctx, request, resource["id"], local_id)
    if links or not active:
        # Resolve Duplicate Patient: the record named by the URL is retired into the survivor.
        survivor = _survivor(ctx, links, active)
        ctx.require_scope("Patient", "u")
        merged = await rpc(
            request.app.state.stubs.mpi.MergePatients(
                mpi_pb2.MergePatientsRequest(survivor_local_id=survivor, subsumed_local_id=local_id),
                metadata=ctx.metadata,
            )
        )
        return JSONResponse(_retired_resource(merged.subsumed, merged.survivor), media_type=FHIR_JSON)
    patient.ref.local_id = local_id
    result = await rpc(
        request.app.state.stubs.mpi.RegisterPatient(
            mpi_pb2.RegisterPatientRequest(patient=patient, idempotency_key=key),
            metadata=ctx.metadata,
        )
    )
    # Masked as a read of the record is (the service's one masking of every Patient it returns).
    location = f"{request.app.state.settings.public_url}/fhir/R4/Patient/{result.patient.record_id}"
    return JSONResponse(
        patient_resource(result.patient),
        status_code=201 if result.created else 200,
        media_type=FHIR_JSON,
        headers={"Location": location},
    )


# Not an operation the API offers (always 405): left out of the OpenAPI document.
@router.delete("/Patient", response_class=JSONResponse, include_in_schema=False)
async def remove_patient(ctx: Context) -> JSONResponse:
    """ITI-104 Remove Patient (conditional delete) is an option this Manager does not support: a
    hospital retires a record by merging it (replaced-by), the exchange keeps every identity it
    cross-referenced (documents may name it)."""
    # FHIR R4 http.html (delete): a server that refuses to delete resources of a type on principle
    # returns 405 Method Not Allowed.
    raise ApiError(
        405,
        "remove-patient-unsupported",
        "removing a patient is not supported; merge it into the surviving record (replaced-by)",
        headers={"Allow": "GET, PUT"},
    )


@router.get("/Patient/{patient_id}", response_class=JSONResponse)
async def read_patient(patient_id: str, ctx: Context, request: Request) -> JSONResponse:
    """FHIR read of one index record by the id PDQ gave it (IHE PDQm: Patient read), masked as
    the caller's role and purpose allow. Unknown, merged away or malformed ids are 404."""
    ctx.require_scope("Patient", "r")
    if not _RECORD_ID.fullmatch(patient_id):
        raise ApiError(404, "patient-not-found", "no Patient with that id")
    result = await rpc(
        request.app.state.stubs.mpi.GetPatient(mpi_pb2.GetPatientRequest(record_id=patient_id), metadata=ctx.metadata)
    )
    return JSONResponse(patient_resource(result.patient), media_type=FHIR_JSON)
